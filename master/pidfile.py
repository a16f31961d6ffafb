"""The master's pid file: one running master per queue directory.

NAME
    pidfile -- ``$queue_directory/pid/master.pid``, locked for the master's lifetime

DESCRIPTION
    As with Postfix, the file holds the pid right-aligned in 32 columns plus a newline
    (33 bytes), and the running master holds an exclusive ``flock`` on it. Whether a
    master runs is decided by the lock, never by the pid alone (pids are recycled):
    ``running_pid`` returns the pid only when the file is locked by someone. The file is
    left behind on exit, as Postfix leaves it; the lock going away is what counts.

    ``PidFile`` is also a context manager usable as python-daemon's ``pidfile``: acquire
    before detaching (so "already running" is reported on the terminal; the lock is
    inherited by the daemon through fork), ``__enter__`` rewrites the pid after detaching.
"""

from __future__ import annotations

import fcntl
import os

PID_WIDTH = 32


class AlreadyRunning(RuntimeError):
    """Another master holds the lock."""


class PidFile:
    """An exclusively locked pid file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def acquire(self) -> None:
        """Open and lock (no wait); raise AlreadyRunning when another master has it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"already running (pid {running_pid(self.path)})") from None
        self._fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid():>{PID_WIDTH}}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # python-daemon's pidfile protocol
    def __enter__(self) -> PidFile:
        if self._fd is None:
            self.acquire()
        else:
            self.write_pid()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def running_pid(path: str) -> int | None:
    """The pid of the master holding the lock on path, or None when none does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        return None  # we got the lock: nobody holds it
    finally:
        os.close(fd)
