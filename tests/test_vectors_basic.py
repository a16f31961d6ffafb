"""Differential test: through our worker, a proxied lookup equals the direct one.

For every vectors.tsv row (tests/vectors: recorded with Postfix 3.7.11, copied from
the project's spec) of the built-in, file-less or text types below, the real
``postmap -q KEY proxy:MAP`` through the real Postfix master and OUR proxymap must
give exactly what ``postmap -q KEY MAP`` gives when the client opens the table itself
(run live), and that must be what was recorded on the reference machine. A proxy is
transparent: where the recorded 3.7 C proxymap differed from direct (docs/DROPIN.md,
"Known differences"), we follow direct.

Open replies are compared too: the FIXED/PATTERN/MULTI_WRITER bits a fresh open
answers, against open-flags.tsv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from proxymap import flags
from tests.support.postfix import PrivatePostfix, ensure_postfix
from tests.support.vectors import (
    HOST_DEPENDENT_TYPES,
    REPOSITORY,
    absolute_map,
    build_vector_tables,
    known_differences_markdown,
    load_open_flags,
    load_vectors,
    proxy_read_maps_for,
    rows_of_types,
    vectors_dir,
)

pytestmark = pytest.mark.postfix

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
BASIC_TYPES = ("texthash", "inline", "static", "fail", "environ", "unix")

# 3.7 could not open a texthash file with duplicate keys (surrogate table, PATTERN);
# a transparent proxy opens it as the client does, so it answers like a healthy one.
HEALTHY_TWIN = {"texthash:dups.src": "texthash:fixed.src"}


DIRECT_ROWS = [row for row in rows_of_types(load_vectors(), BASIC_TYPES) if not row.proxied]
OPEN_FLAG_ROWS = [row for row in load_open_flags() if row.map_type in BASIC_TYPES]


def row_id(row) -> str:
    return f"L{row.line}-{row.map[:24]}-{row.key[:24]!r}"


def test_vectors_are_available():
    assert (vectors_dir() / "vectors.tsv").is_file(), f"no test vectors in {vectors_dir()}"
    assert DIRECT_ROWS and OPEN_FLAG_ROWS


@pytest.fixture(scope="module")
def vector_postfix():
    ensure_postfix()
    assert OUR_PROXYMAP.exists(), f"our worker is not installed: {OUR_PROXYMAP}"
    instance = PrivatePostfix(proxymap_program=OUR_PROXYMAP, name="harness-vectors")
    instance.vectors = build_vector_tables(instance.tree / "vectors")
    instance.proxy_read_maps = proxy_read_maps_for(
        [row.map for row in DIRECT_ROWS] + [row.map for row in OPEN_FLAG_ROWS], instance.vectors
    )
    with instance:
        instance.wait_until_serving("alice", absolute_map("texthash:fixed.src", instance.vectors))
        yield instance


@pytest.mark.parametrize("row", DIRECT_ROWS, ids=[row_id(r) for r in DIRECT_ROWS])
def test_proxy_is_transparent(vector_postfix, row):
    table = absolute_map(row.map, vector_postfix.vectors)
    direct = vector_postfix.lookup(row.key, table).outcome()
    if row.map_type not in HOST_DEPENDENT_TYPES:
        assert direct == row.outcome, "the direct client disagrees with the recording"
    proxied = vector_postfix.lookup(row.key, "proxy:" + table)
    assert proxied.outcome() == direct, proxied.stderr + vector_postfix.log_tail()


@pytest.mark.parametrize("row", OPEN_FLAG_ROWS, ids=[r.map[:40] for r in OPEN_FLAG_ROWS])
def test_open_reply_flags(vector_postfix, row):
    recorded = {r.map: r for r in OPEN_FLAG_ROWS}
    expected = recorded[HEALTHY_TWIN.get(row.map, row.map)]
    table = absolute_map(row.map, vector_postfix.vectors)
    with vector_postfix.client() as client:
        reply = client.open(table, row.request_flags)
    assert reply["status"].decode() == expected.status
    assert int(reply["flags"]) & flags.IMPL_MASK == expected.reply_flags & flags.IMPL_MASK, (
        f"{flags.flag_names(int(reply['flags']))} vs recorded {expected.reply_flag_names}"
    )


def test_dropin_doc_lists_the_current_known_differences():
    doc = (REPOSITORY / "docs" / "DROPIN.md").read_text()
    begin = doc.index("-->\n", doc.index("<!-- BEGIN known-differences")) + len("-->\n")
    end = doc.index("<!-- END known-differences -->")
    assert doc[begin:end] == known_differences_markdown(load_vectors()), (
        "regenerate the table in docs/DROPIN.md with: python -m tests.support.vectors"
    )
