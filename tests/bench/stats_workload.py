"""Bench workload for the cost of live statistics: our worker with them off and on.

NAME
    stats_workload -- pyproxymap_statistics = no against yes, texthash and hash at 16
    connections, in paired runs

SYNOPSIS
    python -m tests.bench.stats_workload [--tables texthash,hash] [--conns 16]
                                         [--seconds 3] [--repeat 7] [--ours PATH]

    from tests.bench.stats_workload import stats_rows, stats_markdown
    rows = stats_rows(pmload, base_dir, ours_program, seconds=3.0, repeat=7)
    print("\\n".join(stats_markdown(rows)))

DESCRIPTION
    Two private Postfix instances run our worker on the same tables at the same time,
    one with ``pyproxymap_statistics = no`` (the fast path without figures) and one
    with the default ``yes`` (the process title summary stays off, its default). Only
    one of them is loaded at any moment. Both have a process limit of two (this machine's
    CPUs), so that both serve with the same number of workers.

    The cost looked for (a few per cent) is smaller than the drift of a shared 2-CPU
    machine from one run to the next, so the runs are paired: each repeat runs both
    settings back to back, in alternating order (off first, then on first, ...), and
    the figure of the repeat is the ratio within the pair. A table's row gives the
    medians of each setting and the median of the paired ratios, lookups/s and CPU per
    lookup (utime+stime of the instance's proxymap processes from /proc, divided by the
    lookups served), with the lowest and highest paired ratio beside it.

    Verdict: the median paired cost (1 - on/off lookups/s) is at most 3 %.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from tests.bench.run import (
    BenchTable,
    build_pmload,
    build_tables,
    cpu_seconds_between,
    make_instance,
    run_pmload,
    worker_ticks,
)
from tests.support.postfix import PrivatePostfix

SETTINGS = ("off", "on")
TARGET_COST = 0.03
WORKERS = 2


def stats_instance(
    program: Path, tables: dict[str, BenchTable], base: Path, setting: str
) -> PrivatePostfix:
    settings = {
        # Two workers on both sides from the first run on: the master's spawning, which
        # varies from run to run, would otherwise weigh more than the figures do.
        "default_process_limit": str(WORKERS),
        "pyproxymap_statistics": "yes" if setting == "on" else "no",
    }
    return make_instance(program, tables, base, f"stats-{setting}", "ours", settings=settings)


def measure(
    pmload: Path, instance: PrivatePostfix, table: BenchTable, conns: int, seconds: float
) -> dict[str, float]:
    before = worker_ticks(instance)
    load = run_pmload(
        pmload, instance.socket_path(), table.spec, conns, seconds, table.keyfile, False
    )
    after = worker_ticks(instance)
    if load.exit or not load.requests:
        raise RuntimeError(f"pmload failed: exit {load.exit} {load.error}")
    return {
        "rps": load.rps,
        "p50_us": load.p50_us,
        "p99_us": load.p99_us,
        "cpu_us": cpu_seconds_between(before, after) / load.requests * 1e6,
        "workers": len(after),
    }


def paired_runs(
    pmload: Path,
    instances: dict[str, PrivatePostfix],
    table: BenchTable,
    conns: int,
    seconds: float,
    repeat: int,
) -> list[dict[str, dict[str, float]]]:
    """REPEAT pairs, the order alternating so that neither setting always runs second."""
    pairs = []
    for n in range(repeat):
        order = SETTINGS if n % 2 == 0 else tuple(reversed(SETTINGS))
        pair = {s: measure(pmload, instances[s], table, conns, seconds) for s in order}
        print(
            f"stats {table.kind} pair {n + 1}/{repeat}: "
            + ", ".join(f"{s} {pair[s]['rps']:.0f}/s {pair[s]['cpu_us']:.2f} us" for s in SETTINGS),
            file=sys.stderr,
            flush=True,
        )
        pairs.append(pair)
    return pairs


def summarize(table: str, conns: int, pairs: list[dict[str, dict[str, float]]]) -> dict:
    def median(setting: str, name: str) -> float:
        return statistics.median(pair[setting][name] for pair in pairs)

    rps_ratios = [pair["on"]["rps"] / pair["off"]["rps"] for pair in pairs]
    cpu_ratios = [pair["on"]["cpu_us"] / pair["off"]["cpu_us"] for pair in pairs]
    row: dict[str, object] = {"table": table, "conns": conns, "pairs": len(pairs)}
    for setting in SETTINGS:
        for name in ("rps", "cpu_us", "p50_us", "p99_us", "workers"):
            row[f"{name}_{setting}"] = median(setting, name)
    row.update(
        rps_ratio=statistics.median(rps_ratios),
        rps_ratio_low=min(rps_ratios),
        rps_ratio_high=max(rps_ratios),
        cpu_ratio=statistics.median(cpu_ratios),
        cpu_ratio_low=min(cpu_ratios),
        cpu_ratio_high=max(cpu_ratios),
    )
    row["met"] = 1 - row["rps_ratio"] <= TARGET_COST
    return row


def stats_rows(
    pmload: Path,
    base: Path,
    program: Path,
    *,
    kinds: tuple[str, ...] = ("texthash", "hash"),
    conns: int = 16,
    seconds: float = 3.0,
    repeat: int = 7,
) -> list[dict]:
    tables = build_tables(base / "stats-tables", list(kinds))
    instances = {s: stats_instance(program, tables, base, s) for s in SETTINGS}
    rows = []
    try:
        for instance in instances.values():
            instance.start()
        for table in tables.values():
            for instance in instances.values():
                instance.wait_until_serving(table.probe_key, table.spec)
                # Warm-up: the table opened, the workers the master spawns for CONNS.
                run_pmload(
                    pmload, instance.socket_path(), table.spec, conns, 1.0, table.keyfile, False
                )
            pairs = paired_runs(pmload, instances, table, conns, seconds, repeat)
            rows.append(summarize(table.kind, conns, pairs))
    finally:
        for instance in instances.values():
            instance.stop()
            instance.cleanup()
    return rows


def stats_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| table | conns | pairs | lookups/s off | on | on/off (lowest–highest) "
        "| CPU µs/lookup off | on | on/off (lowest–highest) | workers off/on | cost ≤ 3 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['table']} | {row['conns']} | {row['pairs']} "
            f"| {row['rps_off']:,.0f} | {row['rps_on']:,.0f} "
            f"| {row['rps_ratio']:.3f} ({row['rps_ratio_low']:.3f}–{row['rps_ratio_high']:.3f}) "
            f"| {row['cpu_us_off']:.2f} | {row['cpu_us_on']:.2f} "
            f"| {row['cpu_ratio']:.3f} ({row['cpu_ratio_low']:.3f}–{row['cpu_ratio_high']:.3f}) "
            f"| {row['workers_off']:.0f}/{row['workers_on']:.0f} "
            f"| {'met' if row['met'] else 'NOT met'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.stats_workload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tables", default="texthash,hash")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--ours", default=str(Path(sys.executable).parent / "proxymap"))
    options = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="pmbench-stats-", dir="/tmp"))
    base.chmod(0o755)
    try:
        rows = stats_rows(
            build_pmload(),
            base,
            Path(options.ours),
            kinds=tuple(options.tables.split(",")),
            conns=options.conns,
            seconds=options.seconds,
            repeat=options.repeat,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(stats_markdown(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
