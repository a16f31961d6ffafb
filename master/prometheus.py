"""The workers' live statistics as a Prometheus text endpoint (off by default).

NAME
    prometheus -- ``proxymap-master metrics``: the snapshots in the text exposition format

SYNOPSIS
    proxymap-master [-c DIR] metrics [--once]

    main.cf:  pyproxymap_metrics_listen = 127.0.0.1:9154
              pyproxymap_metrics_listen = unix:/run/pyproxymap/metrics.sock

DESCRIPTION
    Serves ``GET /metrics`` on the loopback address and port, or the UNIX socket, named
    by ``pyproxymap_metrics_listen``; empty (the default) means off and the command
    refuses to start. ``--once`` prints the text once and exits (for node_exporter's
    textfile collector, from cron or a timer). Runs beside either master: it reads the
    workers' snapshot files (``master.stats``) and needs nothing from the master.

    Pre-forked workers come and go; a counter summed over the running workers would
    drop whenever one exits. As prometheus_client's multiprocess mode keeps the
    counts of dead processes, this process reads the snapshots every second and, when
    a worker is gone, adds its last counts to a retired total per service and table,
    so the ``_total`` counters only grow while it runs (at most the last second of an
    exiting worker is lost; a restart of this command is a counter reset, which
    Prometheus handles). Gauges (connections, clients, latency over the last minute)
    are those of the running workers.

    Why not prometheus_client itself: its counters in multiprocess mode cost a lock and
    an mmap write per increment, on every lookup of every worker; the snapshots are
    already the per-process store, so only the text format is needed here.

    Metrics (labels ``service`` and ``table``):
    ``pyproxymap_lookups_total``, ``_hits_total``, ``_misses_total``,
    ``pyproxymap_answers_total{status="retry|config|deny"}``,
    ``pyproxymap_lookup_latency_seconds{quantile="0.5|0.99|1"}`` (last minute),
    ``pyproxymap_backend_connections{state="open|in_use|waiting"}``,
    ``pyproxymap_backend_connection_limit``, ``pyproxymap_backend_connects_total``,
    ``pyproxymap_backend_failovers_total``, ``pyproxymap_backend_servers_down``;
    per service ``pyproxymap_workers``, ``pyproxymap_clients``,
    ``pyproxymap_requests_in_flight``.

SECURITY
    Only loopback addresses are accepted (the figures name tables and servers); a UNIX
    socket is created mode 0660.

SEE ALSO
    master.stats, proxymap.stats, https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler

from master.stats import aggregate, read_snapshots, stats_directory, writer_alive

LISTEN_PARAMETER = "pyproxymap_metrics_listen"
RETIRED = ("lookups", "hits", "misses", "retry", "config", "deny")
BACKEND_RETIRED = ("connects", "failovers")
POLL = 1.0


class MetricsError(ValueError):
    """A listen address this command will not use."""


def parse_listen(text: str) -> tuple[str, str | tuple[str, int]]:
    """("unix", path) or ("inet", (host, port)); loopback hosts only."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise MetricsError(f"{LISTEN_PARAMETER}: {text}: the socket path must be absolute")
        return "unix", path
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise MetricsError(f"{LISTEN_PARAMETER}: {text}: expected host:port or unix:/path")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise MetricsError(f"{LISTEN_PARAMETER}: {text}: only a loopback address is allowed")
    return "inet", (host, int(port))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels.items()) + "}"


class Exporter:
    """Reads the snapshots, keeps the counts of workers that are gone, renders text."""

    def __init__(self, queue_directory: str) -> None:
        self.directory = stats_directory(queue_directory)
        self.lock = threading.Lock()
        self.live: dict[tuple[int, object], dict] = {}
        self.retired: dict[tuple[str, str], dict[str, int]] = {}

    def poll(self) -> list[dict]:
        """Read the snapshots; fold the last figures of workers that are gone."""
        snapshots = read_snapshots(self.directory)
        with self.lock:
            current = {(doc["pid"], doc.get("start_ticks")): doc for doc in snapshots}
            for key, doc in self.live.items():
                if key in current:
                    continue
                if writer_alive(*key):  # unreadable for a moment: keep what we had
                    current[key] = doc
                    snapshots.append(doc)
                else:
                    self._retire(doc)
            self.live = current
        return snapshots

    def _retire(self, doc: dict) -> None:
        service = str(doc.get("service") or "?")
        tables = doc.get("tables")
        for name, figures in tables.items() if isinstance(tables, dict) else ():
            if not isinstance(figures, dict):
                continue
            total = self.retired.setdefault((service, str(name)), {})
            backend = figures.get("backend")
            if not isinstance(backend, dict):
                backend = {}
            for field, value in [
                *((f, figures.get(f)) for f in RETIRED),
                *((f, backend.get(f)) for f in BACKEND_RETIRED),
            ]:
                if isinstance(value, int):
                    total[field] = total.get(field, 0) + value

    def render(self) -> str:
        snapshots = self.poll()
        with self.lock:
            retired = {key: dict(value) for key, value in self.retired.items()}
        return render(aggregate(snapshots), retired)


def _counter_lines(services: dict, retired: dict) -> Iterable[tuple[str, str, float]]:
    keys = {(s, t) for s, service in services.items() for t in service["tables"]}
    for service, table in sorted(keys | set(retired)):
        live = services.get(service, {}).get("tables", {}).get(table, {})
        old = retired.get((service, table), {})
        labels = {"service": service, "table": table}
        for field in ("lookups", "hits", "misses"):
            yield (
                f"pyproxymap_{field}_total",
                _labels(**labels),
                live.get(field, 0) + old.get(field, 0),
            )
        for field in ("retry", "config", "deny"):
            yield (
                "pyproxymap_answers_total",
                _labels(**labels, status=field),
                live.get(field, 0) + old.get(field, 0),
            )
        backend = live.get("backend") or {}
        if backend or "connects" in old:
            for field in BACKEND_RETIRED:
                yield (
                    f"pyproxymap_backend_{field}_total",
                    _labels(**labels),
                    backend.get(field, 0) + old.get(field, 0),
                )


def _gauge_lines(services: dict) -> Iterable[tuple[str, str, float]]:
    for service, figures in services.items():
        workers = figures["workers"]
        yield "pyproxymap_workers", _labels(service=service), len(workers)
        yield "pyproxymap_clients", _labels(service=service), sum(w["clients"] for w in workers)
        yield (
            "pyproxymap_requests_in_flight",
            _labels(service=service),
            sum(w["in_flight"] for w in workers),
        )
        for table, stats in figures["tables"].items():
            labels = {"service": service, "table": table}
            latency = stats["latency"]
            for quantile, field in (("0.5", "p50_ms"), ("0.99", "p99_ms"), ("1", "max_ms")):
                if latency.get(field) is not None:
                    yield (
                        "pyproxymap_lookup_latency_seconds",
                        _labels(**labels, quantile=quantile),
                        latency[field] / 1000,
                    )
            backend = stats.get("backend")
            if backend:
                for state in ("open", "in_use", "waiting"):
                    yield (
                        "pyproxymap_backend_connections",
                        _labels(**labels, state=state),
                        backend[state],
                    )
                yield "pyproxymap_backend_connection_limit", _labels(**labels), backend["limit"]
                yield (
                    "pyproxymap_backend_servers_down",
                    _labels(**labels),
                    len(backend.get("down", [])),
                )


HELP = {
    "pyproxymap_lookups_total": ("counter", "Lookups answered."),
    "pyproxymap_hits_total": ("counter", "Lookups answered with a value."),
    "pyproxymap_misses_total": ("counter", "Lookups answered not found."),
    "pyproxymap_answers_total": ("counter", "RETRY, CONFIG and DENY answers."),
    "pyproxymap_backend_connects_total": ("counter", "Backend connections opened."),
    "pyproxymap_backend_failovers_total": ("counter", "Connects that moved to another server."),
    "pyproxymap_workers": ("gauge", "Workers running."),
    "pyproxymap_clients": ("gauge", "Client connections open."),
    "pyproxymap_requests_in_flight": ("gauge", "Requests in progress."),
    "pyproxymap_lookup_latency_seconds": ("gauge", "Lookup latency over the last minute."),
    "pyproxymap_backend_connections": ("gauge", "Backend connections by state."),
    "pyproxymap_backend_connection_limit": ("gauge", "Backend connections allowed."),
    "pyproxymap_backend_servers_down": ("gauge", "Backend servers in back-off."),
}


def render(services: dict, retired: dict | None = None) -> str:
    """The text exposition format (version 0.0.4), one HELP/TYPE block per metric."""
    samples: dict[str, list[str]] = {}
    for name, labels, value in [*_counter_lines(services, retired or {}), *_gauge_lines(services)]:
        number = repr(float(value)) if isinstance(value, float) else str(value)
        samples.setdefault(name, []).append(f"{name}{labels} {number}")
    lines = []
    for name, block in samples.items():
        kind, text = HELP[name]
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *block]
    return "\n".join(lines) + "\n" if lines else ""


# --- serving ---------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    exporter: Exporter

    def do_GET(self) -> None:  # the name http.server calls
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.exporter.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every 15 s is not worth a log line


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _IPv6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port)


def make_server(listen: str, exporter: Exporter) -> socketserver.BaseServer:
    kind, address = parse_listen(listen)
    handler = type("Handler", (_Handler,), {"exporter": exporter})
    if kind == "unix":
        assert isinstance(address, str)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        old_umask = os.umask(0o117)
        try:
            return _UnixServer(address, handler)
        finally:
            os.umask(old_umask)
    assert isinstance(address, tuple)
    server_class = _IPv6Server if ":" in address[0] else _TCPServer
    return server_class(address, handler)


def serve(listen: str, queue_directory: str) -> None:
    """Serve until interrupted; a thread folds exiting workers' counts every second."""
    exporter = Exporter(queue_directory)
    server = make_server(listen, exporter)

    def keep_polling() -> None:
        while True:
            with contextlib.suppress(Exception):
                exporter.poll()
            time.sleep(POLL)

    threading.Thread(target=keep_polling, daemon=True).start()
    with server:
        server.serve_forever()
