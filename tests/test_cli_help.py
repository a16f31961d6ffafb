"""CLIs a Postfix administrator can guess (issue 12, point 5).

``-h`` works on every command; ``proxymap-query --help`` shows the KEY/TABLE order, the
options and the exit status; a table without ``proxy:`` gets a warning; the USES column
of ``status`` counts what its help (and the README) says: one per request for a client
that waits for each reply, for Postfix's proxymap and for ours alike.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.postfix import ProxymapClient
from tests.test_arbiter import instance_factory, wait_until  # noqa: F401
from tests.test_query import LiveServer, query

VENV_BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("option", ["-h", "--help"])
def test_proxymap_query_help_shows_order_options_and_exit_status(option):
    done = run(str(VENV_BIN / "proxymap-query"), option)
    assert done.returncode == 0
    text = done.stdout
    assert text.startswith("Usage: proxymap-query [OPTIONS] KEY proxy:TYPE:NAME\n")
    assert "the key first, the table last" in text
    for form in (
        "--sequence proxy:TYPE:NAME",
        "--update KEY VALUE proxy:TYPE:NAME",
        "--delete KEY proxy:TYPE:NAME",
    ):
        assert form in text
    for option_name in (
        "-s, --socket SOCKET",
        "-c, --config-dir CONFIG_DIR",
        "--v311",
        "--write",
        "--no-utf8",
        "-h, --help",
    ):
        assert option_name in text
    assert "Exit status:" in text
    for code in (
        "0   found",
        "1   not found",
        "2   temporary error",
        "3   invalid request",
        "4   the table is not approved",
        "5   configuration error",
        "75  cannot connect",
    ):
        assert code in text


def test_proxymap_query_warns_without_proxy_prefix(tmp_path):
    table = tmp_path / "map"
    table.write_text("alice alice@example.com\n")
    spec = f"texthash:{table}"
    with LiveServer(str(tmp_path / "s"), "proxymap", {spec}) as live:
        status, out, err = query("-s", live.path, "alice", spec)
        assert (status, out) == (0, b"alice@example.com\n")
        assert (
            f'proxymap-query: warning: "{spec}" has no proxy: prefix: asking the '
            f"proxymap service for proxy:{spec}"
        ) in err
        status, _, err = query("-s", live.path, "alice", f"proxy:{spec}")
        assert status == 0 and "warning" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["proxymap-master"],
        ["proxymap-master", "start"],
        ["proxymap-master", "stop"],
        ["proxymap-master", "reload"],
        ["proxymap-master", "status"],
        ["proxymap-master", "check"],
        ["proxymap-master", "dropin"],
        ["proxymap-master", "dropin", "enable"],
        ["proxymap-master", "dropin", "disable"],
        ["proxymap-master", "dropin", "status"],
        ["proxymap-query"],
        ["proxymap"],
    ],
    ids=" ".join,
)
def test_dash_h_everywhere(command):
    done = run(str(VENV_BIN / command[0]), *command[1:], "-h")
    assert done.returncode == 0, done.stderr
    if command[0] == "proxymap":  # the worker prints its manual page
        assert "SYNOPSIS" in done.stdout and "check-proxymap" in done.stdout
    else:
        assert done.stdout.startswith(f"Usage: {' '.join(command)}")


def test_status_help_says_what_uses_counts():
    text = run(str(VENV_BIN / "proxymap-master"), "status", "-h").stdout
    assert "USES   busy periods the worker has finished" in text
    assert "one use per request" in text


@pytest.mark.parametrize("worker", ["C", "ours"])
def test_uses_is_one_per_request_of_a_client_that_waits(instance_factory, worker):  # noqa: F811
    """What status -h and the README say, for Postfix's proxymap and for ours."""
    command = "proxymap" if worker == "C" else "pyproxymap"
    pf = instance_factory(f"proxymap unix - - n - 1 {command}\n", "pyproxymap_prefork = 1\n")
    if worker == "ours":
        (pf.daemon / "pyproxymap").symlink_to(VENV_BIN / "proxymap")
    pf.start()
    wait_until(lambda: len(pf.workers("proxymap")) == 1)
    with ProxymapClient(pf.queue / "private" / "proxymap") as client:
        for key in ("alice", "bob", "nobody", "alice", "bob"):
            assert client.lookup(pf.table, key)["status"] in (b"0", b"1")
            time.sleep(0.1)  # the client waits: the worker goes idle in between
        [shown] = wait_until(lambda: [w for w in pf.workers("proxymap") if w["uses"] >= 5])
    assert shown["uses"] == 5
    text = pf.cli("status").stdout
    assert "USES" in text and f"{shown['pid']:>8} " in text
