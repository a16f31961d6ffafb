"""Build indexed tables with the real postmap/postalias, and ask postmap about them.

NAME
    postmap -- real-postmap oracle for indexed tables (hash, btree, lmdb, cdb)

SYNOPSIS
    from tests.support.postmap import build_table, query, query_many, dump
    spec = build_table("hash", tmp_path / "virtual", [("alice", "alice@example.com")])
    query(spec, "ALICE")               # -> "alice@example.com"  (postmap folds the key)
    query_many(spec, ["alice", "x"])   # -> {"alice": "alice@example.com"}
    dump(spec)                         # -> [("alice", "alice@example.com")]
    spec = build_aliases("hash", tmp_path / "aliases", "postmaster: root\\n")
    open_indexed(spec).lookup(client_folded_key("ALICE"))
    benchmark_lookups("hash")          # -> lookups/s of our table class, no sockets

DESCRIPTION
    Every function runs the installed Postfix commands directly (never through
    proxymap), so their answers are the reference a table class is compared with.
    Keys and values are ``str``; bytes that are not UTF-8 travel as surrogate escapes,
    exactly as the command line and pipes carry them.

    ``query`` returns None for "not found" and raises ``PostmapError`` when postmap
    reports a fatal error (open failure, corrupt file). ``query_many`` uses
    ``postmap -q -`` (keys on stdin, ``key<TAB>value`` for each key found), which is one
    process for any number of keys. ``dump`` is ``postmap -s`` (every entry, in the
    file's own order).

    ``client_folded_key`` turns a key into what a 3.7 client sends through proxymap:
    the UTF-8 layer casefolds a valid UTF-8 key, a driver folds anything else to ASCII
    lower case; the request then carries ``CLIENT_LOOKUP_FLAGS`` (UTF8_REQUEST | LOCK |
    DUP_WARN, no fold bit).

    Tests call ``require_postmap()`` first: it installs Postfix when root and skips
    otherwise (``tests.support.postfix.ensure_postfix``).
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from proxymap import flags as F
from proxymap.tables.base import OpenContext, Table
from tests.support.postfix import CLIENT_TIMEOUT, ensure_postfix, postmap_path

# What `postmap -q` (3.7) sends with each proxied lookup: utf8_request|lock|warn_dup.
CLIENT_LOOKUP_FLAGS = F.UTF8_REQUEST | F.LOCK | F.DUP_WARN
# What proxywrite adds to a client's update/delete flags.
SERVER_WRITE_FLAGS = F.SYNC_UPDATE | F.DUP_REPLACE
INDEXED_TYPES = ("hash", "btree", "lmdb", "cdb")
SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}


class PostmapError(RuntimeError):
    """postmap/postalias failed (exit status and stderr in the message)."""

    def __init__(self, command: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(command)}: exit {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def require_postmap() -> None:
    """Skip the calling test unless the real Postfix commands can be run (see module doc)."""
    ensure_postfix()


def postalias_path() -> str:
    return str(Path(postmap_path()).with_name("postalias"))


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _run(
    command: Sequence[str], stdin: bytes = b"", timeout: float = CLIENT_TIMEOUT * 4
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    return subprocess.run(list(command), input=stdin, capture_output=True, timeout=timeout, env=env)


def _checked(command: Sequence[str], stdin: bytes = b"") -> bytes:
    done = _run(command, stdin)
    if done.returncode != 0:
        raise PostmapError(command, done.returncode, _decode(done.stderr))
    return done.stdout


# --- building ---------------------------------------------------------------------------


def write_source(path: str | os.PathLike, entries: Iterable[tuple[str, str]]) -> Path:
    """Write a postmap source file: one ``key<TAB>value`` line per entry."""
    path = Path(path)
    path.write_bytes(b"".join(_encode(f"{key}\t{value}\n") for key, value in entries))
    return path


def build_table(
    dict_type: str,
    source: str | os.PathLike,
    entries: Iterable[tuple[str, str]] | None = None,
    options: Sequence[str] = (),
) -> str:
    """``postmap [options] TYPE:SOURCE`` (writing SOURCE from ``entries`` first); the spec.

    Source lines postmap rejects only produce warnings; a fatal error raises.
    """
    if entries is not None:
        write_source(source, entries)
    spec = f"{dict_type}:{source}"
    _checked([postmap_path(), *options, spec])
    return spec


def build_aliases(
    dict_type: str, source: str | os.PathLike, text: str | None = None, options: Sequence[str] = ()
) -> str:
    """``postalias [options] TYPE:SOURCE`` (writing SOURCE from ``text`` first); the spec."""
    if text is not None:
        Path(source).write_bytes(_encode(text))
    spec = f"{dict_type}:{source}"
    _checked([postalias_path(), *options, spec])
    return spec


def table_file(spec: str) -> Path:
    """The file an indexed ``TYPE:NAME`` spec lives in (``NAME.db``, ``.lmdb``, ``.cdb``)."""
    dict_type, _, name = spec.partition(":")
    return Path(name + SUFFIX[dict_type])


# --- asking -----------------------------------------------------------------------------


def query(spec: str, key: str, options: Sequence[str] = ()) -> str | None:
    """``postmap -q KEY SPEC``: the value, None when not found, PostmapError when fatal."""
    command = [postmap_path(), *options, "-q", key, spec]
    done = _run(command)
    if done.returncode == 0:
        return _decode(done.stdout).removesuffix("\n")
    stderr = _decode(done.stderr)
    if "fatal:" in stderr:
        raise PostmapError(command, done.returncode, stderr)
    return None


def query_many(spec: str, keys: Iterable[str], options: Sequence[str] = ()) -> dict[str, str]:
    """``postmap -q - SPEC`` with KEYS on stdin: {key: value} for the keys found.

    Keys must not contain TAB or newline (they would be ambiguous in the output).
    """
    keys = list(keys)
    for key in keys:
        if "\t" in key or "\n" in key:
            raise ValueError(f"key {key!r} cannot be asked through postmap -q -")
    command = [postmap_path(), *options, "-q", "-", spec]
    done = _run(command, b"".join(_encode(key + "\n") for key in keys))
    stderr = _decode(done.stderr)
    if done.returncode not in (0, 1) or "fatal:" in stderr:
        raise PostmapError(command, done.returncode, stderr)
    found = {}
    for line in _decode(done.stdout).splitlines():
        key, _, value = line.partition("\t")
        found[key] = value
    return found


def dump(spec: str, options: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``postmap -s SPEC``: every (key, value), in the order postmap prints them."""
    out = _checked([postmap_path(), *options, "-s", spec])
    return [tuple(line.split("\t", 1)) for line in _decode(out).splitlines()]  # type: ignore[misc]


# --- our side of a comparison -----------------------------------------------------------


def client_folded_key(key: str) -> bytes:
    """The key a 3.7 client sends for KEY: casefolded when UTF-8, else ASCII-lowered."""
    raw = _encode(key)
    try:
        return raw.decode("utf-8").casefold().encode("utf-8")
    except UnicodeDecodeError:
        return raw.lower()


def open_indexed(
    spec: str, open_mode: int = os.O_RDONLY, flags: int = 0, ctx: OpenContext | None = None
) -> Table:
    """Construct our table class for SPEC directly (DictOpenError propagates)."""
    from proxymap.tables import table_class

    dict_type, _, name = spec.partition(":")
    return table_class(dict_type)(name, open_mode, flags, ctx or OpenContext())


def our_lookup(table: Table, key: str, flags: int = CLIENT_LOOKUP_FLAGS) -> str | None:
    """Look KEY up the way the proxymap handler does for a 3.7 ``postmap -q`` client."""
    table.flags = (table.flags & ~F.RQST_MASK) | (flags & F.RQST_MASK)
    value = table.lookup(client_folded_key(key))
    return None if value is None else _decode(value)


def lookup_when_unlocked(table: Table, key: bytes) -> bytes | None:
    """``table.lookup``, tried again while a writer holds the file locked (DictBusy),
    as the request handler does (it pauses on the event loop instead of sleeping)."""
    from proxymap.tables.base import DictBusy

    while True:
        try:
            return table.lookup(key)
        except DictBusy:
            time.sleep(0.001)


def our_dump(table: Table) -> list[tuple[str, str]]:
    """Every entry through our ``sequence`` (first, then next until the end)."""
    entries = []
    item = table.sequence(0)
    while item is not None:
        entries.append((_decode(item[0]), _decode(item[1])))
        item = table.sequence(1)
    return entries


# --- benchmark --------------------------------------------------------------------------


def benchmark_lookups(
    dict_type: str,
    entries: int = 10_000,
    lookups: int = 200_000,
    hit_ratio: float = 0.8,
    flags: int = CLIENT_LOOKUP_FLAGS,
    workdir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Lookups per second of our DICT_TYPE table class on a postmap-built table.

    The table holds ENTRIES ``userN@example.com`` keys; the lookup mix has HIT_RATIO
    hits. Measures ``Table.lookup`` only (no protocol, no sockets), with the request
    flags a 3.7 client sends (LOCK included, so each lookup takes the file lock).
    Returns {"lookups_per_second", "microseconds_per_lookup", "entries", "lookups"}.
    """
    with tempfile.TemporaryDirectory(prefix="indexed-bench-", dir=workdir) as tmp:
        source = Path(tmp) / "bench"
        spec = build_table(
            dict_type, source, ((f"user{n}@example.com", f"mailbox-{n}") for n in range(entries))
        )
        table = open_indexed(spec)
        table.flags = (table.flags & ~F.RQST_MASK) | (flags & F.RQST_MASK)
        rng = random.Random(1)
        keys = [
            (
                f"user{rng.randrange(entries)}@example.com"
                if rng.random() < hit_ratio
                else f"nobody{n}@example.org"
            ).encode()
            for n in range(min(lookups, 50_000))
        ]
        # Let the racy-stamp window of the fresh file pass: measure the steady state.
        time.sleep(max(0.0, 2.05 - (time.time() - source.stat().st_mtime)))
        lookup = table.lookup
        started = time.perf_counter()
        for n in range(lookups):
            lookup(keys[n % len(keys)])
        elapsed = time.perf_counter() - started
        table.close()
    return {
        "lookups_per_second": lookups / elapsed,
        "microseconds_per_lookup": elapsed / lookups * 1e6,
        "entries": float(entries),
        "lookups": float(lookups),
    }


if __name__ == "__main__":
    for kind in INDEXED_TYPES:
        figures = benchmark_lookups(kind)
        print(
            f"{kind:6} {figures['lookups_per_second']:>10,.0f} lookups/s"
            f"  ({figures['microseconds_per_lookup']:.2f} us/lookup)"
        )
