"""Differential test of the file, pattern, composite and socket tables through our worker.

The companion of ``test_vectors_basic`` for the other table types: indexed files (hash,
btree, lmdb, cdb), patterns (regexp, pcre, cidr), composites (pipemap, unionmap,
randmap) and socket clients (tcp, socketmap, against our fakes of the servers the
vectors were recorded with: tests/support/fake_vector_servers.py). For every direct
vectors.tsv row (tests/vectors: recorded with Postfix 3.7.11, copied from the project's
spec), ``postmap -q KEY proxy:MAP`` through the real Postfix master and OUR worker must
equal ``postmap -q KEY MAP`` run live, and that must equal the recording.

One deliberate difference: a direct ``postmap -q '' lmdb:…`` aborts (LMDB refuses an
empty key); our worker answers "not found", as the C proxymap did once its instance had
learned the NUL convention (docs/TABLES.md 3.1). That row is checked against "not found".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from proxymap import flags
from tests.support.postfix import PrivatePostfix, ensure_postfix
from tests.support.vectors import (
    absolute_map,
    build_vector_tables,
    fake_servers,
    load_open_flags,
    load_vectors,
    proxy_read_maps_for,
    rows_of_types,
)

pytestmark = pytest.mark.postfix

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
TYPES = (
    "hash",
    "btree",
    "lmdb",
    "cdb",
    "regexp",
    "pcre",
    "cidr",
    "pipemap",
    "unionmap",
    "randmap",
    "tcp",
    "socketmap",
)
NOT_FOUND = ("1", "")


DIRECT_ROWS = [row for row in rows_of_types(load_vectors(), TYPES) if not row.proxied]
OPEN_FLAG_ROWS = [row for row in load_open_flags() if row.map_type in TYPES]


def deliberate_difference(row) -> tuple[str, str] | None:
    """What we answer where the direct client fails for a reason no proxy should copy."""
    if row.map_type == "lmdb" and row.key == "" and row.outcome[0] == "E":
        return NOT_FOUND
    return None


@pytest.fixture(scope="module")
def vector_postfix(tmp_path_factory):
    ensure_postfix()
    assert OUR_PROXYMAP.exists(), f"our worker is not installed: {OUR_PROXYMAP}"
    instance = PrivatePostfix(proxymap_program=OUR_PROXYMAP, name="vectors-tables")
    instance.vectors = build_vector_tables(instance.tree / "vectors")
    instance.proxy_read_maps = proxy_read_maps_for(
        [row.map for row in DIRECT_ROWS] + [row.map for row in OPEN_FLAG_ROWS], instance.vectors
    )
    with fake_servers(tmp_path_factory.mktemp("wire")), instance:
        instance.wait_until_serving("alice", absolute_map("hash:fixed.src", instance.vectors))
        yield instance


def test_every_type_has_rows():
    assert {row.map_type for row in DIRECT_ROWS} == set(TYPES)


@pytest.mark.parametrize(
    "row", DIRECT_ROWS, ids=[f"L{r.line}-{r.map[:24]}-{r.key[:20]!r}" for r in DIRECT_ROWS]
)
def test_proxy_is_transparent(vector_postfix, row):
    table = absolute_map(row.map, vector_postfix.vectors)
    direct = vector_postfix.lookup(row.key, table).outcome()
    assert direct == row.outcome, "the direct client disagrees with the recording"
    proxied = vector_postfix.lookup(row.key, "proxy:" + table)
    expected = deliberate_difference(row) or direct
    assert proxied.outcome() == expected, proxied.stderr + vector_postfix.log_tail()


@pytest.mark.parametrize("row", OPEN_FLAG_ROWS, ids=[r.map[:40] for r in OPEN_FLAG_ROWS])
def test_open_reply_flags(vector_postfix, row):
    table = absolute_map(row.map, vector_postfix.vectors)
    with vector_postfix.client() as client:
        reply = client.open(table, row.request_flags)
    assert reply["status"].decode() == row.status
    assert int(reply["flags"]) & flags.IMPL_MASK == row.reply_flags & flags.IMPL_MASK, (
        f"{flags.flag_names(int(reply['flags']))} vs recorded {row.reply_flag_names}"
    )
