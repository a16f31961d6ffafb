"""File locks shared by test processes: pytest-xdist workers, or test runs side by side.

NAME
    locks -- flock(2) helpers: one holder at a time, and the "serial" test turnstile

SYNOPSIS
    with exclusive(PACKAGE_INSTALL_LOCK):
        ...  # apt-get install: one test process at a time on this machine

    turnstile = Turnstile(directory)
    with turnstile.hold(alone=False):  # an ordinary test: others may run beside it
        ...
    with turnstile.hold(alone=True):   # a timing test: waits until it runs alone
        ...

DESCRIPTION
    flock(2) locks belong to an open file description, so every holder opens the file
    itself; the kernel drops a lock when its holder dies, so a killed test leaves no
    stale lock behind.

    ``Turnstile`` is a readers-writer lock over two files. Ordinary tests hold the
    "run" file shared; a test that must run alone holds it exclusive. flock does not
    queue waiters, so a worker whose short tests follow one another could keep a shared
    hold forever; the "gate" file prevents that: every holder passes the gate (held
    exclusive only while taking "run"), and a test waiting to run alone keeps the gate
    until it has its exclusive hold, so no new shared holder gets in meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# apt-get and dpkg take their own locks but fail instead of waiting (and two test
# processes would fight over /usr/sbin/policy-rc.d): one installer at a time, machine-wide.
PACKAGE_INSTALL_LOCK = Path(tempfile.gettempdir()) / "pyproxymap-tests-apt.lock"
# apt-get options: wait for dpkg's lock (an apt run outside the tests) rather than fail.
APT_WAIT_FOR_LOCK = ("-o", "DPkg::Lock::Timeout=600")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive flock on PATH (created when missing), waiting for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Turnstile:
    """Let tests run side by side, except those that must run alone (see the module)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self._gate = os.open(directory / "gate.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._run = os.open(directory / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def hold(self, *, alone: bool) -> Iterator[None]:
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._run, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._run, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._gate)
        os.close(self._run)
