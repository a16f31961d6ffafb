"""Property-based differential through OUR worker: generated tables, ``proxy:`` vs direct.

Hypothesis writes whole regexp, pcre, cidr and hash tables (the grammars of
``test_tables_patterns_props``, plus mixed-case/UTF-8 postmap sources for hash) and a
batch of keys. The real ``postmap -q - proxy:TYPE:FILE`` asks our worker, run by a
private real Postfix master; ``postmap -q - TYPE:FILE`` opens the same file itself. The
two answer sets must be identical: a proxy is transparent.

Every example writes a new file (a "slot" approved in proxy_read_maps up front), because
a worker keeps the tables it opened for its life, as Postfix's does.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.postfix import PrivatePostfix, ensure_postfix, run_postmap, settle_files
from tests.test_tables_patterns_props import (
    KEYS,
    V4_KEYS,
    V6_KEYS,
    cidr_rules,
    pcre_rules,
    regexp_rules,
)

pytestmark = pytest.mark.postfix

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
MIN_CASES = 2000
SLOTS = {"regexp": 60, "pcre": 60, "cidr": 100, "hash": 60}


def slot_path(tables: Path, table_type: str, index: int) -> Path:
    return tables / f"slot-{index}.{table_type}"


@pytest.fixture(scope="module")
def worker():
    ensure_postfix()
    assert OUR_PROXYMAP.exists(), f"our worker is not installed: {OUR_PROXYMAP}"
    instance = PrivatePostfix(proxymap_program=OUR_PROXYMAP, name="proxy-props")
    probe = instance.tables / "probe"
    probe.write_text("alive yes\n")
    probe.chmod(0o644)
    instance.proxy_read_maps = " ".join(
        [f"proxy:texthash:{probe}"]
        + [
            f"proxy:{table_type}:{slot_path(instance.tables, table_type, index)}"
            for table_type, count in SLOTS.items()
            for index in range(count)
        ]
    )
    settle_files(probe)
    with instance:
        instance.wait_until_serving("alive", f"texthash:{probe}")
        instance.slots = {table_type: itertools.count() for table_type in SLOTS}
        instance.found = dict.fromkeys(SLOTS, 0)  # keys found: the property is not vacuous
        yield instance


def answers(instance: PrivatePostfix, table: str, keys: list[str]) -> dict[str, str | None]:
    """One ``postmap -q -`` run for all keys; ``None`` = not found.

    postmap prints ``key<TAB>value`` for each key found, in input order.
    """
    done = run_postmap(
        ["-q", "-", table],
        conf_dir=instance.conf_dir,
        stdin="".join(f"{key}\n" for key in keys).encode(),
    )
    assert done.exit in (0, 1) and "fatal" not in done.stderr, done.stderr + instance.log_tail()
    lines = done.stdout.split("\n") if done.stdout else []
    found: dict[str, str | None] = {}
    position = 0
    for key in keys:
        if position < len(lines) and lines[position].startswith(key + "\t"):
            found[key] = lines[position][len(key) + 1 :]
            position += 1
        else:
            found[key] = None
    assert position == len(lines), f"unparsed postmap output: {lines[position:]}"
    return found


def compare(instance: PrivatePostfix, table_type: str, source: str, keys: list[str]) -> int:
    index = next(instance.slots[table_type])
    assert index < SLOTS[table_type], "more examples than approved slots"
    path = slot_path(instance.tables, table_type, index)
    path.write_text(source)
    path.chmod(0o644)
    if table_type == "hash":
        built = run_postmap([f"hash:{path}"], conf_dir=instance.conf_dir)
        assert built.exit == 0, built.stderr
        Path(f"{path}.db").chmod(0o644)
    direct = answers(instance, f"{table_type}:{path}", keys)
    proxied = answers(instance, f"proxy:{table_type}:{path}", keys)
    differences = {k: (direct[k], proxied[k]) for k in keys if direct[k] != proxied[k]}
    assert not differences, f"table:\n{source}\n(direct, proxy): {differences}"
    instance.found[table_type] += sum(value is not None for value in proxied.values())
    return len(keys)


def run_property(instance, table_type: str, sources, keys) -> int:
    cases: list[int] = []

    @settings(
        max_examples=SLOTS[table_type],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(lines=sources, keys=keys)
    def check(lines, keys):
        source = "\n".join(lines) + "\n" if isinstance(lines, list) else lines
        cases.append(compare(instance, table_type, source, keys))

    check()
    return sum(cases)


def test_regexp_through_proxy_equals_direct(worker):
    assert run_property(worker, "regexp", regexp_rules(), KEYS) >= MIN_CASES
    assert worker.found["regexp"] >= MIN_CASES // 20


def test_pcre_through_proxy_equals_direct(worker):
    assert run_property(worker, "pcre", pcre_rules(), KEYS) >= MIN_CASES
    assert worker.found["pcre"] >= MIN_CASES // 20


def test_cidr_through_proxy_equals_direct(worker):
    keys = st.lists(st.one_of(V4_KEYS, V6_KEYS), min_size=25, max_size=30, unique=True)
    assert run_property(worker, "cidr", cidr_rules(), keys) >= MIN_CASES
    assert worker.found["cidr"] >= MIN_CASES // 20


HASH_KEY = st.text(alphabet="abcXYZ.@-_1é€ßÉ", min_size=1, max_size=10)
HASH_VALUE = st.text(alphabet="abc XYZ,@1é", min_size=1, max_size=12).map(str.strip).filter(bool)


@st.composite
def hash_source_and_keys(draw):
    entries = draw(st.dictionaries(HASH_KEY, HASH_VALUE, min_size=20, max_size=40))
    source = "".join(f"{key} {value}\n" for key, value in entries.items())
    present = list(entries)
    variants = [key.upper() for key in present] + [key.swapcase() for key in present]
    absent = draw(st.lists(HASH_KEY, min_size=5, max_size=10))
    keys = list(dict.fromkeys(present + variants + absent))
    return source, keys


def test_hash_through_proxy_equals_direct(worker):
    cases: list[int] = []

    @settings(
        max_examples=SLOTS["hash"],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=hash_source_and_keys())
    def check(case):
        source, keys = case
        cases.append(compare(worker, "hash", source, keys))

    check()
    assert sum(cases) >= MIN_CASES
    assert worker.found["hash"] >= MIN_CASES // 4
