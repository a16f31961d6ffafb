"""The master's control socket: ``proxymap-master status`` reads the live state here.

NAME
    control -- ``$queue_directory/pid/master.ctl``, one JSON document per connection

DESCRIPTION
    The master listens on a unix stream socket next to its pid file (mode 0600: the
    state is for the operator, not for mail_owner). For every connection it writes one
    JSON document -- master pid, generation, configuration directory, and for each
    service its counters and per-worker pid, generation, state (idle, busy, retiring)
    and use count -- then closes. The request carries nothing, so a client can neither
    confuse nor block the master: the reply is small, written with a short timeout.

    Chosen over a state file rewritten by the master because a file is stale the moment
    it is written and costs the master disk writes on every TAKEN/AVAIL change.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

CONTROL_NAME = "master.ctl"
REPLY_TIMEOUT = 1.0


def control_path(queue_directory: str) -> str:
    return os.path.join(queue_directory, "pid", CONTROL_NAME)


def open_control_socket(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(8)
    sock.setblocking(False)
    return sock


def answer_one(listener: socket.socket, state: dict) -> None:
    """Accept one pending connection, send the state, close (errors are the client's)."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(REPLY_TIMEOUT)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(state).encode() + b"\n")


def query(path: str, timeout: float = 5.0) -> dict:
    """Client side: the state document (raises OSError when no master answers)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
