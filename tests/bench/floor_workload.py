"""Bench workload for the one-connection floor: what a lookup costs at the least.

NAME
    floor_workload -- one connection against fixed-reply servers and both proxymaps,
    with the server and the load on one CPU, on two, or where the kernel puts them

SYNOPSIS
    python -m tests.bench.floor_workload [--seconds 3] [--repeat 3] [--ours PATH]
    python -m tests.bench.floor_workload --serve SOCKET   # the Python fixed-reply server

    from tests.bench.floor_workload import floor_rows, floor_markdown
    rows = floor_rows(pmload, base_dir, ours_program, seconds=3.0, repeat=3)

DESCRIPTION
    A client that waits for each reply (Postfix's clients, one connection) sees the
    whole path of a request: its write, the server's wake-up, read, answer and write,
    and its own wake-up. Four servers answer pmload's lookups, one connection each:

      c-echo       echo_floor.c (beside this file, compiled once like pmload): an
                   epoll loop that answers every request with a fixed reply without
                   looking at it -- the floor of any server on this machine;
      python-echo  the same in Python on the event loop our worker uses (uvloop when
                   installed): the floor of a Python server;
      c-proxymap   the installed C proxymap on a texthash table, under the real master;
      ours         our worker on the same table, under the real master.

    Each runs at one connection in three placements: ``free`` (the kernel places the
    server and pmload), ``one-cpu`` (both on CPU 0: every wake-up is a switch on a warm
    CPU) and ``two-cpus`` (server on CPU 0, pmload on CPU 1: every wake-up crosses CPUs,
    and the waking CPU was idle). Affinity is set on the server processes (the proxymaps'
    workers after the warm-up) and on pmload. Then each at 16 connections, ``free``: the
    fixed-reply servers in their one process, the proxymaps with the workers their
    masters spawn (process limit 2, this machine's CPUs, for both).

    The rows give medians of --repeat runs: lookups/s, p50, p99 and the server's CPU per
    lookup (utime+stime from /proc, divided by the lookups served).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench.run import (
    BENCH_DIR,
    TICKS_PER_SECOND,
    build_pmload,
    build_tables,
    cache_dir,
    make_instance,
    run_pmload,
)
from tests.support.postfix import C_PROXYMAP, PrivatePostfix, proc_cpu_ticks

ECHO_SOURCE = BENCH_DIR / "echo_floor.c"
SERVERS = ("c-echo", "python-echo", "c-proxymap", "ours")
PLACEMENTS: dict[str, tuple[set[int] | None, set[int] | None]] = {
    # placement: (server CPUs, pmload CPUs); None = wherever the kernel likes
    "free": (None, None),
    "one-cpu": ({0}, {0}),
    "two-cpus": ({0}, {1}),
}
# (connections, placement): one connection in every placement; 16 where the kernel likes
# (the proxymaps then have the workers their masters spawn, the fixed-reply servers one).
CELLS = [(1, placement) for placement in PLACEMENTS] + [(16, "free")]
ANNOUNCEMENT = b"protocol\0proxymap_protocol\0\0"
FIXED_REPLY = b"status\x000\x00value\x00floor\x00\x00"


def build_echo() -> Path:
    """Compile echo_floor.c once per source version (as pmload)."""
    digest = hashlib.sha256(ECHO_SOURCE.read_bytes()).hexdigest()[:12]
    binary = cache_dir() / f"echo_floor-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-O2", "-o", str(partial), str(ECHO_SOURCE)], check=True)
        partial.rename(binary)
    return binary


# --- the Python fixed-reply server -----------------------------------------------------------


class FixedReply(asyncio.Protocol):
    """One fixed reply per complete request; requests are counted by their list end
    (pmload's lookups never hold an empty value, so NUL NUL ends a list)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.tail = b""
        self.transport.write(ANNOUNCEMENT)

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        complete = data.count(b"\0\0")
        self.tail = data[data.rfind(b"\0\0") + 2 :] if complete else data
        if complete:
            self.transport.write(FIXED_REPLY * complete)


def serve(path: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        server = await asyncio.get_running_loop().create_unix_server(FixedReply, path)
        await server.serve_forever()

    asyncio.run(main())


# --- measuring ---------------------------------------------------------------------------------


class Server:
    """A server under test: its socket, the table name pmload asks for, its pids."""

    def __init__(self, socket_path: Path, table: str, pids: Callable[[], list[int]]) -> None:
        self.socket_path = socket_path
        self.table = table
        self.pids = pids


def start_process(command: list[str], socket_path: Path) -> subprocess.Popen:
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[0]} did not start")
        time.sleep(0.01)
    return process


def place(pids: list[int], cpus: set[int] | None) -> None:
    every = set(range(os.cpu_count() or 1))
    for pid in pids:
        os.sched_setaffinity(pid, cpus if cpus is not None else every)


def measure(
    pmload: Path, server: Server, keyfile: Path, placement: str, conns: int, seconds: float
) -> dict:
    server_cpus, load_cpus = PLACEMENTS[placement]
    pids = server.pids()
    place(pids, server_cpus)
    before = {pid: proc_cpu_ticks(pid) for pid in pids}
    load = run_pmload(
        pmload, server.socket_path, server.table, conns, seconds, keyfile, False, cpus=load_cpus
    )
    after = {pid: proc_cpu_ticks(pid) for pid in server.pids()}
    if load.exit or not load.requests:
        raise RuntimeError(f"pmload failed: exit {load.exit} {load.error}")
    ticks = sum(after[pid] - before.get(pid, 0) for pid in after)
    return {
        "rps": load.rps,
        "p50_us": load.p50_us,
        "p99_us": load.p99_us,
        "cpu_us": ticks / TICKS_PER_SECOND / load.requests * 1e6,
    }


def floor_rows(
    pmload: Path, base: Path, program: Path, *, seconds: float = 3.0, repeat: int = 3
) -> list[dict]:
    tables = build_tables(base / "floor-tables", ["texthash"])
    table = tables["texthash"]
    instances: dict[str, PrivatePostfix] = {
        impl: make_instance(
            prog,
            tables,
            base,
            f"floor-{impl}",
            impl,
            settings={"default_process_limit": "2"},
        )
        for impl, prog in (("c", C_PROXYMAP), ("ours", program))
    }
    processes: list[subprocess.Popen] = []
    try:
        servers: dict[str, Server] = {}
        echo_socket = base / "c-echo.sock"
        processes.append(start_process([str(build_echo()), str(echo_socket)], echo_socket))
        c_echo = processes[-1].pid
        servers["c-echo"] = Server(echo_socket, "floor", lambda: [c_echo])
        python_socket = base / "python-echo.sock"
        command = [sys.executable, "-m", "tests.bench.floor_workload", "--serve"]
        processes.append(start_process([*command, str(python_socket)], python_socket))
        python_echo = processes[-1].pid
        servers["python-echo"] = Server(python_socket, "floor", lambda: [python_echo])
        for impl, name in (("c", "c-proxymap"), ("ours", "ours")):
            instance = instances[impl]
            instance.start()
            instance.wait_until_serving(table.probe_key, table.spec)
            run_pmload(pmload, instance.socket_path(), table.spec, 1, 0.5, table.keyfile, False)
            servers[name] = Server(
                instance.socket_path(),
                table.spec,
                lambda instance=instance: instance.worker_pids("proxymap"),
            )
        rows = []
        for conns, placement in CELLS:
            for name in SERVERS:
                runs = [
                    measure(pmload, servers[name], table.keyfile, placement, conns, seconds)
                    for _ in range(repeat)
                ]
                row = {"conns": conns, "placement": placement, "server": name, "runs": len(runs)}
                for figure in ("rps", "p50_us", "p99_us", "cpu_us"):
                    row[figure] = statistics.median(run[figure] for run in runs)
                print(
                    f"floor {conns} {placement} {name}: {row['rps']:.0f}/s "
                    f"p50 {row['p50_us']:.1f} us cpu {row['cpu_us']:.2f} us",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(row)
        return rows
    finally:
        for process in processes:
            process.kill()
            process.wait()
        for instance in instances.values():
            instance.stop()
            instance.cleanup()


def floor_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| conns | placement | server | lookups/s | p50 µs | p99 µs | server CPU µs/lookup "
        "| lookups/s vs c-echo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floor = {
        (row["conns"], row["placement"]): row["rps"] for row in rows if row["server"] == "c-echo"
    }
    for row in rows:
        cell = (row["conns"], row["placement"])
        lines.append(
            f"| {row['conns']} | {row['placement']} | {row['server']} | {row['rps']:,.0f} "
            f"| {row['p50_us']:.1f} | {row['p99_us']:.1f} | {row['cpu_us']:.2f} "
            f"| {row['rps'] / floor[cell]:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.floor_workload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ours", default=str(Path(sys.executable).parent / "proxymap"))
    parser.add_argument("--serve", metavar="SOCKET", help="run the Python fixed-reply server")
    options = parser.parse_args(argv)
    if options.serve:
        serve(options.serve)
        return 0
    base = Path(tempfile.mkdtemp(prefix="pmbench-floor-", dir="/tmp"))
    base.chmod(0o755)
    try:
        rows = floor_rows(
            build_pmload(), base, Path(options.ours), seconds=options.seconds, repeat=options.repeat
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(floor_markdown(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
