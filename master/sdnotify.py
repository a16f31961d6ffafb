"""systemd readiness notification (``Type=notify``), without libsystemd.

NAME
    sdnotify -- send READY=1 / RELOADING=1 / STOPPING=1 / STATUS=... to $NOTIFY_SOCKET

DESCRIPTION
    systemd passes the path of a datagram socket in ``NOTIFY_SOCKET`` (a leading ``@``
    means the Linux abstract namespace). Each notification is one datagram of
    ``KEY=value`` lines. Without the variable every call is a no-op, so the master runs
    the same way by hand, under a test, or under systemd. Errors are swallowed: a
    supervisor must never die because its own supervisor went away.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """One socket for the life of the master (opened lazily)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. ``notify(READY=1, STATUS="running")``; True when sent."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> bool:
        return self.notify(RELOADING=1, STATUS="reloading")

    def stopping(self) -> bool:
        return self.notify(STOPPING=1, STATUS="stopping")

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
