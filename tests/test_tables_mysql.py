"""mysql: tables against a private MariaDB, and differentially against the real Postfix.

``TestAgainstPostfix`` is the differential test: for a set of .cf files and keys, the
direct ``postmap -q KEY mysql:FILE`` (Postfix 3.7's own client), ``postmap -q KEY
proxy:mysql:FILE`` through OUR worker under the real Postfix master, and the same
through the C proxymap must agree, status and value. Keys go in batches (``postmap
-q -``, one process per table and path) where a lookup cannot fail; lookups that fail
run one by one, and the proxied ones are checked on the wire (status 2 = RETRY).

The other classes work at table level: escaping, host and option-file parsing,
failover and recovery (a dead first host, all hosts dead, a restarted server, one log
line per outage) and concurrency (a stalled query holds up nobody else and times out
as RETRY; 50 concurrent lookups never open more connections than configured).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxymap import flags as F
from proxymap.tables import mysql as mysql_module
from proxymap.tables import open_table
from proxymap.tables.base import (
    LATER,
    DictOpenError,
    DictRetry,
    OpenContext,
    SurrogateTable,
)
from proxymap.tables.mysql import (
    DEFAULT_SOCKET,
    Endpoint,
    MysqlTable,
    ResultHeader,
    _one_result_set,
    mysql_escape,
    parse_host,
    read_option_files,
    unix_first_random,
)
from proxymap.tables.pool import EndpointState
from tests.support.postfix import (
    POSTMAP_LOOKUP_FLAGS,
    PrivatePostfix,
    ensure_postfix,
    postmap_lookup,
    settle_files,
)
from tests.support.servers import (  # noqa: F401 - fixtures, used by name
    PrivateMariaDB,
    ensure_server_packages,
    free_port,
    mariadb,
    mariadb_module,
)
from tests.support.started import both_ways, started

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
USER, PASSWORD, DBNAME = "pf", "s3cret'\"pw", "mail"
FOLD_LOOKUP_FLAGS = POSTMAP_LOOKUP_FLAGS | F.FOLD_FIX  # what postmap -q sends

SCHEMA = r"""
CREATE TABLE aliases (k VARCHAR(255) PRIMARY KEY, v TEXT, v2 TEXT,
                      l TEXT CHARACTER SET latin1, b BLOB);
INSERT INTO aliases VALUES
  ('alice', 'alice@example.com', NULL, 'caf\xe9', NULL),
  ('bob', 'bob@example.com', 'bob2@example.com', NULL, NULL),
  ('o''neil', 'quote@example.com', NULL, NULL, NULL),
  ('back\\slash', 'backslash@example.com', NULL, NULL, NULL),
  ('dq"key', 'dq@example.com', NULL, NULL, NULL),
  ('100%', 'percent@example.com', NULL, NULL, NULL),
  ('über', 'uber@example.com', 'ünïcödé €', NULL, NULL),
  ('empty', '', NULL, NULL, NULL),
  ('nullval', NULL, NULL, NULL, NULL),
  ('nul', 'A', NULL, NULL, X'41004243'),
  ('user@example.com', 'user-at-example', NULL, NULL, NULL),
  ('user@other.org', 'user-at-other', NULL, NULL, NULL),
  ('user', 'bare-user', NULL, NULL, NULL),
  ('a b', 'spaced', NULL, NULL, NULL);
CREATE TABLE multi (k VARCHAR(255), v TEXT, n INT);
INSERT INTO multi VALUES ('list', 'a', 1), ('list', 'b', 2), ('list', 'c', 3),
  ('one', 'x@y.z', 1), ('pair', 'p1@h.example', 1), ('pair', 'p2', 2);
CREATE PROCEDURE one_set(IN p VARCHAR(255)) SELECT v FROM aliases WHERE k = p;
CREATE PROCEDURE no_set(IN p VARCHAR(255)) DO p;
"""
TWO_SETS = (
    "DELIMITER //\nCREATE PROCEDURE two_sets(IN p VARCHAR(255)) "
    "BEGIN SELECT 1; SELECT 2; END//\nDELIMITER ;"
)


def fill(db: PrivateMariaDB) -> None:
    db.create_user(USER, PASSWORD, DBNAME)
    db.execute(SCHEMA.replace("\\xe9", "é"), database=DBNAME)
    db.execute(TWO_SETS, database=DBNAME)


def cf_text(db: PrivateMariaDB, extra: dict[str, str], hosts: str | None = None) -> str:
    lines = {
        "hosts": hosts if hosts is not None else f"inet:127.0.0.1:{db.port}",
        "user": USER,
        "password": PASSWORD,
        "dbname": DBNAME,
        **extra,
    }
    return "".join(f"{name} = {value}\n" for name, value in lines.items())


def closed_port() -> int:
    """A TCP port nobody listens on (connects are refused at once)."""
    return free_port()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def context(**params: str) -> OpenContext:
    ctx = OpenContext(params=dict(params))
    ctx.open_table = lambda spec, mode, flags: open_table(spec, mode, flags, ctx)
    return ctx


def table_for(
    directory: Path,
    db: PrivateMariaDB,
    extra: dict[str, str],
    *,
    hosts: str | None = None,
    ctx: OpenContext | None = None,
    name: str = "t.cf",
    flags: int = F.FOLD_FIX,
) -> MysqlTable:
    path = directory / name
    path.write_text(cf_text(db, extra, hosts))
    return MysqlTable(str(path), os.O_RDONLY, flags, ctx or context())


QUERY = "SELECT v FROM aliases WHERE k='%s'"


@pytest.fixture(scope="module")
def db(mariadb_module: PrivateMariaDB) -> PrivateMariaDB:  # noqa: F811
    fill(mariadb_module)
    return mariadb_module


@pytest.fixture
def cfdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pyproxymap-mysql-") as name:
        yield Path(name)


way = both_ways(MysqlTable)


# ---------------------------------------------------------------------------------------
# Units: escaping, hosts, option files, opening
# ---------------------------------------------------------------------------------------


class TestEscape:
    def test_utf8mb4_specials(self) -> None:
        assert mysql_escape(b"a\0b\nc\rd\\e'f\"g\x1ah%_") == b"a\\0b\\nc\\rd\\\\e\\'f\\\"g\\Zh%_"
        assert mysql_escape("über'".encode()) == "über\\'".encode()
        assert mysql_escape(b"\xff\xfe'") == b"\xff\xfe\\'"  # invalid UTF-8 kept as is

    def test_no_backslash_escapes(self) -> None:
        assert mysql_escape(b"o'n\\x\n", no_backslash_escapes=True) == b"o''n\\x\n"

    def test_multibyte_charsets_keep_characters_whole(self) -> None:
        # 0xBF5C is one GBK character whose second byte is "\": escaping it would
        # leave 0xBF followed by "\\'", i.e. a quote that ends the string.
        assert mysql_escape(b"\xbf\x5c'", "gbk") == b"\xbf\x5c\\'"
        assert mysql_escape(b"\x95\x5c'", "sjis") == b"\x95\x5c\\'"
        assert mysql_escape(b"\xa4\x5c", "big5") == b"\xa4\x5c"
        assert mysql_escape(b"\x5c\xbf", "gbk") == b"\\\\\xbf"  # a lone lead byte
        assert mysql_escape(b"\xbf\x5c'", "gbk", no_backslash_escapes=True) == b"\xbf\x5c''"
        # The byte-wise charsets escape the same byte.
        assert mysql_escape(b"\xbf\x5c'", "latin1") == b"\xbf\\\\\\'"


def answer_packets(value: bytes, definition: bytes = b"\x03def\x00\x00\x00\x01v") -> bytes:
    """One result set as MariaDB sends it with DEPRECATE_EOF: the column count, one
    column definition, one row and the closing OK packet (status 2, autocommit)."""
    payloads = [b"\x01", definition, bytes([len(value)]) + value, b"\xfe\x00\x00\x02\x00\x00\x00"]
    return b"".join(
        len(payload).to_bytes(3, "little") + bytes([seq]) + payload
        for seq, payload in enumerate(payloads, 1)
    )


class TestResultParsing:
    def test_a_kept_header_is_matched_within_the_valid_bytes(self) -> None:
        header = ResultHeader()
        answer = answer_packets(b"abc")
        proto = SimpleNamespace(buffer=bytearray(answer), pos=0, length=len(answer))
        assert _one_result_set(proto, True, header) == ([(b"abc",)], len(answer), 5, 2)
        assert header.data == answer[:-19]  # up to the row packet
        # A receive buffer longer than its valid bytes: what lies past them is old.
        proto = SimpleNamespace(buffer=bytearray(answer * 2), pos=0, length=8)
        assert _one_result_set(proto, True, header) is None  # more bytes needed
        other = answer_packets(b"xy", definition=b"\x03def\x00\x00\x00\x01w")
        proto = SimpleNamespace(buffer=bytearray(answer + other), pos=len(answer))
        proto.length = len(answer) + len(other)
        assert _one_result_set(proto, True, header)[0] == [(b"xy",)]
        assert header.data == other[:-18]  # the new one is kept


class TestHosts:
    def test_forms(self) -> None:
        assert parse_host("db1", {}) == Endpoint("db1", host="db1", port=3306)
        assert parse_host("inet:db1:3307", {}) == Endpoint("inet:db1:3307", host="db1", port=3307)
        assert parse_host("db1:mysql", {}).port == 3306  # a service name
        assert parse_host("inet:[::1]:3308", {}) == Endpoint(
            "inet:[::1]:3308", host="::1", port=3308
        )
        assert parse_host("unix:/run/x.sock", {}) == Endpoint(
            "unix:/run/x.sock", unix_socket="/run/x.sock"
        )
        assert parse_host("db1", {"port": "3310"}).port == 3310  # from the option files

    def test_localhost_is_the_default_socket(self) -> None:
        for text in ("localhost", "inet:LocalHost:3306", "unix:localhost"):
            assert parse_host(text, {}, environ={}).unix_socket == DEFAULT_SOCKET
        assert parse_host("localhost", {"socket": "/s"}).unix_socket == "/s"
        assert parse_host("localhost", {}, environ={"MYSQL_UNIX_PORT": "/e"}).unix_socket == "/e"
        assert parse_host("127.0.0.1", {}).host == "127.0.0.1"  # TCP, as the man page says

    def test_unknown_service(self) -> None:
        with pytest.raises(DictOpenError, match="unknown service: nosuchservice/tcp"):
            parse_host("db1:nosuchservice", {})

    def test_unix_sockets_first_in_random_order(self) -> None:
        states = [
            EndpointState(parse_host(text, {}), text)
            for text in ("inet:a:1", "unix:/s1", "inet:b:2", "unix:/s2")
        ]
        seen = set()
        for _ in range(200):
            order = [s.label for s in unix_first_random(states)]
            assert {order[0], order[1]} == {"unix:/s1", "unix:/s2"}
            seen.add(tuple(order))
        assert len(seen) == 4  # both halves are shuffled


class TestOptionFiles:
    def test_groups_include_and_escapes(self, tmp_path: Path) -> None:
        (tmp_path / "inc").mkdir()
        (tmp_path / "inc" / "my.cnf").write_text("[client]\nport = 4000\n")
        (tmp_path / "inc" / "other.cnf").write_text("[client]\nuser = ignored\n")
        main = tmp_path / "main.cnf"
        main.write_text(
            "[mysqld]\nsocket = /server.sock\n"
            "[client]\nsocket = '/client sock'\nuser=u1\n"
            "[client-server]\ndefault_character_set = latin1\n"
            '[postfix]\npassword = "p\\tw"\nuser = u2\n'
            f"!includedir {tmp_path / 'inc'}\n"
        )
        options = read_option_files(str(main), "postfix")
        assert options == {
            "socket": "/client sock",
            "user": "u2",
            "default-character-set": "latin1",
            "password": "p\tw",
            "port": "4000",
        }
        assert read_option_files(str(main), "")["user"] == "u1"  # [client] only

    def test_no_file_and_no_group_reads_nothing(self) -> None:
        assert read_option_files(None, None) == {}
        assert read_option_files(None, "") == {}

    def test_default_files(self, tmp_path: Path) -> None:
        (tmp_path / ".my.cnf").write_text("[client]\nsocket = /home.sock\n")
        options = read_option_files(None, "client", environ={"HOME": str(tmp_path)})
        assert options["socket"] == "/home.sock"


class TestOpen:
    def test_read_only(self, cfdir: Path) -> None:
        path = cfdir / "t.cf"
        path.write_text("dbname = x\nquery = SELECT 1\n")
        with pytest.raises(DictOpenError, match="requires O_RDONLY"):
            MysqlTable(str(path), os.O_RDWR, 0, context())

    @pytest.mark.parametrize(
        "text, message",
        [
            ("query = SELECT 1\n", "bad string length 0 < 1: dbname"),
            ("dbname = d\nquery = SELECT '%x'\n", "Invalid query template"),
            ("dbname = d\n", "'table' parameter not defined|bad string length"),
            ("dbname = d\nquery = SELECT 1\ncharset = nosuch\n", "unsupported character set"),
            ("dbname = d\nquery = SELECT 1\nhosts = h:nosuchsvc\n", "unknown service"),
            ("dbname = d\nquery = SELECT 1\nrequire_result_set = maybe\n", "bad boolean"),
            ("dbname = d\nquery = SELECT 1\ntls_CAfile = /nonexistent/ca.pem\n", "TLS settings"),
        ],
    )
    def test_errors_make_the_table_unavailable(self, cfdir: Path, text: str, message: str) -> None:
        path = cfdir / "t.cf"
        path.write_text(text)
        with pytest.raises(DictOpenError, match=message):
            MysqlTable(str(path), os.O_RDONLY, 0, context())
        surrogate = open_table(f"mysql:{path}", os.O_RDONLY, 0, context())
        assert isinstance(surrogate, SurrogateTable)
        with pytest.raises(DictRetry):
            surrogate.lookup(b"x")

    @pytest.mark.parametrize("query", ["SELECT '%s'", "SELECT '%u'", "SELECT '%d %3'"])
    def test_always_fixed(self, cfdir: Path, query: str) -> None:
        # Postfix's test for "the query uses part of the key" (a pattern table) is
        # disabled: every SQL table is fixed, and keys fold as fixed keys do.
        path = cfdir / "t.cf"
        path.write_text(f"dbname = d\nquery = {query}\n")
        table = MysqlTable(str(path), os.O_RDONLY, F.PATTERN | F.LOCK, context())
        assert table.flags & (F.FIXED | F.PATTERN) == F.FIXED
        assert table.flags & F.LOCK

    def test_tls_from_the_option_file(self, cfdir: Path) -> None:
        (cfdir / "my.cnf").write_text("[client]\nssl\n")
        path = cfdir / "t.cf"
        path.write_text(f"dbname = d\nquery = SELECT 1\noption_file = {cfdir}/my.cnf\n")
        assert MysqlTable(str(path), os.O_RDONLY, 0, context()).login.tls is not None
        path.write_text("dbname = d\nquery = SELECT 1\noption_group =\n")
        assert MysqlTable(str(path), os.O_RDONLY, 0, context()).login.tls is None

    def test_main_cf_prefix_and_defaults(self) -> None:
        ctx = context(src_dbname="d", src_query="SELECT 1", src_hosts="a , unix:/s\tb:3307")
        table = MysqlTable("src", os.O_RDONLY, 0, ctx)
        assert [e.label for e in table.endpoints] == ["a", "unix:/s", "b:3307"]
        assert table.pool.size == 8 and table.timeout == 10
        assert table.pool.idle_limit == 60 and table.pool.backoff_max <= 2
        bare = MysqlTable(
            "src2",
            os.O_RDONLY,
            0,
            context(
                src2_dbname="d",
                src2_query="SELECT 1",
                src2_idle_interval="7",
                src2_retry_interval="1",
                pyproxymap_mysql_connections="3",
                pyproxymap_mysql_timeout="2.5",
            ),
        )
        assert [e.label for e in bare.endpoints] == ["localhost"]
        assert bare.pool.size == 3 and bare.timeout == 2.5
        assert bare.pool.idle_limit == 7 and bare.pool.backoff_max == 1


# ---------------------------------------------------------------------------------------
# Table level, against the private MariaDB
# ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("way")
class TestLookups:
    def test_values_are_the_bytes_the_server_sent(self, db: PrivateMariaDB, cfdir: Path) -> None:
        table = table_for(cfdir, db, {"query": "SELECT v, v2, l, b FROM aliases WHERE k='%s'"})

        async def main() -> None:
            assert await table.alookup(b"alice") == "alice@example.com,café".encode()
            assert await table.alookup("über".encode()) == "uber@example.com,ünïcödé €".encode()
            assert await table.alookup(b"nul") == b"A,A"  # a value ends at its NUL
            assert await table.alookup(b"ALICE") is not None  # FOLD_FIX
            assert await table.alookup(b"nullval") is None
            assert await table.alookup(b"x'OR'1'='1") is None  # no injection
            assert await table.alookup(b"o'neil") == b"quote@example.com"
            assert await table.alookup(b"back\\slash") == b"backslash@example.com"

        run(main())

    def test_answers_of_every_size(self, db: PrivateMariaDB, cfdir: Path) -> None:
        # The one-pass parser takes an answer whole or not at all: one that needs
        # several reads (a 300 kB value, 2 000 rows) is read by asyncmy, and the
        # connection stays in step for the lookups after it.
        big = table_for(
            cfdir, db, {"query": "SELECT REPEAT('%s', 100000), NULL, ''"}, name="big.cf"
        )
        rows = table_for(
            cfdir, db, {"query": "SELECT seq FROM seq_1_to_2000 WHERE '%s' <> ''"}, name="rows.cf"
        )
        small = table_for(cfdir, db, {"query": QUERY}, name="small.cf")

        async def main() -> None:
            for _ in range(3):
                assert await big.alookup(b"xyz") == b"xyz" * 100000
                assert await rows.alookup(b"k") == b",".join(b"%d" % n for n in range(1, 2001))
                assert await small.alookup(b"bob") == b"bob@example.com"
                assert await small.alookup(b"nobody") is None

        run(main())

    def test_answers_whose_columns_change_with_the_key(
        self, db: PrivateMariaDB, cfdir: Path, way: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The column definition of a literal carries its length: an answer to a key
        # of another length opens with other bytes than the kept ResultHeader, so its
        # columns are parsed, and an answer to a key of the same length reuses them.
        table = table_for(cfdir, db, {"query": "SELECT '%s' AS v"})
        parsed = []
        columns = mysql_module._columns
        monkeypatch.setattr(
            mysql_module, "_columns", lambda *args: parsed.append(1) or columns(*args)
        )

        async def main() -> None:
            for key in (b"a", b"b", b"longer key", b"c", b"d", b"longer kez", b"", b"e"):
                assert await table.alookup(key) == (key or None)
            assert len(parsed) == 5  # all but b and d: a, longer key, c, longer kez, e
            assert table.header.data.startswith(b"\x01\x00\x00\x01\x01")  # one column
            assert table.pool.connects == 1

        run(main())

    def test_charset_setting(self, db: PrivateMariaDB, cfdir: Path) -> None:
        table = table_for(
            cfdir, db, {"query": "SELECT l, v2 FROM aliases WHERE k='%s'", "charset": "latin1"}
        )

        async def main() -> None:
            # The server converts to the connection's character set: é is one byte,
            # and "€" (not in latin1 proper) is cp1252's 0x80, as MariaDB's latin1 is.
            assert await table.alookup(b"alice") == b"caf\xe9"
            assert await table.alookup("\xfcber".encode("latin1")) == "ünïcödé €".encode("cp1252")

        run(main())

    def test_no_backslash_escapes_server_mode(self, db: PrivateMariaDB, cfdir: Path) -> None:
        db.execute("SET GLOBAL sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        try:
            table = table_for(cfdir, db, {"query": QUERY})

            async def main() -> None:
                assert await table.alookup(b"back\\slash") == b"backslash@example.com"
                assert await table.alookup(b"o'neil") == b"quote@example.com"
                assert await table.alookup(b"x' OR '1'='1") is None

            run(main())
        finally:
            db.execute("SET GLOBAL sql_mode = REPLACE(@@sql_mode, 'NO_BACKSLASH_ESCAPES', '')")

    def test_retry_escapes_for_the_new_connection(self, db: PrivateMariaDB, cfdir: Path) -> None:
        # A query escaped for a NO_BACKSLASH_ESCAPES connection that is then lost is
        # escaped again for the connection that retries it (here in the default
        # mode, where a lone quote-doubling would let a backslash end the string).
        table = table_for(cfdir, db, {"query": QUERY}, name="modes.cf")

        async def main() -> None:
            db.execute("SET GLOBAL sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
            try:
                assert await table.alookup(b"o'neil") == b"quote@example.com"
            finally:
                db.execute("SET GLOBAL sql_mode = REPLACE(@@sql_mode, 'NO_BACKSLASH_ESCAPES', '')")
            db.execute(f"KILL {table.pool._idle[-1].connection.thread_id()}")
            await asyncio.sleep(0.2)  # the server has closed it
            assert await table.alookup(b"x\\' OR '1'='1") is None
            assert table.pool.connects == 2  # the retry made a new connection
            assert await table.alookup(b"back\\slash") == b"backslash@example.com"

        run(main())

    def test_result_set_rules(self, db: PrivateMariaDB, cfdir: Path) -> None:
        one = table_for(cfdir, db, {"query": "CALL one_set('%s')"}, name="one.cf")
        two = table_for(cfdir, db, {"query": "CALL two_sets('%s')"}, name="two.cf")
        none = table_for(cfdir, db, {"query": "CALL no_set('%s')"}, name="none.cf")
        allowed = table_for(
            cfdir, db, {"query": "DO '%s'", "require_result_set": "no"}, name="allowed.cf"
        )
        stacked = table_for(cfdir, db, {"query": QUERY + "; SELECT 1"}, name="stacked.cf")

        async def main() -> None:
            assert await one.alookup(b"bob") == b"bob@example.com"
            assert await one.alookup(b"bob") == b"bob@example.com"  # connection reusable
            for table in (two, none, stacked):
                with pytest.raises(DictRetry):
                    await table.alookup(b"bob")
            assert await allowed.alookup(b"bob") is None

        run(main())


class TestStartedLookups:
    """``lookup_start``'s own branches (the classes above also run through it)."""

    def test_answered_in_the_data_callback(self, db: PrivateMariaDB, cfdir: Path) -> None:
        table = table_for(cfdir, db, {"query": "SELECT v, v2 FROM aliases WHERE k='%s'"})
        big = table_for(cfdir, db, {"query": "SELECT REPEAT('%s', 100000)"}, name="big.cf")

        async def main() -> None:
            assert await table.alookup(b"alice")  # connected: the next ones start
            assert await started(table, b"bob") == b"bob@example.com,bob2@example.com"
            assert await started(table, b"nobody") is None
            assert await started(table, "über".encode()) == "uber@example.com,ünïcödé €".encode()
            assert table.pool.in_use == 0 and table.pool.connects == 1
            assert await big.alookup(b"x") == b"x" * 100000
            for _ in range(2):  # taken whole after several reads
                assert await started(big, b"xyz") == b"xyz" * 100000
            assert big.pool.in_use == 0 and big.pool.connects == 1

        run(main())

    def test_failures_go_on_in_rows(self, db: PrivateMariaDB, cfdir: Path) -> None:
        broken = table_for(cfdir, db, {"query": "SELECT nosuch FROM aliases WHERE k='%s'"})
        two = table_for(cfdir, db, {"query": "CALL two_sets('%s')"}, name="two.cf")

        async def failing() -> None:
            for table in (broken, two):
                table.pool.release(await table.pool.acquire(5))  # an idle connection
                outcome = await started(table, b"bob")
                assert isinstance(outcome, DictRetry), outcome
                assert "query failed" in str(outcome)
                assert table.pool.in_use == 0

        run(failing())

    def test_lost_connection_is_tried_again(self, db: PrivateMariaDB, cfdir: Path) -> None:
        table = table_for(cfdir, db, {"query": "SELECT '%s' FROM DUAL WHERE SLEEP(0.5) = 0"})

        async def main() -> None:
            assert await table.alookup(b"a") == b"a"
            thread_id = table.pool._idle[-1].connection.thread_id()
            answer = asyncio.ensure_future(started(table, b"b"))
            await asyncio.sleep(0.1)
            await asyncio.to_thread(db.execute, f"KILL {thread_id}")
            assert await answer == b"b"  # on a new connection
            assert table.pool.connects == 2 and table.pool.in_use == 0

        run(main())

    def test_deadline(self, db: PrivateMariaDB, cfdir: Path) -> None:
        slow = {"query": "SELECT SLEEP('%s')"}
        ctx = context(pyproxymap_mysql_timeout="0.5")
        table = table_for(cfdir, db, slow, ctx=ctx, name="slow.cf", flags=0)

        async def main() -> None:
            assert await table.alookup(b"0") == b"0"
            began = time.monotonic()
            outcome = await started(table, b"3")
            assert isinstance(outcome, DictRetry) and "within 0.5s" in str(outcome)
            assert 0.45 < time.monotonic() - began < 2.0  # a loaded machine
            while table.pool.in_use:  # until KILL QUERY has stopped it
                await asyncio.sleep(0.05)
            assert await started(table, b"0") == b"0"

        run(main())

    def test_queued_when_no_connection_is_free(self, db: PrivateMariaDB, cfdir: Path) -> None:
        slow = {"query": "SELECT '%s' FROM DUAL WHERE SLEEP(0.2) = 0"}
        ctx = context(pyproxymap_mysql_connections="1")
        table = table_for(cfdir, db, slow, ctx=ctx, name="one.cf", flags=0)

        async def main() -> None:
            assert table.lookup_start(b"a", print) is LATER  # not connected yet
            assert await table.alookup(b"a") == b"a"
            first = asyncio.ensure_future(started(table, b"b"))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(started(table, b"c"))  # waits for the one
            await asyncio.sleep(0.05)
            assert table.pool.waiting == 1 and table.pool.in_use == 1
            assert await first == b"b"
            assert not second.done()  # sent on that connection when it came back
            assert await second == b"c"
            assert table.pool.connects == 1 and table.pool.in_use == 0

        run(main())


class TestConnections:
    def test_health_check_and_idle_close(
        self, db: PrivateMariaDB, cfdir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        db.create_user("idler", "pw", DBNAME)
        path = cfdir / "idle.cf"
        path.write_text(
            cf_text(db, {"user": "idler", "password": "pw", "query": QUERY, "idle_interval": "1"})
        )
        table = MysqlTable(str(path), os.O_RDONLY, 0, context())
        table.pool.check_after = 0.05  # (5 s in service)
        caplog.set_level(logging.INFO, "proxymap")

        async def main() -> None:
            assert await table.alookup(b"alice") == b"alice@example.com"
            # The server drops the idle connection (wait_timeout, a restart...): the
            # ping before reuse notices, and the lookup gets a new connection.
            await asyncio.to_thread(
                db.execute,
                "SELECT GROUP_CONCAT(CONCAT('KILL ', ID)) "
                "FROM information_schema.PROCESSLIST WHERE USER='idler' "
                "INTO @k; EXECUTE IMMEDIATE @k",
            )
            await asyncio.sleep(0.1)
            assert await table.alookup(b"alice") == b"alice@example.com"
            assert table.pool.connects == 2
            assert await asyncio.to_thread(db.connection_count, "idler") == 1
            # Quiet for idle_interval: the connection is closed, as Postfix does.
            await asyncio.sleep(1.3)
            assert table.pool.open == 0
            assert await asyncio.to_thread(db.connection_count, "idler") == 0

        run(main())
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


TLS_QUERY = (
    "SELECT GROUP_CONCAT(VARIABLE_VALUE ORDER BY VARIABLE_NAME SEPARATOR ' ') "
    "FROM information_schema.SESSION_STATUS "
    "WHERE VARIABLE_NAME IN ('Ssl_version', 'Ssl_cipher') AND '%s' <> ''"
)


def make_certificates(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 and localhost (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pyproxymap test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    )
    for item in directory.iterdir():
        item.chmod(0o644)  # the server runs as mysql


@pytest.fixture(scope="module")
def tls_db() -> Iterator[tuple[PrivateMariaDB, Path]]:
    ensure_server_packages("mariadb-server")
    with tempfile.TemporaryDirectory(prefix="pyproxymap-tls-") as name:
        certs = Path(name)
        certs.chmod(0o755)
        make_certificates(certs)
        with PrivateMariaDB(
            extra_args=[
                f"--ssl-ca={certs}/ca.pem",
                f"--ssl-cert={certs}/server.pem",
                f"--ssl-key={certs}/server.key",
            ]
        ) as server:
            server.create_user(USER, PASSWORD, DBNAME)
            yield server, certs


class TestTls:
    """tls_* settings, ours against the direct postmap (TLS version and cipher seen by
    the server, or the failure)."""

    @pytest.mark.parametrize(
        "settings, unix",
        [
            (settings, unix)
            for unix in (False, True)
            for settings in (
                "",
                "tls_CAfile = {c}/ca.pem",
                "tls_CAfile = {c}/ca.pem\ntls_verify_cert = yes",
                "tls_cert_file = {c}/server.pem\ntls_key_file = {c}/server.key",
                "tls_ciphers = ECDHE-RSA-AES128-GCM-SHA256\ntls_CAfile = {c}/ca.pem",
            )
        ]
        + [
            ("tls_CApath = /etc/ssl/certs", False),  # the test CA is not there: refused
            ("tls_CAfile = {c}/server.pem", True),  # not the CA: refused
        ],
    )
    def test_against_postmap(
        self, tls_db: tuple[PrivateMariaDB, Path], cfdir: Path, settings: str, unix: bool
    ) -> None:
        ensure_postfix()
        server, certs = tls_db
        hosts = f"unix:{server.socket}" if unix else f"inet:127.0.0.1:{server.port}"
        path = cfdir / "tls.cf"
        path.write_text(
            cf_text(server, {"query": TLS_QUERY}, hosts) + settings.format(c=certs) + "\n"
        )
        settle_files(path)
        direct = postmap_lookup("x", f"mysql:{path}")
        table = MysqlTable(str(path), os.O_RDONLY, 0, context())

        async def ours() -> tuple[str, str]:
            try:
                value = await table.alookup(b"x")
            except DictRetry:
                return ("E", "")
            return ("1", "") if value is None else ("0", value.decode())

        assert run(ours()) == direct.outcome(), direct.stderr
        assert ("TLSv1" in direct.stdout) == bool(settings) or direct.exit != 0


@pytest.mark.usefixtures("way")
class TestFailover:
    def test_first_host_dead_second_answers(
        self, db: PrivateMariaDB, cfdir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        dead = f"inet:127.0.0.1:{closed_port()}"
        table = table_for(cfdir, db, {"query": QUERY}, hosts=f"{dead} inet:127.0.0.1:{db.port}")
        caplog.set_level(logging.INFO, "proxymap")

        async def main() -> None:
            for _ in range(30):
                assert await table.alookup(b"alice") == b"alice@example.com"
                table.pool.discard_idle()  # every lookup makes a new connection
                await asyncio.sleep(0.01)

        run(main())
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) <= 1 and all(dead in r.getMessage() for r in warnings)

    def test_all_hosts_dead_is_retry(
        self, cfdir: Path, db: PrivateMariaDB, caplog: pytest.LogCaptureFixture
    ) -> None:
        hosts = f"inet:127.0.0.1:{closed_port()} unix:{cfdir}/none.sock"
        table = table_for(cfdir, db, {"query": QUERY}, hosts=hosts)
        caplog.set_level(logging.INFO, "proxymap")

        async def main() -> None:
            for _ in range(20):
                with pytest.raises(DictRetry):
                    await table.alookup(b"alice")

        run(main())
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2, warnings  # one per server, not one per lookup

    def test_restart_and_outage_recovery(
        self,
        mariadb: PrivateMariaDB,  # noqa: F811
        cfdir: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        fill(mariadb)
        table = table_for(
            cfdir,
            mariadb,
            {"query": QUERY},
            hosts=f"unix:{mariadb.socket}",
            ctx=context(pyproxymap_mysql_timeout="3"),
        )
        caplog.set_level(logging.INFO, "proxymap")

        async def until_found(limit: float) -> float:
            began = time.monotonic()
            while True:
                try:
                    if await table.alookup(b"alice") == b"alice@example.com":
                        return time.monotonic() - began
                except DictRetry:
                    pass
                assert time.monotonic() - began < limit, "no recovery"
                await asyncio.sleep(0.05)

        async def main() -> None:
            assert await table.alookup(b"alice") == b"alice@example.com"
            await asyncio.to_thread(mariadb.restart)
            # The idle connection is broken: the lookup retries on a new one at once.
            assert await table.alookup(b"alice") == b"alice@example.com"
            await asyncio.to_thread(mariadb.kill)
            for _ in range(20):
                with pytest.raises(DictRetry):
                    await table.alookup(b"alice")  # never "not found"
                await asyncio.sleep(0.02)
            await asyncio.to_thread(mariadb.start)
            assert await until_found(5.0) < 5.0

        run(main())
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings  # one line for the whole outage
        assert any("again" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("way")
class TestConcurrency:
    @pytest.mark.serial
    def test_stalled_query_holds_up_nobody_and_times_out(
        self, db: PrivateMariaDB, cfdir: Path
    ) -> None:
        db.create_user("stall", "pw", DBNAME)
        slow_cf = cfdir / "slow.cf"
        slow_cf.write_text(
            cf_text(db, {"query": "SELECT SLEEP('%s')", "user": "stall", "password": "pw"})
        )
        slow = MysqlTable(str(slow_cf), os.O_RDONLY, 0, context(pyproxymap_mysql_timeout="1"))
        fast = table_for(cfdir, db, {"query": QUERY})

        async def main() -> None:
            assert await fast.alookup(b"alice")  # connected
            began = time.monotonic()
            stalled = asyncio.ensure_future(slow.alookup(b"5"))
            await asyncio.sleep(0.2)  # the query is running on the server now
            assert not stalled.done()
            times = []
            for _ in range(20):
                start = time.monotonic()
                assert await fast.alookup(b"bob") == b"bob@example.com"
                times.append(time.monotonic() - start)
            # Within 10 ms (a loaded test machine may pause once or twice).
            assert sorted(times)[17] < 0.010 and max(times) < 0.050, times
            with pytest.raises(DictRetry):
                await stalled
            assert 0.9 < time.monotonic() - began < 2.0
            assert await slow.alookup(b"0") == b"0"  # the pool recovered

        run(main())

    def test_connection_bound_under_50_lookups(
        self, db: PrivateMariaDB, cfdir: Path, way: str
    ) -> None:
        user = f"bound_{way}"  # a user of its own: the other way's table is still open
        db.create_user(user, "pw", DBNAME)
        path = cfdir / "bound.cf"
        path.write_text(
            cf_text(db, {"user": user, "password": "pw", "query": QUERY + " AND SLEEP(0.05) = 0"})
        )
        table = MysqlTable(str(path), os.O_RDONLY, 0, context(pyproxymap_mysql_connections="4"))
        counts: list[int] = []

        async def main() -> None:
            lookups = asyncio.gather(*[table.alookup(b"alice") for _ in range(50)])
            while not lookups.done():
                counts.append(await asyncio.to_thread(db.connection_count, user))
                assert table.pool.open <= 4
            assert await lookups == [b"alice@example.com"] * 50

        run(main())
        assert max(counts) <= 4 and max(counts) >= 2, counts
        assert table.pool.connects <= 4


# ---------------------------------------------------------------------------------------
# Differential: direct postmap, proxy: through our worker, proxy: through the C proxymap
# ---------------------------------------------------------------------------------------

# name -> (.cf settings, keys looked up in one batch, (key, wire status) looked up one
# by one). Batches hold lookups that cannot fail (postmap -q - stops at the first
# error); the wire status is what proxymap answers (0 found, 1 not found, 2 RETRY).
RETRY = "2"
CASES: dict[str, tuple[dict[str, str], list[str], list[tuple[str, str]]]] = {
    "basic": (
        {"query": "SELECT v FROM aliases WHERE k='%s'"},
        [
            "alice",
            "Alice",
            "bob",
            "o'neil",
            "back\\slash",
            'dq"key',
            "100%",
            "über",
            "ÜBER",
            "nope",
            "empty",
            "nullval",
            "x'OR'1'='1",
            "user@example.com",
            "%s",
            "'",
            "\\",
            "\\'",
        ],
        [("a b", "0"), ("x' OR '1'='1", "1")],
    ),
    "columns": (
        {"query": "SELECT v, v2, l, b FROM aliases WHERE k='%s'"},
        ["alice", "bob", "über", "nul", "nullval", "nope"],
        [],
    ),
    "rows": (
        {"query": "SELECT v FROM multi WHERE k='%s' ORDER BY n"},
        ["list", "one", "pair", "nope"],
        [],
    ),
    "limit": (
        {"query": "SELECT v FROM multi WHERE k='%s' ORDER BY n", "expansion_limit": "2"},
        ["one", "pair", "nope"],
        [("list", RETRY)],
    ),
    "limit_columns": (
        {"query": "SELECT v, v2 FROM aliases WHERE k='%s'", "expansion_limit": "1"},
        ["alice", "nope"],
        [("bob", RETRY)],
    ),
    "echo": (
        {"query": "SELECT '%s', '%u', '%d'"},
        [
            "o'neil@ex.am",
            'q"uote@d',
            "back\\sl@x",
            "100%@pct",
            "über@straße.de",
            "bare",
            "@dom.ain",
            "user@",
            "a@b@c",
            "\\@\\",
        ],
        [],
    ),
    "labels": (
        {"query": "SELECT '%1|%2|%3|%U|%D'"},
        ["a@b.c.d", "a@b.c", "a@c", "bare", "a@x..y.z", "A@B.C.D"],
        [],
    ),
    "format": (
        {
            "query": "SELECT v FROM multi WHERE k='%u' ORDER BY n",
            "result_format": "smtp:[%d] %u <%s> %S %U %D %1 %%",
        },
        ["pair@dom.example", "one@a.b", "list@x.y", "pair", "one@b"],
        [],
    ),
    "format_user": (
        {"query": "SELECT v FROM multi WHERE k='%s' ORDER BY n", "result_format": "%u"},
        ["pair", "one", "list"],
        [],
    ),
    "domain": (
        {
            "query": "SELECT v FROM aliases WHERE k='%s'",
            "domain": "example.com, !other.org other.org",
        },
        [
            "user@example.com",
            "user@EXAMPLE.COM",
            "user@other.org",
            "user",
            "@example.com",
            "x@sub.example.com",
        ],
        [],
    ),
    "legacy": (
        {
            "table": "aliases",
            "select_field": "v",
            "where_field": "k",
            "additional_conditions": "AND v <> 'bare-user'",
        },
        ["alice", "user", "o'neil", "nope"],
        [],
    ),
    "procedure": ({"query": "CALL one_set('%s')"}, ["bob", "nope"], []),
    "no_result_set": ({"query": "DO '%s'", "require_result_set": "no"}, [], [("bob", "1")]),
    "errors": ({"query": "SELECT nosuchcolumn FROM aliases WHERE k='%s'"}, [], [("bob", RETRY)]),
    "two_sets": ({"query": "CALL two_sets('%s')"}, [], [("bob", RETRY)]),
    "result_set_required": ({"query": "DO '%s'"}, [], [("bob", RETRY)]),
    "stacked": ({"query": "SELECT v FROM aliases WHERE k='%s'; SELECT 1"}, [], [("bob", RETRY)]),
    "dead": ({"query": "SELECT v FROM aliases WHERE k='%s'"}, [], [("bob", RETRY)]),
    "localhost": ({"query": "SELECT v FROM aliases WHERE k='%s'"}, ["alice", "nope"], []),
    # The server sends latin1 (the option file's character set): not UTF-8, which the
    # client's UTF-8 layer refuses (postmap fails) after a successful wire answer.
    "latin1": ({"query": "SELECT l FROM aliases WHERE k='%s'"}, [], [("alice", "0")]),
}
# Where the C proxymap's wire answer differs (the postmap outcome through it does not):
# it runs a UTF-8 layer of its own for 3.7 clients and answers CONFIG (5) for a value
# that is not UTF-8; our worker leaves that check to the client's layer, as a direct
# lookup does (see proxymap/handler.py).
C_WIRE_DIFFERENCES = {("latin1", "alice"): ("5", "")}
PREFIX = "mysqlsrc"  # a main.cf-prefix table: mysql:mysqlsrc


def case_settings(case: str, db: PrivateMariaDB, tables: Path) -> tuple[dict[str, str], str]:
    """The settings of one case and its hosts line (some cases need special ones)."""
    settings = dict(CASES[case][0])
    hosts = f"inet:127.0.0.1:{db.port}"
    if case == "dead":
        hosts = f"inet:127.0.0.1:{closed_port()}"
    elif case == "localhost":
        # "localhost" is the default socket: the option file says which (never the
        # system instance's).
        (tables / "localhost.cnf").write_text(f"[client]\nsocket = {db.socket}\n")
        hosts = "localhost"
        settings["option_file"] = str(tables / "localhost.cnf")
    elif case == "latin1":
        (tables / "latin1.cnf").write_text("[pyproxymap]\ndefault-character-set = latin1\n")
        settings["option_file"] = str(tables / "latin1.cnf")
        settings["option_group"] = "pyproxymap"
        hosts = f"unix:{db.socket}"
    return settings, hosts


@pytest.fixture(scope="module")
def postfixes(db: PrivateMariaDB) -> Iterator[dict[str, object]]:
    ensure_postfix()
    assert OUR_PROXYMAP.exists(), f"our worker is not installed: {OUR_PROXYMAP}"
    tables = Path(tempfile.mkdtemp(prefix="pyproxymap-mysqlcf-"))
    tables.chmod(0o755)
    specs = {}
    for case in CASES:
        settings, hosts = case_settings(case, db, tables)
        path = tables / f"{case}.cf"
        path.write_text(cf_text(db, settings, hosts))
        specs[case] = f"mysql:{path}"
    main_cf = {
        f"{PREFIX}_{name}": value
        for name, value in {
            "hosts": f"unix:{db.socket}",
            "user": USER,
            "password": PASSWORD,
            "dbname": DBNAME,
            "query": "SELECT v FROM aliases WHERE k='%s'",
        }.items()
    }
    specs["prefix"] = f"mysql:{PREFIX}"
    for item in tables.iterdir():
        item.chmod(0o644)
    settle_files(tables)
    read_maps = " ".join(f"proxy:{spec}" for spec in specs.values())
    ours = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP, proxy_read_maps=read_maps, main_cf=main_cf, name="mysql-ours"
    )
    theirs = PrivatePostfix(proxy_read_maps=read_maps, main_cf=main_cf, name="mysql-c")
    try:
        with ours, theirs:
            for instance in (ours, theirs):
                instance.wait_until_serving("alice", specs["basic"])
            yield {"ours": ours, "c": theirs, "specs": specs, "tables": tables}
    finally:
        for item in tables.iterdir():
            item.unlink()
        tables.rmdir()


def _batch(pf: PrivatePostfix, keys: list[str], table: str) -> tuple[object, dict[str, str]]:
    return pf.postmap_q_many(keys, table)


def _raw(pf: PrivatePostfix, table: str, key: str) -> tuple[str, str]:
    with pf.client() as client:
        reply = client.lookup(table, key.encode(), flags=FOLD_LOOKUP_FLAGS)
    return reply["status"].decode(), reply.get("value", b"").decode("utf-8", "replace")


class TestAgainstPostfix:
    """Ours must equal the direct lookup; differences of the C proxymap are listed."""

    C_DIFFERENCES: dict[tuple[str, str], tuple[str, str]] = {}

    @pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1]] + ["prefix"])
    def test_batch(self, postfixes: dict, case: str) -> None:
        ours, theirs, spec = postfixes["ours"], postfixes["c"], postfixes["specs"][case]
        keys = CASES[case][1] if case != "prefix" else ["alice", "o'neil", "nope"]
        direct = _batch(ours, keys, spec)
        assert direct[0] == 0, f"direct lookups failed: {direct}"
        assert direct[1], "the direct client found nothing: a vacuous case"
        proxied = _batch(ours, keys, "proxy:" + spec)
        assert proxied == direct, ours.log_tail()
        assert _batch(theirs, keys, "proxy:" + spec) == direct

    @pytest.mark.parametrize(
        "case, key, status", [(c, k, st) for c in CASES for k, st in CASES[c][2]]
    )
    def test_single(self, postfixes: dict, case: str, key: str, status: str) -> None:
        ours, theirs, spec = postfixes["ours"], postfixes["c"], postfixes["specs"][case]
        direct = ours.lookup(key, spec)
        ours_raw = _raw(ours, spec, key)
        assert ours_raw[0] == status, (direct, ours.log_tail())
        c_raw = _raw(theirs, spec, key)
        assert c_raw == C_WIRE_DIFFERENCES.get((case, key), ours_raw), "C answers otherwise"
        if status == RETRY:
            # A failed direct lookup is fatal for postmap; through the proxy it is
            # status 2 on the wire (above): postmap -q proxy: would fail just the same.
            assert direct.outcome() == ("E", ""), direct
            assert "query error" in direct.stderr
        else:
            assert ours.lookup(key, "proxy:" + spec).outcome() == direct.outcome()
            assert theirs.lookup(key, "proxy:" + spec).outcome() == direct.outcome()


def test_expected_values_spot_check(postfixes: dict) -> None:
    """The differential cases above compare like with like; pin a few answers."""
    ours, specs = postfixes["ours"], postfixes["specs"]
    found = _batch(ours, ["alice", "ÜBER", "o'neil", "x'OR'1'='1"], "proxy:" + specs["basic"])
    assert found == (
        0,
        {"alice": "alice@example.com", "ÜBER": "uber@example.com", "o'neil": "quote@example.com"},
    )
    assert _batch(ours, ["list"], "proxy:" + specs["rows"]) == (0, {"list": "a,b,c"})
    assert _batch(ours, ["nul"], "proxy:" + specs["columns"]) == (0, {"nul": "A,A"})
    assert _raw(ours, specs["dead"], "bob") == ("2", "")
    assert _batch(ours, ["pair@dom.example"], "proxy:" + specs["format"]) == (
        0,
        {
            "pair@dom.example": "smtp:[h.example] p1 <p1@h.example> pair@dom.example pair "
            "dom.example example %"
        },
    )


def test_server_restart_through_our_worker(postfixes: dict, db: PrivateMariaDB) -> None:
    """Last in the file (it restarts the shared server): the worker is not restarted,
    its broken connection is replaced at once, and nothing is logged."""
    ours, theirs, spec = postfixes["ours"], postfixes["c"], postfixes["specs"]["basic"]
    found = ("0", "alice@example.com")
    assert _raw(ours, spec, "alice") == found and _raw(theirs, spec, "alice") == found
    log_offset = len(ours.maillog())
    db.restart()
    began = time.monotonic()
    while _raw(ours, spec, "alice") != found:
        assert time.monotonic() - began < 5.0, ours.log_tail()
        time.sleep(0.05)
    assert time.monotonic() - began < 5.0
    assert ours.lookup("alice", "proxy:" + spec).outcome() == ("0", "alice@example.com")
    logged = ours.maillog()[log_offset:]
    assert len([line for line in logged.splitlines() if "warning:" in line]) <= 1, logged
    # The C proxymap marks the host down for retry_interval (60 s) after the failed
    # query: RETRY meanwhile, where a direct lookup (a new process) finds the key.
    assert _raw(theirs, spec, "alice")[0] == RETRY
    assert postmap_lookup("alice", spec, conf_dir=theirs.conf_dir).outcome() == found
