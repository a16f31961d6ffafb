"""Run the fuzz targets under atheris and report inputs, coverage and time.

NAME
    run -- ``python -m tests.fuzz.run [--runs N] [--jobs J] [TARGET ...] [-- OPTIONS]``

DESCRIPTION
    Starts one atheris process (``tests.fuzz.child``) per target -- ``attr``,
    ``scanner``, ``connection``; all three by default -- at most ``--jobs`` at a time
    (default: the number of CPUs), each in a fresh work directory under /dev/shm.
    ``--runs`` is the total number of inputs, shared by the targets in the ratio
    3:3:4 (the connection target gets the largest part: it covers the most code).
    Options after ``--`` go to libFuzzer (e.g. ``-seed=1``, ``-max_total_time=60``).

    Prints one line per target (inputs, libFuzzer's coverage counters ``cov`` --
    instrumented branches reached -- and ``ft`` -- features -- corpus size,
    seconds, inputs per second) and a total. A crash, a hang or a violated property
    stops that target: its input is kept under ``fuzz-artifacts/`` (reproduce with
    ``python -m tests.fuzz.child TARGET DIR fuzz-artifacts/crash-...``), the log
    tail is printed and the exit status is 1.

EXIT STATUS
    0 when every target ran all its inputs without a finding.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("attr", "scanner", "connection")
WEIGHTS = {"attr": 3, "scanner": 3, "connection": 4}
DEFAULT_RUNS = 1_000_000
ARTIFACTS = Path("fuzz-artifacts")


@dataclass
class Outcome:
    target: str
    runs: int
    wanted: int
    cov: int
    features: int
    corpus: int
    seconds: float
    returncode: int
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.runs >= self.wanted

    def line(self) -> str:
        rate = self.runs / self.seconds if self.seconds else 0.0
        verdict = "ok" if self.ok else f"FAILED (exit {self.returncode})"
        return (
            f"{self.target:<11} {self.runs:>9} inputs  cov {self.cov:>5}  ft {self.features:>6}"
            f"  corpus {self.corpus:>5}  {self.seconds:7.1f} s  {rate:7.0f}/s  {verdict}"
        )


def parse_log(text: str) -> tuple[int, int, int, int]:
    """(inputs executed, cov, ft, corpus units) from a libFuzzer log."""
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    progress = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
    cov, features, corpus = map(int, progress[-1]) if progress else (0, 0, 0)
    return (int(runs[-1]) if runs else 0), cov, features, corpus


def fuzz_one(target: str, runs: int, options: list[str], base: Path) -> Outcome:
    workdir = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=base))
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.child",
        target,
        str(workdir),
        f"-runs={runs}",
        *options,
    ]
    started = time.monotonic()
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        check=False,
    )
    seconds = time.monotonic() - started
    count, cov, features, corpus = parse_log(done.stdout)
    crashes = [p for p in workdir.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    if crashes:
        ARTIFACTS.mkdir(exist_ok=True)
        for crash in crashes:
            shutil.copy(crash, ARTIFACTS / f"{target}-{crash.name}")
    shutil.rmtree(workdir, ignore_errors=True)
    return Outcome(
        target, count, runs, cov, features, corpus, seconds, done.returncode, done.stdout
    )


def share(total: int, targets: list[str]) -> dict[str, int]:
    weight = sum(WEIGHTS[t] for t in targets)
    runs = {t: total * WEIGHTS[t] // weight for t in targets}
    runs[targets[-1]] += total - sum(runs.values())
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, options = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run")
    parser.add_argument("targets", nargs="*", choices=[*TARGETS, []], default=[])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="inputs in all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    targets = list(args.targets or TARGETS)
    runs = share(args.runs, targets)
    base = Path(
        tempfile.mkdtemp(prefix="pmfz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    base.chmod(0o755)
    print(
        f"fuzzing {', '.join(f'{t} {runs[t]}' for t in targets)} inputs, {args.jobs} at a time",
        flush=True,
    )
    started = time.monotonic()
    # The slowest target first, so that the others share the remaining CPU.
    order = sorted(targets, key=lambda t: -WEIGHTS[t])
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(lambda t: fuzz_one(t, runs[t], options, base), order))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - started
    for outcome in outcomes:
        print(outcome.line())
    total = sum(o.runs for o in outcomes)
    print(f"{'total':<11} {total:>9} inputs in {elapsed:.1f} s")
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        print(f"\n--- {outcome.target}: last lines of the libFuzzer log ---")
        print("\n".join(outcome.log.splitlines()[-60:]))
        print(f"(inputs kept under {ARTIFACTS}/)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
