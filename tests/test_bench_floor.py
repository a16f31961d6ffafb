"""The one-connection floor workload's servers and report (tests/bench/floor_workload.py)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.floor_workload import (
    ANNOUNCEMENT,
    FIXED_REPLY,
    FixedReply,
    build_echo,
    floor_markdown,
    start_process,
)
from tests.bench.run import build_pmload, run_pmload

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def _load(socket_path: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alice\nbob\n")
    result = run_pmload(build_pmload(), socket_path, "floor", 1, 0.3, keys, False)
    assert result.exit == 0, result.error
    assert result.requests > 100
    assert result.ok == result.requests  # every request answered once, "found"


@pytest.mark.parametrize("server", ["c", "python"])
def test_a_fixed_reply_server_answers_every_lookup_once(server: str, tmp_path: Path) -> None:
    socket_path = tmp_path / "floor.sock"
    if server == "c":
        command = [str(build_echo()), str(socket_path)]
    else:
        command = [sys.executable, "-m", "tests.bench.floor_workload", "--serve", str(socket_path)]
    process = start_process(command, socket_path)
    try:
        _load(socket_path, tmp_path)
    finally:
        process.kill()
        process.wait()


class _Transport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def test_the_python_server_counts_requests_across_chunks() -> None:
    request = b"request\0lookup\0table\0floor\0flags\0" + b"524353\0key\0alice\0\0"
    protocol = FixedReply()
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    data = request * 3
    cuts = (0, 5, len(request) + 3, len(data))  # part of one, the rest and a bit, the rest
    for start, end in itertools.pairwise(cuts):
        protocol.data_received(data[start:end])
    assert transport.written == ANNOUNCEMENT + FIXED_REPLY * 3


def test_the_report_compares_each_placement_with_its_c_floor() -> None:
    rows = [
        {"placement": "one-cpu", "server": "c-echo", "rps": 200_000.0, "p50_us": 4.0},
        {"placement": "one-cpu", "server": "ours", "rps": 100_000.0, "p50_us": 8.0},
        {"placement": "two-cpus", "server": "c-echo", "rps": 50_000.0, "p50_us": 12.0},
        {"placement": "two-cpus", "server": "ours", "rps": 40_000.0, "p50_us": 18.0},
    ]
    for row in rows:
        row.update(conns=1, p99_us=30.0, cpu_us=5.0)
    lines = floor_markdown(rows)
    assert lines[3].endswith("| 0.50 |") and lines[5].endswith("| 0.80 |")


def test_echo_floor_compiles_without_warnings(tmp_path: Path) -> None:
    source = Path(__file__).parent / "bench" / "echo_floor.c"
    done = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp_path / "e"), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
