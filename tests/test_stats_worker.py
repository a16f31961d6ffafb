"""Live statistics of real workers: known traffic in, exact figures out.

Two set-ups serve the same four kinds of table through our worker:

* ``aliases`` (texthash): hits and misses;
* a name that is not approved: DENY;
* ``slow`` (socketmap): the server of tests/bench/slow_socketmap.py, answering after
  150 ms -- timed, and the slow-table warning (threshold 100ms) logged once;
* ``dead`` (socketmap): a port nobody listens on -- RETRY, the server listed as down.

Under the real Postfix master (drop-in: no master of ours) the figures are read with
``proxymap-query --stats``; then the worker is killed with SIGKILL: its file is stale,
the next reader removes it, and the worker Postfix spawns next starts from zero. Under
our master they are read with ``proxymap-master status`` (``--json``, the table,
``--watch``), and across a reload the retired generation's figures disappear with it.
Counts are checked exactly, latencies within bounds, and the process title shows its
one-line summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.postfix import (
    PrivatePostfix,
    ProxymapClient,
    ensure_postfix,
    run_postmap,
    settle_files,
)
from tests.support.servers import free_port

VENV_BIN = Path(sys.executable).parent
OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or VENV_BIN / "proxymap")
QUERY = str(VENV_BIN / "proxymap-query")
MASTER = str(VENV_BIN / "proxymap-master")
SLOW_SERVER = Path(__file__).parent / "bench" / "slow_socketmap.py"
DELAY_MS = 150
DENIED = "texthash:/nonexistent/denied"
SETTINGS = {
    "pyproxymap_verbose_proctitle": "yes",
    "pyproxymap_slow_table_threshold": "100ms",
    "pyproxymap_socketmap_timeout": "5",
}


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def slow_server():
    port = free_port()
    process = subprocess.Popen([sys.executable, str(SLOW_SERVER), str(port), str(DELAY_MS)])

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, 10, "the slow socketmap server")
        yield f"socketmap:inet:127.0.0.1:{port}:slow"
    finally:
        process.kill()
        process.wait()


def dead_table() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"socketmap:inet:127.0.0.1:{port}:dead"


class Tables:
    """The table names of one set-up, and the traffic with the figures it must give."""

    def __init__(self, directory: Path, slow: str) -> None:
        (directory / "warm").write_text("ready yes\n")
        (directory / "aliases").write_text("alice alice@example.com\nbob bob@example.com\n")
        directory.chmod(0o755)
        self.warm = f"texthash:{directory}/warm"
        self.aliases = f"texthash:{directory}/aliases"
        self.slow = slow
        self.dead = dead_table()

    @property
    def proxy_read_maps(self) -> str:
        return " ".join(f"proxy:{name}" for name in (self.warm, self.aliases, self.slow, self.dead))

    def drive(self, lookup: Callable[[str, str], int]) -> None:
        """Known traffic; ``lookup(table, key)`` answers the status."""
        statuses = [lookup(self.aliases, key) for key in ("alice", "bob", "carol", "alice")]
        statuses += [lookup(DENIED, "alice") for _ in range(2)]
        statuses += [lookup(self.slow, f"key{number}") for number in range(4)]
        statuses += [lookup(self.dead, f"key{number}") for number in range(3)]
        assert statuses == [0, 0, 1, 0, 4, 4, 0, 0, 0, 0, 2, 2, 2], statuses

    def check(self, tables: dict) -> None:
        """The figures of ``drive`` (the warm-up table aside), summed over the workers."""

        def counts(name: str) -> tuple[int, ...]:
            figures = tables[name]
            return tuple(
                figures[field] for field in ("lookups", "hits", "misses", "retry", "config", "deny")
            )

        assert counts(self.aliases) == (4, 3, 1, 0, 0, 0)
        assert counts(DENIED) == (0, 0, 0, 0, 0, 2)
        assert counts(self.slow) == (4, 4, 0, 0, 0, 0)
        assert counts(self.dead) == (3, 0, 0, 3, 0, 0)
        assert "backend" not in tables[self.aliases]
        slow = tables[self.slow]
        latency = slow["latency"]
        assert latency["samples"] == 4
        assert DELAY_MS <= latency["p50_ms"] <= DELAY_MS * 1.5, latency
        assert DELAY_MS <= latency["p99_ms"] <= 1000 and DELAY_MS <= latency["max_ms"] < 1000
        # One connection per worker that served it (sequential lookups), 16 allowed each.
        backend = slow["backend"]
        assert 1 <= backend["open"] == backend["connects"] <= slow["workers"]
        assert backend["limit"] == 16 * slow["workers"] and backend["down"] == []
        dead = tables[self.dead]["backend"]
        assert dead["open"] == 0 and dead["connects"] == 0
        port = self.dead.split(":")[3]
        assert [down.split(": ")[0] for down in dead["down"]] == [f"inet:127.0.0.1:{port}"]

    def ready(self, tables: dict) -> bool:
        """The snapshot holds all of ``drive`` (it is written once a second)."""
        return (
            all(name in tables for name in (self.aliases, DENIED, self.slow, self.dead))
            and tables[self.dead]["lookups"] == 3
        )


def status_of(client: ProxymapClient, table: str, key: str) -> int:
    return int(client.lookup(table, key)["status"])


def proc_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


TITLE = re.compile(
    r"\[(\d+) clients, (\d+) busy, (\d+) lookups, (\d+) retry, "
    r"(\d+)/100 served\]$"
)


# --- under the real Postfix master ---------------------------------------------------------------
def query_stats(conf: Path) -> dict:
    done = subprocess.run(
        [QUERY, "-c", str(conf), "--stats", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.serial
def test_figures_under_the_postfix_master(slow_server):
    ensure_postfix()
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP, name="stats-worker", proxymap_maxproc="1", main_cf=SETTINGS
    )
    tables = Tables(instance.tables, slow_server)
    instance.proxy_read_maps = tables.proxy_read_maps
    settle_files(instance.tables)
    with instance:
        instance.wait_until_serving("ready", tables.warm)
        [pid] = instance.wait_for_workers()
        with instance.client() as client:
            tables.drive(lambda table, key: status_of(client, table, key))
            figures = wait_for(
                lambda: (
                    (f := query_stats(instance.conf_dir))["services"]
                    and tables.ready(f["services"]["proxymap"]["tables"])
                    and f
                ),
                what="the snapshot",
            )
            service = figures["services"]["proxymap"]
            tables.check(service["tables"])
            [worker] = service["workers"]
            assert worker["pid"] == pid and worker["clients"] == 1
            assert worker["max_use"] == 100
            # The title: refreshed by the same tick, with the same figures.
            lookups = sum(t["lookups"] for t in service["tables"].values())
            title = wait_for(
                lambda: (m := TITLE.search(proc_title(pid))) and int(m.group(3)) == lookups and m,
                what="the process title",
            )
            assert proc_title(pid).startswith("proxymap ")
            clients, busy, _, retry, uses = map(int, title.groups())
            assert (clients, busy, retry) == (1, 0, 3)
            assert uses == worker["connections_served"]
        text = subprocess.run(
            [QUERY, "-c", str(instance.conf_dir), "--stats"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert re.search(
            rf"\s4\s+75\.0\s+1\s+0\s+0\s+0\s.*{re.escape(tables.aliases)}$", text, re.M
        ), text
        assert f"down: inet:127.0.0.1:{tables.dead.split(':')[3]}: " in text
        log = instance.maillog()
        slow_lines = [line for line in log.splitlines() if "is slow" in line]
        assert len(slow_lines) == 1, slow_lines
        assert f"warning: table {tables.slow} is slow: smoothed lookup latency " in slow_lines[0]

        # kill -9: the file stays behind, a reader removes it; the next worker starts afresh.
        directory = instance.queue_dir / "pid" / "pyproxymap-stats"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not instance.worker_pids(), what="the worker to die")
        assert (directory / f"{pid}.json").exists()
        assert query_stats(instance.conf_dir)["services"] == {}
        assert not (directory / f"{pid}.json").exists()
        assert instance.postmap_q("alice", f"proxy:{tables.aliases}") == (0, "alice@example.com")
        [new_pid] = instance.wait_for_workers()
        figures = wait_for(
            lambda: (
                (f := query_stats(instance.conf_dir))["services"]
                and f["services"]["proxymap"]["tables"]
                and f
            ),
            what="the new worker's snapshot",
        )
        [worker] = figures["services"]["proxymap"]["workers"]
        assert worker["pid"] == new_pid != pid
        aliases = figures["services"]["proxymap"]["tables"][tables.aliases]
        assert (aliases["lookups"], aliases["hits"]) == (1, 1)

        # The Postfix master stops its children with SIGTERM, which ends them at once:
        # their files stay until a reader (or the next worker) sees the pids are gone.
        instance.stop()
        assert query_stats(instance.conf_dir)["services"] == {}
        assert not any(directory.glob("*.json"))


# --- under our master --------------------------------------------------------------------------
class OurMaster:
    """A private tree with our master and our worker (test_arbiter's Instance, smaller)."""

    def __init__(self, slow: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="stats-master-", dir="/tmp"))
        self.root.chmod(0o755)
        self.conf = self.root / "conf"
        daemon = self.root / "daemon"
        table_dir = self.root / "tables"
        for directory in (self.conf, daemon, table_dir):
            directory.mkdir()
        (daemon / "proxymap").symlink_to(OUR_PROXYMAP)
        self.tables = Tables(table_dir, slow)
        settings = "".join(f"{name} = {value}\n" for name, value in SETTINGS.items())
        (self.conf / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            "queue_directory = $config_directory/../queue\n"
            "daemon_directory = $config_directory/../daemon\n"
            f"proxy_read_maps = {self.tables.proxy_read_maps}\n" + settings
        )
        (self.conf / "master.cf").write_text(
            "proxymap unix - - n - 2 proxymap -o pyproxymap_prefork=2\n"
        )
        settle_files(self.conf, table_dir)
        self.process: subprocess.Popen | None = None

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MASTER, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        with open(self.root / "master.log", "ab") as log:
            self.process = subprocess.Popen(
                [MASTER, "-c", str(self.conf), "start"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for(lambda: self.postmap(self.tables.warm, "ready") == 0, 20, "our master")

    def postmap(self, table: str, key: str) -> int | str:
        return run_postmap(["-q", key, f"proxy:{table}"], conf_dir=self.conf).exit

    def status(self) -> dict:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if os.environ.get("PYPROXYMAP_KEEP_TREES") != "1":
            shutil.rmtree(self.root, ignore_errors=True)


def postmap_status(master: OurMaster, table: str, key: str) -> int:
    """postmap's exit as a proxymap status: 0 found, 1 not found; DENY and RETRY are
    fatal errors for postmap (exit 1), told apart by its message."""
    result = run_postmap(["-q", key, f"proxy:{table}"], conf_dir=master.conf)
    if result.exit in (0, 1) and "fatal" not in result.stderr:
        return result.exit
    if "is not configured for table" in result.stderr:
        return 4
    if "temporary failure" in result.stderr or "query error" in result.stderr:
        return 2
    raise AssertionError(f"postmap: {result}")


@pytest.mark.serial
def test_figures_under_our_master(slow_server):
    ensure_postfix()
    master = OurMaster(slow_server)
    tables = master.tables
    try:
        master.start()
        tables.drive(lambda table, key: postmap_status(master, table, key))
        state = wait_for(
            lambda: (
                (s := master.status())["statistics"]["services"]
                and tables.ready(s["statistics"]["services"]["proxymap"]["tables"])
                and s
            ),
            what="the snapshots",
        )
        service = state["statistics"]["services"]["proxymap"]
        tables.check(service["tables"])
        generation = state["generation"]
        worker_pids = {w["pid"] for w in state["services"][0]["workers"]}
        assert {w["pid"] for w in service["workers"]} <= worker_pids
        assert all(w["generation"] == generation for w in service["workers"])

        text = master.cli("status")
        assert text.returncode == 0, text.stderr
        assert "LOOKUPS  HIT%" in text.stdout and tables.slow in text.stdout
        assert re.search(
            r"^\s+3\s+0\.0\s+0\s+3\s+0\s+0\s.*" + re.escape(tables.dead) + "$", text.stdout, re.M
        ), text.stdout

        watch = subprocess.Popen(
            [MASTER, "-c", str(master.conf), "status", "--watch", "0.3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        watch.send_signal(signal.SIGINT)
        output, _ = watch.communicate(timeout=10)
        assert watch.returncode == 0
        assert output.count("master pid ") >= 2

        # A reload retires the workers; their figures go with them.
        assert master.cli("reload").returncode == 0
        wait_for(
            lambda: (
                (s := master.status())["generation"] > generation
                and all(
                    w["generation"] > generation
                    for w in s["statistics"]["services"].get("proxymap", {}).get("workers", [])
                )
            ),
            what="the old generation's snapshots to go",
        )
        assert master.postmap(tables.aliases, "alice") == 0
        state = wait_for(
            lambda: (
                (s := master.status())["statistics"]["services"]
                and tables.aliases in s["statistics"]["services"]["proxymap"]["tables"]
                and s
            ),
            what="the new generation's figures",
        )
        aliases = state["statistics"]["services"]["proxymap"]["tables"][tables.aliases]
        assert (aliases["lookups"], aliases["hits"]) == (1, 1)
    finally:
        master.stop()
