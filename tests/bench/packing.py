"""How many workers a master gives each side, and how the clients spread over them.

    .venv/bin/python -m tests.bench.packing --tables hash,texthash --conns 1,16,256
    .venv/bin/python -m tests.bench.packing --impl c --impl main=/work/main/.venv/bin/proxymap \\
        --impl branch=.venv/bin/proxymap --seconds 3 --repeat 2

Each ``--impl`` is ``c`` (the installed C proxymap) or ``NAME=PATH`` (a proxymap worker
executable, e.g. two checkouts for an A/B); default: ``c`` and ``ours`` (this venv's).
Per table, a fresh private Postfix (the real master) per implementation, the warm-up of
``tests.bench.run``, then per connection count ``--repeat`` closed-loop runs (pmload),
the implementations alternating. During a run the clients of every worker are counted
(server-side sockets connected to the proxymap socket, from /proc/net/unix and
/proc/<pid>/fd) and each worker's CPU is read; the table shows lookups/s, CPU per
lookup, workers, the clients per worker and each worker's share of a CPU during the run
(a worker that idles beside a saturated one shows as a low share).

``--master ours`` runs the same instances under our master (``proxymap-master``, with
``pyproxymap_prefork = --prefork``, default 1) instead of Postfix's. Runs as root, like
the bench.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.run import (
    BUSY_KIND,
    BUSY_WARM_UP,
    C_PROXYMAP,
    TICKS_PER_SECOND,
    build_pmload,
    build_tables,
    make_instance,
    probe,
    run_pmload,
    running,
)
from tests.support.postfix import PrivatePostfix, proc_cpu_ticks

OUR_MASTER = Path(sys.executable).parent / "proxymap-master"
# Points of a run (fractions of its length) at which clients per worker are counted.
SPREAD_POINTS = (0.5, 0.9)


def connected_inodes(path: Path) -> set[int]:
    """Inodes of the server-side sockets of clients connected to a socket named like
    PATH (the master binds it relative to the queue directory: private/proxymap; a
    worker holds only its own instance's)."""
    wanted = f"{path.parent.name}/{path.name}"
    inodes = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; St 03 = connected.
            if len(fields) >= 8 and fields[5] == "03" and fields[7].endswith(wanted):
                inodes.add(int(fields[6]))
    return inodes


def clients_of(pid: int, inodes: set[int]) -> int:
    """How many of INODES process PID holds open."""
    count = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            count += 1
    return count


@dataclass
class SpreadWatch:
    """Clients per worker at SPREAD_POINTS of a run (pmload calls ``during``)."""

    instance: PrivatePostfix
    spreads: list[list[int]] = field(default_factory=list)

    def during(self, began: float, seconds: float) -> None:
        for point in SPREAD_POINTS:
            delay = began + point * seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            inodes = connected_inodes(self.instance.socket_path())
            counts = [clients_of(pid, inodes) for pid in self.instance.worker_pids()]
            self.spreads.append(sorted(counts, reverse=True))


@dataclass
class Row:
    impl: str
    table: str
    conns: int
    rps: float
    cpu_us: float | None
    workers: int
    spread: list[int]
    shares: list[float]  # each worker's CPU seconds per second of the run, highest first


def measure(pmload: Path, instance: PrivatePostfix, impl: str, table, conns: int, seconds: float):
    before = {pid: proc_cpu_ticks(pid) for pid in instance.worker_pids()}
    watch = SpreadWatch(instance)
    began = time.monotonic()
    load = run_pmload(
        pmload, instance.socket_path(), table.spec, conns, seconds, table.keyfile, False, watch
    )
    elapsed = time.monotonic() - began
    after = {pid: proc_cpu_ticks(pid) for pid in instance.worker_pids()}
    ticks = {pid: after[pid] - before.get(pid, 0) for pid in after}
    cpu = sum(ticks.values()) / TICKS_PER_SECOND
    return Row(
        impl=impl,
        table=table.kind,
        conns=conns,
        rps=load.rps,
        cpu_us=cpu / load.requests * 1e6 if load.requests else None,
        workers=len(after),
        spread=watch.spreads[-1] if watch.spreads else [],
        shares=sorted((t / TICKS_PER_SECOND / elapsed for t in ticks.values()), reverse=True),
    )


def warm_up(pmload: Path, instance: PrivatePostfix, table, conns: list[int]) -> None:
    """What tests.bench.run does before the first measured run."""
    busy = table.kind == BUSY_KIND
    run_pmload(
        pmload,
        instance.socket_path(),
        table.spec,
        max(conns) if busy else 16,
        BUSY_WARM_UP if busy else 0.5,
        table.keyfile,
        False,
    )


class UnderOurMaster(PrivatePostfix):
    """The same private tree and configuration, run by our master (proxymap-master)."""

    def master_cf_lines(self) -> list[str]:
        # postlogd needs the real master's services: ours logs to stderr instead.
        return [line for line in super().master_cf_lines() if "postlogd" not in line]

    def master_command(self) -> list[str]:
        return [str(OUR_MASTER), "-c", str(self.conf_dir), "start"]


def make_side(master: str, program: Path, tables, base: Path, tag: str, impl: str, prefork):
    """An instance of the real master (``make_instance``) or of ours."""
    instance = make_instance(program, tables, base, tag, impl)
    if master == "postfix":
        return instance
    ours = UnderOurMaster(
        proxymap_program=program,
        proxy_read_maps=instance.proxy_read_maps,
        main_cf={**instance.extra_main_cf, "pyproxymap_prefork": str(prefork)},
        readable_paths=instance.readable_paths,
        base_dir=base,
        name=f"{tag}-ours",
    )
    instance.cleanup()
    return ours


def parse_impls(values: list[str] | None) -> dict[str, Path]:
    impls: dict[str, Path] = {}
    for value in values or ["c", f"ours={Path(sys.executable).parent / 'proxymap'}"]:
        name, _, path = value.partition("=")
        impls[name] = C_PROXYMAP if name == "c" and not path else Path(path).resolve()
    return impls


def fmt_row(row: Row) -> str:
    cpu = f"{row.cpu_us:.1f}" if row.cpu_us is not None else "n/a"
    spread = "+".join(str(n) for n in row.spread)
    shares = "/".join(f"{s:.2f}" for s in row.shares)
    return (
        f"| {row.table} | {row.conns} | {row.impl} | {row.rps:.0f} | {cpu} | {row.workers} "
        f"| {spread} | {shares} |"
    )


def measure_all(options, pmload: Path, base: Path, impls, kinds, conns) -> list[Row]:
    """Every table, connection count and repeat; fresh instances per table."""
    tables = build_tables(base / "tables", kinds)
    rows: list[Row] = []
    for kind, table in tables.items():
        instances = {
            name: make_side(
                options.master,
                program,
                tables,
                base,
                f"{name}-{kind}",
                "c" if name == "c" else "ours",
                options.prefork,
            )
            for name, program in impls.items()
        }
        with running(instances):
            for name, instance in instances.items():
                if why := probe(instance, table, name):
                    raise SystemExit(f"{name} {kind}: {why}")
                warm_up(pmload, instance, table, conns)
            for count in conns:
                for repeat in range(options.repeat):
                    order = list(instances) if repeat % 2 == 0 else list(reversed(instances))
                    for name in order:
                        row = measure(pmload, instances[name], name, table, count, options.seconds)
                        rows.append(row)
                        print(fmt_row(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.packing", description=__doc__)
    parser.add_argument("--tables", default="hash,texthash")
    parser.add_argument("--conns", default="1,16,256")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--impl", action="append", help="c or NAME=PATH (repeatable)")
    parser.add_argument(
        "--master", choices=("postfix", "ours"), default="postfix", help="which master spawns"
    )
    parser.add_argument(
        "--prefork", type=int, default=1, help="pyproxymap_prefork under our master"
    )
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("runs private Postfix masters: run as root", file=sys.stderr)
        return 2
    impls = parse_impls(options.impl)
    conns = [int(c) for c in options.conns.split(",") if c]
    kinds = [k for k in options.tables.split(",") if k]
    pmload = build_pmload()
    base = Path(tempfile.mkdtemp(prefix="pmpack-", dir="/tmp"))
    base.chmod(0o755)
    print(f"master: {options.master}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    try:
        rows = measure_all(options, pmload, base, impls, kinds, conns)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print()
    print(
        "| table | conns | impl | lookups/s | CPU µs/lookup | workers | clients/worker "
        "| CPU share/worker |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(fmt_row(row))
    summarize(rows)
    return 0


def summarize(rows: list[Row]) -> None:
    """Medians per cell: lookups/s, CPU per lookup, the most workers seen."""
    print()
    print("| table | conns | impl | median lookups/s | median CPU µs/lookup | max workers |")
    print("|---|---|---|---|---|---|")
    cells: dict[tuple[str, int, str], list[Row]] = {}
    for row in rows:
        cells.setdefault((row.table, row.conns, row.impl), []).append(row)
    for (table, conns, impl), cell in cells.items():
        cpus = [r.cpu_us for r in cell if r.cpu_us is not None]
        print(
            f"| {table} | {conns} | {impl} | {statistics.median(r.rps for r in cell):.0f} "
            f"| {statistics.median(cpus):.1f} | {max(r.workers for r in cell)} |"
            if cpus
            else f"| {table} | {conns} | {impl} | n/a | n/a | n/a |"
        )


if __name__ == "__main__":
    sys.exit(main())
