"""In-process cost of asynchronous lookups through the connection code, in instructions.

    .venv/bin/python -m tests.bench.async_micro [--tables nothing,wakeup,mysql,pgsql]
                                                [--conns 1,16] [--statistics no]
                                                [--lookups 200,1200] [--clock]

For each table and connection count, a child process runs ``--lookups`` lookups (the
total over all connections) through ``ProxymapProtocol.data_received`` on a uvloop
loop, each connection sending its next request one loop turn after its reply was
written (a closed loop, as pmload's clients). The child runs under callgrind twice, with
the two lookup counts; the difference of the instruction totals divided by the
difference of the counts is the cost of one lookup (start-up, imports, opening the
table and the database connections cancel out). Deterministic: other load on the
machine does not change it. ``--clock`` runs the children without valgrind and gives
CPU time (ns) per lookup instead (noisy on a shared machine).

Tables: ``texthash`` is synchronous (the floor: the harness and the synchronous fast
path), ``nothing`` answers without waiting (an asynchronous table with no I/O),
``wakeup`` waits for one future that the loop resolves on its next turn (one I/O
readiness, no system call), ``mysql`` and ``pgsql`` query private servers started here
(tests/bench/databases.py: 10 000 rows, one key in five misses).

Before/after: run it from the other checkout's directory (with this file copied
there if it lacks it), e.g. ``cd /other && /this/.venv/bin/python -m
tests.bench.async_micro``: ``-m`` puts the current directory first on sys.path, ahead
of the venv's own checkout, and the children inherit it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxymap import attr
from proxymap import flags as F
from proxymap.connection import ProxymapProtocol
from proxymap.handler import RequestHandler
from proxymap.protocol import stream_name
from proxymap.tables import TABLE_TYPES
from proxymap.tables.base import AsyncTable
from tests.bench.connection_micro import CountingTransport, Skeleton

KEYS = [
    f"nobody{i}@example.com" if i % 5 == 0 else f"user{(i * 7919) % 10_000}@example.com"
    for i in range(1000)
]


class NothingTable(AsyncTable):
    """Answers at once: the asynchronous path without any I/O."""

    dict_type = "nothing"

    def __init__(self, name, open_mode, flags, ctx):
        super().__init__(name, open_mode, flags | F.FIXED)

    async def alookup(self, key: bytes) -> bytes | None:
        return None if key.startswith(b"nobody") else key + b".dest"


class WakeupTable(NothingTable):
    """Waits for one future resolved on the loop's next turn, as a socket read would."""

    dict_type = "wakeup"

    async def alookup(self, key: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.call_soon(ready.set_result, None)
        await ready
        return None if key.startswith(b"nobody") else key + b".dest"


TABLE_TYPES["nothing"] = f"{__name__}:NothingTable"
TABLE_TYPES["wakeup"] = f"{__name__}:WakeupTable"


class ClientTransport(CountingTransport):
    """One client: counts its replies and sends the next request a loop turn later
    (the rest of a transport is connection_micro's stand-in)."""

    def __init__(self, loop, requests: list[bytes], count: int, finished) -> None:
        super().__init__()
        self.loop = loop
        self.requests = requests
        self.left = count
        self.finished = finished
        self.protocol: ProxymapProtocol | None = None
        self.sent = 0

    def send_next(self) -> None:
        assert self.protocol is not None
        request = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        self.protocol.data_received(request)

    def write(self, data: bytes) -> None:
        if data.startswith(b"protocol\x00"):
            return  # the announcement
        self.left -= data.count(b"status\x00")
        if self.left > 0:
            self.loop.call_soon(self.send_next)
        else:
            self.finished()

    def get_extra_info(self, name, default=None):
        return default


def lookup_request(table: str, key: str) -> bytes:
    # What postmap -q of Postfix 3.7 sends (the bench's pmload form).
    return attr.encode(
        [
            (b"request", b"lookup"),
            (b"table", table.encode()),
            (b"flags", b"540737"),
            (b"key", key.encode()),
        ]
    )


async def run_lookups(spec: str, params: dict[str, str], total: int, conns: int) -> float:
    """Seconds of CPU time for ``total`` lookups over ``conns`` connections."""
    loop = asyncio.get_running_loop()
    handler = RequestHandler("proxymap", {spec}, params)
    skeleton = Skeleton()
    done = loop.create_future()
    pending = conns

    def finished() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            done.set_result(None)

    requests = [lookup_request(spec, key) for key in KEYS]
    clients = []
    for n in range(conns):
        share = total // conns + (1 if n < total % conns else 0)
        transport = ClientTransport(loop, requests[n * 7 :] + requests[: n * 7], share, finished)
        protocol = ProxymapProtocol(skeleton, handler, stream_name("proxymap"))  # type: ignore[arg-type]
        protocol.connection_made(transport)  # type: ignore[arg-type]
        transport.protocol = protocol
        clients.append(transport)
    started = time.process_time()
    for transport in clients:
        loop.call_soon(transport.send_next)
    await done
    elapsed = time.process_time() - started
    assert skeleton.busy == 0
    handler.close()
    return elapsed


def child(spec: str, statistics: str, total: int, conns: int) -> None:
    import uvloop

    params = {"pyproxymap_statistics": statistics}
    elapsed = uvloop.run(run_lookups(spec, params, total, conns))
    print(f"cpu {elapsed:.6f}")


def _instructions(out_file: Path) -> int:
    text = out_file.read_text()
    found = re.search(r"^(?:totals|summary): (\d+)", text, re.MULTILINE)
    assert found, f"no totals in {out_file}"
    return int(found.group(1))


def run_child(
    spec: str, statistics: str, total: int, conns: int, env: dict[str, str], valgrind: bool
) -> float:
    """Instructions (valgrind) or CPU seconds of one child run."""
    command = [
        sys.executable,
        "-m",
        "tests.bench.async_micro",
        "--child",
        spec,
        str(total),
        str(conns),
    ]
    command += ["--statistics", statistics]
    if not valgrind:
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        return float(output.stdout.split()[-1])
    with tempfile.TemporaryDirectory(prefix="pm-callgrind-") as directory:
        out_file = Path(directory) / "callgrind.out"
        valgrind_command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
        subprocess.run(valgrind_command + command, env=env, check=True, capture_output=True)
        return float(_instructions(out_file))


def table_specs(kinds: list[str], directory: Path, stack) -> dict[str, str]:
    specs = {}
    backends = None
    for kind in kinds:
        if kind in ("nothing", "wakeup"):
            specs[kind] = f"{kind}:x"
            continue
        if kind == "texthash":  # a synchronous table, for the harness's own share
            source = directory / "texthash"
            source.write_text("".join(f"{key} {key}.dest\n" for key in KEYS if "user" in key))
            specs[kind] = f"texthash:{source}"
            continue
        from tests.bench.databases import DatabaseBackends

        if backends is None:
            backends = stack.enter_context(DatabaseBackends(directory / "servers"))
        tables = directory / "tables"
        tables.mkdir(exist_ok=True)
        specs[kind] = backends.table(kind, tables).specs["ours"]
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", default="nothing,wakeup,mysql,pgsql")
    parser.add_argument("--conns", default="1,16")
    parser.add_argument("--lookups", default="200,1200", help="the two totals to subtract")
    parser.add_argument("--statistics", default="yes", help="pyproxymap_statistics")
    parser.add_argument("--clock", action="store_true", help="CPU time, no valgrind")
    parser.add_argument("--child", nargs=3, metavar=("SPEC", "LOOKUPS", "CONNS"))
    options = parser.parse_args()
    if options.child:
        spec, total, conns = options.child
        child(spec, options.statistics, int(total), int(conns))
        return
    import contextlib

    low, high = (int(n) for n in options.lookups.split(","))
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pm-amicro-")))
        directory.chmod(0o755)
        specs = table_specs(options.tables.split(","), directory, stack)
        unit = "ns/lookup" if options.clock else "instructions/lookup"
        for kind, spec in specs.items():
            for conns in (int(n) for n in options.conns.split(",")):
                figures = [
                    run_child(spec, options.statistics, total, conns, env, not options.clock)
                    for total in (low, high)
                ]
                per_lookup = (figures[1] - figures[0]) / (high - low)
                if options.clock:
                    per_lookup *= 1e9
                print(f"{kind:8} conns {conns:3}  {per_lookup:10.0f} {unit}", flush=True)


if __name__ == "__main__":
    main()
