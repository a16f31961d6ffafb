"""The test suite is safe on a mail server: no system Postfix is stopped, nothing installed
unless asked, and private instances run side by side (issue 15, point 5).

The logic tests stand in a harmless process for a "system master" and record what
``ensure_postfix`` would run, so that a regression can never reach the real
/etc/postfix instance. The coexistence test runs two private masters at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import postfix
from tests.support.postfix import PrivatePostfix, ensure_postfix, settle_files

OUR_PROXYMAP = Path(sys.executable).parent / "proxymap"


@pytest.fixture
def fake_system_master(tmp_path, monkeypatch):
    """A live process that looks like the system master to system_postfix_running's checks,
    and a recorder in place of every command ensure_postfix could run."""
    sleeper = subprocess.Popen(["sleep", "60"])
    pid_file = tmp_path / "master.pid"
    pid_file.write_text(f"{sleeper.pid:>10}\n")
    monkeypatch.setattr(postfix, "SYSTEM_MASTER_PID", pid_file)
    monkeypatch.setattr(postfix, "MASTER", Path(f"/proc/{sleeper.pid}/exe").resolve())
    commands: list[list[str]] = []

    def record(command, *args, **kwargs):
        commands.append(list(command))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(postfix.subprocess, "run", record)
    monkeypatch.setattr(postfix, "_postfix_checked", False)
    yield sleeper, commands
    sleeper.kill()
    sleeper.wait()


def test_ensure_postfix_leaves_a_running_system_master_alone(fake_system_master, monkeypatch):
    sleeper, commands = fake_system_master
    monkeypatch.setattr(postfix, "missing_postfix_parts", lambda: [])
    if os.geteuid() != 0:
        pytest.skip("ensure_postfix needs root to accept the machine")
    ensure_postfix()
    assert commands == []  # no "postfix -c /etc/postfix stop", nothing at all
    assert sleeper.poll() is None


def test_missing_postfix_is_not_installed_unless_asked(fake_system_master, monkeypatch):
    _sleeper, commands = fake_system_master
    monkeypatch.setattr(postfix, "missing_postfix_parts", lambda: ["/usr/lib/postfix/sbin/master"])
    installs: list[bool] = []
    monkeypatch.setattr(postfix, "install_postfix", lambda: installs.append(True))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYPROXYMAP_INSTALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PYPROXYMAP_INSTALL=1"):
        ensure_postfix()
    assert installs == [] and commands == []


def test_missing_postfix_is_installed_when_asked(fake_system_master, monkeypatch):
    _sleeper, commands = fake_system_master
    parts = [["/usr/lib/postfix/sbin/master"]]
    monkeypatch.setattr(postfix, "missing_postfix_parts", lambda: parts[-1])

    def install() -> None:
        parts.append([])

    monkeypatch.setattr(postfix, "install_postfix", install)
    monkeypatch.setenv("PYPROXYMAP_INSTALL", "1")
    monkeypatch.delenv("CI", raising=False)
    if os.geteuid() != 0:
        pytest.skip("installing needs root")
    ensure_postfix()
    assert parts == [["/usr/lib/postfix/sbin/master"], []]
    assert commands == []  # installed, and still nothing stopped


def _instance(name: str, program: Path) -> PrivatePostfix:
    instance = PrivatePostfix(proxymap_program=program, name=name)
    source = instance.tables / "aliases"
    source.write_text(f"alice {name}@example.com\n")
    source.chmod(0o644)
    settle_files(instance.tables)
    instance.proxy_read_maps = f"proxy:texthash:{source}"
    instance.table = f"texthash:{source}"
    return instance


def test_two_private_masters_coexist():
    ensure_postfix()
    first = _instance("coexist-a", postfix.C_PROXYMAP)
    second = _instance("coexist-b", OUR_PROXYMAP)
    with first:
        first.wait_until_serving("alice", first.table)
        with second:
            second.wait_until_serving("alice", second.table)
            assert first.master.poll() is None and second.master.poll() is None
            assert first.postmap_q("alice", "proxy:" + first.table) == (0, "coexist-a@example.com")
            assert second.postmap_q("alice", "proxy:" + second.table) == (
                0,
                "coexist-b@example.com",
            )
            # Each master's workers are its own.
            assert set(first.child_pids()).isdisjoint(second.child_pids())
        # Stopping one leaves the other serving.
        assert first.master.poll() is None
        assert first.postmap_q("alice", "proxy:" + first.table) == (0, "coexist-a@example.com")


def test_the_benchmark_notes_a_system_master_and_leaves_it_alone(fake_system_master):
    sleeper, commands = fake_system_master
    assert postfix.system_postfix_running()
    assert commands == [] and sleeper.poll() is None
    assert not hasattr(postfix, "stop_system_postfix")  # nothing left that could stop it
