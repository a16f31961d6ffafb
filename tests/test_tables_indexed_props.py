"""Property-based differential tests: our indexed tables versus the real postmap.

Random postmap sources (mixed case, UTF-8 letters that casefold in interesting ways,
quoted keys with blanks inside the quotes, values with inner blanks) are built with the
real postmap for every indexed type; then a sample of present and absent keys is asked
both of our table classes and of ``postmap -q -`` (one batch per table). Our update
path is checked the other way round: what we write, postmap must read back.
"""

from __future__ import annotations

import os
import random
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxymap import flags as F
from proxymap.tables.cdb import CdbReader, write_cdb
from tests.support.postmap import (
    CLIENT_LOOKUP_FLAGS,
    INDEXED_TYPES,
    SERVER_WRITE_FLAGS,
    build_table,
    client_folded_key,
    dump,
    open_indexed,
    our_dump,
    our_lookup,
    query_many,
    require_postmap,
)

# Letters whose folding differs between ASCII lowering and Unicode casefolding.
UNICODE_LETTERS = "äÄöÖüÜßẞéÉİıøØçÇσΣςﬃŉǅ"
KEY_CHARS = string.ascii_letters + string.digits + "._-+@=:/%!" + UNICODE_LETTERS
VALUE_CHARS = KEY_CHARS + " \t,;<>|\"'#$"
WRITABLE_TYPES = ("hash", "btree", "lmdb")

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

plain_keys = st.text(KEY_CHARS, min_size=1, max_size=24)
quoted_keys = st.builds(
    lambda words, domain: '"' + " ".join(words) + '"@' + domain,
    st.lists(st.text(KEY_CHARS.replace('"', ""), min_size=1, max_size=8), min_size=2, max_size=3),
    st.text(string.ascii_lowercase, min_size=1, max_size=8),
)
keys = st.one_of(plain_keys, plain_keys, quoted_keys)
# postmap trims the value and skips an empty one: generate only what it keeps as is.
values = st.text(VALUE_CHARS, min_size=1, max_size=40).map(str.strip).filter(bool)
entries = st.lists(st.tuples(keys, values), min_size=1, max_size=60)


@pytest.fixture(scope="module", autouse=True)
def _postfix() -> None:
    require_postmap()


def case_variants(key: str, rng: random.Random) -> str:
    """The key with a random mix of upper and lower case letters."""
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in key)


def compare(spec: str, asked: list[str]) -> int:
    """Our lookup == postmap -q for every key; returns the number found."""
    table = open_indexed(spec)
    expected = query_many(spec, asked)
    for key in asked:
        assert our_lookup(table, key) == expected.get(key), (spec, key)
    if not spec.startswith("cdb:"):
        assert our_dump(table) == dump(spec), spec
    table.close()
    return len(expected)


@pytest.mark.postfix
@PROPERTY_SETTINGS
@given(table_entries=entries, absent=st.lists(keys, max_size=10), seed=st.integers(0, 1 << 30))
def test_random_tables_answer_like_postmap(table_entries, absent, seed):
    rng = random.Random(seed)
    asked = [k for k, _ in table_entries] + absent
    asked += [case_variants(k, rng) for k, _ in table_entries]
    asked = list(dict.fromkeys(asked))
    with tempfile.TemporaryDirectory(prefix="indexed-props-") as tmp:
        source = Path(tmp) / "t"
        for dict_type in INDEXED_TYPES:
            spec = build_table(dict_type, source, table_entries)
            assert compare(spec, asked) >= 1


def random_entries(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """COUNT entries drawn like the strategies above, from a seeded generator."""
    made = []
    for n in range(count):
        length = rng.randint(1, 20)
        key = "".join(rng.choice(KEY_CHARS) for _ in range(length))
        if n % 10 == 0:
            key = f'"{key[:5]} {key[5:] or "x"}"@example.com'
        value = "".join(rng.choice(VALUE_CHARS) for _ in range(rng.randint(1, 30))).strip()
        made.append((key, value or f"v{n}"))
    return made


@pytest.mark.postfix
@pytest.mark.slow
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 1 << 30))
def test_large_random_tables_answer_like_postmap(seed):
    """12 000 entries per table; 2 000 keys asked (present, re-cased, absent)."""
    rng = random.Random(seed)
    table_entries = random_entries(rng, 12_000)
    present = [k for k, _ in rng.sample(table_entries, 1500)]
    asked = present + [case_variants(k, rng) for k in present[:300]]
    asked += [f"absent-{rng.random()}" for _ in range(200)]
    with tempfile.TemporaryDirectory(prefix="indexed-props-big-") as tmp:
        source = Path(tmp) / "big"
        for dict_type in INDEXED_TYPES:
            spec = build_table(dict_type, source, table_entries)
            assert compare(spec, asked) >= 1500


@pytest.mark.postfix
@PROPERTY_SETTINGS
@given(written=entries, removed=st.integers(0, 10))
def test_our_updates_are_read_by_postmap(written, removed):
    """What a 3.7 client stores through us (key casefolded by the client) postmap reads."""
    expected: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="indexed-props-w-") as tmp:
        for dict_type in WRITABLE_TYPES:
            spec = f"{dict_type}:{tmp}/{dict_type}"
            table = open_indexed(spec, os.O_RDWR | os.O_CREAT)
            expected.clear()
            for key, value in written:
                folded = client_folded_key(key)
                table.flags = (table.flags & ~F.RQST_MASK) | F.LOCK | SERVER_WRITE_FLAGS
                assert table.update(folded, value.encode()) == 0
                expected[folded.decode()] = value
            for key in list(expected)[:removed]:
                table.flags = (table.flags & ~F.RQST_MASK) | F.LOCK | F.SYNC_UPDATE
                assert table.delete(key.encode()) == 0
                del expected[key]
            table.close()
            assert sorted(dump(spec)) == sorted(expected.items())
            asked = [k for k, _ in written]
            answers = query_many(spec, asked)
            assert answers == {
                k: expected[client_folded_key(k).decode()]
                for k in asked
                if client_folded_key(k).decode() in expected
            }
            reader = open_indexed(spec)
            reader.flags = (reader.flags & ~F.RQST_MASK) | CLIENT_LOOKUP_FLAGS
            for key in asked:
                assert our_lookup(reader, key) == answers.get(key)
            reader.close()


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=60)), max_size=80),
    absent=st.lists(st.binary(max_size=30), max_size=10),
)
def test_cdb_round_trip(items, absent):
    """Our cdb writer and reader agree: first record wins, iteration is file order."""
    with tempfile.TemporaryDirectory(prefix="indexed-cdb-") as tmp:
        path = os.path.join(tmp, "t.cdb")
        write_cdb(path, items)
        reader = CdbReader.open(path)
        assert list(reader) == items
        first: dict[bytes, bytes] = {}
        for key, value in items:
            first.setdefault(key, value)
        for key, value in first.items():
            assert reader.get(key) == value
        for key in absent:
            assert reader.get(key) == first.get(key)
        reader.close()
