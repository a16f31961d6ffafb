"""The differential test vectors, loaded and made usable on this machine.

NAME
    vectors -- read tests/vectors/*.tsv and build their tables with the real postmap

SYNOPSIS
    rows = load_vectors()
    workdir = build_vector_tables(tmp_path)
    table = absolute_map(rows[0].map, workdir)
    maps = proxy_read_maps_for(rows, workdir)

DESCRIPTION
    The vectors were recorded with the real Postfix 3.7.11 (docs/TABLES.md section 8
    says what they hold): every row is the outcome of ``postmap -q KEY MAP`` directly, and
    of ``postmap -q KEY proxy:MAP`` through the C proxymap. The recorded data files were
    copied from the project's spec into ``tests/vectors/`` (see its README.md); the tests
    read only that copy. Map specs name their files relative to the vectors directory;
    ``build_vector_tables`` copies that directory, fills ``@VECTORS@`` in the ``*.cf``
    files, writes ``test.sqlite`` for the ``sqlite-*.cf`` configurations, and builds the
    indexed files (hash, btree, lmdb, cdb) with the real postmap, so lookups here see
    byte-identical tables. ``fake_servers`` runs the fake tcp/socketmap/memcache backends
    the network rows talk to (tests/support/fake_vector_servers.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.fake_vector_servers import PORTS as FAKE_SERVER_PORTS
from tests.support.fake_vector_servers import FakeVectorServers
from tests.support.locks import exclusive
from tests.support.postfix import postmap_path, settle_files

REPOSITORY = Path(__file__).resolve().parents[2]
VECTORS_DIR = REPOSITORY / "tests" / "vectors"

# Types whose name part is a file; relative names are relative to the vectors dir.
FILE_TYPES = (
    "hash|btree|lmdb|cdb|dbm|sdbm|texthash|regexp|pcre|cidr|sqlite|memcache|mysql|pgsql|ldap"
)
_RELATIVE_FILE = re.compile(r"(?<![\w-])(" + FILE_TYPES + r"):(?![{/])([^\s,{}]+)")

# Indexed tables the vectors use, built from their .src files like `postmap TYPE:FILE`.
INDEXED_TABLES = (
    "hash:fixed.src",
    "btree:btree.src",
    "lmdb:fixed.src",
    "cdb:fixed.src",
    "hash:dups.src",
    "cdb:dups.src",
    "lmdb:dups.src",
)

# Rows of these types depend on the host (user database) or on fake network servers.
HOST_DEPENDENT_TYPES = frozenset({"unix"})
NETWORK_TYPES = frozenset({"tcp", "socketmap", "memcache", "mysql", "pgsql", "ldap"})

_ESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def vectors_dir() -> Path:
    """The recorded vectors, in the repository (tests/vectors)."""
    return VECTORS_DIR


def unescape(field: str) -> str:
    """Undo the TSV escaping: \\\\ backslash, \\t TAB, \\n LF, \\r CR (others kept)."""
    out = []
    index = 0
    while index < len(field):
        char = field[index]
        if char == "\\" and index + 1 < len(field):
            following = field[index + 1]
            out.append(_ESCAPES.get(following, "\\" + following))
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def escape(text: str) -> str:
    """The inverse of unescape, for showing rows in documents."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


@dataclass(frozen=True)
class VectorRow:
    """One vectors.tsv row: map spec (relative names), key, expected exit, value."""

    line: int
    map: str
    key: str
    exit: str
    value: str

    @property
    def proxied(self) -> bool:
        return self.map.startswith("proxy:")

    @property
    def direct_map(self) -> str:
        """The map without its proxy: prefix."""
        return self.map[len("proxy:") :] if self.proxied else self.map

    @property
    def map_type(self) -> str:
        return self.direct_map.split(":", 1)[0]

    @property
    def outcome(self) -> tuple[str, str]:
        """(exit, value) in the notation of PostmapResult.outcome()."""
        return self.exit, self.value if self.exit == "0" else ""


@dataclass(frozen=True)
class OpenFlagsRow:
    """One open-flags.tsv row: what a fresh open of MAP answered.

    status is the proxymap status as text, or "EOF" when the server process died
    (then reply_flags is None).
    """

    map: str
    request_flags: int
    status: str
    reply_flags: int | None
    reply_flag_names: str

    @property
    def map_type(self) -> str:
        return self.map.split(":", 1)[0]


def _read_tsv(name: str) -> list[tuple[int, list[str]]]:
    path = vectors_dir() / name
    rows = []
    with open(path, encoding="utf-8", newline="\n") as tsv:
        next(tsv)  # header
        for number, line in enumerate(tsv, start=2):
            rows.append((number, [unescape(f) for f in line.rstrip("\n").split("\t")]))
    return rows


def load_vectors(name: str = "vectors.tsv") -> list[VectorRow]:
    return [VectorRow(number, *fields) for number, fields in _read_tsv(name)]


def load_open_flags() -> list[OpenFlagsRow]:
    return [
        OpenFlagsRow(
            fields[0],
            int(fields[1]),
            fields[2],
            None if fields[3] == "EOF" else int(fields[3]),
            fields[4],
        )
        for _, fields in _read_tsv("open-flags.tsv")
    ]


def rows_of_types(rows: Iterable[VectorRow], types: Iterable[str]) -> list[VectorRow]:
    wanted = set(types)
    return [row for row in rows if row.map_type in wanted]


def absolute_map(spec: str, workdir: str | os.PathLike) -> str:
    """Make the relative file names inside a map spec absolute (nested ones too)."""
    return _RELATIVE_FILE.sub(lambda m: f"{m.group(1)}:{workdir}/{m.group(2)}", spec)


def build_vector_tables(workdir: str | os.PathLike) -> Path:
    """Copy the vectors dir to WORKDIR and build its tables; returns WORKDIR.

    Everything ends up readable by the postfix user (the proxymap worker reads it).
    """
    work = Path(workdir)
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(vectors_dir(), work)
    for path in (work, *work.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for cf in work.glob("*.cf"):
        cf.write_text(cf.read_text().replace("@VECTORS@", str(work)))
    build_sqlite(work / "test.sqlite")
    for spec in INDEXED_TABLES:
        table_type, name = spec.split(":")
        subprocess.run(
            [postmap_path(), f"{table_type}:{work}/{name}"],
            check=True,
            stderr=subprocess.DEVNULL,
        )
    for path in work.iterdir():
        path.chmod(0o644)
    settle_files(work)
    return work


# test.sqlite, which the sqlite-*.cf vectors query: one table, the rows the recording had.
SQLITE_SCHEMA = "CREATE TABLE aliases (addr TEXT, dest TEXT, extra TEXT)"
SQLITE_ALIASES = (
    # addr                      dest                        extra
    ("alice@example.com", "alice@mail.example.com", "x1"),
    ("multi@example.com", "first@example.net", "x2"),
    ("multi@example.com", "second@example.net", "x3"),
    ("multi@example.com", "third@example.net", "x4"),
    ("nullval@example.com", None, "x5"),  # SQL NULL
    ("emptyval@example.com", "", "x6"),
    ("o'brien@example.com", "quote-ok@example.com", "x7"),
    ("Mixed@Example.com", "mixed-case-row", "x8"),
    ("mixed@example.com", "lower-case-row", "x9"),
    ("nodomain", "bare-user", "x10"),
    ("bob", "unqualified-result", "x11"),
    ("%", "percent-row", "x12"),
    ("\u00fcn\u00ef@example.com", "utf8-row", "x13"),  # ünï
)


def build_sqlite(path: str | os.PathLike) -> Path:
    """Write the vectors' sqlite database at PATH (replacing any old one)."""
    database = Path(path)
    database.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        connection.execute(SQLITE_SCHEMA)
        connection.executemany("INSERT INTO aliases VALUES (?, ?, ?)", SQLITE_ALIASES)
    database.chmod(0o644)
    return database


def proxy_read_maps_for(maps_or_rows: Iterable[VectorRow | str], workdir: str | os.PathLike) -> str:
    """The proxy_read_maps value approving every map (rows or map specs) given.

    Entries are absolute, prefixed with proxy:, deduplicated in order, and have $ doubled
    because main.cf would otherwise expand it.
    """
    entries: dict[str, None] = {}
    for item in maps_or_rows:
        spec = item.direct_map if isinstance(item, VectorRow) else item.removeprefix("proxy:")
        entry = "proxy:" + absolute_map(spec, workdir)
        entries[entry.replace("$", "$$")] = None
    return " ".join(entries)


def known_proxy_differences(rows: Iterable[VectorRow]) -> list[tuple[VectorRow, VectorRow]]:
    """(direct row, proxy row) pairs where the recorded 3.7 proxymap differed from direct."""
    direct = {}
    pairs = []
    for row in rows:
        if not row.proxied:
            direct[(row.map, row.key)] = row
        else:
            twin = direct.get((row.direct_map, row.key))
            if twin is not None and twin.outcome != row.outcome:
                pairs.append((twin, row))
    return pairs


def difference_reason(direct: VectorRow, proxied: VectorRow) -> str:
    """Why the recorded 3.7 proxymap answered differently (docs/TABLES.md 2.3, 2.6, 3.2, 5.1)."""
    if proxied.exit == "HANG":
        return "3.7 proxymap process exits (fatal) on this table; the client retries forever"
    if direct.map_type == "texthash" and "dups" in direct.map:
        return "3.7 opens texthash without a duplicate policy: the table is unusable (RETRY)"
    if direct.map_type == "lmdb" and direct.key == "":
        return "direct lmdb rejects an empty key (fatal); the proxy instance answers not found"
    if direct.map_type == "pipemap":
        return "3.7 opens pipemap members without fold flags: the key passed on is not folded"
    if direct.exit == "0" and proxied.exit == "1":
        return "3.7 loads text-table keys unfolded (open flags 0) while the client folds the key"
    return "see docs/TABLES.md section 8"


def expected_from_pyproxymap(direct: VectorRow, proxied: VectorRow) -> str:
    if direct.map_type == "lmdb" and direct.key == "":
        return "not found (docs/TABLES.md 3.2)"
    if proxied.exit == "HANG":
        return "an error reply (E), no hang"
    return "as direct"


def _cell(outcome: tuple[str, str]) -> str:
    exit_code, value = outcome
    if exit_code == "0":
        return "`" + escape(value).replace("|", "\\|") + "`" if value else "(empty value)"
    return {"1": "not found", "E": "error", "HANG": "hang"}[exit_code]


def known_differences_markdown(rows: Iterable[VectorRow]) -> str:
    """The table of direct != 3.7-proxy rows, as docs/DROPIN.md shows it."""
    lines = [
        "| # | map | key | direct `postmap -q` | 3.7 C proxymap | pyproxymap | why 3.7 differs |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, (direct, proxied) in enumerate(known_proxy_differences(rows), start=1):
        table = direct.map if len(direct.map) <= 48 else direct.map[:45] + "..."
        key = escape(direct.key).replace("|", "\\|")
        lines.append(
            f"| {number} | `{table.replace('|', '¦')}` | {f'`{key}`' if key else '(empty)'} "
            f"| {_cell(direct.outcome)} | {_cell(proxied.outcome)} "
            f"| {expected_from_pyproxymap(direct, proxied)} | {difference_reason(direct, proxied)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # python -m tests.support.vectors  -> the known-differences table for docs/DROPIN.md
    print(known_differences_markdown(load_vectors()), end="")


# ---------------------------------------------------------------------------
# The vectors' fake network servers (tcp :19601, socketmap :19602, memcache :19603)
# ---------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# The recorded ports are fixed: one test process at a time on this machine runs the fakes
# (pytest-xdist workers, test runs of other checkouts). A module that holds them must
# have no @pytest.mark.serial test: that test would wait for a worker waiting for them.
FAKE_SERVERS_LOCK = Path(tempfile.gettempdir()) / "pyproxymap-tests-vector-ports.lock"


@contextlib.contextmanager
def fake_servers(log_dir: str | os.PathLike) -> Iterator[None]:
    """Run our fake tcp/socketmap/memcache servers unless something already listens there.

    Requests are logged to LOG_DIR/wire.log. The fakes live in this process (a thread).
    Another test process using them is waited for (FAKE_SERVERS_LOCK).
    """
    with exclusive(FAKE_SERVERS_LOCK):
        if all(_port_open(port) for port in FAKE_SERVER_PORTS):
            yield
            return
        with FakeVectorServers(wire_log=Path(log_dir) / "wire.log"):
            yield


@contextlib.contextmanager
def fake_servers_on_free_ports(log_dir: str | os.PathLike) -> Iterator[FakeVectorServers]:
    """The same fakes on free ports, for callers that rewrite the map specs with
    ``on_own_ports``: no waiting for the recorded ports (a test that compares with the
    real Postfix, which reads the specs from main.cf, keeps using ``fake_servers``)."""
    with FakeVectorServers(wire_log=Path(log_dir) / "wire.log", ports=(0, 0, 0)) as fakes:
        yield fakes
