"""Where the benchmark writes its results: every run out of git, the last summary in it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bench.run import RESULTS_DIR, Report, markdown, write_results

REPO = Path(__file__).resolve().parent.parent


def a_report() -> Report:
    return Report(
        started="2026-11-28T06:00:00Z",
        options={"seconds": 1.0, "repeat": 1, "v311": False},
        host={"cpus": 2, "postfix": "3.7.11"},
        samples=[{"table": "texthash", "conns": 1, "implementation": "ours", "rps": 1234.5}],
    )


def test_a_run_goes_to_runs_and_its_summary_to_latest(tmp_path: Path) -> None:
    report = a_report()
    written = write_results(report, tmp_path)
    assert written == tmp_path / "runs" / "20261128T060000Z.md"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "20261128T060000Z.json",
        "20261128T060000Z.md",
    ]
    data = json.loads((tmp_path / "runs" / "20261128T060000Z.json").read_text())
    assert data["started"] == report.started and data["samples"] == report.samples
    assert (tmp_path / "latest.md").read_text() == written.read_text() == markdown(report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.md", "runs"]


def test_git_ignores_every_run_but_not_latest() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: Path) -> bool:
        relative = str(path.relative_to(REPO))
        done = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", relative])
        return done.returncode == 0

    assert ignored(RESULTS_DIR / "runs" / "20261128T060000Z.json")
    assert ignored(RESULTS_DIR / "runs" / "20261128T060000Z.md")
    assert not ignored(RESULTS_DIR / "latest.md")


def test_a_database_run_has_its_table_and_the_direct_columns() -> None:
    def row(impl: str, rps: float, p99_us: float) -> dict:
        return {
            "table": "pgsql-5ms",
            "conns": 32,
            "implementation": impl,
            "rps": rps,
            "p50_us": 5300.0,
            "p99_us": p99_us,
            "runs": 1,
            "failed_runs": 0,
            "db_over_bound": 0,
        }

    report = Report(
        started="2026-11-28T06:00:00Z",
        options={"seconds": 1.0, "repeat": 1, "v311": False, "db_pool": None},
        host={"cpus": 2, "postfix": "3.7.11"},
        db_limits={"pgsql": 8},
        summary=[
            row("c", 700.0, 140_000.0),
            row("ours", 4600.0, 10_700.0),
            row("direct", 5600.0, 6_060.0),
        ],
    )
    text = markdown(report)
    assert "| table | conns | lookups/s C | ours | ratio | p50 µs C" not in text  # no local rows
    line = next(line for line in text.splitlines() if line.startswith("| pgsql-5ms | 32 |"))
    assert line.endswith("| ≥ 5x C, p99 ≤ 15 ms: met | 5,600 | 5.30 | 6.06 |")
