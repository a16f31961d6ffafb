"""main.cf reading and $-expansion, checked against the real `postconf -xh`.

The differential tests write a main.cf, ask the installed postconf for the expanded
values and compare with ``MainConfig``. Two presentation details of postconf are
normalised on our side only: it prints a value with runs of blanks collapsed to one
space and without leading/trailing blanks (daemons see the value unchanged).
postconf only prints parameters it knows, so every test parameter is referenced from
``smtpd_banner``, which makes it a "used" user-defined parameter.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from master.mainconf import (
    MainConfig,
    MainConfigError,
    parse_main_cf,
    parse_override,
    split_name_value,
    to_seconds,
)

POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"


@pytest.fixture(scope="module")
def postconf() -> str:
    if not os.path.exists(POSTCONF):
        from tests.support.postfix import ensure_postfix

        ensure_postfix()
    return POSTCONF


def write_config(directory: Path, params: dict[str, str], extra: str = "") -> str:
    """A config dir whose main.cf defines params, all of them "used" for postconf."""
    directory.mkdir(parents=True, exist_ok=True)
    carrier = " ".join(f"${name}" for name in params)
    lines = [f"smtpd_banner = {carrier}"] + [f"{name} = {value}" for name, value in params.items()]
    (directory / "main.cf").write_text("\n".join(lines) + "\n" + extra)
    (directory / "master.cf").write_text("")
    # Postfix re-reads (after a 1 s sleep) a file modified within the last second.
    past = time.time() - 10
    for name in ("main.cf", "master.cf"):
        os.utime(directory / name, (past, past))
    return str(directory)


def postconf_values(
    postconf: str, config_dir: str, names: list[str], overrides: dict[str, str] | None = None
) -> list[str] | None:
    """`postconf -c DIR [-o n=v] -xh NAMES` (None when postconf fails)."""
    command = [postconf, "-c", config_dir]
    for name, value in (overrides or {}).items():
        command += ["-o", f"{name}={value}"]
    done = subprocess.run(command + ["-xh", *names], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return done.stdout.split("\n")[: len(names)]


def as_postconf_prints(value: str) -> str:
    return " ".join(value.split())


# Every expansion form; the values reference one another on purpose.
EXPANSION_FORMS = {
    "p_hello": "hello",
    "p_dollar": "a$$b",
    "p_indirect": "$p_undefined",
    "p_plain": "$p_hello ${p_hello} $(p_hello) $$p_hello x$p_hello.y",
    "p_nested": "[$p_plain] [$p_dollar]",
    "p_if_set": "${p_hello?yes} ${p_nothing?yes} ${p_hello?{braced}} ${p_hello?$p_dollar}",
    "p_if_unset": "${p_hello:no} ${p_nothing:no} ${p_nothing:{ braced }}",
    "p_if_else": "${p_hello?{t1}:{t2}} ${p_nothing?{t1}:{t2}} ${p_nothing?{t1}:t2x}",
    "p_raw_test": "${p_indirect?raw-set} ${p_indirect:raw-unset}",
    "p_plain_text": "${p_hello?x:y}|${p_hello? spaced }|${p_hello?:}|${p_hello?{}}",
    "p_blank_name": "${ p_hello }",
    "p_braces_in_text": "${p_hello?{a{b}c}} ${p_hello?a{b}c} $(p_hello?(x))",
    "p_numeric": "${{1} < {2} ? {lt} : {ge}} ${{10} < {9} ? {lt} : {ge}} ${{09} == {9} ? {eq}}",
    "p_string": "${{abc} == {abc} ? {eq} : {ne}} ${{ab} < {b} ? {lt}} ${{ 10 } < {9} ? {str}}",
    "p_ops": "${{1}<={1}?{a}} ${{2}>={1}?{b}} ${{2}>{1}?{c}} ${{2}!={1}?{d}} ${{ 1 } == {1}?{e}:{f}}",
    "p_bare_relational": "<${{a}=={a}}> <${{a}=={b}}> <${{a}=={b}?}>",
    "p_levels": "${{3.6} <level {3.10} ? {a}} ${{3.6.1} >level {3.6} ? {b}} ${{3} ==level {3.0} ? {c}}"
    " ${{3.6} !=level {3.06} ? {d} : {e}} ${{2} <level {10} ? {f}}",
    "p_compat": "${{$compatibility_level} <level {1} ? {old} : {new}}",
    "p_expanded_operands": "${{$p_hello} == {hello} ? {$p_dollar} : {n}}",
    "p_else_plain": "${{1}=={2}?{y}: n } ${{1}=={2}?{y}: {m} }",
    "p_builtin": "$mail_version $syslog_name $myorigin $mydestination",
    "p_hostdep": "$myhostname $mydomain $mynetworks",
}


def test_expansion_forms_match_postconf(postconf, tmp_path):
    config_dir = write_config(tmp_path / "forms", EXPANSION_FORMS)
    names = list(EXPANSION_FORMS) + ["smtpd_banner", "config_directory", "relay_domains"]
    expected = postconf_values(postconf, config_dir, names)
    assert expected is not None, "postconf rejected the test main.cf"
    config = MainConfig.load(config_dir)
    for name, want in zip(names, expected, strict=True):
        assert as_postconf_prints(config[name]) == want, name


PROXY_MAPS_CUSTOM = {
    "compatibility_level": "3.6",
    "my_tables": "proxy:hash:/srv/a, {proxy:texthash:/srv/b opt=x}",
    "proxy_read_maps": "$my_tables ${my_tables?{pipemap:{proxy:inline:{a=b}}}} "
    "$local_recipient_maps $mydestination $relay_domains $mynetworks",
    "proxy_write_maps": "$proxy_read_maps proxy:btree:$data_directory/w",
    "mydestination": "$myhostname, localhost.$mydomain",
    "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
}


@pytest.mark.parametrize("params", [{}, PROXY_MAPS_CUSTOM], ids=["default", "custom"])
def test_proxy_maps_match_postconf(postconf, tmp_path, params):
    config_dir = write_config(tmp_path / "maps", params)
    names = ["proxy_read_maps", "proxy_write_maps", "mynetworks", "mynetworks_style"]
    expected = postconf_values(postconf, config_dir, names)
    assert expected is not None
    config = MainConfig.load(config_dir)
    for name, want in zip(names, expected, strict=True):
        assert as_postconf_prints(config[name]) == want, name


@pytest.mark.parametrize(
    "params",
    [
        {"myhostname": "mail.example.com"},
        {"myhostname": "mail.example"},
        {"myhostname": "bare"},
        {"mydomain": "example.org"},
        {"inet_interfaces": "loopback-only"},
        {"mynetworks_style": "host", "inet_protocols": "ipv4"},
        {"mynetworks_style": "class"},
    ],
    ids=lambda params: ",".join(f"{k}={v}" for k, v in params.items()),
)
def test_host_defaults_match_postconf(postconf, tmp_path, params):
    config_dir = write_config(tmp_path / "host", params)
    names = ["myhostname", "mydomain", "myorigin", "mydestination", "mynetworks"]
    expected = postconf_values(postconf, config_dir, names)
    assert expected is not None
    config = MainConfig.load(config_dir)
    assert [as_postconf_prints(config[name]) for name in names] == expected


def test_overrides_match_postconf(postconf, tmp_path):
    params = {"p_one": "one", "p_two": "$p_one two", "syslog_name": "main"}
    config_dir = write_config(tmp_path / "over", params)
    overrides = {"p_one": "ONE", "syslog_name": "postfix/$p_two", "max_use": "3"}
    names = ["p_one", "p_two", "syslog_name", "max_use", "max_idle"]
    expected = postconf_values(postconf, config_dir, names, overrides)
    assert expected is not None
    config = MainConfig.load(config_dir, overrides)
    assert [config[name] for name in names] == expected
    assert config.raw("p_one") == "ONE" and config.main_cf["p_one"] == "one"


ERROR_VALUES = [
    "${p_hello",
    "x$",
    "${}",
    "$(p_hello}",
    "${p_hello-b}",
    "${p_hello?{x}y}",
    "${{a}=={a}?{y}:{n}x}",
    "${p_hello?{x}:{y}:{z}}",
    "${p_hello:{x}:{y}}",
    "${{a}{b}}",
    "${{a}==}",
    "${{x} <level {10} ? {y}}",
    "${{ 3.6 } >=level {3} ? {y}}",
    "$p_loop",
]


def test_errors_where_postconf_fails(postconf, tmp_path):
    # A failing postconf takes seconds to exit, so the cases run side by side.
    def postconf_fails(index_value: tuple[int, str]) -> bool:
        index, value = index_value
        params = {"p_hello": "hello", "p_loop": "x$p_loop", "p_bad": value}
        config_dir = write_config(tmp_path / f"bad{index}", params)
        return postconf_values(postconf, config_dir, ["p_bad"]) is None

    with ThreadPoolExecutor(max_workers=len(ERROR_VALUES)) as pool:
        failed = list(pool.map(postconf_fails, enumerate(ERROR_VALUES)))
    assert all(failed), [v for v, f in zip(ERROR_VALUES, failed, strict=True) if not f]
    for index in range(len(ERROR_VALUES)):
        with pytest.raises(MainConfigError):
            MainConfig.load(str(tmp_path / f"bad{index}"))["p_bad"]


# -- logical lines and name = value -------------------------------------------


def test_logical_lines_continuations_and_comments():
    text = (
        b"# a comment\n"
        b"first = one\n"
        b"  two\n"
        b"\n"
        b"   # a comment between a line and its continuation\n"
        b"\tthree\n"
        b"hash = a # not a comment\n"
        b"spaced   =   value with  inner  blanks   \n"
        b"empty =\n"
        b'quoted = "x"\n'
    )
    params = parse_main_cf(text, "main.cf")
    assert params == {
        "first": "one  two\tthree",
        "hash": "a # not a comment",
        "spaced": "value with  inner  blanks",
        "empty": "",
        "quoted": '"x"',
    }


def test_later_definition_wins_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        params = parse_main_cf(b"a = 1\na = 2\n", "/x/main.cf")
    assert params == {"a": "2"}
    assert "/x/main.cf, line 2: overriding earlier entry: a=1" in caplog.text


def test_missing_equals_is_an_error():
    with pytest.raises(MainConfigError) as error:
        parse_main_cf(b"good = 1\nbad value\n", "/x/main.cf")
    assert str(error.value) == "/x/main.cf, line 2: missing '=' after attribute name: \"bad value\""


def test_leading_continuation_is_dropped(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_main_cf(b"  orphan\na = 1\n", "m") == {"a": "1"}
    assert "logical line must not start with whitespace" in caplog.text


def test_name_value_and_override_syntax():
    assert split_name_value(" name=value ") == ("name", "value")
    assert split_name_value("name =  a = b ") == ("name", "a = b")
    assert parse_override("max_use = 3") == ("max_use", "3")
    with pytest.raises(MainConfigError, match='invalid "-o max_use" option value'):
        parse_override("max_use")


def test_load_uses_mail_config_and_reports_missing_file(tmp_path, monkeypatch):
    (tmp_path / "main.cf").write_text("max_idle = 7\n")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    config = MainConfig.load()
    assert config.config_dir == str(tmp_path)
    assert config["config_directory"] == str(tmp_path)
    assert config.get_time("max_idle") == 7
    with pytest.raises(MainConfigError, match="open .*/nowhere/main.cf: No such file"):
        MainConfig.load(str(tmp_path / "nowhere"))


def test_typed_values():
    config = MainConfig({"b1": "Yes", "b2": "false", "n": "42", "t1": "5m", "t2": "2", "bad": "x"})
    assert config.get_bool("b1") is True and config.get_bool("b2") is False
    assert config.get_int("n") == 42
    assert config.get_time("t1") == 300 and config.get_time("t2") == 2
    assert config.get_time("t2", default_unit="h") == 7200
    assert config.get_time("max_idle") == 100 and config.get_time("ipc_timeout") == 3600
    assert config.get_int("max_use") == 100
    for getter in (config.get_bool, config.get_int, config.get_time):
        with pytest.raises(MainConfigError):
            getter("bad")
    assert to_seconds("x", "1w") == 604800


def test_mapping_behaviour():
    config = MainConfig({"mine": "$mail_version"}, overrides={"other": "$$"})
    assert config["mine"] == config["mail_version"]
    assert config["other"] == "$"
    assert "mine" in config and "other" in config and "proxy_read_maps" in config
    assert "no_such_parameter_anywhere" not in config
    with pytest.raises(KeyError):
        config["no_such_parameter_anywhere"]
    assert config.get("no_such_parameter_anywhere", "") == ""
    names = list(config)
    assert "mine" in names and "other" in names and "max_idle" in names
    assert len(names) == len(set(names)) == len(config)
    assert config.expand("<$mine>") == f"<{config['mail_version']}>"


# Pieces of the expansion syntax, glued at random: most results are syntax errors,
# the rest exercise odd but valid combinations. Both sides must agree on which is which.
FUZZ_TOKENS = [
    "$",
    "$",
    "$",
    "{",
    "{",
    "}",
    "}",
    "(",
    ")",
    "?",
    ":",
    "p_a",
    "p_e",
    "p_u",
    " ",
    "==",
    "<",
    "<level",
    "!=",
    "1",
    "3.6",
    "10",
    "x",
    "{1}",
    "{p}",
    "$p_a",
    "${p_a}",
    "${p_e?",
    "${{",
    ",",
    "$$",
    "?{a}",
    ":{b}",
    "${p_u:",
    "${p_a?{",
    ">=level",
    "{3.10}",
    " ? ",
    " : ",
    "{ y }",
]
FUZZ_CASES = 300


def test_random_expressions_match_postconf(postconf, tmp_path):
    rng = random.Random(20261125)
    expressions = [
        "".join(rng.choice(FUZZ_TOKENS) for _ in range(rng.randint(1, 16)))
        for _ in range(FUZZ_CASES)
    ]

    def postconf_result(index: int) -> str:
        params = {"p_a": "A", "p_e": "", "p_x": expressions[index]}
        config_dir = write_config(tmp_path / f"fuzz{index}", params)
        values = postconf_values(postconf, config_dir, ["p_x"])
        return "ERROR" if values is None else values[0]

    with ThreadPoolExecutor(max_workers=48) as pool:
        expected = list(pool.map(postconf_result, range(FUZZ_CASES)))
    mismatches = []
    for index, want in enumerate(expected):
        try:
            got = as_postconf_prints(MainConfig.load(str(tmp_path / f"fuzz{index}"))["p_x"])
        except MainConfigError:
            got = "ERROR"
        if got != want:
            mismatches.append((expressions[index], want, got))
    assert mismatches == []
    assert 20 < sum(value != "ERROR" for value in expected) < FUZZ_CASES - 20


def test_logical_lines_match_postconf(postconf, tmp_path):
    text = (
        "# comment\n"
        "smtpd_banner = $p_one $p_two $p_three $p_four $p_five\n"
        "p_one = first\n"
        "  continued\n"
        "# a comment inside the logical line\n"
        "\tand tab-continued\n"
        "\n"
        "p_two=no blanks # stays\n"
        'p_three   =   "quoted"   \n'
        "p_four = early\n"
        "p_four = late\n"
        "p_five =\n"
        "   only continuation\n"
    )
    directory = tmp_path / "lines"
    write_config(directory, {})
    (directory / "main.cf").write_text(text)
    past = time.time() - 10
    os.utime(directory / "main.cf", (past, past))
    names = ["p_one", "p_two", "p_three", "p_four", "p_five"]
    done = subprocess.run(
        [postconf, "-c", str(directory), "-h", *names], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    config = MainConfig.load(str(directory))
    assert [as_postconf_prints(config.raw(name)) for name in names] == done.stdout.split("\n")[
        : len(names)
    ]
