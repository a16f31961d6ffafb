"""The benchmark's busy-site hash table (tests/bench/run.py, kind hash-busy)."""

from __future__ import annotations

from pathlib import Path

from tests.bench.run import BUSY_ENTRIES, BUSY_KEYS, busy_table
from tests.support.postfix import run_postmap
from tests.support.postmap import require_postmap


def test_the_busy_table_has_its_entries_and_one_key_in_five_missing(tmp_path: Path) -> None:
    require_postmap()
    table = busy_table(tmp_path)
    keys = table.keyfile.read_text().split()
    assert len(keys) == BUSY_KEYS
    absent = sum(key.startswith("absent") for key in keys)
    assert 0.15 < absent / BUSY_KEYS < 0.25
    assert len(set(keys)) > BUSY_KEYS / 2  # drawn at random, not a short cycle
    source = (tmp_path / "users-busy").read_text().splitlines()
    assert len(source) == BUSY_ENTRIES
    last = f"busy{BUSY_ENTRIES - 1}@example.org"
    found = run_postmap(["-q", last, table.spec])
    assert (found.exit, found.stdout.strip()) == (0, f"busy{BUSY_ENTRIES - 1}@mail.example.net")
    missing = run_postmap(["-q", "absent1@example.org", table.spec])
    assert missing.exit == 1
