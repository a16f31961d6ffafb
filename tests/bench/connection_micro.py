"""In-process micro-benchmark of the connection code: lookups through the asyncio driver.

    .venv/bin/python -m tests.bench.connection_micro [--lookups N] [--repeat R]

No socket and no event-loop turn per request: ``ProxymapProtocol.data_received`` is fed
one whole lookup per call, as a real client sends it, with a transport that only counts
what is written, so the figure is the cost of the worker's own code per request (the
fast path once the shortcut is learnt). Per table (texthash, 1000 keys, nine in ten
found; inline, 10 keys, mostly not found), with ``pyproxymap_statistics`` off and on (the default), and for pipelined requests
(ten per chunk: the general path). Best of ``--repeat`` runs, in ns of CPU time per
lookup (process time: a shared machine's preemptions do not count).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from proxymap import attr
from proxymap.connection import ProxymapProtocol
from proxymap.handler import RequestHandler
from proxymap.protocol import stream_name

KEYS = 1000


class CountingTransport:
    """Enough of a transport: counts the bytes written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class Skeleton:
    """What MultiServer gives a protocol, minus the status pipe."""

    ipc_timeout = 3600

    def __init__(self) -> None:
        self.busy = 0
        self.loop = None

    def _connection_made(self, protocol: object) -> None:
        pass

    def _connection_lost(self, protocol: object) -> None:
        pass

    def request_started(self) -> None:
        self.busy += 1

    def request_done(self) -> None:
        self.busy -= 1


def lookup(table: str, key: bytes) -> bytes:
    return attr.encode(
        [(b"request", b"lookup"), (b"table", table.encode()), (b"flags", b"64"), (b"key", key)]
    )


def requests(table: str) -> list[bytes]:
    # Nine keys in ten exist.
    return [lookup(table, b"user%d" % (n if n % 10 else n + KEYS)) for n in range(KEYS)]


def measure(table: str, params: dict[str, str], lookups: int, per_chunk: int) -> float:
    """ns per lookup through one fresh connection."""
    handler = RequestHandler("proxymap", {table}, params)
    protocol = ProxymapProtocol(Skeleton(), handler, stream_name("proxymap"))  # type: ignore[arg-type]
    protocol.connection_made(CountingTransport())  # type: ignore[arg-type]
    wire = requests(table)
    chunks = [b"".join(wire[i : i + per_chunk]) for i in range(0, len(wire), per_chunk)]
    rounds = max(1, lookups // len(wire))
    data_received = protocol.data_received
    for chunk in chunks:  # warm-up: instance opened, shortcut learnt
        data_received(chunk)
    started = time.process_time_ns()
    for _ in range(rounds):
        for chunk in chunks:
            data_received(chunk)
    elapsed = time.process_time_ns() - started
    return elapsed / (rounds * len(wire))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="pm-micro-"))
    source = directory / "map"
    source.write_text("".join(f"user{n} user{n}@example.com\n" for n in range(KEYS)))
    # A short name: the fast path hashes the request bytes before the key.
    inline = (
        "inline:{" + ",".join(f"user{n}=user{n}@example.com" for n in range(0, KEYS, 100)) + "}"
    )
    quiet = {"pyproxymap_statistics": "no"}
    cases = [
        ("texthash", f"texthash:{source}", quiet, 1),
        ("texthash, statistics", f"texthash:{source}", {}, 1),
        ("inline", inline, quiet, 1),
        ("texthash, 10 pipelined", f"texthash:{source}", quiet, 10),
    ]
    asyncio.set_event_loop(asyncio.new_event_loop())
    for name, table, params, per_chunk in cases:
        best = min(
            measure(table, params, options.lookups, per_chunk) for _ in range(options.repeat)
        )
        print(f"{name:24} {best:8.0f} ns/lookup")


if __name__ == "__main__":
    main()
