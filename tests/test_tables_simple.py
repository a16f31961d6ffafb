"""The simple table types against the real Postfix 3.7 direct `postmap -q` results.

Every ``tests/vectors/vectors.tsv`` row (recorded with Postfix 3.7.11, copied from the
project's spec) for texthash, inline, static, fail, environ and unix is
answered through the request handler twice: as a 3.7 client does it (open flags 0,
key case-folded by the client's UTF-8 layer, lookup flags 524353) and as a 3.11+
client does it (instance_flags 540737, the server folds). Both must give what the
direct postmap row says. Then the details the vectors do not pin down.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxymap import flags as F
from proxymap.handler import RequestHandler
from proxymap.protocol import CONFIG, G1, G2, NOKEY, OK, RETRY, Request
from proxymap.tables import open_table
from proxymap.tables.base import DictRetry, OpenContext, SurrogateTable
from proxymap.tables.utf8 import Utf8Table, activate, casefold_utf8, is_valid_utf8
from tests.support.vectors import vectors_dir

VECTORS = vectors_dir()  # tests/vectors: recorded with Postfix 3.7.11
OUR_TYPES = ("texthash", "inline", "static", "fail", "environ", "unix")
FILE_TYPES = ("texthash",)
G1_CLIENT_LOOKUP_FLAGS = 524353  # DUP_WARN|LOCK|UTF8_REQUEST (postmap -q, 3.7)
G2_POSTMAP_INSTANCE_FLAGS = 540737  # DUP_WARN|LOCK|FOLD_FIX|UTF8_REQUEST (postmap -q, 3.12)
PARAMS = {"smtputf8_enable": "yes"}
RO = os.O_RDONLY
RW = os.O_RDWR | os.O_CREAT


def unescape_tsv(field: str) -> str:
    table = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), m.group(0)), field)


def absolute_map(spec: str) -> str:
    dict_type, _, name = spec.partition(":")
    if dict_type in FILE_TYPES and not name.startswith("/"):
        return f"{dict_type}:{VECTORS / name}"
    return spec


def vector_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    lines = (VECTORS / "vectors.tsv").read_text(encoding="utf-8").split("\n")[1:]
    for line in lines:
        if not line:
            continue
        spec, key, exit_code, value = (unescape_tsv(f) for f in line.split("\t"))
        if spec.partition(":")[0] in OUR_TYPES:
            if spec.startswith("unix:") and exit_code == "0":
                value = this_host_entry(spec, key)
            rows.append((absolute_map(spec), key, exit_code, value))
    return rows


def this_host_entry(spec: str, key: str) -> str:
    """A unix: row's answer on this machine (ids differ between hosts), from getent(1)."""
    database = spec.partition(":")[2].split(".")[0]  # passwd or group
    result = subprocess.run(
        ["getent", database, key.lower()], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


ROWS = vector_rows()


def test_vectors_are_present():
    assert (VECTORS / "vectors.tsv").is_file(), f"no test vectors in {VECTORS}"


def expect(reply, exit_code: str, value: str) -> None:
    if exit_code == "0":
        assert (reply.status, reply.value) == (OK, value.encode("utf-8"))
    elif exit_code == "1":
        assert (reply.status, reply.value) == (NOKEY, b"")
    else:
        assert exit_code == "E"
        assert reply.status in (RETRY, CONFIG)


def g1_client_key(key: bytes, open_reply: int) -> bytes:
    """What the 3.7 client's UTF-8 layer sends: casefolded when the table is fixed."""
    if is_valid_utf8(key) and open_reply & F.FIXED:
        return casefold_utf8(key)
    return key


def test_vectors_cover_every_simple_type():
    assert VECTORS.is_dir()
    assert {spec.partition(":")[0] for spec, *_ in ROWS} == set(OUR_TYPES)
    assert len(ROWS) > 80


@pytest.mark.parametrize(("spec", "key", "exit_code", "value"), ROWS)
def test_vector_row_through_a_g1_client(spec, key, exit_code, value):
    handler = RequestHandler("proxymap", [spec], PARAMS)
    opened = handler.handle(Request("open", spec, G1, flags=0))
    assert opened.status == OK
    sent = g1_client_key(key.encode("utf-8"), opened.flags & F.IMPL_MASK)
    reply = handler.handle(Request("lookup", spec, G1, flags=G1_CLIENT_LOOKUP_FLAGS, key=sent))
    expect(reply, exit_code, value)


@pytest.mark.parametrize(("spec", "key", "exit_code", "value"), ROWS)
def test_vector_row_through_a_g2_client(spec, key, exit_code, value):
    handler = RequestHandler("proxymap", [spec], PARAMS)
    opened = handler.handle(Request("open", spec, G2, instance_flags=G2_POSTMAP_INSTANCE_FLAGS))
    assert opened.status == OK
    reply = handler.handle(
        Request(
            "lookup",
            spec,
            G2,
            instance_flags=G2_POSTMAP_INSTANCE_FLAGS,
            flags=opened.flags,
            key=key.encode("utf-8"),
        )
    )
    expect(reply, exit_code, value)


# --- texthash -----------------------------------------------------------------------------


def write(tmp_path: Path, text: bytes, name: str = "t.src") -> str:
    path = tmp_path / name
    path.write_bytes(text)
    return str(path)


def ctx(utf8: bool = True) -> OpenContext:
    return OpenContext(params={}, utf8_enabled=utf8)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (F.DUP_WARN, b"first"),
        (F.DUP_IGNORE, b"first"),
        (F.DUP_REPLACE, b"third"),
    ],
)
def test_texthash_duplicate_policy(tmp_path, caplog, flags, expected):
    path = write(tmp_path, b"dup first\nDUP second\ndup third\n")
    with caplog.at_level(logging.WARNING, "proxymap"):
        table = open_table(f"texthash:{path}", RO, flags | F.FOLD_FIX, ctx())
    assert table.lookup(b"dup") == expected
    warned = [r.getMessage() for r in caplog.records if "duplicate entry" in r.getMessage()]
    assert warned == (
        [f'{path}, line 2: duplicate entry: "dup"', f'{path}, line 3: duplicate entry: "dup"']
        if flags == F.DUP_WARN
        else []
    )


def test_texthash_duplicate_without_dup_flag_is_unavailable(tmp_path):
    path = write(tmp_path, b"a 1\nb 2\na 3\n")
    table = open_table(f"texthash:{path}", RO, 0, ctx())
    assert isinstance(table, SurrogateTable)
    assert table.flags & F.PATTERN
    with pytest.raises(DictRetry):
        table.lookup(b"b")


def test_texthash_folding_depends_on_open_flags(tmp_path):
    path = write(tmp_path, "Straße S\nBob B\n".encode())
    unicode_fold = open_table(f"texthash:{path}", RO, F.FOLD_FIX | F.UTF8_REQUEST, ctx())
    assert unicode_fold.lookup(b"strasse") == b"S"
    ascii_fold = open_table(f"texthash:{path}", RO, F.FOLD_FIX | F.UTF8_REQUEST, ctx(False))
    assert ascii_fold.lookup("straße".encode()) == b"S"
    assert ascii_fold.lookup(b"strasse") is None
    no_fold = open_table(f"texthash:{path}", RO, F.UTF8_REQUEST, ctx())
    assert no_fold.lookup(b"bob") is None
    assert no_fold.lookup(b"Bob") == b"B"


def test_texthash_non_utf8_lines_only_skipped_under_utf8(tmp_path):
    path = write(tmp_path, b"caf\xe9 latin1\nok yes\n")
    utf8 = open_table(f"texthash:{path}", RO, F.UTF8_REQUEST, ctx())
    assert (utf8.lookup(b"caf\xe9"), utf8.lookup(b"ok")) == (None, b"yes")
    bytes_only = open_table(f"texthash:{path}", RO, 0 | F.DUP_WARN, ctx())
    assert bytes_only.lookup(b"caf\xe9") == b"latin1"


def test_texthash_sequence_and_next_before_first(tmp_path):
    path = write(tmp_path, b"b 2\na 1\n")
    table = open_table(f"texthash:{path}", RO, F.DUP_WARN, ctx())
    assert table.sequence(1) == (b"b", b"2")  # "next" first: starts at the top
    assert [table.sequence(0), table.sequence(1), table.sequence(1)] == [
        (b"b", b"2"),
        (b"a", b"1"),
        None,
    ]


def test_texthash_missing_file_and_read_write_open_are_unavailable(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, "proxymap"):
        missing = open_table(f"texthash:{tmp_path}/nope", RO, 0, ctx())
    assert isinstance(missing, SurrogateTable)
    assert f"open database {tmp_path}/nope: No such file or directory" in caplog.text
    path = write(tmp_path, b"a 1\n")
    assert isinstance(open_table(f"texthash:{path}", RW, 0, ctx()), SurrogateTable)


# --- inline / static ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "{ {key with spaces = v} }",
        "{a = 1}",
        "{a=x,y}",
        '{"a b"=1}',
        "{novalue}",
        "{}",
        "{ a=1 }x",
        " {a=1}",
        "a=1",
        "{a=1",
        "{ {a=1 }",
    ],
)
def test_inline_syntax_errors_poison_the_table(name):
    table = open_table(f"inline:{name}", RO, F.FOLD_FIX, ctx())
    assert isinstance(table, SurrogateTable)
    with pytest.raises(DictRetry):
        table.lookup(b"a")


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ('{ {"key with spaces" = value, with comma} }', b'"key with spaces"', b"value, with comma"),
        ("{ {a = 1} }", b"a", b"1"),
        ("{ {a=x,y} }", b"a", b"x,y"),
        ("{k\\=x=v}", b"k\\=x", b"v"),
        ("{a==b}", b"a", b"=b"),
        ("{=empty-key}", b"", b"empty-key"),
        ("{e=}", b"e", b""),
        ("{a=1, a=2}", b"a", b"2"),
    ],
)
def test_inline_working_forms(name, key, value):
    table = open_table(f"inline:{name}", RO, F.FOLD_FIX, ctx())
    assert table.lookup(key) == value


def test_inline_non_utf8_name_unavailable_only_under_utf8():
    name = b"{caf\xe9=x}".decode("utf-8", "surrogateescape")
    assert isinstance(open_table(f"inline:{name}", RO, F.UTF8_REQUEST, ctx()), SurrogateTable)
    table = open_table(f"inline:{name}", RO, 0, ctx())
    assert table.lookup(b"caf\xe9") == b"x"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (" x ", b" x "),
        ("{ text here }", b"text here"),
        ("{}", b""),
        ("plain", b"plain"),
    ],
)
def test_static_values(name, value):
    table = open_table(f"static:{name}", RO, F.FOLD_FIX, ctx())
    assert (table.lookup(b""), table.lookup(b"ANY")) == (value, value)
    assert table.flags & F.FIXED


@pytest.mark.parametrize("name", ["{x}y", "{x", "{ {x }"])
def test_static_bad_braces_unavailable(name):
    assert isinstance(open_table(f"static:{name}", RO, 0, ctx()), SurrogateTable)


# --- fail / environ / internal / unix --------------------------------------------------------


def test_fail_every_operation_retries_and_is_a_pattern_table():
    table = open_table("fail:x", RW, 0, ctx())
    assert table.flags == F.PATTERN
    for call in (
        lambda: table.lookup(b"k"),
        lambda: table.update(b"k", b"v"),
        lambda: table.delete(b"k"),
        lambda: table.sequence(0),
    ):
        with pytest.raises(DictRetry):
            call()


def test_environ_folds_and_updates_this_process(monkeypatch):
    monkeypatch.setenv("pmtest_var", "lower")
    table = open_table("environ:ignored", RO, F.FOLD_FIX, ctx())
    assert table.lookup(b"PMTEST_VAR") == b"lower"
    table.flags = F.FIXED
    assert table.lookup(b"PMTEST_VAR") is None
    assert table.update(b"pmtest_new", b"v") == 0
    try:
        assert os.environb[b"pmtest_new"] == b"v"
    finally:
        del os.environb[b"pmtest_new"]


def test_internal_update_delete_sequence():
    table = open_table("internal:t", RW, F.FOLD_FIX, ctx())
    assert table.lookup(b"k") is None
    assert (table.update(b"K", b"1"), table.update(b"j", b"2"), table.update(b"k", b"3")) == (
        0,
        0,
        0,
    )
    assert table.lookup(b"K") == b"3"
    assert [table.sequence(0), table.sequence(1), table.sequence(1)] == [
        (b"k", b"3"),
        (b"j", b"2"),
        None,
    ]
    assert (table.delete(b"k"), table.delete(b"k")) == (0, 1)


def getent(database: str, name: str) -> bytes:
    return subprocess.run(
        ["getent", database, name], capture_output=True, check=True
    ).stdout.rstrip(b"\n")


@pytest.mark.parametrize(
    ("map_name", "database"), [("passwd.byname", "passwd"), ("group.byname", "group")]
)
def test_unix_matches_getent_for_every_entry(map_name, database):
    table = open_table(f"unix:{map_name}", RO, F.FOLD_FIX, ctx())
    names = subprocess.run(
        ["getent", database], capture_output=True, check=True, text=True
    ).stdout.split("\n")
    names = [line.split(":")[0] for line in names if line][:50]
    assert names
    for name in names:
        assert table.lookup(name.encode()) == getent(database, name)


def test_unix_unknown_map_and_read_write_are_unavailable():
    assert isinstance(open_table("unix:shadow.byname", RO, 0, ctx()), SurrogateTable)
    assert isinstance(open_table("unix:passwd.byname", RW, 0, ctx()), SurrogateTable)


# --- the UTF-8 layer ------------------------------------------------------------------------


def test_utf8_layer_checks_keys_and_values(caplog):
    inner = open_table("internal:u", RW, F.FOLD_FIX | F.UTF8_REQUEST, ctx())
    table = activate(inner)
    assert isinstance(table, Utf8Table)
    assert table.flags & F.UTF8_ACTIVE
    assert table.update("STRAßE".encode(), b"v") == 0
    assert inner.entries == {b"strasse": b"v"}
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert table.lookup(b"\xff") is None
        assert table.update(b"\xff", b"v") == 0
        assert table.delete(b"\xfe") == 0
    assert 'internal:u: non-UTF-8 key "\\xff": malformed UTF-8 or invalid codepoint' in caplog.text
    assert inner.entries == {b"strasse": b"v"}
    inner.entries[b"bad"] = b"\xe9"
    from proxymap.tables.base import DictConfig

    with pytest.raises(DictConfig):
        table.lookup(b"bad")
    assert activate(table) is table


def test_utf8_layer_hides_fold_bits_from_the_driver():
    seen = []

    class Spy(type(open_table("internal:s", RW, 0, ctx()))):
        def lookup(self, key):
            seen.append((key, self.flags & F.FOLD_ANY))
            return super().lookup(key)

    table = activate(Spy("s", RW, F.FIXED | F.FOLD_FIX, ctx()))
    table.lookup("ÉCOLE".encode())
    assert seen == [("école".encode(), 0)]
    assert table.flags & F.FOLD_FIX
    table.flags = F.FIXED  # no fold asked: the key passes unchanged
    table.lookup(b"ABC")
    assert seen[-1] == (b"ABC", 0)


# --- properties -------------------------------------------------------------------------------

_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._@-", min_size=1, max_size=12)
_VALUE = st.lists(_WORD, min_size=1, max_size=4).map(" , ".join)


@settings(max_examples=200, deadline=None)
@given(entries=st.dictionaries(_WORD, _VALUE, min_size=1, max_size=8))
def test_inline_braced_elements_round_trip(entries):
    name = "{ " + ", ".join(f"{{ {k} = {v} }}" for k, v in entries.items()) + " }"
    table = open_table(f"inline:{name}", RO, F.FOLD_FIX, ctx())
    assert not isinstance(table, SurrogateTable)
    for key, value in entries.items():
        assert table.lookup(key.upper().encode()) == value.encode()
    walk = [table.sequence(0)] + [table.sequence(1) for _ in entries]
    assert walk[-1] is None
    assert dict(walk[:-1]) == {k.encode(): v.encode() for k, v in entries.items()}


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=20))
def test_utf8_fold_is_python_casefold_and_idempotent(text):
    data = text.encode("utf-8")
    folded = casefold_utf8(data)
    assert folded == text.casefold().encode("utf-8")
    assert casefold_utf8(folded) == folded


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "inline:{a = 1}",
            'missing \'=\' after attribute name: "inline:{a = 1}"; need "inline:{name=value...}"',
        ),
        ('inline:{"a b"=1}', 'unbalanced \'"\': "inline:{"a b"=1}"; need "inline:{name=value...}"'),
        ("inline:{}", 'bad syntax: "inline:{}"; need "inline:{name=value...}"'),
        ("static:{x}y", "bad static:name syntax: syntax error after '}' in \"{x}y\""),
        ("unix:foo.byname", "unknown table: unix:foo.byname"),
    ],
)
def test_open_errors_read_like_postmap(caplog, spec, message):
    with caplog.at_level(logging.ERROR, "proxymap"):
        assert isinstance(open_table(spec, RO, F.UTF8_REQUEST, ctx()), SurrogateTable)
    assert [r.getMessage() for r in caplog.records] == [message]
