"""master.cf reader, child argv and environment (docs/PROTOCOL.md 4.1, 4.2, 5.1), `check` CLI."""

from __future__ import annotations

import logging
import os

import pytest
from click.testing import CliRunner

from master.cli import main as cli_main
from master.masterconf import (
    MasterConfigError,
    child_argv,
    child_environment,
    import_environment,
    parse_master_cf,
    split_fields,
)

POSTFIX_LINES = """\
# comment
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
"""


def one(text: str, **kwargs):
    entries = parse_master_cf(text, "m.cf", **kwargs)
    assert len(entries) == 1
    return entries[0]


def test_defaults_of_dash_columns():
    entry = one("proxymap unix - - - - - proxymap\n", default_process_limit=77)
    assert (entry.private, entry.unprivileged, entry.chroot) == (True, True, False)
    assert (entry.wakeup, entry.wakeup_after_use, entry.maxproc) == (0, False, 77)
    assert entry.identity == ("private/proxymap", "unix")
    assert entry.socket_path("/q") == "/q/private/proxymap"
    assert entry.executable("/usr/lib/postfix/sbin") == "/usr/lib/postfix/sbin/proxymap"


def test_argv_matches_what_the_real_master_passes():
    """Observed /proc/<pid>/cmdline of the 3.7 master's children (docs/PROTOCOL.md 4.1)."""
    reader, writer = parse_master_cf(POSTFIX_LINES)
    assert child_argv(reader, foreground=False) == ["proxymap", "-t", "unix", "-u"]
    assert child_argv(writer, foreground=False) == [
        "proxymap",
        "-l",
        "-n",
        "proxywrite",
        "-t",
        "unix",
        "-u",
    ]
    # master -d: children get -d after -t (observed "proxymap -t unix -d -u")
    assert child_argv(reader, foreground=True) == ["proxymap", "-t", "unix", "-d", "-u"]


def test_argv_order_of_every_item():
    entry = one("svc unix - y y 0 0 /abs/cmd -o a=b x\n")
    assert child_argv(entry, foreground=True, verbose=2) == [
        "/abs/cmd",
        "-z",
        "-n",
        "svc",
        "-t",
        "unix",
        "-d",
        "-v",
        "-v",
        "-u",
        "-c",
        "-o",
        "a=b",
        "x",
    ]
    inet = one("2525 inet n n n - 5 smtpd\n")
    assert child_argv(inet, foreground=False) == [
        "smtpd",
        "-n",
        "2525",
        "-t",
        "inet",
        "-o",
        "stress=",
    ]
    loopback = one("127.0.0.1:2525 inet n n n - 5 smtpd\n")
    assert "stress=" not in child_argv(loopback, foreground=False)
    assert child_argv(loopback, foreground=False, listen_fd_count=2)[-2:] == ["-s", "2"]


def test_continuation_comments_and_braces():
    text = (
        "pyproxymap unix - n n - 4 pyproxymap\n"
        "  # a comment between continuation lines\n"
        "\n"
        "  -o { syslog_name = postfix/ pm }\n"
        "\t-o pyproxymap_prefork=3 {  two words  }\n"
    )
    entry = one(text)
    assert entry.args == (
        "-o",
        "syslog_name = postfix/ pm",
        "-o",
        "pyproxymap_prefork=3",
        "two words",
    )
    assert entry.lineno == 1
    assert entry.prefork_override == 3
    assert entry.prefork(default=8) == 3
    assert "-n" not in child_argv(entry, foreground=False)  # service name == command


def test_drop_in_command_gets_the_service_name():
    entry = one("proxymap unix - - n - - pyproxymap\n")
    assert child_argv(entry, foreground=False) == [
        "pyproxymap",
        "-n",
        "proxymap",
        "-t",
        "unix",
        "-u",
    ]


def test_prefork_never_above_maxproc():
    entry = one("proxywrite unix - - n - 1 proxymap -o pyproxymap_prefork=4\n")
    assert entry.prefork(default=16) == 1
    unlimited = one("x unix - - n - 0 x\n")
    assert unlimited.prefork(default=16) == 16


def test_duplicate_last_wins_with_warning(caplog):
    text = "proxymap unix - - n - 5 proxymap\nproxymap unix - - n - 9 other\n"
    with caplog.at_level(logging.WARNING, logger="master"):
        entries = parse_master_cf(text, "m.cf")
    assert [(e.maxproc, e.command, e.lineno) for e in entries] == [(9, "other", 2)]
    assert "m.cf: line 2: duplicate service proxymap/unix" in caplog.text
    # same name, different type or private/public: different services
    assert len(parse_master_cf("a unix - - n - - a\na unix n - n - - a\na inet n - n - - a\n")) == 3


def test_leading_continuation_is_warned_and_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="master"):
        entries = parse_master_cf("  orphan line\nproxymap unix - - n - - proxymap\n", "m.cf")
    assert len(entries) == 1
    assert "m.cf, line 1: logical line must not start with whitespace" in caplog.text


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("proxymap unix - - n -", 'field "maxproc" is missing'),
        ("proxymap tcp - - n - - proxymap", "bad transport type"),
        ("proxymap unix x - n - - proxymap", "bad private field value"),
        ("proxymap unix - - n - many proxymap", "bad maxproc field value"),
        ("proxymap unix - - n 1x - proxymap", "bad wakeup field value"),
        ("25 inet y - n - - smtpd", "inet service cannot be private"),
        ("proxymap unix - - n - - proxymap { unclosed", "missing '}'"),
        ("proxymap unix - - n - - proxymap -o pyproxymap_prefork=lots", "bad pyproxymap_prefork"),
    ],
)
def test_errors_name_file_and_line(line, problem):
    with pytest.raises(MasterConfigError) as caught:
        parse_master_cf(f"# first\n\n{line}\n", "/etc/x/master.cf")
    assert str(caught.value).startswith("/etc/x/master.cf: line 3: ")
    assert problem in str(caught.value)


def test_wakeup_after_first_use():
    entry = one("pickup unix n - n 60? 1 pickup\n")
    assert (entry.wakeup, entry.wakeup_after_use) == (60, True)


def test_split_fields_braces():
    assert split_fields("a {b c} { d } e", "w") == ["a", "b c", "d", "e"]
    assert split_fields("{ {nested} x }", "w") == ["{nested} x"]


def test_environment_is_filtered_and_generation_octal():
    environ = {
        "PATH": "/bin",
        "TZ": "UTC",
        "LANG": "de_DE",
        "HOME": "/root",
        "POSTLOG_SERVICE": "/stale",
    }
    main = {
        "syslog_name": "pm",
        "import_environment": "MAIL_CONFIG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME",
    }
    env = child_environment(main, 25, "/etc/pm", environ)
    assert env == {
        "MAIL_CONFIG": "/etc/pm",
        "MAIL_LOGTAG": "pm",
        "TZ": "UTC",
        "LANG": "C",
        "GENERATION": "31",
    }


def test_environment_with_maillog_file_matches_observed_order():
    """Observed child environment of the 3.7 master (docs/PROTOCOL.md 4.2), same order."""
    main = {
        "maillog_file": "/var/log/mail.log",
        "queue_directory": "/var/spool/postfix",
        "myhostname": "vm.localdomain",
        "syslog_name": "postfix",
    }
    env = child_environment(main, 0o31, "/etc/postfix", {"PATH": "/bin"})
    assert list(env.items()) == [
        ("MAIL_CONFIG", "/etc/postfix"),
        ("MAIL_LOGTAG", "postfix"),
        ("LANG", "C"),
        ("POSTLOG_SERVICE", "/var/spool/postfix/public/postlog"),
        ("POSTLOG_HOSTNAME", "vm"),
        ("GENERATION", "31"),
    ]


def test_import_environment_forced_values():
    assert import_environment("A B=2, C", {"A": "1", "B": "x"}) == {"A": "1", "B": "2"}


# ---------------------------------------------------------------------------
# proxymap-master check
# ---------------------------------------------------------------------------


def write_config(tmp_path, master_cf: str, main_cf: str = ""):
    conf = tmp_path / "conf"
    conf.mkdir()
    daemon = tmp_path / "daemon"
    daemon.mkdir()
    tool = daemon / "tool"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    (conf / "main.cf").write_text(
        f"queue_directory = {tmp_path}/queue\ndaemon_directory = {daemon}\n{main_cf}"
    )
    (conf / "master.cf").write_text(master_cf)
    return conf


def test_check_accepts_a_good_config(tmp_path):
    conf = write_config(tmp_path, "tool unix - n n - 2 tool\n")
    result = CliRunner().invoke(cli_main, ["-c", str(conf), "check"])
    assert result.exit_code == 0, result.output
    assert "configuration ok" in result.output


def test_check_reports_master_cf_error_with_file_and_line(tmp_path):
    conf = write_config(tmp_path, "tool unix - n n - 2 tool\n\nbad unix - - n - nope tool\n")
    result = CliRunner().invoke(cli_main, ["-c", str(conf), "check"])
    assert result.exit_code == 78
    assert f"{conf}/master.cf: line 3: bad maxproc field value 'nope'" in result.output


def test_check_reports_main_cf_error(tmp_path):
    conf = write_config(tmp_path, "tool unix - n n - 2 tool\n", "this line has no equals\n")
    result = CliRunner().invoke(cli_main, ["-c", str(conf), "check"])
    assert result.exit_code == 78
    assert "line 3" in result.output and "missing '='" in result.output


def test_check_reports_missing_command(tmp_path):
    conf = write_config(tmp_path, "tool unix - n n - 2 absent\n")
    result = CliRunner().invoke(cli_main, ["-c", str(conf), "check"])
    assert result.exit_code == 78
    assert "absent: not an executable" in result.output


def test_prefork_default_is_the_cpu_count():
    from master.arbiter import ArbiterError, default_prefork
    from master.mainconf import MainConfig

    assert default_prefork(MainConfig({})) == (os.cpu_count() or 1)
    assert default_prefork(MainConfig({"pyproxymap_prefork": "5"})) == 5
    with pytest.raises(ArbiterError) as caught:
        default_prefork(MainConfig({"pyproxymap_prefork": "many"}))
    assert caught.value.exit_status == 78
