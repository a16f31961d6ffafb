"""The benchmark's own tables (tests/bench/run.py): hash-busy and sqlite."""

from __future__ import annotations

from pathlib import Path

from tests.bench.run import BUSY_ENTRIES, BUSY_KEYS, INDEXED_ENTRIES, busy_table, sqlite_table
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


def test_the_sqlite_table_answers_postfix_itself(tmp_path: Path) -> None:
    """The sqlite kind: the indexed tables' entries, and a .cf Postfix's client reads."""
    require_postmap()
    tmp_path.chmod(0o755)
    table = sqlite_table(tmp_path, ["user1@example.com", "nobody@example.com"])
    assert table.keyfile.read_text().split() == ["user1@example.com", "nobody@example.com"]
    last = f"user{INDEXED_ENTRIES - 1}@example.com"
    found = run_postmap(["-q", last, table.spec])
    assert (found.exit, found.stdout.strip()) == (
        0,
        f"user{INDEXED_ENTRIES - 1}@mail.example.net",
    ), found.stderr
    assert run_postmap(["-q", "nobody@example.com", table.spec]).exit == 1
