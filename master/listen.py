"""Listening endpoints created once by the master and inherited by every child.

NAME
    listen -- create the unix-domain and inet listen sockets of master.cf services

SYNOPSIS
    prepare_queue_directory(queue_directory, owner_ids(mail_owner), data_directory)
    sock = open_listener(entry, queue_directory, backlog, owner)

DESCRIPTION
    A unix service listens on ``$queue_directory/private/<name>`` (directory mode 0700,
    owned by mail_owner) or ``public/<name>`` (mode 0755); the socket itself has mode
    0666 and, when the master runs as root, belongs to mail_owner -- as with the real
    master. The master never accepts on these sockets; it only polls them to decide when
    to spawn (see ``avail``). Every socket is non-blocking because all children race for
    ``accept()`` on it and a loser must get EAGAIN, not hang.

    Socket files are left in place when the master stops or a service is removed, as
    Postfix does (observed with master 3.7: ``private/proxymap`` survives ``postfix stop``
    and a reload that drops the service); a stale file is replaced at the next start.

    ``unix``, ``unix-dgram`` (for postlogd, when ``maillog_file`` is used) and ``inet``
    are implemented; ``fifo`` and ``pass`` are refused with a clear message (proxymap
    uses neither).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import stat

from master.masterconf import ServiceEntry, split_inet_endpoint


class ListenError(OSError):
    """A listen endpoint that cannot be created."""


def owner_ids(mail_owner: str) -> tuple[int, int] | None:
    """(uid, gid) of mail_owner when we are root and can give things away, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(mail_owner)
    except KeyError:
        raise ListenError(f"unknown mail_owner user: {mail_owner!r}") from None
    return entry.pw_uid, entry.pw_gid


def _make_directory(path: str, mode: int, owner: tuple[int, int] | None) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)


def prepare_queue_directory(
    queue_directory: str, owner: tuple[int, int] | None, data_directory: str | None = None
) -> None:
    """Create queue_directory, private/, public/, pid/ (and data_directory, mail_owner's,
    mode 0700, where proxywrite keeps its tables) when missing: a fresh checkout works."""
    if data_directory:
        os.makedirs(data_directory, mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(data_directory, *owner)
    os.makedirs(queue_directory, mode=0o755, exist_ok=True)
    _make_directory(os.path.join(queue_directory, "private"), 0o700, owner)
    _make_directory(os.path.join(queue_directory, "public"), 0o755, owner)
    os.makedirs(os.path.join(queue_directory, "pid"), mode=0o755, exist_ok=True)


def _bind_unix(
    path: str, kind: int, owner: tuple[int, int] | None, backlog: int | None
) -> socket.socket:
    """Bind a fresh unix socket at path (replacing a stale one), mode 0666, non-blocking."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenError(f"{path}: exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        if owner is not None:
            os.chown(path, *owner)
        if backlog is not None:
            sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise ListenError(f"bind {path}: {err.strerror}") from None
    sock.setblocking(False)
    return sock


def open_unix_listener(path: str, backlog: int, owner: tuple[int, int] | None) -> socket.socket:
    """A listening unix stream socket (a ``unix`` service)."""
    return _bind_unix(path, socket.SOCK_STREAM, owner, backlog)


def open_unix_dgram_listener(path: str, owner: tuple[int, int] | None) -> socket.socket:
    """A datagram endpoint (postlogd's ``public/postlog``): bound, mode 0666, no listen()."""
    return _bind_unix(path, socket.SOCK_DGRAM, owner, None)


def open_inet_listener(endpoint: str, backlog: int) -> socket.socket:
    """Bind ``[host:]port`` (all addresses when no host), with SO_REUSEADDR."""
    host, port = split_inet_endpoint(endpoint)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise ListenError(f"{endpoint}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise ListenError(f"bind {endpoint}: {err.strerror}") from None
    sock.setblocking(False)
    return sock


def open_listener(
    entry: ServiceEntry, queue_directory: str, backlog: int, owner: tuple[int, int] | None
) -> socket.socket:
    """The one listen socket of a service (the child finds it on fd 6)."""
    if entry.transport == "unix":
        return open_unix_listener(entry.socket_path(queue_directory), backlog, owner)
    if entry.transport == "unix-dgram":
        return open_unix_dgram_listener(entry.socket_path(queue_directory), owner)
    if entry.transport == "inet":
        return open_inet_listener(entry.name, backlog)
    raise ListenError(
        f"{entry.where}: transport {entry.transport!r} is not supported by this master"
    )
