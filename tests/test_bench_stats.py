"""The statistics-cost workload's arithmetic (tests/bench/stats_workload.py)."""

from __future__ import annotations

import pytest

from tests.bench.stats_workload import stats_markdown, summarize


def _run(rps: float, cpu_us: float, workers: int = 2) -> dict[str, float]:
    return {"rps": rps, "cpu_us": cpu_us, "p50_us": 100.0, "p99_us": 900.0, "workers": workers}


def test_the_figure_of_a_repeat_is_the_ratio_within_its_pair() -> None:
    # The machine drifts by 2x between pairs; within each pair "on" costs 2 %.
    pairs = [
        {"off": _run(50_000, 10.0), "on": _run(49_000, 10.2)},
        {"off": _run(25_000, 20.0), "on": _run(24_500, 20.4)},
        {"off": _run(40_000, 12.5), "on": _run(39_200, 12.75)},
    ]
    row = summarize("texthash", 16, pairs)
    assert row["rps_ratio"] == pytest.approx(0.98)
    assert row["cpu_ratio"] == pytest.approx(1.02)
    assert row["rps_off"] == 40_000 and row["rps_on"] == 39_200
    assert row["met"] is True


def test_a_cost_above_three_per_cent_is_not_met() -> None:
    pairs = [{"off": _run(50_000, 10.0), "on": _run(48_000, 10.5)} for _ in range(3)]
    row = summarize("hash", 16, pairs)
    assert row["rps_ratio"] == pytest.approx(0.96)
    assert row["met"] is False
    assert "NOT met" in stats_markdown([row])[-1]


def test_the_spread_of_the_pairs_is_reported() -> None:
    pairs = [
        {"off": _run(50_000, 10.0), "on": _run(45_000, 11.0)},
        {"off": _run(50_000, 10.0), "on": _run(50_000, 10.0)},
        {"off": _run(50_000, 10.0), "on": _run(55_000, 9.0)},
    ]
    row = summarize("hash", 16, pairs)
    assert (row["rps_ratio_low"], row["rps_ratio"], row["rps_ratio_high"]) == pytest.approx(
        (0.9, 1.0, 1.1)
    )
    assert "1.000 (0.900–1.100)" in stats_markdown([row])[-1]
