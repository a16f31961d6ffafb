"""db_common: templates, suppression, result joining, the domain filter, legacy SQL.

Unit tests pin each rule; ``TestAgainstPostfix`` runs the real ``postmap -q`` on
sqlite tables (no server needed) and compares every answer with a minimal sqlite
driver built on this machinery: the query is expanded here, run with Python's
sqlite3, and the first column of each row goes through ``QueryContext.results``.
Expected values in the unit tests were observed with Postfix 3.7.11.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxymap.tables.base import (
    AsyncTable,
    DictConfig,
    DictOpenError,
    DictRetry,
    OpenContext,
    SyncTable,
)
from proxymap.tables.cfg_parser import CfgParser
from proxymap.tables.db_common import (
    DomainFilter,
    Need,
    QueryContext,
    Template,
    expand,
    legacy_query,
    list_tokens,
    split_address,
)
from proxymap.tables.utf8 import casefold_utf8
from tests.support.postfix import ensure_postfix, postmap_lookup, settle_files
from tests.support.vectors import SQLITE_ALIASES


def sqlite_quote(piece: bytes) -> bytes:
    """What Postfix's sqlite driver does to each substituted piece (sqlite3 %q)."""
    return piece.replace(b"'", b"''")


def write_cf(path: Path, lines: dict[str, str]) -> Path:
    path.write_text("".join(f"{name} = {value}\n" for name, value in lines.items()))
    return path


def context(
    cf_lines: dict[str, str],
    tmp_path: Path,
    ctx: OpenContext | None = None,
    dict_type: str = "sqlite",
) -> QueryContext:
    cfg = CfgParser(str(write_cf(tmp_path / "t.cf", cf_lines)), {})
    return QueryContext.for_sql(cfg, ctx or OpenContext(), dict_type)


# ---------------------------------------------------------------------------
# Template parsing
# ---------------------------------------------------------------------------


class TestTemplateParse:
    @pytest.mark.parametrize(
        "text, what, flags, labels",
        [
            ("SELECT 1", "query", Need.NONE, 0),
            ("%s %S %%", "query", Need.NONE, 0),
            ("%u", "query", Need.KEY_USER | Need.KEY_PARTIAL, 0),
            ("%d", "query", Need.KEY_DOMAIN | Need.KEY_PARTIAL, 0),
            ("%u", "result", Need.VALUE_USER, 0),
            ("%d", "result", Need.VALUE_DOMAIN, 0),
            ("%U", "result", Need.KEY_USER | Need.KEY_PARTIAL, 0),
            ("%D", "result", Need.KEY_DOMAIN | Need.KEY_PARTIAL, 0),
            ("%2.%1 %7", "query", Need.KEY_DOMAIN | Need.KEY_PARTIAL, 7),
            ("%3", "result", Need.KEY_DOMAIN | Need.KEY_PARTIAL, 3),
        ],
    )
    def test_requirements(self, text: str, what: str, flags: Need, labels: int) -> None:
        template = Template.parse(text, what)
        assert template.needs.flags == flags
        assert template.max_label == labels

    def test_attributes(self) -> None:
        template = Template.parse("smtp:[%d]", "result")
        assert template.text == b"smtp:[%d]"
        assert not template.is_query
        assert template.uses_domain and not template.uses_user
        assert Template.parse("%U", "result").uses_user
        assert Template.parse("x", "key_format").is_query
        assert Template.parse(b"%s\xff", "query").text == b"%s\xff"

    @pytest.mark.parametrize(
        "text, dynamic", [("static", False), ("100%%", False), ("%s", True), ("ou=%1", True)]
    )
    def test_dynamic(self, text: str, dynamic: bool) -> None:
        assert Template.parse(text, "search_base").dynamic is dynamic

    @pytest.mark.parametrize(
        "text, what, message",
        [
            ("SELECT '%x'", "query", "db_common_parse: T: Invalid query template: SELECT '%x'"),
            ("SELECT '%s %'", "query", "db_common_parse: T: Invalid query template: SELECT '%s %'"),
            ("%%%s%0", "result", "db_common_parse: T: Invalid result template: %%%s%0"),
            ("%x", "result_format", "db_common_parse: T: Invalid result template: %x"),
        ],
    )
    def test_invalid(self, text: str, what: str, message: str) -> None:
        with pytest.raises(DictOpenError) as caught:
            Template.parse(text, what, table="T")
        assert str(caught.value) == message


# ---------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------

ALL_PARTS = Template.parse("[%s|%u|%d|%S|%U|%D]", "query")
USER_ONLY = Template.parse("[%s|%u]", "query")
LABELS = Template.parse("[%2.%1]", "query")


class TestQueryExpansion:
    @pytest.mark.parametrize(
        "key, expected",
        [
            (b"a@b.c", b"[a@b.c|a|b.c|a@b.c|a|b.c]"),
            (b"a@b@c.d", b"[a@b@c.d|a@b|c.d|a@b@c.d|a@b|c.d]"),  # the LAST @ splits
            (b"x@example..com", b"[x@example..com|x|example..com|x@example..com|x|example..com]"),
            (b"@x.y", None),
            (b"user@", None),
            (b"@", None),
            (b"plain", None),
            (b"", None),
        ],
    )
    def test_all_parts(self, key: bytes, expected: bytes | None) -> None:
        assert expand(ALL_PARTS, key, key) == expected

    @pytest.mark.parametrize(
        "key, expected",
        [
            (b"a@b.c", b"[a@b.c|a]"),
            (b"user@", b"[user@|user]"),
            (b"plain", b"[plain|plain]"),
            (b"@x.y", None),
            (b"@", None),
            (b"@a@b", b"[@a@b|@a]"),
        ],
    )
    def test_local_part_only(self, key: bytes, expected: bytes | None) -> None:
        assert expand(USER_ONLY, key, None) == expected

    @pytest.mark.parametrize(
        "key, expected",
        [
            (b"x@example..com", b"[example.com]"),  # empty labels do not count
            (b"x@a.b.", b"[a.b]"),
            (b"x@..a..b..", b"[a.b]"),
            (b"x@mail.example.com", b"[example.com]"),
            (b"x@.com", None),
            (b"x@com", None),
            (b"x", None),
        ],
    )
    def test_labels(self, key: bytes, expected: bytes | None) -> None:
        assert expand(LABELS, key, None) == expected

    def test_percent_and_escape(self) -> None:
        template = Template.parse("'%%' '%s' '%u' ''", "query")
        assert expand(template, b"o'b%s", None, sqlite_quote) == b"'%' 'o''b%s' 'o''b%s' ''"
        assert expand(Template.parse("%s", "query"), b"%", None) == b"%"

    def test_null_input(self) -> None:
        assert expand(ALL_PARTS, None, None) is None


VALUES = [b"a@b.c", None, b"", b"noat", b"@dom", b"loc@", b"x@y@z"]


class TestResultExpansion:
    @pytest.mark.parametrize(
        "fmt, expected",
        [
            ("<%s>", [b"<a@b.c>", b"<noat>", b"<@dom>", b"<loc@>", b"<x@y@z>"]),
            ("<%u>", [b"<a>", b"<noat>", b"<loc>", b"<x@y>"]),
            ("<%d>", [b"<b.c>", b"<dom>", b"<z>"]),
            ("<%u/%d>", [b"<a/b.c>", b"<x@y/z>"]),
        ],
    )
    def test_value_parts(self, fmt: str, expected: list[bytes]) -> None:
        template = Template.parse(fmt, "result")
        got = [expand(template, value, b"k") for value in VALUES]
        assert [g for g in got if g is not None] == expected

    def test_key_parts(self) -> None:
        template = Template.parse("<%S/%U/%D/%1/%2>", "result")
        assert (
            expand(template, b"v@w", b"k@mail.example.com")
            == b"<k@mail.example.com/k/mail.example.com/com/example>"
        )
        assert expand(template, b"v", b"nodomain") is None
        assert expand(Template.parse("%U", "result"), b"v", b"@a.b") is None


# ---------------------------------------------------------------------------
# QueryContext: pooled requirements, warnings, joining, expansion_limit
# ---------------------------------------------------------------------------


class TestQueryContext:
    def test_pooled_requirements(self, tmp_path: Path) -> None:
        # %D in result_format keeps domain-less keys from being queried at all.
        qc = context({"dbpath": "x", "query": "SELECT '%s'", "result_format": "%D:%s"}, tmp_path)
        assert qc.query_for(b"bob", sqlite_quote) is None
        assert qc.query_for(b"bob@example.com", sqlite_quote) == b"SELECT 'bob@example.com'"
        # %3 in result_format: keys need three labels.
        qc = context({"dbpath": "x", "query": "SELECT '%s'", "result_format": "%3"}, tmp_path)
        assert qc.query_for(b"a@example.com", sqlite_quote) is None
        assert qc.query_for(b"a@mail.example.com", sqlite_quote) is not None

    def test_empty_key_warns(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        qc = context({"dbpath": "x", "query": "SELECT 1"}, tmp_path)
        with caplog.at_level(logging.WARNING, "proxymap"):
            assert qc.query_for(b"", None) is None
        assert f'table "sqlite:{tmp_path}/t.cf": empty query string -- ignored' in caplog.messages

    def test_joining(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        qc = context({"dbpath": "x", "query": "SELECT 1", "result_format": "<%s>"}, tmp_path)
        joined = qc.results(b"k")
        with caplog.at_level(logging.WARNING, "proxymap"):
            joined.extend(VALUES)
        assert joined.value() == b"<a@b.c>,<noat>,<@dom>,<loc@>,<x@y@z>"
        assert joined.count == 5
        # NULL is silent, the empty value is reported once.
        assert caplog.messages == [
            f'table "sqlite:{tmp_path}/t.cf": empty lookup result for: "k" -- ignored'
        ]

    def test_nothing_found(self, tmp_path: Path) -> None:
        qc = context({"dbpath": "x", "query": "SELECT 1", "result_format": "%d"}, tmp_path)
        joined = qc.results(b"k")
        joined.extend([None, b"", b"noat"])
        assert joined.value() is None

    @pytest.mark.parametrize(
        "limit, fmt, outcome",
        [
            ("0", "%s", b"a@b.c,noat,@dom,loc@,x@y@z"),
            ("-1", "%s", b"a@b.c,noat,@dom,loc@,x@y@z"),
            ("5", "%s", b"a@b.c,noat,@dom,loc@,x@y@z"),
            ("4", "%s", DictRetry),
            ("3", "%d", b"b.c,dom,z"),
            ("2", "%d", DictRetry),  # skipped values do not count
        ],
    )
    def test_expansion_limit(
        self, tmp_path: Path, limit: str, fmt: str, outcome: bytes | type
    ) -> None:
        qc = context(
            {"dbpath": "x", "query": "SELECT 1", "result_format": fmt, "expansion_limit": limit},
            tmp_path,
        )
        joined = qc.results(b"k")
        if outcome is DictRetry:
            with pytest.raises(DictRetry):
                joined.extend(VALUES)
        else:
            joined.extend(VALUES)
            assert joined.value() == outcome

    def test_extra_templates_pool(self, tmp_path: Path) -> None:
        cfg = CfgParser(str(write_cf(tmp_path / "l.cf", {})), {})
        base = Template.parse("ou=%1", "search_base")
        qc = QueryContext(
            cfg,
            Template.parse("(mail=%s)", "query"),
            Template.parse("%s", "result"),
            0,
            None,
            extra=[base],
        )
        assert qc.expand_query(qc.query, b"nodomain", None) is None
        assert qc.expand_query(base, b"a@b.com", None) == b"ou=com"

    def test_for_sql_errors(self, tmp_path: Path) -> None:
        with pytest.raises(DictOpenError, match=r"bad string length 0 < 1: result_format = $"):
            context({"dbpath": "x", "query": "SELECT 1", "result_format": ""}, tmp_path)
        with pytest.raises(
            DictOpenError, match="bad numerical configuration: expansion_limit = 0x2"
        ):
            context({"dbpath": "x", "query": "SELECT 1", "expansion_limit": "0x2"}, tmp_path)
        with pytest.raises(DictOpenError, match="Invalid query template"):
            context({"dbpath": "x", "query": "SELECT '%x'"}, tmp_path)

    def test_for_sql_empty_query_is_legacy(self, tmp_path: Path) -> None:
        qc = context(
            {"dbpath": "x", "query": "", "table": "t", "select_field": "v", "where_field": "k"},
            tmp_path,
        )
        assert qc.query.text == b"SELECT v FROM t WHERE k='%s' "


# ---------------------------------------------------------------------------
# legacy_query
# ---------------------------------------------------------------------------


class TestLegacyQuery:
    def cfg(self, tmp_path: Path, lines: dict[str, str]) -> CfgParser:
        return CfgParser(str(write_cf(tmp_path / "legacy.cf", lines)), {})

    def test_forms(self, tmp_path: Path) -> None:
        fields = {"table": "aliases", "select_field": "dest", "where_field": "addr"}
        assert (
            legacy_query(self.cfg(tmp_path, fields), "mysql")
            == "SELECT dest FROM aliases WHERE addr='%s' "
        )
        more = {**fields, "additional_conditions": "AND extra <> 'x3'"}
        assert (
            legacy_query(self.cfg(tmp_path, more), "sqlite")
            == "SELECT dest FROM aliases WHERE addr='%s' AND extra <> 'x3'"
        )

    def test_pgsql_select_function(self, tmp_path: Path) -> None:
        assert (
            legacy_query(self.cfg(tmp_path, {"select_function": "lookup"}), "pgsql")
            == "SELECT lookup('%s')"
        )
        # empty select_function: the table form; other types ignore it
        with pytest.raises(DictOpenError, match="table = $"):
            legacy_query(self.cfg(tmp_path, {"select_function": ""}), "pgsql")
        with pytest.raises(DictOpenError, match="table = $"):
            legacy_query(self.cfg(tmp_path, {"select_function": "lookup"}), "mysql")

    @pytest.mark.parametrize("missing", ["table", "select_field", "where_field"])
    def test_missing_field(self, tmp_path: Path, missing: str) -> None:
        fields = {"table": "aliases", "select_field": "dest", "where_field": "addr"}
        del fields[missing]
        cfg = self.cfg(tmp_path, fields)
        with pytest.raises(DictOpenError) as caught:
            legacy_query(cfg, "sqlite")
        assert str(caught.value) == f"{cfg.name}: bad string length 0 < 1: {missing} = "


# ---------------------------------------------------------------------------
# Domain filter
# ---------------------------------------------------------------------------


class FakeTable(SyncTable):
    dict_type = "fake"

    def __init__(self, name: str, entries: set[bytes], error: type[Exception] | None = None):
        super().__init__(name, os.O_RDONLY, 0)
        self.entries = entries
        self.error = error
        self.asked: list[bytes] = []

    def lookup(self, key: bytes) -> bytes | None:
        self.asked.append(key)
        if self.error is not None:
            raise self.error(f"{self.spec}: failing")
        return b"ok" if key in self.entries else None


class FakeAsyncTable(AsyncTable):
    dict_type = "afake"

    def __init__(self, name: str, entries: set[bytes]) -> None:
        super().__init__(name, os.O_RDONLY, 0)
        self.entries = entries

    async def alookup(self, key: bytes) -> bytes | None:
        await asyncio.sleep(0)
        return b"ok" if key in self.entries else None


def fake_context(tables: dict[str, object]) -> tuple[OpenContext, list[tuple[str, int, int]]]:
    opened: list[tuple[str, int, int]] = []

    def open_table(spec: str, open_mode: int, flags: int):
        opened.append((spec, open_mode, flags))
        return tables[spec]

    return OpenContext(open_table=open_table), opened


class TestDomainFilter:
    def test_unset(self, tmp_path: Path) -> None:
        cfg = CfgParser(str(write_cf(tmp_path / "d.cf", {"domain": ""})), {})
        assert DomainFilter.from_config(cfg, OpenContext()) is None

    @pytest.mark.parametrize(
        "key, allowed",
        [
            (b"x@example.com", True),
            (b"x@EXAMPLE.com", True),
            (b"a@b@example.com", True),
            (b"x@sub.example.com", False),  # no parent-domain matching
            (b"x@bad.example.com", False),
            (b"x@example.org", False),
            (b"x@sub.example.org", False),
            (b"x@.example.org", True),  # ".example.org" is just a name
            (b"@example.com", False),
            (b"x@example.com@", False),
            (b"example.com", False),
            (b"x@[a.example]", True),
            (b"", False),
        ],
    )
    def test_names(self, key: bytes, allowed: bool) -> None:
        domains = DomainFilter.parse(
            "Example.COM, !bad.example.com .example.org [a.example]", "T", OpenContext()
        )
        assert domains.allows(key) is allowed

    def test_negation_first_match_wins(self) -> None:
        domains = DomainFilter.parse("!!a.example, !b.example, b.example", "T", OpenContext())
        assert domains.allows(b"x@a.example")
        assert not domains.allows(b"x@b.example")

    def test_file(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        listing = tmp_path / "domains"
        listing.write_text(
            "a.example\n#comment.example\n  b.example, !c.example\nD.Example # tail.example\n"
        )
        with caplog.at_level(logging.WARNING, "proxymap"):
            domains = DomainFilter.parse(f"{listing}", "T", OpenContext())
        assert caplog.messages == ["T: comment at end of line is not supported: # tail.example"]
        verdicts = {
            name: domains.allows(b"x@" + name)
            for name in (
                b"a.example",
                b"b.example",
                b"c.example",
                b"d.example",
                b"tail.example",
                b"comment.example",
            )
        }
        assert verdicts == {
            b"a.example": True,
            b"b.example": True,
            b"c.example": False,
            b"d.example": True,
            b"tail.example": False,
            b"comment.example": False,
        }
        negated = DomainFilter.parse(f"!{listing} x.example", "T", OpenContext())
        assert not negated.allows(b"x@a.example")
        assert negated.allows(b"x@c.example")  # "!c.example" negated again
        assert negated.allows(b"x@x.example")

    def test_missing_file_fails_when_reached(self, tmp_path: Path) -> None:
        domains = DomainFilter.parse(f"a.example {tmp_path}/nofile b.example", "T", OpenContext())
        assert domains.allows(b"x@a.example")
        with pytest.raises(DictRetry):
            domains.allows(b"x@b.example")

    def test_bare_negation(self) -> None:
        with pytest.raises(DictOpenError, match="^T: no pattern after '!'$"):
            DomainFilter.parse("a.example !", "T", OpenContext())

    def test_tables(self) -> None:
        table = FakeTable("t", {b"example.com"})
        ctx, opened = fake_context({"fake:t": table})
        domains = DomainFilter.parse("fake:t", "T", ctx)
        from proxymap import flags as F

        assert opened == [("fake:t", os.O_RDONLY, F.LOCK | F.UTF8_REQUEST)]
        assert domains.allows(b"x@Example.COM")  # the subject is folded before the lookup
        assert not domains.allows(b"x@example.org")
        assert table.asked == [b"example.com", b"example.org"]

    def test_real_nested_table(self) -> None:
        domains = DomainFilter.parse("inline:{ example.com=1, { x.org = y } }", "T", OpenContext())
        assert domains.allows(b"a@example.com") and domains.allows(b"a@x.org")
        assert not domains.allows(b"a@y.org")

    @pytest.mark.parametrize("error", [DictRetry, DictConfig])
    def test_table_error(self, error: type[Exception], caplog: pytest.LogCaptureFixture) -> None:
        ctx, _ = fake_context({"fake:bad": FakeTable("bad", set(), error)})
        domains = DomainFilter.parse("a.example fake:bad b.example", "T", ctx)
        assert domains.allows(b"x@a.example")  # decided before the failing entry
        with caplog.at_level(logging.WARNING, "proxymap"), pytest.raises(error):
            domains.allows(b"x@b.example")
        assert caplog.messages == ["T: fake:bad: table lookup problem"]

    def test_asynchronous_table(self) -> None:
        ctx, _ = fake_context({"afake:t": FakeAsyncTable("t", {b"example.com"})})
        domains = DomainFilter.parse("afake:t", "T", ctx)
        assert domains.asynchronous
        assert asyncio.run(domains.aallows(b"x@example.com"))
        assert not asyncio.run(domains.aallows(b"x@example.org"))
        with pytest.raises(DictRetry):
            domains.allows(b"x@example.com")

    def test_query_context_uses_filter(self, tmp_path: Path) -> None:
        qc = context({"dbpath": "x", "query": "SELECT '%s'", "domain": "example.com"}, tmp_path)
        assert qc.query_for(b"bob@example.com", None) == b"SELECT 'bob@example.com'"
        assert qc.query_for(b"bob@example.org", None) is None
        assert asyncio.run(qc.aquery_for(b"bob@example.com", None)) == b"SELECT 'bob@example.com'"

    def test_tokens(self) -> None:
        tokens = [token for token, _ in list_tokens(" a,b\tinline:{x, {y = z}} ,, c\n")]
        assert tokens == ["a", "b", "inline:{x, {y = z}}", "c"]

    def test_split_address(self) -> None:
        assert split_address(b"a@b@c") == (b"a@b", b"c")
        assert split_address(b"plain") == (b"plain", None)
        assert split_address(b"user@") == (b"user", b"")


# ---------------------------------------------------------------------------
# Differential: the real postmap on sqlite tables
# ---------------------------------------------------------------------------

ALIASES = [
    *SQLITE_ALIASES,  # the vectors' rows
    ("x@bad.example.com", "bad-row", "x14"),
    ("x@.example.org", "dot-row", "x15"),
    ("x@mail.example.com", "mail-row", "x16"),
]
RESULT_VALUES = ["a@b.c", None, "", "noat", "@dom", "loc@", "x@y@z"]

ALIAS_QUERY = "SELECT dest FROM aliases WHERE addr='%s'"
VALUES_QUERY = "SELECT v FROM vals ORDER BY n"
CONFIGS: dict[str, dict[str, str]] = {
    "basic": {"query": ALIAS_QUERY},
    "fancy": {
        "query": "SELECT dest FROM aliases WHERE addr='%u@%d'",
        "result_format": "smtp:[%s] key=%S user=%U dom=%D tld=%1",
        "domain": "example.com",
        "expansion_limit": "2",
    },
    "resultdomain": {"query": ALIAS_QUERY, "result_format": "%u at %d"},
    "legacy": {
        "table": "aliases",
        "select_field": "dest",
        "where_field": "addr",
        "additional_conditions": "AND extra <> 'x3'",
    },
    "legacy-bare": {"table": "aliases", "select_field": "dest", "where_field": "addr"},
    "echo-parts": {"query": "SELECT '[%s|%u|%d|%S|%U|%D]'"},
    "echo-user": {"query": "SELECT '[%s|%u|%U|%%]'"},
    "echo-labels": {"query": "SELECT '[%3/%2.%1]'"},
    "pooled-domain": {"query": "SELECT '%s'", "result_format": "%D:%s"},
    "pooled-labels": {"query": "SELECT '%s'", "result_format": "<%2>"},
    "values": {"query": VALUES_QUERY, "result_format": "<%s>"},
    "values-user": {"query": VALUES_QUERY, "result_format": "<%u>"},
    "values-domain": {"query": VALUES_QUERY, "result_format": "<%u/%d>"},
    "values-key": {"query": VALUES_QUERY, "result_format": "<%S/%U/%D/%1>"},
    "limit-5": {"query": VALUES_QUERY, "expansion_limit": "5"},
    "limit-4": {"query": VALUES_QUERY, "expansion_limit": "4"},
    "limit-domain": {"query": VALUES_QUERY, "result_format": "%d", "expansion_limit": "3"},
    "domains": {"query": ALIAS_QUERY, "domain": "Example.COM, !bad.example.com .example.org"},
    "domains-file": {"query": ALIAS_QUERY, "domain": "@FILE@"},
    "domains-negfile": {"query": ALIAS_QUERY, "domain": "!@FILE@, mail.example.com"},
    "domains-table": {"query": ALIAS_QUERY, "domain": "inline:{example.com=1} !x.example"},
}
KEYS = [
    "alice@example.com",
    "ALICE@EXAMPLE.COM",
    "multi@example.com",
    "nullval@example.com",
    "emptyval@example.com",
    "o'brien@example.com",
    "Mixed@Example.com",
    "nodomain",
    "%",
    "%s",
    "\u00fcn\u00ef@example.com",
    "\u00dcN\u00cf@EXAMPLE.COM",
    "@example.com",
    "user@",
    "@",
    "a@b@example.com",
    "x@example..com",
    "x@mail..example.com.",
    "x@mail.example.com",
    "x@bad.example.com",
    "x@.example.org",
    "bob",
    "",
]
# The value tables ignore the key: a few keys show every rule there.
VALUE_KEYS = ["k", "K@Mail.Example.com", "@a.b", "nodomain@x"]


def make_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE aliases (addr TEXT, dest TEXT, extra TEXT)")
        db.executemany("INSERT INTO aliases VALUES (?,?,?)", ALIASES)
        db.execute("CREATE TABLE vals (n INTEGER, v TEXT)")
        db.executemany("INSERT INTO vals VALUES (?,?)", list(enumerate(RESULT_VALUES)))
    db.close()


def our_answer(cf: Path, key: str) -> tuple[str, str]:
    """A minimal sqlite driver on this machinery; vectors notation (0/1/E, value)."""
    cfg = CfgParser(str(cf), {})
    database = cfg.get_str("dbpath", "", 1)
    qc = QueryContext.for_sql(cfg, OpenContext(), "sqlite")
    folded = casefold_utf8(key.encode())  # what the UTF-8 layer does under postmap -q
    query = qc.query_for(folded, sqlite_quote)
    if query is None:
        return "1", ""
    with sqlite3.connect(database) as db:
        rows = db.execute(query.decode()).fetchall()
    db.close()
    joined = qc.results(folded)
    try:
        for row in rows:
            joined.add(None if row[0] is None else str(row[0]).encode())
    except DictRetry:
        return "E", ""
    value = joined.value()
    return ("1", "") if value is None else ("0", value.decode())


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One .cf file per entry of CONFIGS, on one database, old enough for postmap."""
    ensure_postfix()
    root = tmp_path_factory.mktemp("dbcommon")
    make_database(root / "test.sqlite")
    listing = root / "domains"
    listing.write_text("example.com\n!bad.example.com\n#x.example.org\n  .Example.ORG\n")
    files = {}
    for name, lines in CONFIGS.items():
        lines = {k: v.replace("@FILE@", str(listing)) for k, v in lines.items()}
        files[name] = write_cf(root / f"{name}.cf", {"dbpath": str(root / "test.sqlite"), **lines})
    settle_files(root)
    return files


@pytest.mark.postfix
class TestAgainstPostfix:
    def test_same_answers(self, tables: dict[str, Path]) -> None:
        cases = [
            (name, key)
            for name in CONFIGS
            for key in (VALUE_KEYS if name.startswith(("values", "limit")) else KEYS)
        ]

        def theirs(case: tuple[str, str]) -> tuple[str, str]:
            name, key = case
            return postmap_lookup(key, f"sqlite:{tables[name]}").outcome()

        with ThreadPoolExecutor(max_workers=16) as pool:  # RETRY costs postmap a 1 s sleep
            expected = list(pool.map(theirs, cases))
        ours = [our_answer(tables[name], key) for name, key in cases]
        differences = [
            (case, want, got)
            for case, want, got in zip(cases, expected, ours, strict=True)
            if want != got
        ]
        assert not differences, differences
        # The matrix must exercise every outcome.
        assert {outcome for outcome, _ in expected} == {"0", "1", "E"}

    def test_same_open_errors(self, tmp_path: Path) -> None:
        ensure_postfix()
        files = {}
        for number, (lines, message) in enumerate(OPEN_ERRORS):
            cf = write_cf(
                tmp_path / f"bad{number}.cf", {"dbpath": str(tmp_path / "db.sqlite"), **lines}
            )
            files[cf] = message.format(cf=cf)
        settle_files(*files)
        with ThreadPoolExecutor(max_workers=len(files)) as pool:  # each fatal sleeps 1 s
            results = list(pool.map(lambda cf: postmap_lookup("k", f"sqlite:{cf}"), files))
        for (cf, message), result in zip(files.items(), results, strict=True):
            assert f"postmap: fatal: {message}\n" in result.stderr
            with pytest.raises(DictOpenError) as caught:
                our_answer(cf, "k")
            assert str(caught.value) == message


# (settings, Postfix's fatal message); {cf} is the file's path.
OPEN_ERRORS = [
    ({"query": "SELECT '%x'"}, "db_common_parse: {cf}: Invalid query template: SELECT '%x'"),
    (
        {"query": "SELECT 1", "result_format": "%s%"},
        "db_common_parse: {cf}: Invalid result template: %s%",
    ),
    ({"table": "aliases", "where_field": "addr"}, "{cf}: bad string length 0 < 1: select_field = "),
    ({"query": "SELECT 1", "domain": "a.example, !"}, "{cf}: no pattern after '!'"),
]
