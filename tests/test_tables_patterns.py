"""Pattern and composite tables against the real Postfix's recorded answers.

Every direct ``vectors.tsv`` row of the types regexp, pcre, cidr, pipemap, unionmap,
randmap, tcp and socketmap is replayed the way ``postmap -q`` looks it up: open with
the client's flags (fold_fix | utf8_request | lock | warn_dup), casefold the key only
when the table says it is fixed, then look up with the request flags 524353. tcp and
socketmap rows talk to the shared fake servers (started here when not running).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxymap import flags as F
from proxymap.tables import open_table
from proxymap.tables.base import DictError, OpenContext, SurrogateTable
from proxymap.tables.cidr import CidrTable
from proxymap.tables.pcre import PcreTable
from proxymap.tables.randmap import RandmapTable
from proxymap.tables.regexp import RegexpTable
from tests.support.fake_vector_servers import FakeVectorServers
from tests.support.postfix import ensure_postfix, postmap_path
from tests.support.vectors import (
    absolute_map,
    build_vector_tables,
    fake_servers_on_free_ports,
    load_vectors,
)

TYPES = ("regexp", "pcre", "cidr", "pipemap", "unionmap", "randmap", "tcp", "socketmap")
REQUEST_FLAGS = 524353  # what postmap -q sends: utf8_request | lock | warn_dup
OPEN_FLAGS = REQUEST_FLAGS | F.FOLD_FIX

ROWS = [row for row in load_vectors() if not row.proxied and row.map_type in TYPES]


def make_context(params=None) -> OpenContext:
    ctx = OpenContext(params=dict(params or {}))
    ctx.open_table = lambda spec, mode, flags: open_table(spec, mode, flags, ctx)
    return ctx


def lookup_like_postmap(spec: str, key: str) -> tuple[str, str]:
    """(exit, value) in the vectors' notation for one direct `postmap -q KEY SPEC`."""
    table = open_table(spec, os.O_RDONLY, OPEN_FLAGS, make_context())
    if isinstance(table, SurrogateTable):
        return "E", ""
    wire_key = key.casefold() if table.flags & F.FIXED else key
    table.flags = REQUEST_FLAGS | (table.flags & (F.FIXED | F.PATTERN))
    try:
        if table.asynchronous:
            value = asyncio.run(table.alookup(wire_key.encode()))
        else:
            value = table.lookup(wire_key.encode())
    except DictError:
        return "E", ""
    finally:
        table.close()
    if value is None:
        return "1", ""
    return "0", value.decode("utf-8", "surrogateescape")


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory) -> Path:
    ensure_postfix()  # the indexed members (hash:fixed.src) are built by the real postmap
    return build_vector_tables(tmp_path_factory.mktemp("patterns-vectors") / "v")


@pytest.fixture(scope="module")
def fake_servers(tmp_path_factory) -> Iterator[FakeVectorServers]:
    """The vectors' tcp/socketmap fakes, on ports of their own (no other test waits)."""
    with fake_servers_on_free_ports(tmp_path_factory.mktemp("wire")) as fakes:
        yield fakes


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.line}:{r.map[:40]}:{r.key[:20]}" for r in ROWS])
def test_vector_row_like_direct_postmap(row, vector_dir, request):
    spec = absolute_map(row.map, vector_dir)
    if row.map_type in ("tcp", "socketmap"):
        spec = request.getfixturevalue("fake_servers").on_own_ports(spec)
    assert lookup_like_postmap(spec, row.key) == row.outcome


def test_vectors_cover_every_type():
    assert {row.map_type for row in ROWS} == set(TYPES)
    assert len(ROWS) >= 180


# --- inline and composite forms, compared live with the real postmap --------------------

LIVE_CASES = [
    ("regexp:{}", "a"),
    ("regexp:{ }", "a"),
    ("regexp:{/a/ b}", "a"),
    ("regexp:{ {/a/ b} }x", "a"),
    ("pcre:{{/a/ x}, {/b/}}", "b"),
    ("regexp:{{/(a)/ $1$1}}", "xa"),
    ("cidr:{{1.2.3.4 x}, {if 10.0.0.0/8}, {10.1.1.1 y}, {endif}}", "10.1.1.1"),
    ("cidr:{{!10.0.0.0/8 x}}", "11.0.0.1"),
    ("cidr:{{!10.0.0.0/8 x}}", "::1"),
    ("regexp:{{ /a/ spaced }}", "a"),
    ("regexp:{{if /a/}, {/b/ ab}, {endif}}", "ab"),
    ("regexp:{{/a/ {x} }}", "a"),
    ("pcre:{ {/a/ x } , {/b/ y} }", "b"),
    ("randmap:{{a b}}", "k"),
    ("randmap:{ }", "k"),
    ("randmap:{a}x", "k"),
    ("unionmap:{}", "k"),
    ("pipemap:{randmap:{x}}", "k"),
    ("unionmap:{regexp:{{/./ v}}, { randmap:{y} }}", "k"),
    ("unionmap:{regexp:{{/./ v}}, regexp:{{/./ w}}}", "k"),
    ("unionmap:{regexp:{{/./ v}}, regexp:{{/x/ w}}}", "k"),
    ("pipemap:{regexp:{{/(.*)/ $1-x}}, regexp:{{/-x$/ ok}}}", "k"),
    ("pipemap:{regexp:{{/(.*)/ $1-x}}, cidr:/nonexistent/file}", "k"),
    ("unionmap:{regexp:{{/./ v}}, pcre:/nonexistent/file}", "k"),
    ("unionmap:{cidr:{{0.0.0.0/0 any}}, regexp:{{/^1/ one}}}", "1.2.3.4"),
    ("regexp:{{/a/ one},{/a/ two}}", "a"),
    ("regexp:{{/A/i upper}, {/a/ lower}}", "a"),
]


@pytest.mark.parametrize(("spec", "key"), LIVE_CASES)
def test_inline_and_composite_forms_match_postmap(spec, key):
    ensure_postfix()
    done = subprocess.run(
        [postmap_path(), "-q", key, spec], capture_output=True, text=True, check=False
    )
    if done.returncode == 0:
        expected = ("0", done.stdout[:-1] if done.stdout.endswith("\n") else done.stdout)
    else:
        expected = ("E", "") if "fatal:" in done.stderr else ("1", "")
    assert lookup_like_postmap(spec, key) == expected


def test_randmap_picks_every_value():
    table = RandmapTable("{a, b, {c d}}", os.O_RDONLY, 0)
    assert {table.lookup(b"k") for _ in range(200)} == {b"a", b"b", b"{c d}"}


# --- details that the vectors do not show directly --------------------------------------


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_fresh_flags_are_pattern(tmp_path):
    for cls, text in ((RegexpTable, "/a/ b\n"), (PcreTable, "/a/ b\n"), (CidrTable, "1.2.3.4 x\n")):
        table = cls(write(tmp_path, "t", text), os.O_RDONLY, 0, make_context())
        assert table.flags == F.PATTERN
    assert RandmapTable("{a, b}", os.O_RDONLY, 0).flags == F.PATTERN


@pytest.mark.parametrize("cls", [RegexpTable, PcreTable, CidrTable])
def test_missing_file_is_unavailable_and_read_write_is_refused(cls, tmp_path):
    spec = f"{cls.dict_type}:{tmp_path}/nonexistent"
    table = open_table(spec, os.O_RDONLY, 0, make_context())
    assert isinstance(table, SurrogateTable)
    with pytest.raises(DictError):
        table.lookup(b"x")
    existing = write(tmp_path, "t", "/x/ y\n")
    rw = open_table(f"{cls.dict_type}:{existing}", os.O_RDWR | os.O_CREAT, 0, make_context())
    assert isinstance(rw, SurrogateTable)


@pytest.mark.parametrize("cls", [RegexpTable, PcreTable])
def test_no_regsub_at_open_drops_substitution_rules(cls, tmp_path):
    path = write(tmp_path, "t", "/^(a.*)/ got=$1\n/^a/ plain\n")
    normal = cls(path, os.O_RDONLY, 0, make_context())
    without = cls(path, os.O_RDONLY, F.NO_REGSUB, make_context())
    assert normal.lookup(b"abc") == b"got=abc"
    assert without.lookup(b"abc") == b"plain"
    normal.flags |= F.NO_REGSUB  # a request bit changes nothing after open
    assert normal.lookup(b"abc") == b"got=abc"


@pytest.mark.parametrize("cls", [RegexpTable, PcreTable])
def test_fold_mul_lowercases_the_key_and_results_copy_it(cls, tmp_path):
    table = cls(write(tmp_path, "t", "/^(.*)@/i local=$1\n"), os.O_RDONLY, 0, make_context())
    assert table.lookup(b"Joe@X") == b"local=Joe"
    table.flags |= F.FOLD_MUL
    assert table.lookup(b"Joe@X") == b"local=joe"


def test_regexp_final_backslash_ends_the_pattern_but_not_in_pcre(tmp_path):
    # Postfix's regexp parser stops at a trailing backslash; pcre reports a missing delimiter.
    assert RegexpTable(write(tmp_path, "r", "/ab\\\n"), 0, 0).lookup(b"xab") == b""
    assert PcreTable(write(tmp_path, "p", "/ab\\\n"), 0, 0).lookup(b"xab") is None


def test_if_without_endif_ends_the_search(tmp_path):
    text = "if /^a/\n/b/ inside\n/./ fallback\n"
    table = RegexpTable(write(tmp_path, "t", text), 0, 0)
    assert table.lookup(b"ab") == b"inside"
    assert table.lookup(b"xyz") is None


def test_regexp_uses_c_locale_even_when_python_does_not(tmp_path):
    import locale

    table = RegexpTable(write(tmp_path, "t", "/^.$/ one\n/^..$/ two\n"), 0, 0)
    old = locale.setlocale(locale.LC_CTYPE)
    try:
        for name in ("C.UTF-8", "en_US.UTF-8"):
            try:
                locale.setlocale(locale.LC_CTYPE, name)
                break
            except locale.Error:
                continue
        assert table.lookup("é".encode()) == b"two"
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def test_warnings_name_file_and_line(tmp_path, caplog):
    path = write(tmp_path, "t", "# comment\n/ok/ fine\n/bad/q never\n")
    RegexpTable(path, 0, 0)
    assert f'regexp map {path}, line 3: unknown regexp option "q"' in caplog.text


def test_sequence_is_unsupported(tmp_path):
    from proxymap.tables.base import DictUnsupported

    table = CidrTable(write(tmp_path, "t", "1.2.3.4 x\n"), 0, 0)
    with pytest.raises(DictUnsupported):
        table.sequence(0)


def test_composites_take_kind_from_first_member_and_propagate_errors(tmp_path):
    ctx = make_context()
    regexp_file = write(tmp_path, "r", "/^(.*)$/ [$1]\n")
    union = open_table(f"unionmap:{{regexp:{regexp_file}, randmap:{{r}}}}", 0, 0, ctx)
    assert union.flags & F.PATTERN and union.lookup(b"k") == b"[k],r"
    pipe = open_table(f"pipemap:{{regexp:{regexp_file}, regexp:{regexp_file}}}", 0, 0, ctx)
    assert pipe.lookup(b"k") == b"[[k]]"
    broken = open_table(f"pipemap:{{regexp:{regexp_file}, regexp:{tmp_path}/missing}}", 0, 0, ctx)
    with pytest.raises(DictError):
        broken.lookup(b"k")
    assert isinstance(open_table("unionmap:{nocolon}", 0, 0, ctx), SurrogateTable)
    assert isinstance(open_table("randmap:{}", 0, 0, ctx), SurrogateTable)


# --- cost of a large header_checks-style table ------------------------------------------


def test_pcre_thousand_rule_lookup_cost(tmp_path, capsys):
    rules = [f"/^Subject:.*\\bspamword{n}\\b/ REJECT spam {n}" for n in range(998)]
    rules += ["/^Received: from (\\S+)/ PREPEND X-Seen: $1", "/^X-Last:/ DISCARD"]
    table = PcreTable(write(tmp_path, "header_checks", "\n".join(rules) + "\n"), 0, 0)
    miss = b"Subject: an ordinary message about nothing in particular"
    hit = b"X-Last: yes"
    assert table.lookup(miss) is None and table.lookup(hit) == b"DISCARD"
    assert table.lookup(b"Subject: spamword70 and spamword7") == b"REJECT spam 7"  # file order
    assert table.lookup(b"Received: from mx.example by x") == b"PREPEND X-Seen: mx.example"
    # Contains every byte the rules require: no rule is ruled out before pcre2_match runs.
    hard_miss = b"Subject: spamword 0123456789 " + bytes(range(0x21, 0x7F))
    assert table.lookup(hard_miss) is None
    with capsys.disabled():
        print()
        for label, key in (
            ("non-matching header", miss),
            ("all required bytes present", hard_miss),
        ):
            rounds = 200
            started = time.perf_counter()
            for _ in range(rounds):
                table.lookup(key)
            per_lookup_us = (time.perf_counter() - started) / rounds * 1e6
            print(
                f"pcre 1000-rule table, {label}: {per_lookup_us:.0f} us/lookup "
                f"({per_lookup_us / 1000:.2f} us/rule)"
            )
            assert per_lookup_us < 50_000
