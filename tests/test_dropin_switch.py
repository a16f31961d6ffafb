"""``proxymap-master dropin enable|disable|status`` on a private Postfix (issue 12, point 1).

A private installation: its own configuration directory and a *copy* of
daemon_directory (real files, as on a mail server, so that ``postfix check`` judges
the wrapper as it would there), run by the real Postfix master. Never /etc/postfix,
never the system instance. The switch is made with Postfix's tools only; ``disable``
must leave master.cf byte-identical and ``postfix check`` silent.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.postfix import (
    POSTFIX_SBIN,
    PrivatePostfix,
    ensure_postfix,
    proc_cmdline,
    settle_files,
)

pytestmark = pytest.mark.postfix

MASTER_COMMAND = str(Path(sys.executable).parent / "proxymap-master")
ALIASES = "alice alice@example.com\nbob bob@example.com\n"


class CopiedDaemons(PrivatePostfix):
    """PrivatePostfix whose daemon_directory holds copies, not symlinks."""

    def _link_daemons(self) -> None:
        for program in sorted(POSTFIX_SBIN.iterdir()):
            shutil.copy2(program, self.daemon_dir / program.name)


@pytest.fixture
def postfix_instance():
    ensure_postfix()
    pf = CopiedDaemons(name="harness-dropin-switch")
    (pf.tables / "aliases").write_text(ALIASES)
    settle_files(pf.tables / "aliases")
    pf.table = f"texthash:{pf.tables}/aliases"
    pf.proxy_read_maps = f"proxy:{pf.table} proxy:inline:{{x=1,y=2}}"
    pf.proxy_write_maps = f"proxy:btree:{pf.data_dir}/verify_cache"
    # What post-install would have done: postfix check wants public/ in group postdrop.
    shutil.chown(pf.queue_dir / "public", group="postdrop")
    try:
        pf.start()
        # A complete installation (postfix reload checks the queue): post-install's
        # create-missing, which postfix check runs, adds what the tree lacks.
        assert postfix_check(pf) == []
        yield pf
    finally:
        pf.stop()
        pf.cleanup()


def dropin(pf: PrivatePostfix, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MASTER_COMMAND, "dropin", *args, "-c", str(pf.conf_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def postfix_check(pf: PrivatePostfix) -> list[str]:
    """What `postfix check` says (it logs to the instance's maillog_file)."""
    before = len(pf.maillog())
    done = subprocess.run(
        ["postfix", "-c", str(pf.conf_dir), "check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    said = [
        line
        for line in pf.maillog()[before:].splitlines()
        if "postfix-script" in line or "postfix/postfix" in line or "postsuper" in line
    ]
    return (
        said
        + done.stdout.splitlines()
        + done.stderr.splitlines()
        + ([f"exit status {done.returncode}"] if done.returncode else [])
    )


def serving_programs(pf: PrivatePostfix) -> set[str]:
    """Basename of the executable of each live proxymap worker."""
    return {os.path.basename(os.path.realpath(f"/proc/{pid}/exe")) for pid in pf.wait_for_workers()}


def test_enable_serve_disable_byte_identical(postfix_instance):
    pf = postfix_instance
    assert pf.postmap_q("alice", f"proxy:{pf.table}") == (0, "alice@example.com")
    master_cf = (pf.conf_dir / "master.cf").read_bytes()

    enabled = dropin(pf, "enable")
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr + pf.log_tail()
    assert "answers through pyproxymap" in enabled.stderr
    wrapper = pf.daemon_dir / "pyproxymap"
    info = wrapper.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_uid == 0 and info.st_mode & 0o777 == 0o755
    interpreter = Path(wrapper.read_text().splitlines()[0].removeprefix("#!"))
    assert interpreter.parent == Path(sys.executable).parent  # this venv's interpreter
    commands = subprocess.run(
        [
            "postconf",
            "-c",
            str(pf.conf_dir),
            "-Fh",
            "proxymap/unix/command",
            "proxywrite/unix/command",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert commands == ["pyproxymap", "pyproxymap"]

    # Served by our worker, as the Postfix master runs it: -n from the master, -u.
    assert pf.postmap_q("bob", f"proxy:{pf.table}") == (0, "bob@example.com")
    assert pf.postmap_q("y", "proxy:inline:{x=1,y=2}") == (0, "2")
    workers = pf.wait_for_workers()
    assert [" ".join(proc_cmdline(pid)) for pid in workers] == [
        "pyproxymap -n proxymap -t unix -d -u"
    ], workers
    assert all(p.startswith("python") for p in serving_programs(pf))
    status = dropin(pf, "status")
    assert status.returncode == 0 and "pyproxymap drop-in: enabled" in status.stdout
    assert postfix_check(pf) == []  # a wrapper, not a symlink: nothing "leaves directory"

    disabled = dropin(pf, "disable")
    assert disabled.returncode == 0, disabled.stdout + disabled.stderr
    assert (pf.conf_dir / "master.cf").read_bytes() == master_cf
    assert not wrapper.exists()
    assert not (pf.conf_dir / "pyproxymap-dropin.json").exists()
    assert postfix_check(pf) == []
    pf.reload()  # disable reloaded already; this one retires any worker still idle
    assert pf.postmap_q("alice", f"proxy:{pf.table}") == (0, "alice@example.com")
    assert serving_programs(pf) == {"proxymap"}  # the C worker again
    status = dropin(pf, "status")
    assert status.returncode == 3 and "pyproxymap drop-in: disabled" in status.stdout


def test_disable_after_another_edit_keeps_it(postfix_instance):
    pf = postfix_instance
    assert dropin(pf, "enable").returncode == 0
    subprocess.run(
        ["postconf", "-c", str(pf.conf_dir), "-M", "extra/unix=extra unix - - n - 1 error"],
        check=True,
    )
    disabled = dropin(pf, "disable")
    assert disabled.returncode == 0, disabled.stderr
    assert "other edits kept" in disabled.stderr
    text = (pf.conf_dir / "master.cf").read_text()
    assert "extra" in text and "pyproxymap" not in text
    commands = subprocess.run(
        [
            "postconf",
            "-c",
            str(pf.conf_dir),
            "-Fh",
            "proxymap/unix/command",
            "proxywrite/unix/command",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert commands == ["proxymap", "proxymap"]
    assert pf.postmap_q("alice", f"proxy:{pf.table}") == (0, "alice@example.com")


def test_enable_refuses_an_interpreter_mail_owner_cannot_run(postfix_instance):
    """The pyenv-under-/root case: root runs it, postfix cannot; found before the switch."""
    pf = postfix_instance
    private = Path(tempfile.mkdtemp(prefix="root-only-", dir="/tmp"))
    try:
        private.chmod(0o700)
        python = private / "python"
        python.symlink_to(sys.executable)
        master_cf = (pf.conf_dir / "master.cf").read_bytes()
        refused = dropin(pf, "enable", "--python", str(python))
        assert refused.returncode == 78, refused.stderr
        assert "cannot run as postfix" in refused.stderr
        assert "Permission denied" in refused.stderr
        assert (pf.conf_dir / "master.cf").read_bytes() == master_cf
        assert not (pf.daemon_dir / "pyproxymap").exists()
        assert not (pf.conf_dir / "pyproxymap-dropin.json").exists()
        assert pf.postmap_q("alice", f"proxy:{pf.table}") == (0, "alice@example.com")
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_enable_warns_about_a_table_neither_can_open(postfix_instance):
    pf = postfix_instance
    pf.set_main(proxy_read_maps=f"proxy:{pf.table} proxy:texthash:{pf.tables}/absent")
    enabled = dropin(pf, "enable")
    assert enabled.returncode == 0, enabled.stderr
    assert (
        f"warning: texthash:{pf.tables}/absent: error: open database "
        f"{pf.tables}/absent: No such file or directory (postmap -q fails too"
    ) in enabled.stderr
    assert dropin(pf, "disable").returncode == 0


def test_status_and_disable_need_no_state_when_never_enabled(postfix_instance):
    pf = postfix_instance
    assert dropin(pf, "status").returncode == 3
    done = dropin(pf, "disable")
    assert done.returncode == 0 and "nothing to do" in done.stderr
