"""Signals become events of the main loop (self-pipe via ``signal.set_wakeup_fd``).

NAME
    sig -- turn SIGHUP/SIGTERM/SIGINT/SIGQUIT/SIGCHLD into bytes the main loop reads

DESCRIPTION
    The handlers do nothing: Python's C-level handler writes the signal number into the
    wake-up pipe, the main loop's selector wakes up, and ``SignalPipe.drain()`` returns
    the signal numbers in arrival order. All real work (reload, stop, reaping) happens
    in the loop, never in a handler -- the lesson gunicorn learned from re-entrancy bugs
    and from signals lost between fork and handler setup. SIGCHLD is only a wake-up;
    reaping is ``waitpid(-1, WNOHANG)`` until nothing is left.
"""

from __future__ import annotations

import os
import signal

HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


def _ignore_here(signum, frame) -> None:  # the wake-up byte is the event
    """Installed so that the interpreter writes the wake-up byte; the loop does the work."""


class SignalPipe:
    """Owns the wake-up pipe; ``fileno()`` goes into the main loop's selector."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for number in HANDLED:
            signal.signal(number, _ignore_here)
        # A SIGPIPE from a client that went away must not kill the master.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> list[int]:
        """Signal numbers received since the last call, oldest first."""
        received: list[int] = []
        while True:
            try:
                data = os.read(self._read_fd, 512)
            except BlockingIOError:
                return received
            if not data:
                return received
            received.extend(data)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for number in HANDLED:
            signal.signal(number, signal.SIG_DFL)
        os.close(self._read_fd)
        os.close(self._write_fd)
