"""The Prometheus endpoint: the text format, counters that survive workers, serving.

Snapshots are written by the real ``Reporter`` of a handler serving a texthash file
(this process stands for one worker) and by hand for worker processes the test starts
and kills; ``proxymap-master metrics`` is run as a command and scraped over loopback
TCP and a UNIX socket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from master import stats as reader
from master.multi_server import MultiServer
from master.prometheus import Exporter, MetricsError, parse_listen
from proxymap import stats as writer
from proxymap.handler import RequestHandler
from proxymap.protocol import G1, Request
from proxymap.server import ProxymapService
from tests.support.servers import free_port

MASTER = str(Path(sys.executable).parent / "proxymap-master")


def tree(tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    conf = tmp_path / "conf"
    conf.mkdir()
    queue = tmp_path / "queue"
    (queue / reader.DIRECTORY).mkdir(parents=True)
    (conf / "main.cf").write_text(f"queue_directory = {queue}\n{extra}")
    return conf, queue / reader.DIRECTORY


def worker_snapshot(pid: int, lookups: int, retry: int = 0) -> dict:
    return {
        "format": 1,
        "pid": pid,
        "start_ticks": reader.process_start_ticks(pid),
        "service": "proxymap",
        "generation": 0,
        "started": time.time(),
        "written": time.time(),
        "last_request": None,
        "clients": 1,
        "in_flight": 0,
        "connections_served": 0,
        "max_use": 100,
        "max_idle": 100,
        "bad": 0,
        "window": 60,
        "tables": {
            "mysql:/m.cf": {
                "lookups": lookups,
                "hits": lookups - retry,
                "misses": 0,
                "retry": retry,
                "config": 0,
                "deny": 0,
                "latency": {
                    "samples": 1,
                    "sampling": 1,
                    "max_ms": 2.0,
                    "smoothed_ms": 2.0,
                    "histogram": [[2000.0, 1]],
                },
                "backend": {
                    "open": 1,
                    "in_use": 0,
                    "waiting": 0,
                    "limit": 8,
                    "connects": 2,
                    "failovers": 0,
                    "down": [],
                },
            }
        },
    }


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    assert match, (name, labels, text)
    return float(match.group(1))


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9154") == ("inet", ("127.0.0.1", 9154))
    assert parse_listen("[::1]:9154") == ("inet", ("::1", 9154))
    assert parse_listen("localhost:80") == ("inet", ("127.0.0.1", 80))
    assert parse_listen("unix:/run/m.sock") == ("unix", "/run/m.sock")
    for bad in ("0.0.0.0:9154", "192.0.2.1:1", "example.com:1", "unix:relative", "9154"):
        with pytest.raises(MetricsError):
            parse_listen(bad)


def test_a_real_reporter_rendered(tmp_path):
    conf, directory = tree(tmp_path)
    table = tmp_path / "aliases"
    table.write_text("alice alice@example.com\n")
    spec = f"texthash:{table}"
    handler = RequestHandler("proxymap", [spec], {})
    for key in (b"alice", b"alice", b"bob"):
        handler.handle(Request("lookup", spec, G1, flags=0x80041, key=key))
    handler.handle(Request("lookup", "texthash:/denied", G1, flags=0x80041, key=b"x"))
    server = MultiServer(ProxymapService(), ["proxymap"])
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    reporter = writer.Reporter(server, handler, fd, writer.StatsSettings())
    reporter.update()
    try:
        text = Exporter(str(directory.parent.parent)).render()
    finally:
        reporter.close()
        os.close(fd)
    labels = {"service": "proxymap", "table": spec}
    assert sample(text, "pyproxymap_lookups_total", **labels) == 3
    assert sample(text, "pyproxymap_hits_total", **labels) == 2
    assert sample(text, "pyproxymap_misses_total", **labels) == 1
    assert (
        sample(
            text,
            "pyproxymap_answers_total",
            service="proxymap",
            table="texthash:/denied",
            status="deny",
        )
        == 1
    )
    assert sample(text, "pyproxymap_workers", service="proxymap") == 1
    assert 0 < sample(text, "pyproxymap_lookup_latency_seconds", **labels, quantile="0.5") < 0.1
    # Every metric once, with its HELP and TYPE first.
    names = re.findall(r"^# TYPE (\S+) (counter|gauge)$", text, re.M)
    assert len(names) == len({name for name, _ in names})
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r"^[a-z_]+\{[^}]*\} \S+$", line), line


def test_counters_keep_the_counts_of_workers_that_exit(tmp_path):
    _, directory = tree(tmp_path)
    exporter = Exporter(str(directory.parent.parent))
    workers = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)
    ]
    try:
        for worker, lookups in zip(workers, (10, 5), strict=True):
            (directory / f"{worker.pid}.json").write_text(
                json.dumps(worker_snapshot(worker.pid, lookups, retry=1))
            )
        labels = {"service": "proxymap", "table": "mysql:/m.cf"}
        text = exporter.render()
        assert sample(text, "pyproxymap_lookups_total", **labels) == 15
        assert sample(text, "pyproxymap_backend_connection_limit", **labels) == 16
        workers[0].kill()
        workers[0].wait()
        text = exporter.render()  # the dead worker's file goes, its counts stay
        assert not (directory / f"{workers[0].pid}.json").exists()
        assert sample(text, "pyproxymap_lookups_total", **labels) == 15
        assert sample(text, "pyproxymap_answers_total", **labels, status="retry") == 2
        assert sample(text, "pyproxymap_backend_connects_total", **labels) == 4
        assert sample(text, "pyproxymap_workers", service="proxymap") == 1
        assert sample(text, "pyproxymap_backend_connection_limit", **labels) == 8  # a gauge
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_off_by_default(tmp_path):
    conf, _ = tree(tmp_path)
    done = subprocess.run(
        [MASTER, "-c", str(conf), "metrics"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 78
    assert "pyproxymap_metrics_listen is empty" in done.stderr
    once = subprocess.run(
        [MASTER, "-c", str(conf), "metrics", "--once"], capture_output=True, text=True, timeout=30
    )
    assert once.returncode == 0 and once.stdout == ""


def scrape_unix(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


@pytest.mark.parametrize("kind", ["inet", "unix"])
def test_served_by_the_command(tmp_path, kind):
    listen = f"127.0.0.1:{free_port()}" if kind == "inet" else f"unix:{tmp_path}/metrics.sock"
    conf, directory = tree(tmp_path, f"pyproxymap_metrics_listen = {listen}\n")
    (directory / f"{os.getpid()}.json").write_text(json.dumps(worker_snapshot(os.getpid(), 7)))
    command = subprocess.Popen(
        [MASTER, "-c", str(conf), "metrics"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if kind == "inet":
                    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as reply:
                        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                        text = reply.read().decode()
                else:
                    text = scrape_unix(tmp_path / "metrics.sock")
                break
            except OSError:
                assert command.poll() is None, command.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert (
            sample(text, "pyproxymap_lookups_total", service="proxymap", table="mysql:/m.cf") == 7
        )
        if kind == "unix":
            assert oct((tmp_path / "metrics.sock").stat().st_mode & 0o777) == "0o660"
    finally:
        command.send_signal(signal.SIGINT)
        command.wait(10)
