"""`make run` on the embedded default (conf/): the printed commands answer, so does postmap.

The checkout's conf/ is copied next to a link to this venv, so the run directory the
master creates (``$config_directory/../run``) lands in a temporary tree, not in the
checkout. The real ``postmap -c CONF -q KEY proxy:TYPE:NAME`` is the client.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.postfix import ensure_postfix

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def running_make_run(short_tmp_path):
    ensure_postfix()
    shutil.copytree(REPO / "conf", short_tmp_path / "conf")
    (short_tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    conf = short_tmp_path / "conf"
    process = subprocess.Popen(
        ["make", "-s", "-C", str(REPO), "run", f"CONF={conf}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " or: " in line:  # the last hint line: the master is serving
                break
        yield conf, "".join(lines)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def hinted_commands(output: str) -> list[list[str]]:
    return [shlex.split(match) for match in re.findall(r"(?:try|or): (.+)", output)]


def test_printed_commands_answer(running_make_run):
    conf, output = running_make_run
    commands = hinted_commands(output)
    assert len(commands) == 2, output
    assert any(Path(c[0]).name == "postmap" for c in commands)
    assert any(Path(c[0]).name == "proxymap-query" for c in commands)
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout) == (0, "alice@example.com\n"), done.stderr


@pytest.mark.parametrize(
    ("key", "table", "expected"),
    [
        ("BOB", "texthash:{conf}/tables/aliases", "bob@example.com, robert@example.org"),
        ("192.0.2.7", "cidr:{conf}/tables/clients.cidr", "REJECT documentation network"),
        ("x@example.org", "pcre:{conf}/tables/senders.pcre", "FILTER smtp:[mx.example.org]"),
        ("postfix", "inline:{{pyproxymap=works,postfix=compatible}}", "compatible"),
    ],
)
def test_sample_tables_answer_through_real_postmap(running_make_run, key, table, expected):
    conf, _ = running_make_run
    spec = "proxy:" + table.format(conf=conf)
    done = subprocess.run(
        ["postmap", "-c", str(conf), "-q", key, spec], capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout) == (0, expected + "\n"), done.stderr
