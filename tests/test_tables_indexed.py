"""Indexed tables (hash, btree, lmdb, cdb) against the real postmap/postalias.

Every answer of our table classes is compared with what the installed Postfix says
about the very same file: lookups (vectors and every source key), sequences, files we
write, open errors, NUL-convention learning, and reads during concurrent rebuilds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxymap import flags as F
from proxymap.tables import indexed, open_table
from proxymap.tables.base import (
    DictBusy,
    DictOpenError,
    DictRetry,
    OpenContext,
    SurrogateTable,
)
from proxymap.tables.cdb import CdbReader, cdb_hash, write_cdb
from tests.support.postmap import (
    CLIENT_LOOKUP_FLAGS,
    INDEXED_TYPES,
    SERVER_WRITE_FLAGS,
    PostmapError,
    benchmark_lookups,
    build_aliases,
    build_table,
    client_folded_key,
    dump,
    lookup_when_unlocked,
    open_indexed,
    our_dump,
    our_lookup,
    query,
    query_many,
    require_postmap,
    table_file,
)
from tests.support.vectors import absolute_map, build_vector_tables, load_vectors, vectors_dir

FRESH_FLAGS = {"hash": 28, "btree": 28, "cdb": 28, "lmdb": 262172}
WRITABLE_TYPES = ("hash", "btree", "lmdb")
# The vectors build btree from its own copy: hash and btree would share fixed.src.db.
VECTOR_SOURCE = {"hash": "fixed.src", "btree": "btree.src", "lmdb": "fixed.src", "cdb": "fixed.src"}
RW_CREATE = os.O_RDWR | os.O_CREAT

ALIASES_TEXT = """\
# aliases(5) source
postmaster: root
root: admin@example.com, "|/usr/bin/procmail -a $EXTENSION"
Abuse:\troot
multi: one@example.com,
  two@example.com
"quoted user": root
"""


@pytest.fixture(scope="module")
def vector_work(tmp_path_factory) -> Path:
    require_postmap()
    work = build_vector_tables(tmp_path_factory.mktemp("indexed-vectors"))
    build_aliases("hash", work / "aliases", ALIASES_TEXT)
    build_aliases("lmdb", work / "aliases", None)
    build_aliases("cdb", work / "aliases", None)
    build_aliases("btree", work / "aliases.bt", ALIASES_TEXT)
    return work


def set_request(table, flags: int) -> None:
    """What the 3.7 handler does before an operation: replace the request bits."""
    table.flags = (table.flags & ~F.RQST_MASK) | (flags & F.RQST_MASK)


def source_keys(path: Path) -> list[str]:
    """The key of every data line, raw (unfolded), as postmap would parse it."""
    keys = []
    for line in path.read_bytes().decode("utf-8", "surrogateescape").splitlines():
        if not line.strip() or line[0].isspace() or line.lstrip().startswith("#"):
            continue
        keys.append(line.split(None, 1)[0].rstrip(":"))
    return keys


def probe_keys(keys: list[str]) -> list[str]:
    """Keys plus case variants and misses: what a differential lookup should cover."""
    variants = []
    for key in keys:
        variants += [key, key.upper(), key.lower(), key.swapcase(), key + "x", "x" + key]
    return list(dict.fromkeys(variants))


def assert_same_answers(spec: str, keys: list[str]) -> int:
    """Our lookup == `postmap -q` for every key; returns how many keys were found."""
    table = open_indexed(spec)
    batch = [k for k in keys if "\t" not in k and "\n" not in k and k.strip() == k and k]
    expected = query_many(spec, batch)
    for key in keys:
        want = expected.get(key) if key in batch else query(spec, key)
        assert our_lookup(table, key) == want, (spec, key)
    return len(expected)


def oracle_outcomes(queries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`postmap -q` outcomes in vectors notation, run in parallel (a fatal exit sleeps 1 s)."""

    def outcome(spec_key: tuple[str, str]) -> tuple[str, str]:
        try:
            value = query(*spec_key)
        except PostmapError:
            return "E", ""
        return ("1", "") if value is None else ("0", value)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(outcome, queries))


# --- 1. differential: vectors and every source key -------------------------------------


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", INDEXED_TYPES)
def test_vector_rows_match_postmap(vector_work, dict_type):
    rows = [r for r in load_vectors() if not r.proxied and r.map_type == dict_type]
    assert rows
    specs = [absolute_map(row.map, vector_work) for row in rows]
    live = oracle_outcomes([(spec, row.key) for spec, row in zip(specs, rows, strict=True)])
    checked = 0
    for spec, row, live_outcome in zip(specs, rows, live, strict=True):
        assert live_outcome == row.outcome, ("the oracle moved", row)
        try:
            table = open_indexed(spec)
        except DictOpenError as exc:
            assert row.exit == "E", (row, exc)
            assert f"open database {table_file(spec)}" in str(exc)
            continue
        ours = our_lookup(table, row.key)
        if row.exit == "E":
            # lmdb's empty key kills the real postmap; we answer "not found".
            assert (dict_type, row.key, ours) == ("lmdb", "", None), row
        else:
            our_outcome = ("1", "") if ours is None else ("0", ours)
            assert our_outcome == row.outcome, row
        checked += 1
    assert checked >= 40


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", INDEXED_TYPES)
@pytest.mark.parametrize("source", ["fixed.src", "btree.src", "dups.src"])
def test_every_source_key_matches_postmap(vector_work, tmp_path, dict_type, source):
    src = tmp_path / source
    shutil.copy(vectors_dir() / source, src)
    spec = build_table(dict_type, src)
    keys = source_keys(src) + [k for k, _ in dump(spec)] if dict_type != "cdb" else source_keys(src)
    found = assert_same_answers(spec, probe_keys(keys))
    assert found >= 3


@pytest.mark.postfix
@pytest.mark.parametrize(
    "spec_name", ["hash:aliases", "btree:aliases.bt", "lmdb:aliases", "cdb:aliases"]
)
def test_postalias_tables_match_postmap(vector_work, spec_name):
    dict_type, _, name = spec_name.partition(":")
    spec = f"{dict_type}:{vector_work / name}"
    keys = source_keys(vector_work / name) + ["@", "YP_MASTER_NAME", "YP_LAST_MODIFIED"]
    assert assert_same_answers(spec, probe_keys(keys)) >= 5
    table = open_indexed(spec)
    assert our_lookup(table, "MULTI") == "one@example.com, two@example.com"
    assert our_lookup(table, "Quoted User") == "root"  # postalias unquotes the name


# --- open flags and open errors ---------------------------------------------------------


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", INDEXED_TYPES)
def test_fresh_open_flags(vector_work, dict_type):
    spec = f"{dict_type}:{vector_work}/{VECTOR_SOURCE[dict_type]}"
    table = open_table(spec, os.O_RDONLY, 0, OpenContext())
    assert not isinstance(table, SurrogateTable)
    assert table.flags == FRESH_FLAGS[dict_type]
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert table.lookup(b"alice") == b"alice@example.com"
    # The hit commits the instance to the form postmap wrote (cdb: no NUL).
    learned = F.TRY0NULL if dict_type == "cdb" else F.TRY1NULL
    assert table.flags & F.TRY_ANY == learned
    assert table.flags & F.RQST_MASK == CLIENT_LOOKUP_FLAGS


@pytest.mark.postfix
def test_open_errors_are_postfix_shaped(vector_work, tmp_path):
    junk = os.urandom(5000)
    for suffix in (".db", ".lmdb", ".cdb"):
        (tmp_path / ("junk" + suffix)).write_bytes(junk)
        (tmp_path / ("empty" + suffix)).write_bytes(b"")
    cases = {
        f"hash:{vector_work}/btree.src": "Invalid argument",
        f"btree:{vector_work}/fixed.src": "Invalid argument",
        f"hash:{tmp_path}/nosuch": "No such file or directory",
        f"btree:{tmp_path}/nosuch": "No such file or directory",
        f"lmdb:{tmp_path}/nosuch": "No such file or directory",
        f"cdb:{tmp_path}/nosuch": "No such file or directory",
        f"hash:{tmp_path}/junk": "Invalid argument",
        f"hash:{tmp_path}/empty": "Invalid argument",
        f"lmdb:{tmp_path}/junk": "MDB_INVALID",
        f"cdb:{tmp_path}/junk": "Protocol error",
        f"cdb:{tmp_path}/empty": "Protocol error",
    }
    for spec, reason in cases.items():
        with pytest.raises(DictOpenError) as caught:
            open_indexed(spec)
        assert str(caught.value).startswith(f"open database {table_file(spec)}: "), spec
        assert reason in str(caught.value), spec
    # The real postmap fails on each of them too.
    assert oracle_outcomes([(spec, "alice") for spec in cases]) == [("E", "")] * len(cases)
    with pytest.raises(DictOpenError):
        open_indexed(f"lmdb:{tmp_path}/empty")
    surrogate = open_table(f"hash:{tmp_path}/nosuch", os.O_RDONLY, 0, OpenContext())
    assert isinstance(surrogate, SurrogateTable)


@pytest.mark.postfix
def test_cdb_is_unavailable_for_read_write(vector_work):
    with pytest.raises(DictOpenError, match="O_RDONLY"):
        open_indexed(f"cdb:{vector_work}/fixed.src", RW_CREATE)
    table = open_table(f"cdb:{vector_work}/fixed.src", RW_CREATE, 0, OpenContext())
    assert isinstance(table, SurrogateTable)


# --- NUL convention, folding, values ---------------------------------------------------


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", INDEXED_TYPES)
@pytest.mark.parametrize("option, learned", [("-N", F.TRY1NULL), ("-n", F.TRY0NULL)])
def test_nul_convention_is_learned(tmp_path, dict_type, option, learned):
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("alice", "A"), ("bob", "B")], [option])
    table = open_indexed(spec)
    assert table.flags & F.TRY_ANY == F.TRY_ANY
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert table.lookup(b"nosuch") is None
    assert table.flags & F.TRY_ANY == F.TRY_ANY  # a miss teaches nothing
    assert table.lookup(b"alice") == b"A"
    assert table.flags & F.TRY_ANY == learned
    assert table.lookup(b"bob") == b"B"
    # A 3.11+ client may send flags with neither bit: treated as both, never a crash.
    table.flags &= ~F.TRY_ANY
    assert table.lookup(b"bob") == b"B"
    assert table.flags & F.TRY_ANY == learned
    if dict_type != "cdb":  # 3.7 postmap cannot sequence cdb
        assert our_dump(table) == dump(spec)


@pytest.mark.postfix
def test_fold_fix_is_ascii_only_in_the_driver(vector_work):
    for dict_type in INDEXED_TYPES:
        table = open_indexed(f"{dict_type}:{vector_work}/{VECTOR_SOURCE[dict_type]}")
        set_request(table, F.LOCK | F.FOLD_FIX)
        assert table.lookup(b"ALICE") == b"alice@example.com"
        assert table.lookup(b"MiXeD") == b"v1"
        assert table.lookup("ÄÖÜ@EXAMPLE.COM".encode()) is None  # the client's job
        assert table.lookup("äöü@example.com".encode()) == b"umlaut-upper-key"
        set_request(table, F.LOCK)
        assert table.lookup(b"ALICE") is None
        assert table.lookup(b"") is None


@pytest.mark.postfix
def test_values_are_cut_at_the_first_nul(tmp_path):
    require_postmap()
    spec = build_table("hash", tmp_path / "t", [("k", "v")])
    from berkeleydb import db as bdb

    handle = bdb.DB()
    handle.open(str(table_file(spec)), dbtype=bdb.DB_HASH)
    handle.put(b"two\0", b"first\0second\0")
    handle.close()
    write_cdb(str(tmp_path / "c.cdb"), [(b"two", b"first\0second")])
    for table_spec in (spec, f"cdb:{tmp_path}/c"):
        table = open_indexed(table_spec)
        set_request(table, CLIENT_LOOKUP_FLAGS)
        assert table.lookup(b"two") == b"first"
        assert query(table_spec, "two") == "first"


# --- sequence --------------------------------------------------------------------------


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", ["hash", "btree", "lmdb"])
def test_sequence_matches_postmap_s(vector_work, dict_type):
    spec = f"{dict_type}:{vector_work}/{VECTOR_SOURCE[dict_type]}"
    table = open_indexed(spec)
    set_request(table, F.LOCK)
    ours = our_dump(table)
    assert ours == dump(spec)
    assert len(ours) == 24
    if dict_type != "hash":
        assert [k for k, _ in ours] == sorted(k for k, _ in ours)  # bytewise key order
    assert table.sequence(1) is None  # stays at the end


@pytest.mark.postfix
def test_cdb_sequence_is_file_order(vector_work):
    spec = f"cdb:{vector_work}/fixed.src"
    ours = our_dump(open_indexed(spec))
    reader = CdbReader.open(str(table_file(spec)))
    assert ours == [(k.decode(), v.decode()) for k, v in reader]
    assert ours[0] == ("alice", "alice@example.com")
    # Same entries as the hash table built from the same source (hash keeps a NUL).
    assert sorted(ours) == sorted(dump(f"hash:{vector_work}/fixed.src"))
    reader.close()


# --- 2. our writes are read identically by postmap -------------------------------------


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", WRITABLE_TYPES)
def test_our_writes_are_read_by_postmap(tmp_path, dict_type, caplog):
    require_postmap()
    spec = f"{dict_type}:{tmp_path}/w"
    table = open_indexed(spec, RW_CREATE)
    assert table.flags == FRESH_FLAGS[dict_type]
    source = {f"User{n}@Example.com": f"box-{n}" for n in range(300)}
    source["Straße"] = "ß-value"
    source['"John Doe"@example.com'] = "quoted value"
    # A 3.7 client casefolds the key itself and sends no fold bit (docs/TABLES.md 2.3).
    entries = {client_folded_key(k).decode(): v for k, v in source.items()}
    for key, value in source.items():
        set_request(table, F.LOCK | SERVER_WRITE_FLAGS)
        assert table.update(client_folded_key(key), value.encode()) == 0
    assert table.flags & F.TRY_ANY == F.TRY1NULL  # Linux: committed to the trailing NUL
    set_request(table, F.LOCK | F.FOLD_FIX | SERVER_WRITE_FLAGS)
    assert table.update(b"USER1@EXAMPLE.COM", b"replaced") == 0  # driver-folded, replaced
    entries["user1@example.com"] = "replaced"
    set_request(table, F.LOCK | F.DUP_WARN | F.SYNC_UPDATE)
    with caplog.at_level("WARNING", logger="proxymap"):
        assert table.update(b"user2@example.com", b"kept-not") == 1  # no DUP_REPLACE
    assert 'duplicate entry: "user2@example.com"' in caplog.text
    set_request(table, F.LOCK | F.DUP_IGNORE)
    assert table.update(b"user2@example.com", b"kept-not") == 1
    for gone in ("user3@example.com", "user4@example.com"):
        set_request(table, F.LOCK | F.SYNC_UPDATE)
        assert table.delete(gone.encode()) == 0
        del entries[gone]
    assert table.delete(b"user3@example.com") == 1
    assert table.delete(b"") == 1

    assert sorted(dump(spec)) == sorted(entries.items())
    assert query_many(spec, list(entries) + ["user3@example.com", "nobody"]) == entries
    assert query(spec, "STRASSE") == "ß-value"  # postmap casefolds, like our client did
    assert query(spec, '"JOHN DOE"@example.com') == "quoted value"
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert our_lookup(table, "User1@Example.com") == "replaced"
    assert sorted(our_dump(table)) == sorted(entries.items())
    table.close()


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", WRITABLE_TYPES)
def test_updates_follow_the_learned_convention(tmp_path, dict_type):
    require_postmap()
    spec = build_table(dict_type, tmp_path / "n", [("old", "o")], ["-n"])
    table = open_indexed(spec, RW_CREATE)
    set_request(table, F.LOCK)
    assert table.lookup(b"old") == b"o"
    assert table.flags & F.TRY_ANY == F.TRY0NULL
    set_request(table, F.LOCK | SERVER_WRITE_FLAGS)
    assert table.update(b"new", b"n") == 0
    assert table.delete(b"old") == 0
    assert dump(spec) == [("new", "n")]
    assert query(spec, "new") == "n"
    table.close()
    raw = _raw_keys(spec)
    assert raw == [b"new"]  # written without NUL, like the rest of this file


def _raw_keys(spec: str) -> list[bytes]:
    dict_type, _, name = spec.partition(":")
    if dict_type == "lmdb":
        import lmdb

        env = lmdb.open(name + ".lmdb", subdir=False, lock=False, readonly=True)
        with env.begin() as txn:
            keys = [bytes(k) for k, _ in txn.cursor()]
        env.close()
        return keys
    from berkeleydb import db as bdb

    handle = bdb.DB()
    handle.open(name + ".db", flags=bdb.DB_RDONLY)
    keys = list(handle.keys())
    handle.close()
    return keys


@pytest.mark.postfix
def test_lmdb_map_grows_on_write(tmp_path):
    require_postmap()
    ctx = OpenContext(params={"lmdb_map_size": str(256 * 1024)})
    spec = f"lmdb:{tmp_path}/big"
    table = open_indexed(spec, RW_CREATE, ctx=ctx)
    set_request(table, F.LOCK | F.DUP_REPLACE)  # no sync per update: this is about size
    value = b"v" * 400
    for n in range(3000):  # ~1.5 MB of data in a 256 KiB map
        assert table.update(b"key%05d" % n, value) == 0
    table.close()
    assert os.path.getsize(table_file(spec)) > 1024 * 1024
    assert query(spec, "key02999") == value.decode()
    assert len(dump(spec)) == 3000


@pytest.mark.postfix
def test_cdb_writer_output_is_read_by_postmap(tmp_path):
    require_postmap()
    items = [(f"k{n}".encode(), f"value {n}".encode()) for n in range(2000)]
    items.append(("çà".encode(), b"unicode"))
    write_cdb(str(tmp_path / "mine.cdb"), items)
    spec = f"cdb:{tmp_path}/mine"
    answers = query_many(spec, [k.decode() for k, _ in items] + ["nosuch"])
    assert answers == {k.decode(): v.decode() for k, v in items}
    assert cdb_hash(b"") == 5381
    # And our reader agrees with the tinycdb file postmap writes.
    postmap_spec = build_table(
        "cdb", tmp_path / "theirs", [(k.decode(), v.decode()) for k, v in items]
    )
    reader = CdbReader.open(str(table_file(postmap_spec)))
    assert list(reader) == items
    assert all(reader.get(k) == v for k, v in items)
    assert reader.get(b"nosuch") is None
    reader.close()


# --- 3. change detection and rebuilds while reading ------------------------------------


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", INDEXED_TYPES)
def test_changed_after_rebuild_and_replacement(tmp_path, dict_type, monkeypatch):
    require_postmap()
    # Trust every stamp: the rebuild must be noticed by its stamps, not by distrust.
    monkeypatch.setattr(indexed, "RACY_WINDOW_NS", 0)
    source = tmp_path / "t"
    spec = build_table(dict_type, source, [("k", "one")])
    table = open_indexed(spec)
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert table.lookup(b"k") == b"one"
    assert not table.changed()

    build_table(dict_type, source, [("k", "two")])  # in place, except cdb (tmp + rename)
    assert table.lookup(b"k") == b"two"
    if dict_type == "lmdb":
        assert not table.changed()  # multi-writer: only replacement counts
    else:
        assert table.changed()

    other = build_table(dict_type, tmp_path / "new", [("k", "three")])
    shutil.move(table_file(other), table_file(spec))  # mv new old
    assert table.changed()
    assert table.lookup(b"k") == b"three"
    fresh = open_indexed(spec)
    table_file(spec).unlink()
    assert fresh.changed()
    set_request(fresh, CLIENT_LOOKUP_FLAGS)
    assert fresh.lookup(b"k") == b"three"  # an unlinked file is still served


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", INDEXED_TYPES)
def test_replacement_of_a_hard_linked_file_waits_for_changed(tmp_path, dict_type, monkeypatch):
    """Per access only the open file is checked (fstat): a name renamed over shows as a
    link count of 0. A file that keeps another name does not; its ctime still moves
    (the link count changed), which hash, btree and cdb take as a rewrite. lmdb ignores
    stamps (its own commits move them), so it serves the old file until the worker's
    ``changed()`` check before the next accept restarts it."""
    require_postmap()
    monkeypatch.setattr(indexed, "RACY_WINDOW_NS", 0)
    source = tmp_path / "t"
    spec = build_table(dict_type, source, [("k", "one")])
    table = open_indexed(spec)
    os.link(table_file(spec), tmp_path / "backup-link")
    other = build_table(dict_type, tmp_path / "new", [("k", "two")])
    shutil.move(table_file(other), table_file(spec))
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert table.lookup(b"k") == (b"one" if dict_type == "lmdb" else b"two")
    assert table.changed()
    fresh = open_indexed(spec)
    set_request(fresh, CLIENT_LOOKUP_FLAGS)
    assert fresh.lookup(b"k") == b"two"


LOCK_HOLDER = """import fcntl, sys
lock = fcntl.flock if sys.argv[2] == "flock" else fcntl.lockf
with open(sys.argv[1], "rb+") as table_file:
    lock(table_file, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", ["hash", "btree", "lmdb"])
def test_a_writer_lock_makes_an_access_busy_not_blocked(tmp_path, dict_type):
    """Another process holds the exclusive lock postmap takes while rebuilding: an access
    raises DictBusy at once (the handler tries again later) instead of waiting."""
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("k", "one")])
    table = open_indexed(spec)
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert table.lookup(b"k") == b"one"
    style = "lockf" if dict_type == "lmdb" else "flock"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(table_file(spec)), style],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        set_request(table, CLIENT_LOOKUP_FLAGS)
        started = time.monotonic()
        with pytest.raises(DictBusy):
            table.lookup(b"k")
        assert time.monotonic() - started < 0.5
        assert isinstance(DictBusy("x"), DictRetry)  # unhandled, it is a temporary failure
    finally:
        holder.stdin.close()
        holder.wait(10)
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert table.lookup(b"k") == b"one"


def _version_of(value: bytes | None, key: bytes) -> int:
    """The build number in a value ``N-key``; -1 for anything else (a wrong answer)."""
    if value is None or not value.endswith(b"-" + key):
        return -1
    head = value[: -len(key) - 1]
    return int(head) if head.isdigit() else -1


def _reader(table, keys: list[bytes], progress: dict, stop: threading.Event) -> None:
    """Look keys up until stopped; an answer older than the last finished build is wrong."""
    try:
        while not stop.is_set():
            for key in keys:
                finished = progress["finished"]
                set_request(table, CLIENT_LOOKUP_FLAGS)
                version = _version_of(lookup_when_unlocked(table, key), key)
                progress["lookups"] += 1
                if version < finished:
                    progress["wrong"].append((key, version, finished))
    except Exception as exc:  # noqa: BLE001 - any failure is a finding
        progress["errors"].append(repr(exc))


@pytest.mark.postfix
@pytest.mark.slow
@pytest.mark.parametrize("dict_type", INDEXED_TYPES)
def test_no_wrong_answer_during_rebuilds(tmp_path, dict_type):
    """A reader thread with LOCK never sees a missing, torn or stale answer.

    Each rebuild stores ``N-key`` for build N. Without the lock hash lookups come back
    empty mid-rebuild; without the reopen hash and cdb keep answering from old builds.
    """
    require_postmap()
    source = tmp_path / "t"
    keys = [f"user{n:04d}@example.com" for n in range(3000)]

    def build(version: int) -> None:
        build_table(dict_type, source, [(k, f"{version}-{k}") for k in keys])

    build(0)
    table = open_indexed(f"{dict_type}:{source}")
    progress = {"finished": 0, "lookups": 0, "wrong": [], "errors": []}
    stop = threading.Event()
    probe = [k.encode() for k in keys[::37]]
    reader = threading.Thread(target=_reader, args=(table, probe, progress, stop))
    reader.start()
    try:
        for version in range(1, 9):
            build(version)
            progress["finished"] = version
    finally:
        stop.set()
        reader.join(30)
    assert not progress["errors"], progress["errors"][:3]
    assert not progress["wrong"], progress["wrong"][:3]
    assert progress["lookups"] > 100
    assert table.changed() == (dict_type != "lmdb")
    set_request(table, CLIENT_LOOKUP_FLAGS)
    assert table.lookup(probe[0]) == b"8-" + probe[0]


READER_PROCESS = """import sys, time
from pathlib import Path
from proxymap import flags as F
from tests.support.postmap import open_indexed, lookup_when_unlocked, CLIENT_LOOKUP_FLAGS
table = open_indexed(sys.argv[1])
finished_file = Path(sys.argv[2])
keys = [f"user{n:04d}@example.com".encode() for n in range(0, 2000, 29)]
lookups = wrong = 0
end = time.time() + float(sys.argv[3])
while time.time() < end:
    for key in keys:
        finished = int(finished_file.read_text() or 0)
        table.flags = (table.flags & ~F.RQST_MASK) | CLIENT_LOOKUP_FLAGS
        value = lookup_when_unlocked(table, key)
        lookups += 1
        head = (value or b"").removesuffix(b"-" + key)
        if value is None or head == value or not head.isdigit() or int(head) < finished:
            wrong += 1
print(lookups, wrong)
"""


@pytest.mark.postfix
@pytest.mark.slow
@pytest.mark.parametrize("dict_type", ["hash", "lmdb"])
def test_no_wrong_answer_from_another_process(tmp_path, dict_type):
    """A separate reader process (like a proxymap worker) during repeated rebuilds."""
    require_postmap()
    source = tmp_path / "t"
    keys = [f"user{n:04d}@example.com" for n in range(2000)]
    build_table(dict_type, source, [(k, f"0-{k}") for k in keys])
    finished_file = tmp_path / "finished"
    finished_file.write_text("0")
    script = tmp_path / "reader.py"
    script.write_text(READER_PROCESS)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    reader = subprocess.Popen(
        [sys.executable, str(script), f"{dict_type}:{source}", str(finished_file), "2.5"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    deadline = time.time() + 2.5
    version = 0
    while time.time() < deadline:
        version += 1
        build_table(dict_type, source, [(k, f"{version}-{k}") for k in keys])
        finished_file.write_text(str(version))
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0
    lookups, wrong = map(int, out.split())
    assert version > 5
    assert lookups > 100
    assert wrong == 0


# --- 4. benchmark stays importable and sane --------------------------------------------


@pytest.mark.postfix
def test_benchmark_function_runs(tmp_path):
    require_postmap()
    figures = benchmark_lookups("lmdb", entries=500, lookups=2000, workdir=tmp_path)
    assert figures["lookups"] == 2000
    assert figures["lookups_per_second"] > 1000
    assert client_folded_key("STRASSE") == b"strasse"
    assert client_folded_key("Straße") == b"strasse"
    assert client_folded_key("\udcff\udcfeABC") == b"\xff\xfeabc"


# --- several instances of one file in one process --------------------------------------


@pytest.mark.postfix
def test_lmdb_instances_share_one_environment(tmp_path):
    """The binding refuses a second open of a file; the server may hold several instances."""
    require_postmap()
    spec = build_table("lmdb", tmp_path / "t", [("k", "built")])
    reader = open_indexed(spec)
    other_reader = open_indexed(spec, flags=F.TRY1NULL)  # another instance-flags key
    writer = open_indexed(spec, RW_CREATE)
    set_request(writer, F.LOCK | SERVER_WRITE_FLAGS)
    assert writer.update(b"k", b"written") == 0
    for table in (reader, other_reader):
        set_request(table, CLIENT_LOOKUP_FLAGS)
        assert table.lookup(b"k") == b"written"
    writer.close()
    set_request(reader, CLIENT_LOOKUP_FLAGS)
    assert reader.lookup(b"k") == b"written"  # still open after the writer left
    reader.close()
    other_reader.close()
    assert query(spec, "k") == "written"


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", ["btree", "lmdb"])
def test_sequence_continues_across_a_rebuild(tmp_path, dict_type):
    require_postmap()
    source = tmp_path / "t"
    spec = build_table(dict_type, source, [(f"k{n}", "old") for n in range(6)])
    table = open_indexed(spec)
    set_request(table, F.LOCK)
    assert table.sequence(0) == (b"k0", b"old")
    assert table.sequence(1) == (b"k1", b"old")
    build_table(dict_type, source, [(f"k{n}", "new") for n in range(6)])
    rest = []
    item = table.sequence(1)
    while item is not None:
        rest.append(item)
        item = table.sequence(1)
    assert rest == [(f"k{n}".encode(), b"new") for n in range(2, 6)]


@pytest.mark.postfix
@pytest.mark.parametrize("dict_type", WRITABLE_TYPES)
def test_truncating_open_empties_the_table(tmp_path, dict_type):
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("old", "x")])
    table = open_indexed(spec, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    set_request(table, F.LOCK | SERVER_WRITE_FLAGS)
    assert table.update(b"new", b"y") == 0
    table.close()
    assert dump(spec) == [("new", "y")]
