"""cfg_parser: database-table configuration files and main.cf prefixes.

Unit tests pin the file syntax and the typed getters; ``TestAgainstPostfix`` has the
real ``postmap`` read the same files (through sqlite tables whose query echoes a
configured value) and compares what it saw, and its fatal errors, with ours.
Expected messages were observed with Postfix 3.7.11.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from master.mainconf import MainConfig
from proxymap.tables.base import DictOpenError, OpenContext
from proxymap.tables.cfg_parser import CfgParser, split_name_value
from proxymap.tables.db_common import QueryContext
from tests.support.postfix import ensure_postfix, postmap_lookup, run_postmap, settle_files


def cf_file(tmp_path: Path, text: str | bytes, name: str = "t.cf") -> str:
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return str(path)


# ---------------------------------------------------------------------------
# File syntax
# ---------------------------------------------------------------------------


class TestFileSyntax:
    def test_lines(self, tmp_path: Path) -> None:
        cfg = CfgParser(
            cf_file(
                tmp_path,
                (
                    "# a comment\n"
                    "\n"
                    "hosts = one two\n"
                    "query = SELECT 'A'\n"
                    "  || 'B'\n"
                    "# a comment between a line and its continuation\n"
                    "\n"
                    "\t|| 'C'\n"
                    "tight=a=b\n"
                    "spaced   =   value with  inner  blanks \t \r\n"
                    "hash = value # not a comment\n"
                    "empty =\n"
                    "Query = a different name\n"
                    "last = no newline at the end"
                ),
            ),
            {},
        )
        assert cfg.get_str("hosts", "") == "one two"
        assert cfg.get_str("query", "") == "SELECT 'A'  || 'B'\t|| 'C'"
        assert cfg.get_str("tight", "") == "a=b"
        assert cfg.get_str("spaced", "") == "value with  inner  blanks"
        assert cfg.get_str("hash", "") == "value # not a comment"
        assert cfg.get_str("empty", "default") == ""
        assert cfg.get_str("Query", "") == "a different name"
        assert cfg.get_str("last", "") == "no newline at the end"
        assert cfg.get_str("nosuch", "default") == "default"
        assert cfg.has("empty") and not cfg.has("nosuch")

    def test_later_line_wins(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        path = cf_file(tmp_path, "a = 1\nb = x\na = 2\nb = x\n")
        with caplog.at_level(logging.WARNING, "proxymap"):
            cfg = CfgParser(path, {})
        assert cfg.get_str("a", "") == "2"
        # Only a different value is worth a warning.
        assert caplog.messages == [f"{path}, line 3: overriding earlier entry: a=1"]

    def test_no_dollar_expansion(self, tmp_path: Path) -> None:
        cfg = CfgParser(
            cf_file(tmp_path, "query = SELECT '$myhostname'\n"), {"myhostname": "host.example"}
        )
        assert cfg.get_str("query", "") == "SELECT '$myhostname'"

    def test_eight_bit_values(self, tmp_path: Path) -> None:
        cfg = CfgParser(cf_file(tmp_path, b"query = SELECT '\xff\xc3\xa9'\n"), {})
        assert (
            cfg.get_str("query", "").encode("utf-8", "surrogateescape") == b"SELECT '\xff\xc3\xa9'"
        )

    @pytest.mark.parametrize(
        "line, lineno, reason",
        [
            ("this line has no equals sign", 3, "missing '=' after attribute name"),
            ("bad name = 1", 3, "missing '=' after attribute name"),
            ("= 1", 3, "missing attribute name"),
        ],
    )
    def test_syntax_errors(self, tmp_path: Path, line: str, lineno: int, reason: str) -> None:
        path = cf_file(tmp_path, f"dbpath = x\n\n{line}\nquery = y\n")
        with pytest.raises(DictOpenError) as caught:
            CfgParser(path, {})
        assert str(caught.value) == f'{path}, line {lineno}: {reason}: "{line}"'

    def test_error_names_first_line_of_logical_line(self, tmp_path: Path) -> None:
        path = cf_file(tmp_path, "a = 1\nno equals\n  continued\n")
        with pytest.raises(DictOpenError, match=r', line 2: .*: "no equals  continued"$'):
            CfgParser(path, {})

    def test_unreadable(self, tmp_path: Path) -> None:
        missing = str(tmp_path / "nosuch.cf")
        with pytest.raises(DictOpenError) as caught:
            CfgParser(missing, {})
        assert str(caught.value) == f"open {missing}: No such file or directory"

    def test_owner(self, tmp_path: Path) -> None:
        assert CfgParser(cf_file(tmp_path, "a = 1\n"), {}).owner_uid == os.getuid()
        assert CfgParser("prefix", {}).owner_uid is None

    def test_split_name_value(self) -> None:
        assert split_name_value("  name\t=\tvalue  ") == ("name", "value")
        assert split_name_value("name=") == ("name", "")
        with pytest.raises(ValueError, match="missing attribute name"):
            split_name_value("   ")


# ---------------------------------------------------------------------------
# Typed access, file and main.cf
# ---------------------------------------------------------------------------


@pytest.fixture
def file_cfg(tmp_path: Path) -> CfgParser:
    return CfgParser(
        cf_file(
            tmp_path,
            "\n".join(
                [
                    "word = abc",
                    "blank =",
                    "n = 42",
                    "neg = -7",
                    "plus = +3",
                    "hex = 0x10",
                    "float = 1e3",
                    "huge = 99999999999",
                    "intmax = 2147483647",
                    "under = 1_000",
                    "arabic = \u0663",
                    "yes = YeS",
                    "no = no",
                    "maybe = maybe",
                    "one = 1",
                ]
            )
            + "\n",
        ),
        {},
    )


class TestTyped:
    def test_strings(self, file_cfg: CfgParser) -> None:
        name = file_cfg.name
        assert file_cfg.get_str("word", "", 1, 3) == "abc"
        assert file_cfg.get_str("nosuch", "dflt") == "dflt"
        with pytest.raises(DictOpenError, match=f"^{name}: bad string length 3 > 2: word = abc$"):
            file_cfg.get_str("word", "", 0, 2)
        with pytest.raises(DictOpenError, match=f"^{name}: bad string length 0 < 1: blank = $"):
            file_cfg.get_str("blank", "x", 1)
        with pytest.raises(DictOpenError, match=f"^{name}: bad string length 0 < 1: nosuch = $"):
            file_cfg.get_optional("nosuch", 1)

    def test_optional(self, file_cfg: CfgParser) -> None:
        assert file_cfg.get_optional("word") == "abc"
        assert file_cfg.get_optional("blank") is None
        assert file_cfg.get_optional("nosuch") is None

    @pytest.mark.parametrize(
        "param, value", [("n", 42), ("neg", -7), ("plus", 3), ("intmax", 2147483647), ("nosuch", 5)]
    )
    def test_ints(self, file_cfg: CfgParser, param: str, value: int) -> None:
        assert file_cfg.get_int(param, 5) == value

    @pytest.mark.parametrize("param", ["hex", "float", "huge", "under", "arabic", "blank", "word"])
    def test_bad_ints(self, file_cfg: CfgParser, param: str) -> None:
        with pytest.raises(
            DictOpenError, match=f"^{file_cfg.name}: bad numerical configuration: {param} = "
        ):
            file_cfg.get_int(param, 0)

    def test_int_bounds(self, file_cfg: CfgParser) -> None:
        name = file_cfg.name
        assert file_cfg.get_int("neg", 0, 0, 10) == -7  # a zero bound is no bound
        with pytest.raises(DictOpenError, match=f"^{name}: invalid n parameter value 42 > 10$"):
            file_cfg.get_int("n", 0, 1, 10)
        with pytest.raises(DictOpenError, match=f"^{name}: invalid neg parameter value -7 < 1$"):
            file_cfg.get_int("neg", 0, 1)
        with pytest.raises(DictOpenError, match="invalid nosuch parameter value 0 < 2"):
            file_cfg.get_int("nosuch", 0, 2)  # the default is checked too

    def test_bools(self, file_cfg: CfgParser) -> None:
        assert file_cfg.get_bool("yes", False) is True
        assert file_cfg.get_bool("no", True) is False
        assert file_cfg.get_bool("nosuch", True) is True
        for param in ("maybe", "one", "blank"):
            with pytest.raises(
                DictOpenError, match=f"^{file_cfg.name}: bad boolean configuration: {param} = "
            ):
                file_cfg.get_bool(param, False)


class TestPrefix:
    def test_plain_mapping(self) -> None:
        cfg = CfgParser(
            "ldapsource",
            {
                "ldapsource_server_host": "ldap.example",
                "ldapsource_version": "3",
                "server_host": "wrong",
            },
        )
        assert cfg.get_str("server_host", "localhost") == "ldap.example"
        assert cfg.get_int("version", 2) == 3
        assert cfg.get_str("search_base", "") == ""
        assert cfg.has("version") and not cfg.has("search_base")

    def test_main_cf_expansion(self, tmp_path: Path) -> None:
        (tmp_path / "main.cf").write_text(
            "tdb = /var/db\npfx_dbpath = $tdb/x.sqlite\npfx_expansion_limit = 0x1\n"
            "pfx_start_tls = maybe\npfx_word = abc\n"
        )
        cfg = CfgParser("pfx", MainConfig.load(str(tmp_path)))
        assert cfg.get_str("dbpath", "") == "/var/db/x.sqlite"
        assert cfg.get_str("other", "$tdb/default") == "/var/db/default"  # defaults too
        # main.cf messages name the full parameter and no file
        with pytest.raises(DictOpenError) as caught:
            cfg.get_int("expansion_limit", 0)
        assert str(caught.value) == "bad numerical configuration: pfx_expansion_limit = 0x1"
        with pytest.raises(DictOpenError) as caught:
            cfg.get_bool("start_tls", False)
        assert str(caught.value) == "bad boolean configuration: pfx_start_tls = maybe"
        with pytest.raises(DictOpenError) as caught:
            cfg.get_str("word", "", 5)
        assert str(caught.value) == "bad string length 3 < 5: pfx_word = abc"
        with pytest.raises(DictOpenError) as caught:
            cfg.get_int("missing", 3, 0, 2)
        assert str(caught.value) == "invalid pfx_missing parameter value 3 > 2"

    def test_empty_name(self) -> None:
        with pytest.raises(DictOpenError):
            CfgParser("", {})


# ---------------------------------------------------------------------------
# Differential: what the real postmap reads from the same files
# ---------------------------------------------------------------------------

# Each file sets dbpath and a query that SELECTs a literal; postmap prints the literal.
PARSE_CASES = {
    "continuation": "dbpath = @DB@\n# c\nquery = SELECT 'A'\n  || 'B'\n#  c\n\n\t|| 'C'\n",
    "duplicate": "dbpath = @DB@\nquery = SELECT 'first'\nquery = SELECT 'second'\n",
    "tight": "dbpath=@DB@\nquery=SELECT 'x=y'\n",
    "crlf": "dbpath = @DB@\r\nquery = SELECT 'crlf'   \t \r\n",
    "case": "dbpath = @DB@\nquery = SELECT 'lower'\nQuery = SELECT 'upper'\n",
    "hash": "dbpath = @DB@\nquery = SELECT '#data'  \n",
    "leading": "  stray = 1\ndbpath = @DB@\nquery = SELECT 'after stray'\n",
    "no-newline": "dbpath = @DB@\nquery = SELECT 'end'",
}

# Files postmap refuses with a fatal error; {cf} is the file's path.
ERROR_CASES = {
    "no-equals": (
        "dbpath = @DB@\nquery = SELECT 1\nthis line has no equals sign\n",
        "{cf}, line 3: missing '=' after attribute name: \"this line has no equals sign\"",
    ),
    "no-name": ("dbpath = @DB@\n\n= 1\n", '{cf}, line 3: missing attribute name: "= 1"'),
    "bad-int": (
        "dbpath = @DB@\nquery = SELECT 1\nexpansion_limit = 1e3\n",
        "{cf}: bad numerical configuration: expansion_limit = 1e3",
    ),
    "big-int": (
        "dbpath = @DB@\nquery = SELECT 1\nexpansion_limit = 99999999999\n",
        "{cf}: bad numerical configuration: expansion_limit = 99999999999",
    ),
    "empty-int": (
        "dbpath = @DB@\nquery = SELECT 1\nexpansion_limit =\n",
        "{cf}: bad numerical configuration: expansion_limit = ",
    ),
    "empty-result": (
        "dbpath = @DB@\nquery = SELECT 1\nresult_format =\n",
        "{cf}: bad string length 0 < 1: result_format = ",
    ),
    "no-dbpath": ("query = SELECT 1\n", "{cf}: bad string length 0 < 1: dbpath = "),
    "no-table": (
        "dbpath = @DB@\nselect_field = a\nwhere_field = b\n",
        "{cf}: bad string length 0 < 1: table = ",
    ),
}


def sqlite_open(cfg: CfgParser) -> QueryContext:
    """What Postfix's sqlite driver reads at open, in its order."""
    cfg.get_str("dbpath", "", 1)
    return QueryContext.for_sql(cfg, OpenContext(), "sqlite")


def echoed(cfg: CfgParser, database: str) -> str:
    """Run the configured (literal) query the way the sqlite driver would."""
    query = sqlite_open(cfg).query_for(b"k", lambda piece: piece.replace(b"'", b"''"))
    assert query is not None
    with sqlite3.connect(database) as db:
        value = db.execute(query.decode()).fetchone()[0]
    db.close()
    return value


@pytest.mark.postfix
class TestAgainstPostfix:
    @pytest.fixture
    def database(self, tmp_path: Path) -> str:
        ensure_postfix()
        path = tmp_path / "empty.sqlite"
        sqlite3.connect(path).close()
        return str(path)

    def files(self, tmp_path: Path, database: str, cases: dict) -> dict[str, str]:
        paths = {}
        for name, text in cases.items():
            text = text[0] if isinstance(text, tuple) else text
            paths[name] = cf_file(tmp_path, text.replace("@DB@", database), f"{name}.cf")
        settle_files(*paths.values())
        return paths

    def test_same_values(self, tmp_path: Path, database: str) -> None:
        paths = self.files(tmp_path, database, PARSE_CASES)
        for name, path in paths.items():
            theirs = postmap_lookup("k", f"sqlite:{path}").outcome()
            assert theirs == ("0", echoed(CfgParser(path, {}), database)), name

    def test_same_fatal_errors(self, tmp_path: Path, database: str) -> None:
        paths = self.files(tmp_path, database, ERROR_CASES)
        with ThreadPoolExecutor(max_workers=len(paths)) as pool:  # each fatal sleeps 1 s
            results = dict(
                zip(
                    paths,
                    pool.map(lambda path: postmap_lookup("k", f"sqlite:{path}"), paths.values()),
                    strict=True,
                )
            )
        for name, path in paths.items():
            message = ERROR_CASES[name][1].format(cf=path)
            assert f"postmap: fatal: {message}\n" in results[name].stderr, name
            with pytest.raises(DictOpenError) as caught:
                sqlite_open(CfgParser(path, {}))
            assert str(caught.value) == message, name

    def test_missing_file(self, tmp_path: Path) -> None:
        ensure_postfix()
        missing = str(tmp_path / "nosuch.cf")
        result = postmap_lookup("k", f"sqlite:{missing}")
        assert f"postmap: fatal: open {missing}: No such file or directory\n" in result.stderr
        with pytest.raises(DictOpenError) as caught:
            CfgParser(missing, {})
        assert str(caught.value) == f"open {missing}: No such file or directory"

    def test_main_cf_prefix(self, tmp_path: Path, database: str) -> None:
        conf = tmp_path / "conf"
        conf.mkdir()
        (conf / "main.cf").write_text(
            f"compatibility_level = 3.6\ntdb = {database}\npfx_dbpath = $tdb\n"
            "pfx_query = SELECT '$tdb / %s'\npfx_result_format = [%s]\n"
            "bad_dbpath = $tdb\nbad_query = SELECT 1\nbad_expansion_limit = 0x1\n"
        )
        settle_files(conf)
        params = MainConfig.load(str(conf))
        theirs = run_postmap(["-q", "k", "sqlite:pfx"], conf_dir=conf).outcome()
        assert theirs == ("0", f"[{database} / k]")
        assert theirs == ("0", f"[{echoed(CfgParser('pfx', params), database)}]")
        failed = run_postmap(["-q", "k", "sqlite:bad"], conf_dir=conf)
        message = "bad numerical configuration: bad_expansion_limit = 0x1"
        assert f"postmap: fatal: {message}\n" in failed.stderr
        with pytest.raises(DictOpenError) as caught:
            sqlite_open(CfgParser("bad", params))
        assert str(caught.value) == message

    def test_bad_boolean(self, tmp_path: Path) -> None:
        """mysql reads a boolean at open (no server is contacted before a lookup)."""
        ensure_postfix()
        path = cf_file(tmp_path, "dbname = x\nquery = SELECT 1\nrequire_result_set = maybe\n")
        settle_files(path)
        result = postmap_lookup("k", f"mysql:{path}")
        message = f"{path}: bad boolean configuration: require_result_set = maybe"
        assert f"postmap: fatal: {message}\n" in result.stderr
        with pytest.raises(DictOpenError) as caught:
            CfgParser(path, {}).get_bool("require_result_set", True)
        assert str(caught.value) == message
