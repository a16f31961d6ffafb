"""Bench workload for the result cache: a 5 ms backend, 90 % repeated keys, 32 clients.

NAME
    cache_workload -- our worker with pyproxymap_cache_* off and on, and the backend
    queries each made

SYNOPSIS
    python -m tests.bench.cache_workload [--seconds 4] [--conns 32] [--delay-ms 5]
                                         [--repeated 0.9] [--repeat 3] [--ours PATH]

    from tests.bench.cache_workload import cache_rows, cache_markdown
    rows = cache_rows(pmload, base_dir, ours_program, seconds=4.0)   # list of dicts
    print("\\n".join(cache_markdown(rows)))

DESCRIPTION
    The backend is a socketmap server (``CountingBackend``, in a process of its own)
    that answers every request after DELAY_MS milliseconds -- ``OK <key>@slow.example``,
    or ``NOTFOUND`` for keys that start with ``nobody`` -- and counts the requests
    it answered; the count is read on a side request that is not counted.

    The key files: each line is, with probability REPEATED, one of 1000 hot keys
    (one in ten a "nobody" key), else a key used once. Each run (the warm-ups too)
    has a file of its own, whose once-used keys no other file has, and long enough
    that no client wraps around (pmload starts client i at line i x 7919): the
    fraction of repeated keys is what the clients send.

    Two private Postfix instances, both running our worker on the same table and
    key file, one without cache settings and one with ``pyproxymap_cache_maps``
    naming the table (TTL 60 s, the other settings their defaults). Each gets a
    one-second warm-up (workers spawned, connections opened, hot keys cached), then
    REPEAT pmload runs of SECONDS at CONNS connections; the backend's count is read
    before and after each run. A row per setting: medians of lookups/s, p50, p99,
    backend queries per second and per lookup, and the worker count.

    The C proxymap has no cache; its figures for this backend are the socketmap row
    of run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.run import build_pmload, run_pmload
from tests.support.postfix import PrivatePostfix, settle_files

HOT_KEYS = 1000
COUNT_NAME = b"__count__"


# --- the backend ----------------------------------------------------------------------------


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, counter: list[int]
) -> None:
    try:
        while True:
            length = await reader.readuntil(b":")
            body = (await reader.readexactly(int(length[:-1]) + 1))[:-1]
            name, _, key = body.partition(b" ")
            if name == COUNT_NAME:
                reply = b"OK %d" % counter[0]
            else:
                await asyncio.sleep(delay)
                counter[0] += 1
                reply = (
                    b"NOTFOUND " if key.startswith(b"nobody") else b"OK " + key + b"@slow.example"
                )
            writer.write(b"%d:%s," % (len(reply), reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        writer.close()


async def _serve(port: int, delay: float) -> None:
    counter = [0]
    server = await asyncio.start_server(
        lambda reader, writer: _answer(reader, writer, delay, counter), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


class CountingBackend:
    """The socketmap backend above, in a child process on a free loopback port."""

    def __init__(self, delay_ms: float) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.cache_workload",
                "--serve",
                str(self.port),
                "--delay-ms",
                str(delay_ms),
            ],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.count()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit("the counting socketmap backend did not start")

    @property
    def spec(self) -> str:
        return f"socketmap:inet:127.0.0.1:{self.port}:slow"

    def count(self) -> int:
        """Requests answered so far (this request is not counted)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as client:
            request = COUNT_NAME + b" -"
            client.sendall(b"%d:%s," % (len(request), request))
            reply = b""
            while not reply.endswith(b","):
                chunk = client.recv(100)
                if not chunk:
                    raise OSError("the backend closed the connection")
                reply += chunk
        return int(reply.split(b":", 1)[1][:-1].split()[1])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# --- the workload ---------------------------------------------------------------------------


def write_keys(path: Path, lines: int, repeated: float, seed: int) -> Path:
    """Hot keys with probability REPEATED, else keys no other file (seed) has."""
    rng = random.Random(seed)
    hot = [f"nobody{n}" if n % 10 == 0 else f"user{n}" for n in range(HOT_KEYS)]
    keys = [rng.choice(hot) if rng.random() < repeated else f"once{seed}-{n}" for n in range(lines)]
    path.write_text("".join(f"{key}\n" for key in keys))
    path.chmod(0o644)
    return path


def cache_settings(spec: str) -> dict[str, str]:
    return {"pyproxymap_cache_maps": f"proxy:{spec}", "pyproxymap_cache_ttl": "60s"}


def make_instance(
    program: Path, spec: str, base: Path, cached: bool, tables: Path
) -> PrivatePostfix:
    main_cf = {"max_use": "1000000", "max_idle": "3600", "default_process_limit": "100"}
    if cached:
        main_cf.update(cache_settings(spec))
    return PrivatePostfix(
        proxymap_program=program,
        proxy_read_maps=f"proxy:{spec}",
        main_cf=main_cf,
        readable_paths=[tables],
        base_dir=base,
        name="cache-on" if cached else "cache-off",
    )


def measure(
    pmload: Path,
    instance: PrivatePostfix,
    backend: CountingBackend,
    keyfile: Path,
    conns: int,
    seconds: float,
) -> dict[str, float]:
    before = backend.count()
    load = run_pmload(pmload, instance.socket_path(), backend.spec, conns, seconds, keyfile, False)
    queries = backend.count() - before
    if load.exit or not load.requests:
        raise RuntimeError(f"pmload failed: exit {load.exit} {load.error}")
    return {
        "rps": load.rps,
        "p50_us": load.p50_us,
        "p99_us": load.p99_us,
        "lookups": load.requests,
        "queries": queries,
        "queries_per_s": queries / seconds,
        "queries_per_lookup": queries / load.requests,
        "workers": len(instance.worker_pids("proxymap")),
    }


def cache_rows(
    pmload: Path,
    base: Path,
    program: Path,
    *,
    seconds: float = 4.0,
    conns: int = 32,
    delay_ms: float = 5.0,
    repeated: float = 0.9,
    repeat: int = 3,
) -> list[dict[str, object]]:
    """One row per setting (cache off, cache on): medians over REPEAT runs."""
    tables = base / "cache-tables"
    tables.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Enough lines that no client wraps: pmload's clients start 7919 lines apart.
    lines = max(conns * 7919, 200_000)
    keyfiles = [write_keys(tables / f"keys{n}", lines, repeated, n) for n in range(repeat + 1)]
    settle_files(tables)
    backend = CountingBackend(delay_ms)
    rows: list[dict[str, object]] = []
    try:
        for cached in (False, True):
            instance = make_instance(program, backend.spec, base, cached, tables)
            with instance:
                instance.wait_until_serving("user1", backend.spec)
                run_pmload(
                    pmload, instance.socket_path(), backend.spec, conns, 1.0, keyfiles[0], False
                )
                samples = [
                    measure(pmload, instance, backend, keyfile, conns, seconds)
                    for keyfile in keyfiles[1:]
                ]
            row: dict[str, object] = {
                "cache": "on" if cached else "off",
                "conns": conns,
                "delay_ms": delay_ms,
                "repeated": repeated,
            }
            for name in samples[0]:
                row[name] = statistics.median(sample[name] for sample in samples)
            rows.append(row)
    finally:
        backend.stop()
    return rows


def cache_markdown(rows: list[dict[str, object]]) -> list[str]:
    lines = [
        "| cache | conns | lookups/s | p50 ms | p99 ms | backend queries/s "
        "| queries per lookup | workers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['cache']} | {row['conns']} | {row['rps']:.0f} "
            f"| {row['p50_us'] / 1000:.2f} | {row['p99_us'] / 1000:.2f} "
            f"| {row['queries_per_s']:.0f} | {row['queries_per_lookup']:.3f} "
            f"| {row['workers']:.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.cache_workload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--repeated", type=float, default=0.9)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ours", default=str(Path(sys.executable).parent / "proxymap"))
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve:
        asyncio.run(_serve(options.serve, options.delay_ms / 1000))
        return 0
    base = Path(tempfile.mkdtemp(prefix="pmbench-cache-", dir="/tmp"))
    base.chmod(0o755)
    try:
        rows = cache_rows(
            build_pmload(),
            base,
            Path(options.ours),
            seconds=options.seconds,
            conns=options.conns,
            delay_ms=options.delay_ms,
            repeated=options.repeated,
            repeat=options.repeat,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(cache_markdown(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
