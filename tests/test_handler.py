"""The request handler: processing order, status mapping, instances and flags.

Golden values come from the Postfix 3.12 transcripts (docs/PROTOCOL.md sections 6.5 and
6.6) and from the fresh open-reply flags recorded with Postfix 3.7.11
(tests/vectors/open-flags.tsv, copied from the project's spec).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master.mainconf import MainConfig
from proxymap import flags as F
from proxymap.approval import approved_tables
from proxymap.handler import RequestHandler
from proxymap.instances import InstanceLimit
from proxymap.protocol import (
    BAD,
    CONFIG,
    DENY,
    G1,
    G2,
    NOKEY,
    OK,
    RETRY,
    Reply,
    Request,
    encode_reply,
)
from proxymap.tables import TABLE_TYPES, table_class
from proxymap.tables.base import (
    LATER,
    STARTED,
    AsyncTable,
    DictBusy,
    DictConfig,
    DictOpenError,
    DictRetry,
    Later,
    OpenContext,
    Started,
)
from proxymap.tables.internal import InternalTable
from proxymap.tables.utf8 import activate
from tests.support.postfix import ensure_postfix, postmap_path
from tests.support.vectors import vectors_dir

VECTORS = vectors_dir()  # tests/vectors: recorded with Postfix 3.7.11
PARAMS = {"smtputf8_enable": "yes"}
POSTMAP_Q = 540737  # 3.12 postmap -q instance_flags
POSTMAP_I = 540673  # 3.12 postmap -i instance_flags


@pytest.fixture
def r312(tmp_path) -> str:
    path = tmp_path / "r312"
    path.write_text("alice alice@example.com\nbob bob@example.com\n")
    return f"texthash:{path}"


def reader(*approved: str, **params: str) -> RequestHandler:
    return RequestHandler("proxymap", list(approved), {**PARAMS, **params})


def writer(*approved: str) -> RequestHandler:
    return RequestHandler("proxywrite", list(approved), PARAMS)


def g2(op: str, table: str, inst: int, flags: int = 0, **kw) -> Request:
    return Request(op, table, G2, flags=flags, instance_flags=inst, **kw)


def g1(op: str, table: str, flags: int = 0, **kw) -> Request:
    return Request(op, table, G1, flags=flags, **kw)


def answer(handler: RequestHandler, request: Request) -> Reply:
    reply = handler.handle(request)
    if not isinstance(reply, Reply):
        reply = asyncio.run(reply)
    return reply


# --- 3.12 transcripts ------------------------------------------------------------------------


def test_g2_postmap_q_and_s_transcript(r312):
    handler = reader(r312)
    assert handler.handle(g2("open", r312, POSTMAP_Q)) == Reply(OK, 1589329)
    assert handler.handle(g2("lookup", r312, POSTMAP_Q, 1589329, key=b"ALICE")) == Reply(
        OK, 1589329, value=b"alice@example.com"
    )
    entries = [
        handler.handle(g2("sequence", r312, POSTMAP_Q, 1589329, function=f)) for f in (0, 1, 1)
    ]
    assert sorted((e.status, e.flags, e.key, e.value) for e in entries[:2]) == [
        (OK, 1589329, b"alice", b"alice@example.com"),
        (OK, 1589329, b"bob", b"bob@example.com"),
    ]
    assert entries[2] == Reply(NOKEY, 1589329)


def test_g2_postmap_i_and_d_transcript_through_proxywrite():
    handler = writer("internal:w312")
    assert handler.handle(g2("open", "internal:w312", POSTMAP_I)) == Reply(OK, 1589265)
    assert handler.handle(
        g2("update", "internal:w312", POSTMAP_I, 1589265, key=b"k1", value=b"v1")
    ) == Reply(OK, 1589649)
    assert handler.handle(
        g2("update", "internal:w312", POSTMAP_I, 1589649, key=b"K2", value=b"v2")
    ) == Reply(OK, 1589649)
    assert handler.handle(g2("lookup", "internal:w312", POSTMAP_I, 1589649, key=b"k2")) == Reply(
        OK, 1589649, value=b"v2"
    )
    # Other instance_flags: another, empty instance.
    assert handler.handle(g2("delete", "internal:w312", POSTMAP_Q, 1589329, key=b"k1")) == Reply(
        NOKEY, 1589585
    )
    assert handler.handle(g2("delete", "internal:w312", POSTMAP_I, 1589649, key=b"k1")) == Reply(
        OK, 1589649 | F.SYNC_UPDATE
    )


def test_g2_raw_requests_transcript(r312, caplog):
    handler = reader(r312)
    assert handler.handle(g2("open", r312, 0)) == Reply(OK, 16)
    assert handler.handle(g2("lookup", r312, 0, 0, key=b"alice")) == Reply(
        OK, 0, value=b"alice@example.com"
    )
    assert handler.handle(g2("lookup", r312, 0, 16, key=b"ALICE")) == Reply(NOKEY, 16)
    assert handler.handle(g2("lookup", r312, 0, 16400, key=b"ALICE")) == Reply(
        OK, 16400, value=b"alice@example.com"
    )
    assert handler.handle(g2("lookup", r312, 0, 4294967295, key=b"alice")) == Reply(
        OK, 4294967295, value=b"alice@example.com"
    )
    assert handler.handle(g2("lookup", "texthash:/unapproved", 0, 16, key=b"a")) == Reply(DENY, 0)
    assert handler.handle(g2("lookup", "nocolon", 0, 16, key=b"a")) == Reply(BAD, 0)
    for op in ("update", "delete"):
        assert handler.handle(g2(op, r312, 0, 16, key=b"a", value=b"b")) == Reply(DENY, 0)
    assert handler.handle(g2("sequence", r312, 0, 16, function=7)) == Reply(BAD, 0)


def test_g2_proxywrite_raw_transcript(r312):
    handler = writer("internal:w312", r312)
    assert handler.handle(g2("update", "internal:w312", 0, 16, key=b"a", value=b"b")) == Reply(
        OK, 400
    )
    assert handler.handle(g2("lookup", "internal:w312", 0, 16, key=b"a")) == Reply(
        OK, 16, value=b"b"
    )
    assert handler.handle(g2("delete", "internal:w312", 0, 16, key=b"a")) == Reply(OK, 272)
    assert handler.handle(g2("delete", "internal:w312", 0, 16, key=b"a")) == Reply(NOKEY, 272)
    # texthash cannot be opened read-write: a surrogate, every operation RETRY.
    assert handler.handle(g2("update", r312, 0, 16, key=b"a", value=b"b")) == Reply(RETRY, 400)


# --- processing order and warnings --------------------------------------------------------


def messages(caplog) -> list[str]:
    return [f"{r.levelname.lower()}: {r.getMessage()}" for r in caplog.records]


def test_refusal_of_writes_on_proxymap_comes_before_approval(caplog):
    handler = reader("internal:x")
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert handler.handle(g1("update", "proxy:nocolon", key=b"k", value=b"v")) == Reply(DENY)
        assert handler.handle(g1("delete", "proxy:internal:x", key=b"k")) == Reply(DENY)
    assert messages(caplog) == [
        "warning: refusing proxy:nocolon update request on non-proxywrite service",
        "warning: refusing proxy:internal:x delete request on non-proxywrite service",
    ]


@pytest.mark.parametrize(
    ("service", "access", "parameter"),
    [
        ("proxymap", "read-only", "proxy_read_maps"),
        ("proxywrite", "read-write", "proxy_write_maps"),
    ],
)
def test_unapproved_table_warnings(caplog, service, access, parameter):
    handler = RequestHandler(service, ["hash:/x"], PARAMS)
    with caplog.at_level(logging.WARNING, "proxymap"):
        for _ in range(2):  # logged every time, also when the refusal is cached
            assert handler.handle(g1("open", "proxy:proxy:hash:/y")) == Reply(DENY)
    assert (
        messages(caplog)
        == [
            'warning: request for unapproved table: "hash:/y"',
            f"warning: to approve this table for {access} access, list proxy:hash:/y "
            f"in main.cf:{parameter}",
        ]
        * 2
    )


def test_name_without_colon_is_bad_silently(caplog):
    handler = reader("internal:x")
    with caplog.at_level(logging.DEBUG, "proxymap"):
        assert handler.handle(g1("lookup", "proxy:proxy:nocolon", key=b"k")) == Reply(BAD)
    assert caplog.records == []


def test_every_leading_proxy_prefix_is_stripped():
    handler = reader("static:{v}")
    assert handler.handle(g1("lookup", "proxy:proxy:static:{v}", 524353, key=b"k")) == Reply(
        OK, handler.handle(g1("lookup", "static:{v}", 524353, key=b"k")).flags, value=b"v"
    )


# --- status mapping ------------------------------------------------------------------------


def test_status_mapping(caplog, monkeypatch, r312):
    monkeypatch.setitem(os.environb, b"pmbadvalue", b"\xe9t\xe9")
    handler = writer(r312, "fail:x", "static:{v}", "environ:e", "internal:i", "nosuch:type")
    assert answer(handler, g2("lookup", "fail:x", 0, 32, key=b"k")).status == RETRY
    assert answer(handler, g2("lookup", "nosuch:type", 0, 32, key=b"k")).status == RETRY
    assert (
        answer(handler, g2("lookup", "environ:e", POSTMAP_Q, 1589329, key=b"PMBADVALUE")).status
        == CONFIG
    )
    assert answer(handler, g2("delete", "internal:i", 0, 16, key=b"k")).status == NOKEY
    assert answer(handler, g2("update", "environ:e", 0, 16, key=b"a=b", value=b"v")).status == NOKEY
    with caplog.at_level(logging.WARNING, "proxymap"):
        reply = answer(handler, g2("update", "static:{v}", 0, 16, key=b"k", value=b"v"))
    assert reply.status == RETRY
    assert messages(caplog)[-1] == "warning: table static:{v}: update operation is not supported"


def test_surrogate_open_succeeds_and_warns_on_use(caplog):
    handler = reader("hash:/nonexistent/x")
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert handler.handle(g1("open", "hash:/nonexistent/x")) == Reply(OK, F.PATTERN)
        assert handler.handle(g1("lookup", "hash:/nonexistent/x", 524353, key=b"k")).status == RETRY
    assert any(m.startswith("error: ") for m in messages(caplog))
    assert any(
        m.startswith("warning: hash:/nonexistent/x is unavailable. ") for m in messages(caplog)
    )
    opened = handler.handle(g2("open", "hash:/nonexistent/x", POSTMAP_Q))
    assert opened == Reply(OK, (POSTMAP_Q | F.PATTERN | F.SURROGATE))


# --- instances and flags ---------------------------------------------------------------------


def test_g1_open_reply_never_shows_request_bits(r312):
    handler = reader(r312)
    assert handler.handle(g1("open", r312)) == Reply(OK, 16)
    handler.handle(g1("lookup", r312, 524353, key=b"alice"))
    handler.handle(g1("lookup", r312, 0x84040, key=b"ALICE"))
    assert handler.handle(g1("open", r312)) == Reply(OK, 16)


def test_g1_request_bits_replace_the_instance_request_bits(r312):
    handler = reader(r312)
    # smtputf8 off on the client: it sends FOLD_FIX and the server folds (ASCII).
    assert handler.handle(g1("lookup", r312, 0x4040, key=b"ALICE")).value == b"alice@example.com"
    assert handler.handle(g1("lookup", r312, 0x40, key=b"ALICE")).status == NOKEY


def test_g1_instance_bits_select_separate_instances():
    handler = writer("internal:t")
    handler.handle(g1("update", "internal:t", 0x40, key=b"k", value=b"v"))
    assert handler.handle(g1("lookup", "internal:t", 0x40, key=b"k")).status == OK
    assert (
        handler.handle(g1("lookup", "internal:t", F.SRC_RHS_IS_FILE | 0x40, key=b"k")).status
        == NOKEY
    )


def test_g1_and_g2_instances_are_kept_apart(tmp_path):
    path = tmp_path / "t"
    path.write_text("Bob B\n")
    spec = f"texthash:{path}"
    handler = reader(spec)
    # G1: loaded folded (like a direct postmap -q); G2 instance_flags 0: loaded verbatim.
    assert handler.handle(g1("lookup", spec, 524353, key=b"bob")).value == b"B"
    assert handler.handle(g2("lookup", spec, 0, 16, key=b"bob")).status == NOKEY
    assert handler.handle(g2("lookup", spec, 0, 16, key=b"Bob")).value == b"B"


def test_g1_texthash_duplicates_keep_the_first_value(tmp_path):
    path = tmp_path / "dups"
    path.write_bytes((VECTORS / "dups.src").read_bytes())
    spec = f"texthash:{path}"
    handler = reader(spec)
    assert handler.handle(g1("open", spec)) == Reply(OK, 16)
    assert handler.handle(g1("lookup", spec, 524353, key=b"dup")).value == b"first"


def test_smtputf8_disabled_folds_ascii_only(tmp_path):
    path = tmp_path / "t"
    path.write_text("Straße S\n")
    spec = f"texthash:{path}"
    handler = reader(spec, smtputf8_enable="no")
    assert handler.handle(g2("open", spec, POSTMAP_Q)) == Reply(OK, POSTMAP_Q | F.FIXED)
    assert (
        handler.handle(
            g2("lookup", spec, POSTMAP_Q, POSTMAP_Q | F.FIXED, key="STRAßE".encode())
        ).value
        == b"S"
    )
    assert (
        handler.handle(g2("lookup", spec, POSTMAP_Q, POSTMAP_Q | F.FIXED, key=b"strasse")).status
        == NOKEY
    )


def test_open_lock_and_bulk_update_never_reach_the_table(r312):
    handler = reader(r312)
    inst = F.OPEN_LOCK | F.LOCK
    assert handler.handle(g2("open", r312, inst)) == Reply(OK, inst | F.FIXED)
    reply = handler.handle(g2("lookup", r312, inst, inst | F.FIXED | F.BULK_UPDATE, key=b"bob"))
    assert reply == Reply(OK, inst | F.FIXED | F.BULK_UPDATE, value=b"bob@example.com")
    (instance,) = handler._instances.values()
    assert not instance.table.flags & (F.OPEN_LOCK | F.BULK_UPDATE)


def test_sequence_next_before_first_is_answered_as_first(r312):
    handler = reader(r312)
    first = handler.handle(g1("sequence", r312, 524353, function=1))
    second = handler.handle(g1("sequence", r312, 524353, function=1))
    third = handler.handle(g1("sequence", r312, 524353, function=1))
    assert {first.key, second.key} == {b"alice", b"bob"}
    assert third.status == NOKEY


def test_unsupported_sequence_is_retry_not_a_crash(caplog):
    handler = reader("static:x")
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert handler.handle(g1("sequence", "static:x", 524353, function=0)).status == RETRY
    assert "sequence operation is not supported" in caplog.text


def test_repeated_lookup_reuses_the_route_and_instance(r312):
    handler = reader(r312)
    for _ in range(3):
        handler.handle(g2("lookup", r312, POSTMAP_Q, 1589329, key=b"alice"))
        handler.handle(g1("lookup", "proxy:" + r312, 524353, key=b"alice"))
    assert len(handler._instances) == 2
    assert len(handler._routes) == 2


# --- asynchronous tables --------------------------------------------------------------------


class AsyncMemoryTable(AsyncTable):
    """An in-memory table answering through the asynchronous interface."""

    dict_type = "amem"

    def __init__(self, name, open_mode, flags, ctx):
        self.memory = InternalTable(name, open_mode, flags, ctx)
        super().__init__(name, open_mode, self.memory.flags)

    async def alookup(self, key: bytes) -> bytes | None:
        await asyncio.sleep(0)
        if key == b"boom":
            raise RuntimeError("driver bug")
        self.memory.flags = self.flags
        return self.memory.lookup(key)

    async def aupdate(self, key: bytes, value: bytes) -> int:
        self.memory.flags = self.flags
        return self.memory.update(key, value)


def test_asynchronous_table_gets_a_coroutine(monkeypatch, caplog):
    monkeypatch.setitem(TABLE_TYPES, "amem", f"{__name__}:AsyncMemoryTable")
    handler = writer("amem:t")
    assert answer(
        handler, g2("update", "amem:t", POSTMAP_I, 1589265, key=b"K", value=b"v")
    ) == Reply(OK, 1589649)
    pending = handler.handle(g2("lookup", "amem:t", POSTMAP_I, 1589265, key=b"k"))
    assert not isinstance(pending, Reply)
    assert asyncio.run(pending) == Reply(OK, 1589265, value=b"v")
    with caplog.at_level(logging.ERROR, "proxymap"):
        assert answer(handler, g2("lookup", "amem:t", 0, 16, key=b"boom")).status == RETRY
    assert "driver bug" in caplog.text


class LockedTable(InternalTable):
    """A synchronous table whose file a writer holds locked for its first lookups."""

    dict_type = "locked"
    busy_for = 2  # lookups that find the lock held

    def lookup(self, key: bytes) -> bytes | None:
        if LockedTable.busy_for:
            LockedTable.busy_for -= 1
            raise DictBusy("locked by a writer")
        return super().lookup(key)


def test_a_lookup_waiting_for_a_writers_lock_is_counted(monkeypatch):
    """The wait for a locked table file runs on the loop, and the handler counts it:
    the worker tells its master it waits for a backend (server.waiting_for_backends)."""
    monkeypatch.setitem(TABLE_TYPES, "locked", f"{__name__}:LockedTable")
    monkeypatch.setattr(LockedTable, "busy_for", 2)
    handler = reader("locked:t")

    async def scenario() -> tuple[int, Reply, int]:
        pending = handler.handle(g2("lookup", "locked:t", 0, 16, key=b"k"))
        assert not isinstance(pending, Reply)
        waiting = asyncio.ensure_future(pending)
        await asyncio.sleep(0)
        during = handler.lock_waits
        reply = await waiting
        return during, reply, handler.lock_waits

    during, reply, after = asyncio.run(scenario())
    assert (during, reply.status, after) == (1, NOKEY, 0)


# --- open-reply flags for every row of open-flags.tsv ----------------------------------------

INDEXED_BUILDS = [
    "hash:fixed.src",
    "btree:btree.src",
    "lmdb:fixed.src",
    "cdb:fixed.src",
    "hash:dups.src",
    "cdb:dups.src",
    "lmdb:dups.src",
]


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory) -> Path:
    """A copy of the vectors, with the indexed files built by the real postmap if present."""
    work = tmp_path_factory.mktemp("vectors")
    for source in VECTORS.iterdir():
        if source.suffix in (".src", ".cf"):
            text = source.read_bytes().replace(b"@VECTORS@", str(work).encode())
            (work / source.name).write_bytes(text)
    (work / "main.cf").touch()
    if Path(postmap_path()).exists():
        for spec in INDEXED_BUILDS:
            subprocess.run(
                [postmap_path(), "-c", str(work), spec], cwd=work, capture_output=True, check=False
            )
    return work


# The 3.7 server opens texthash without a dup flag, so duplicates make it a surrogate;
# we open it like a direct postmap -q (DUP_WARN: first value wins), a fixed table.
DELIBERATE_DIFFERENCES = {"texthash:dups.src": F.FIXED}


def open_flag_rows() -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []
    for line in (VECTORS / "open-flags.tsv").read_text().split("\n")[1:]:
        fields = line.split("\t")
        if len(fields) == 5 and fields[3].isdigit():
            spec = fields[0].replace("\\\\", "\\")
            # G1 and G2 open separate instances of one file (lmdb must cope).
            rows.append((spec, int(fields[3])))
    return rows


def implemented(dict_type: str) -> bool:
    try:
        table_class(dict_type)
    except DictOpenError:
        return False
    return True


@pytest.mark.parametrize(("spec", "expected"), open_flag_rows())
def test_open_reply_flags_match_postfix(vector_dir, monkeypatch, spec, expected):
    """G1: exactly the 3.7 fresh-instance reply; G2: the same table kind bits."""
    monkeypatch.chdir(vector_dir)
    g1_expected = DELIBERATE_DIFFERENCES.get(spec, expected)
    kind, _, name = spec.partition(":")
    if name.endswith(".cf"):  # recorded as files; a bare name would be a main.cf prefix
        spec = f"{kind}:{vector_dir / name}"
    handler = reader(spec)
    g1_reply = handler.handle(g1("open", spec))
    g2_reply = handler.handle(g2("open", spec, 0))
    assert (g1_reply.status, g2_reply.status) == (OK, OK)
    if not implemented(spec.partition(":")[0]) and expected != F.PATTERN:
        # A type nobody has implemented yet is a surrogate, which is all we can check.
        assert (g1_reply.flags, g2_reply.flags) == (F.PATTERN, F.PATTERN | F.SURROGATE)
        return
    assert g1_reply.flags == g1_expected
    assert g2_reply.flags & F.IMPL_MASK == expected & F.IMPL_MASK


# --- restart check --------------------------------------------------------------------------


@pytest.fixture
def hash_table(tmp_path) -> Path:
    if not Path(postmap_path()).exists():
        ensure_postfix()
    source = tmp_path / "map"
    source.write_text("alice A\n")
    (tmp_path / "main.cf").touch()
    subprocess.run([postmap_path(), "-c", str(tmp_path), f"hash:{source}"], check=True)
    return source


def test_changed_table_names_the_instance_like_postfix(hash_table):
    spec = f"hash:{hash_table}"
    handler = reader(spec)
    assert handler.handle(g1("open", spec)) == Reply(OK, 28)
    handler.handle(g1("lookup", spec, 524353, key=b"alice"))
    assert handler.handle(g1("open", spec)) == Reply(OK, 28)  # no 3.7 cross-talk (524377)
    handler.handle(g2("open", spec, POSTMAP_Q))
    g1_only = reader(spec)
    g1_only.handle(g1("open", spec))
    g2_only = reader(spec)
    g2_only.handle(g2("open", spec, POSTMAP_Q))
    a_writer = writer(spec)
    a_writer.handle(g2("open", spec, POSTMAP_Q))
    assert [h.changed_table() for h in (handler, g1_only, g2_only, a_writer)] == [None] * 4
    db = Path(f"{hash_table}.db")
    os.utime(db, ns=(db.stat().st_atime_ns, db.stat().st_mtime_ns + 10**9))
    g2_name = f"{spec}(0,warn_dup|lock|fold_fix|utf8_request)"
    assert handler.changed_table() in (f"{spec}:", g2_name)
    assert g1_only.changed_table() == f"{spec}:"
    assert g2_only.changed_table() == g2_name
    assert a_writer.changed_table() is None  # the writer never restarts


def test_g1_null_learning_persists_on_the_instance(hash_table):
    spec = f"hash:{hash_table}"
    handler = reader(spec)
    handler.handle(g1("lookup", spec, 524353, key=b"alice"))
    (instance,) = handler._instances.values()
    assert instance.table.flags & F.TRY_ANY == F.TRY1NULL
    g2_reply = handler.handle(
        g2("lookup", spec, POSTMAP_Q, POSTMAP_Q | 28 | F.UTF8_ACTIVE, key=b"ALICE")
    )
    assert g2_reply == Reply(OK, (POSTMAP_Q | 24 | F.UTF8_ACTIVE), value=b"A")


# --- with the real main.cf object -------------------------------------------------------------


@pytest.mark.parametrize(("level", "utf8"), [("0", False), ("3.6", True)])
def test_smtputf8_default_follows_compatibility_level(level, utf8, tmp_path):
    path = tmp_path / "t"
    path.write_text("Straße S\n")
    spec = f"texthash:{path}"
    params = MainConfig({"compatibility_level": level, "proxy_read_maps": f"proxy:{spec}"})
    handler = RequestHandler("proxymap", approved_tables(params, "proxymap"), params)
    opened = handler.handle(g2("open", spec, POSTMAP_Q))
    assert bool(opened.flags & F.UTF8_ACTIVE) is utf8
    reply = handler.handle(g2("lookup", spec, POSTMAP_Q, opened.flags, key=b"STRASSE"))
    assert reply.status == (OK if utf8 else NOKEY)


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(flags=st.integers(min_value=0, max_value=0xFFFFFFFF), generation=st.sampled_from([G1, G2]))
def test_any_flag_word_round_trips_and_folds_as_asked(r312_static, flags, generation):
    """G2: the reply flags are the request's; the key is folded iff the word asks it."""
    handler, spec = r312_static
    if generation == G2:
        reply = handler.handle(g2("lookup", spec, POSTMAP_Q, flags, key=b"ALICE"))
        assert reply.flags == flags
        want = F.FOLD_FIX if flags & F.FIXED else F.FOLD_MUL
    else:
        reply = handler.handle(g1("lookup", spec, flags, key=b"ALICE"))
        want = F.FOLD_FIX  # G1 keeps the instance's FIXED bit; only request bits vary
    assert reply.status == (OK if flags & want else NOKEY)


@pytest.fixture(scope="module")
def r312_static(tmp_path_factory):
    path = tmp_path_factory.mktemp("r312") / "r312"
    path.write_text("alice alice@example.com\n")
    spec = f"texthash:{path}"
    handler = reader(spec)
    # The property sends every kind of flag word on purpose: no bound on instances here.
    handler.instance_limit = InstanceLimit(max_per_table=2**32)
    return handler, spec


# --- the compiled lookup (fast path) gives what handle + encode_reply give --------------------


def _fast_and_general(specs: list[str]) -> tuple[RequestHandler, RequestHandler]:
    return reader(*specs), reader(*specs)


def _both_ways(fast: RequestHandler, general: RequestHandler, request: Request) -> tuple:
    """(fast reply, general reply, fast table flags, general table flags) for one request."""
    compiled = fast.compile_lookup(request)
    assert compiled is not None
    fast_reply = compiled(request.key)
    general_reply = encode_reply("lookup", request.generation, general.handle(request))
    flags = [[i.table.flags for i in h._instances.values()] for h in (fast, general)]
    return fast_reply, general_reply, *flags


def test_compiled_lookup_learns_the_null_convention_like_handle(hash_table):
    spec = f"hash:{hash_table}"
    fast, general = _fast_and_general([spec])
    for request in (
        g1("lookup", spec, 524353, key=b"ALICE"),
        g1("lookup", spec, 524353, key=b"nobody"),
        g1("lookup", spec, 524353 | F.OPEN_LOCK, key=b"alice"),
        g2("lookup", spec, POSTMAP_Q, POSTMAP_Q | 28, key=b"alice"),
        g2("lookup", spec, POSTMAP_Q, POSTMAP_Q & ~F.TRY_ANY, key=b"alice"),
        g2("lookup", spec, POSTMAP_Q, POSTMAP_Q | F.BULK_UPDATE, key=b"x"),
    ):
        fast_reply, general_reply, fast_flags, general_flags = _both_ways(fast, general, request)
        assert fast_reply == general_reply
        assert fast_flags == general_flags


def test_compiled_lookup_maps_failures_like_handle(caplog):
    fast, general = _fast_and_general(["fail:x", "hash:/nonexistent/x"])
    for request in (
        g1("lookup", "fail:x", 524353, key=b"k"),
        g2("lookup", "fail:x", POSTMAP_Q, 32, key=b"k"),
        g1("lookup", "hash:/nonexistent/x", 524353, key=b"k"),
        g2("lookup", "hash:/nonexistent/x", POSTMAP_Q, POSTMAP_Q, key=b"k"),
    ):
        fast_reply, general_reply, *_ = _both_ways(fast, general, request)
        assert fast_reply == general_reply
        assert fast_reply.startswith(b"status\x002\x00")


def test_no_compiled_lookup_for_refusals_and_other_ops(r312):
    handler = reader(r312)
    assert handler.compile_lookup(g1("lookup", "texthash:/unapproved", 524353)) is None
    assert handler.compile_lookup(g1("lookup", "nocolon", 524353)) is None
    assert handler.compile_lookup(g1("open", r312)) is None
    assert handler.compile_lookup(g1("lookup", r312, 524353)) is not None


class AsyncOutcomes(AsyncTable):
    """An asynchronous table whose key chooses the outcome, after one loop turn: a
    value naming the flag word the lookup started with (read before the first await,
    as drivers must), not found, a NUL in the value, DictRetry, DictConfig, a bug."""

    dict_type = "aout"

    async def alookup(self, key: bytes) -> bytes | None:
        flags = self.flags
        await asyncio.sleep(0)
        return self.outcome(key, flags)

    @staticmethod
    def outcome(key: bytes, flags: int) -> bytes | None:
        if key == b"retry":
            raise DictRetry("aout: server gone")
        if key == b"config":
            raise DictConfig("aout: bad query")
        if key == b"boom":
            raise RuntimeError("driver bug")
        if key.startswith(b"nobody"):
            return None
        if key == b"nul":
            return b"before\x00after"
        return b"%s ran with %d" % (key, flags)


class AsyncNowOutcomes(AsyncOutcomes):
    """The same outcomes, given at once by ``lookup_now``, except for the keys that
    start with "later" (and those only through ``alookup``)."""

    dict_type = "anow"
    answers_now = True

    def lookup_now(self, key: bytes) -> bytes | None | Later:
        if key.startswith(b"later"):
            return LATER
        return self.outcome(key, self.flags)


class AsyncStartOutcomes(AsyncOutcomes):
    """The same outcomes, through ``lookup_start``: given to the callback on the next
    loop turn (a failure as the exception), except for the keys that start with
    "later" (and those only through ``alookup``)."""

    dict_type = "astart"
    starts = True

    def lookup_start(self, key: bytes, answer) -> bytes | None | Later | Started:
        if key.startswith(b"later"):
            return LATER
        try:
            outcome: bytes | None | Exception = self.outcome(key, self.flags)
        except Exception as exc:  # noqa: BLE001 - the callback takes failures too
            outcome = exc
        asyncio.get_running_loop().call_soon(answer, outcome)
        return STARTED


ASYNC_KEYS = [b"alice", b"nobody", b"nul", b"retry", b"config", b"boom", b"alice", b"later"]
ASYNC_REQUESTS = [
    ("G1 postmap -q", G1, 524353, 524353),
    ("G1 OPEN_LOCK", G1, 524353 | F.OPEN_LOCK, 524353 | F.OPEN_LOCK),
    ("G2 postmap -q", G2, POSTMAP_Q, POSTMAP_Q | 28),
    ("G2 no TRY bits", G2, POSTMAP_Q, POSTMAP_Q & ~F.TRY_ANY),
    ("G2 BULK_UPDATE", G2, POSTMAP_Q, POSTMAP_Q | F.BULK_UPDATE),
]
COUNTED = ("lookups", "hits", "misses", "retry", "config")


async def _compiled_answer(handler: RequestHandler, request: Request) -> bytes:
    compiled = handler.compile_lookup(request)
    assert compiled is not None
    reply = compiled(request.key)
    assert reply is not None
    return reply if isinstance(reply, bytes) else await reply


async def _general_answer(handler: RequestHandler, request: Request) -> bytes:
    reply = handler.handle(request)
    if not isinstance(reply, Reply):
        reply = await reply
    return encode_reply("lookup", request.generation, reply)


def _figures(handler: RequestHandler) -> tuple:
    """What the handler counted: table flags, statistics, cache figures."""
    flags = [instance.table.flags for instance in handler._instances.values()]
    stats = {
        name: ({k: v for k, v in s.figures().items() if k in COUNTED}, s.latency.figures())
        for name, s in (handler.statistics or {}).items()
    }
    counts = {name: (counted, latency["samples"]) for name, (counted, latency) in stats.items()}
    return flags, counts, handler.cache_figures()


@pytest.mark.parametrize("statistics", ["yes", "no"])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("kind", ["aout", "anow", "astart"])
def test_compiled_asynchronous_lookup_answers_as_handle(
    monkeypatch, caplog, statistics, cached, kind
):
    """The fast path of an asynchronous table gives, byte for byte, what handle and
    encode_reply give, and counts the same: hits, misses, a NUL in a value, failures
    (RETRY, CONFIG), both generations, echoed flags, statistics and the result cache
    (a second round of the same keys: fresh entries answered at once); a table that
    answers at once (``lookup_now``) and when it cannot."""
    monkeypatch.setitem(TABLE_TYPES, "aout", f"{__name__}:AsyncOutcomes")
    monkeypatch.setitem(TABLE_TYPES, "anow", f"{__name__}:AsyncNowOutcomes")
    monkeypatch.setitem(TABLE_TYPES, "astart", f"{__name__}:AsyncStartOutcomes")
    params = {"pyproxymap_statistics": statistics}
    if cached:
        params["pyproxymap_cache_maps"] = f"{kind}:t"
    fast, general = reader(f"{kind}:t", **params), reader(f"{kind}:t", **params)

    async def scenario() -> None:
        for _ in range(2 if cached else 1):
            for name, generation, flags, request_flags in ASYNC_REQUESTS:
                for key in ASYNC_KEYS:
                    if generation == G1:
                        request = g1("lookup", f"{kind}:t", request_flags, key=key)
                    else:
                        request = g2("lookup", f"{kind}:t", flags, request_flags, key=key)
                    fast_reply = await _compiled_answer(fast, request)
                    assert fast_reply == await _general_answer(general, request), (name, key)
                    assert _figures(fast) == _figures(general), (name, key)

    with caplog.at_level(logging.ERROR, "proxymap"):
        asyncio.run(scenario())
    bug = f"{kind}:t lookup failed: RuntimeError('driver bug')"
    logged = [m for m in caplog.messages if m == bug]
    assert len(logged) == 2 * len(ASYNC_REQUESTS) * (2 if cached else 1)
    if statistics == "yes":
        (stats,) = fast.statistics.values()  # type: ignore[union-attr]
        assert stats.lookups == len(ASYNC_KEYS) * len(ASYNC_REQUESTS) * (2 if cached else 1)
    if cached:
        (cache,) = fast.caches.values()
        assert cache.figures.hits > 0


def test_only_tables_that_answer_at_once_are_asked_to():
    """The UTF-8 layer answers at once, or starts, exactly when the table it wraps does."""
    ctx = OpenContext(params={})
    for cls, answers, starts in (
        (AsyncOutcomes, False, False),
        (AsyncNowOutcomes, True, False),
        (AsyncStartOutcomes, False, True),
    ):
        table = cls("t", os.O_RDONLY, F.FIXED, ctx)
        layer = activate(table)
        assert (table.answers_now, layer.answers_now) == (answers, answers)
        assert (table.starts, layer.starts) == (starts, starts)
        assert isinstance(layer, AsyncTable)
        assert layer.lookup_now(b"\xff") is None  # not UTF-8: not found, as alookup
        assert layer.lookup_start(b"\xff", print) is None


def test_the_utf8_layer_checks_a_started_lookups_value():
    async def outcomes() -> list[object]:
        layer = activate(AsyncStartOutcomes("t", os.O_RDONLY, F.FIXED, OpenContext(params={})))
        answers: list[object] = []
        for key in ("Ünïcode".encode(), b"retry", b"later"):
            assert layer.lookup_start(key, answers.append) in (STARTED, LATER)
        await asyncio.sleep(0.01)
        return answers

    value, retry = asyncio.run(outcomes())
    assert isinstance(value, bytes) and value.startswith("Ünïcode ran with ".encode())
    assert isinstance(retry, DictRetry)


def test_a_lookup_given_at_once_needs_no_coroutine(monkeypatch):
    """``lookup_now``'s answer is the reply itself; LATER gives ``alookup``'s coroutine."""
    monkeypatch.setitem(TABLE_TYPES, "anow", f"{__name__}:AsyncNowOutcomes")
    for statistics in ("yes", "no"):
        handler = reader("anow:t", pyproxymap_statistics=statistics)
        for key in (b"alice", b"later"):
            request = g1("lookup", "anow:t", 524353, key=key)
            compiled = handler.compile_lookup(request)
            assert compiled is not None
            reply = compiled(key)
            assert isinstance(reply, bytes) == (key == b"alice")
            if not isinstance(reply, bytes):
                reply = asyncio.run(reply)  # type: ignore[arg-type]
            assert reply == asyncio.run(_general_answer(reader("anow:t"), request))
            assert b"%s ran with 524353" % key in reply


def test_compiled_asynchronous_lookup_sets_flags_when_it_starts(monkeypatch):
    """As on the general path, the flag word is set when the lookup starts, not when
    it is compiled or called: a request in between may have changed it."""
    monkeypatch.setitem(TABLE_TYPES, "aout", f"{__name__}:AsyncOutcomes")
    for request in (
        g2("lookup", "aout:t", POSTMAP_Q, POSTMAP_Q | 28, key=b"alice"),
        g1("lookup", "aout:t", 524353, key=b"alice"),
    ):
        handler = reader("aout:t")
        compiled = handler.compile_lookup(request)
        assert compiled is not None
        pending = compiled(b"alice")
        (instance,) = handler._instances.values()
        instance.table.flags = 0  # another request's word, before this one starts
        expected = asyncio.run(_general_answer(reader("aout:t"), request))
        assert str(request.flags).encode() in expected
        assert asyncio.run(pending) == expected  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    flags=st.integers(min_value=0, max_value=0xFFFFFFFF),
    generation=st.sampled_from([G1, G2]),
    key=st.sampled_from([b"alice", b"ALICE", b"bob", b"", b"a\x00b", "Straße".encode()]),
)
def test_compiled_lookup_equals_handle_for_any_flags_and_key(r312_pair, flags, generation, key):
    fast, general, spec = r312_pair
    if generation == G2:
        request = g2("lookup", spec, POSTMAP_Q, flags, key=key)
    else:
        request = g1("lookup", spec, flags, key=key)
    fast_reply, general_reply, fast_flags, general_flags = _both_ways(fast, general, request)
    assert fast_reply == general_reply
    assert fast_flags == general_flags


@pytest.fixture(scope="module")
def r312_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("r312pair") / "r312"
    path.write_text("alice alice@example.com\nstraße s\x01z\n")
    spec = f"texthash:{path}"
    return reader(spec), reader(spec), spec
