"""Clean stops and one log identity (issue 12, point 4).

Ctrl-C on ``make run`` is SIGINT to the terminal's whole foreground process group:
make, the master and every worker that did not leave the group. Workers end quietly
(SIGINT at its default, as in a Postfix daemon: no KeyboardInterrupt traceback), the
master stops without calling its workers' deaths failures, and every line the master
process writes carries one tag, ``<syslog_name>/master``.
"""

from __future__ import annotations

import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.postfix import ensure_postfix

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(sys.executable).parent / "proxymap"


def read_until(fd: int, marker: bytes | None, timeout: float) -> bytes:
    """What the terminal shows until marker (None: until the other side closes)."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal is gone
            break
        if not data:
            break
        out += data
        if marker is not None and marker in out:
            break
    return out


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("settle", [0.0, 1.0], ids=["while-workers-start", "serving"])
def test_ctrl_c_on_make_run_is_quiet(short_tmp_path, settle):
    """Right after the hints (workers are still importing) and once they serve."""
    ensure_postfix()
    shutil.copytree(REPO / "conf", short_tmp_path / "conf")
    (short_tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    pid, terminal = pty.fork()
    if pid == 0:  # the child: make run on a terminal, as a newcomer types it
        os.execvp("make", ["make", "-s", "-C", str(REPO), "run", f"CONF={short_tmp_path}/conf"])
    try:
        shown = read_until(terminal, b" or: ", 60)
        assert b" or: " in shown, shown.decode(errors="replace")
        time.sleep(settle)
        [master] = [
            p
            for p in children_of(pid)
            if Path(f"/proc/{p}/cmdline").read_bytes().find(b"proxymap-master") >= 0
        ]
        workers = children_of(master)
        assert settle == 0 or len(workers) == 3
        os.killpg(pid, signal.SIGINT)  # what the terminal driver does on Ctrl-C
        shown += read_until(terminal, None, 20)
    finally:
        os.waitpid(pid, 0)  # make's own exit status after Ctrl-C is make's business
    text = shown.decode(errors="replace").replace("\r\n", "\n")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "pyproxymap/master: terminating on signal 2" in text
    assert "warning" not in text and "throttling" not in text, text
    master_lines = [line for line in text.splitlines() if line.strip()]
    assert all(line.startswith("pyproxymap/master: ") for line in master_lines), text
    # A worker may still be inside exit(2) when the terminal closes: its memory and
    # descriptors released, state R, not yet a zombie. Left behind means still there
    # after a moment.
    deadline = time.monotonic() + 5
    while (alive := [p for p in workers if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive


def _running(pid: int) -> bool:
    """PID exists and is not a zombie (an exited process not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_worker_dies_quietly_on_sigint(tmp_path):
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}\n")
    worker = subprocess.Popen(
        [str(WORKER), "-S"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={"MAIL_CONFIG": str(tmp_path)},
    )
    time.sleep(1.0)  # past the imports: waiting for a request on stdin
    worker.send_signal(signal.SIGINT)
    _, err = worker.communicate(timeout=10)
    assert worker.returncode == -signal.SIGINT
    assert err == b""


@pytest.mark.parametrize("journal", [False, True], ids=["terminal-or-file", "journal"])
def test_master_records_reach_the_journal_once(short_tmp_path, journal):
    """Under systemd stderr is the journal ($JOURNAL_STREAM), which also receives the
    syslog records: the master then writes its records to syslog only (the hints, which
    are not records, still go to stderr)."""
    ensure_postfix()
    shutil.copytree(REPO / "conf", short_tmp_path / "conf")
    (short_tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    output = short_tmp_path / "stderr"
    with open(output, "wb") as stderr:
        info = os.fstat(stderr.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        master = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "proxymap-master"),
                "-c",
                str(short_tmp_path / "conf"),
                "start",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while " or: " not in output.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        master.send_signal(signal.SIGTERM)
        master.wait(30)
    text = output.read_text()
    assert "pyproxymap/master: try: postmap" in text
    assert ("daemon started" in text) is not journal, text
