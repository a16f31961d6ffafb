"""Child -> master status messages on file descriptor 5.

NAME
    status -- TAKEN/AVAIL notifications and the GENERATION variable

SYNOPSIS
    channel = StatusChannel(STATUS_FD, parse_generation(os.environ["GENERATION"]))
    channel.taken()              # before serving a request
    if not channel.available():  # after it; False: the master is gone
        exit(0)
    channel.used()               # both at once, after the work

DESCRIPTION
    A message is 12 bytes in native byte order: pid (int32), generation (uint32) and
    0 = TAKEN (busy) or 1 = AVAIL (``docs/PROTOCOL.md`` section 4.4). The
    generation is the master's spawn counter, passed as octal text in GENERATION and
    echoed so that the master can ignore children of an older configuration.
"""

from __future__ import annotations

import os
import select
import struct
from typing import NamedTuple

STATUS_FD = 5  # the service's status socket, inherited from the master
LISTEN_FD = 6  # first listen socket; -s N means fds 6 .. 6+N-1
FLOW_READ_FD, FLOW_WRITE_FD = 3, 4  # master's flow-control pipe (unused here)

STATUS_TAKEN = 0
STATUS_AVAIL = 1

_FORMAT = struct.Struct("=iIi")
STATUS_SIZE = _FORMAT.size  # 12


class GenerationError(ValueError):
    """GENERATION is not all digits; str() is the Postfix fatal text."""


class StatusMessage(NamedTuple):
    pid: int
    generation: int
    avail: int


def pack_status(pid: int, generation: int, avail: int) -> bytes:
    return _FORMAT.pack(pid, generation, avail)


def unpack_status(data: bytes) -> StatusMessage:
    return StatusMessage(*_FORMAT.unpack(data))


def parse_generation(text: str | None) -> int:
    """Octal GENERATION text -> number (absent: 0).

    Like Postfix, only "all digits" is checked; each digit then counts base 8, so a
    stray 8 or 9 does not stop the child (it just yields an odd number).
    """
    if text is None:
        return 0
    if not text.isascii() or not text.isdigit():
        raise GenerationError(f"bad generation: {text}")
    value = 0
    for digit in text:
        value = (value * 8 + int(digit)) & 0xFFFFFFFF
    return value


class StatusChannel:
    """Writes this process's status messages; a channel without fd is silent."""

    def __init__(self, fd: int | None, generation: int) -> None:
        self.fd = fd
        self.generation = generation
        # Both messages are fixed for the life of the process: build them once.
        pid = os.getpid()
        self._messages = {
            avail: pack_status(pid, generation, avail) for avail in (STATUS_TAKEN, STATUS_AVAIL)
        }
        self._use = self._messages[STATUS_TAKEN] + self._messages[STATUS_AVAIL]

    def _send(self, avail: int) -> bool:
        return self._write(self._messages[avail])

    def _write(self, message: bytes) -> bool:
        fd = self.fd
        if fd is None:
            return True
        written = 0
        try:
            while written < len(message):
                written += os.write(fd, message[written:])
        except BlockingIOError:
            # Someone made the descriptor non-blocking (libuv does when it polls a
            # descriptor) and the master is behind: wait for it like a blocking write,
            # and send only what is left (a restarted message would desynchronise it).
            return self._send_slowly(fd, message, written)
        except OSError:
            return False
        return True

    @staticmethod
    def _send_slowly(fd: int, message: bytes, written: int) -> bool:
        while written < len(message):
            try:
                select.select([], [fd], [])
                written += os.write(fd, message[written:])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return False
        return True

    def taken(self) -> bool:
        """Tell the master this process is busy (a failure is for the caller to ignore)."""
        return self._send(STATUS_TAKEN)

    def available(self) -> bool:
        """Tell the master this process is idle; False means the master is gone."""
        return self._send(STATUS_AVAIL)

    def used(self) -> bool:
        """TAKEN and AVAIL in one write: work done that the master need not act on
        (it counts a use; both arrive together). False means the master is gone."""
        return self._write(self._use)
