"""Postfix-style logging on top of Python's ``logging``.

NAME
    log -- ``<syslog_name>/<process>[<pid>]: <level>: <text>`` to postlog, syslog, stderr

SYNOPSIS
    setup_early("proxymap")                         # before main.cf: $MAIL_LOGTAG
    setup("proxymap", config, verbose=1, stderr=True)
    logging.getLogger("proxymap").warning("request for unapproved table: \\"%s\\"", name)
    fatal("do not run this command by hand")        # logs, then exits with status 1

DESCRIPTION
    Handlers are attached to the root logger, so every logger of the process (the
    services use "proxymap", the skeleton "master") ends up in the same place.
    Python levels map to Postfix levels: DEBUG and INFO are "info" (no level prefix;
    DEBUG records appear only when verbose), WARNING "warning", ERROR "error",
    CRITICAL "fatal", and ``PANIC`` (60) "panic".

    Destination, as for a Postfix daemon (``docs/PROTOCOL.md`` sections 2.13, 4.8):

    * ``maillog_file`` set: one datagram per record to the postlogd socket
      ($POSTLOG_SERVICE, else $queue_directory/public/$postlog_service_name), text
      ``"%b %d %H:%M:%S <host> <tag>[<pid>]: [<level>: ]<text>"``, the text cut at
      2000 bytes, host = first label of $POSTLOG_HOSTNAME or $myhostname;
    * otherwise syslog on /dev/log with facility ``syslog_facility``;
    * in addition stderr, ``<tag>: [<level>: ]<text>``, with ``-V`` (tag
      ``<syslog_name>/<process>``) or when stderr is a terminal (tag ``<process>``).

    The tag is ``<syslog_name>/<process name>``; before main.cf is read the syslog
    name comes from $MAIL_LOGTAG ("postfix" when unset).

SECURITY
    Sockets are connected by ``setup`` and stay connected, so a process that chroots
    afterwards keeps logging (the socket paths are no longer reachable from inside
    the chroot). A missing socket is retried on the next record; records logged
    meanwhile are dropped, as syslog(3) would.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import NoReturn

from master.postfix_defaults import DEFAULTS

PANIC = 60
FATAL = logging.CRITICAL
logging.addLevelName(PANIC, "PANIC")

SYSLOG_SOCKET = "/dev/log"
MAX_POSTLOG_TEXT = 2000  # postlogd's record limit for the text part

_LEVEL_PREFIX = {
    logging.WARNING: "warning: ",
    logging.ERROR: "error: ",
    FATAL: "fatal: ",
    PANIC: "panic: ",
}
# syslog(3) priorities: info 6, warning 4, err 3, crit 2, alert 1.
_SYSLOG_PRIORITY = {logging.WARNING: 4, logging.ERROR: 3, FATAL: 2, PANIC: 1}
_FACILITIES = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}

_MARKER = "_pyproxymap_handler"


def level_prefix(levelno: int) -> str:
    """ "warning: " etc.; "" for info and debug."""
    if levelno >= PANIC:
        return _LEVEL_PREFIX[PANIC]
    for level in (FATAL, logging.ERROR, logging.WARNING):
        if levelno >= level:
            return _LEVEL_PREFIX[level]
    return ""


class PostfixFormatter(logging.Formatter):
    """``[<level>: ]<text>``; the handlers add what comes before."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            # Tracebacks would span lines; Postfix records never do.
            text += " (" + self.formatException(record.exc_info).splitlines()[-1] + ")"
        return level_prefix(record.levelno) + text


class _DatagramHandler(logging.Handler):
    """Sends each record as one datagram on a UNIX socket, reconnecting when needed."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.sock: socket.socket | None = None
        self._connected()

    def _connected(self) -> socket.socket | None:
        """The socket, connected now if it was not; None when the daemon is not there."""
        if self.sock is not None:
            return self.sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return None
        os.set_inheritable(sock.fileno(), False)
        self.sock = sock
        return sock

    def datagram(self, record: logging.LogRecord) -> bytes:
        raise NotImplementedError

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.datagram(record)
            sock = self._connected()
            if sock is None:
                return
            try:
                sock.send(data)
            except OSError:
                # The daemon restarted (ECONNREFUSED) or went away: retry once, fresh.
                self.close_socket()
                sock = self._connected()
                if sock is not None:
                    sock.send(data)
        except Exception:  # noqa: BLE001 - Handler.emit's contract: handleError reports it
            self.handleError(record)

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.close_socket()
        super().close()


class PostlogHandler(_DatagramHandler):
    """postlogd(8) client: the format of maillog_client."""

    def __init__(self, path: str, tag: str, hostname: str) -> None:
        self.tag = tag
        self.hostname = hostname.split(".", 1)[0]
        super().__init__(path)

    def datagram(self, record: logging.LogRecord) -> bytes:
        text = self.format(record).encode("utf-8", "surrogateescape")[:MAX_POSTLOG_TEXT]
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(record.created))
        head = f"{stamp} {self.hostname} {self.tag}[{os.getpid()}]: "
        return head.encode() + text


class SyslogHandler(_DatagramHandler):
    """syslog(3) on /dev/log, formatted like glibc's."""

    def __init__(self, tag: str, facility: int, path: str = SYSLOG_SOCKET) -> None:
        self.tag = tag
        self.facility = facility
        super().__init__(path)

    def datagram(self, record: logging.LogRecord) -> bytes:
        priority = self.facility * 8 + _SYSLOG_PRIORITY.get(_postfix_level(record.levelno), 6)
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(record.created))
        text = self.format(record)
        return f"<{priority}>{stamp} {self.tag}[{os.getpid()}]: {text}".encode(
            "utf-8", "surrogateescape"
        )


class StderrHandler(logging.StreamHandler):
    """``<tag>: [<level>: ]<text>`` on stderr (no pid, as Postfix's msg_vstream)."""

    def __init__(self, tag: str) -> None:
        super().__init__(sys.stderr)
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.tag}: {super().format(record)}"


def _postfix_level(levelno: int) -> int:
    for level in (PANIC, FATAL, logging.ERROR, logging.WARNING):
        if levelno >= level:
            return level
    return logging.INFO


def make_tag(syslog_name: str, process_name: str) -> str:
    return f"{syslog_name}/{process_name}" if syslog_name else process_name


def _install(handlers: list[logging.Handler], verbose: int) -> None:
    """Replace our previous handlers on the root logger (others are left alone)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARKER, False):
            root.removeHandler(handler)
            handler.close()
    formatter = PostfixFormatter()
    for handler in handlers:
        setattr(handler, _MARKER, True)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def setup_early(
    process_name: str,
    *,
    stderr: bool | None = None,
    verbose: int = 0,
    tag_with_logtag: bool = False,
) -> None:
    """Logging before main.cf is read: syslog with tag $MAIL_LOGTAG/<process>.

    stderr (default: when it is a terminal) is tagged with the bare process name, or
    with the syslog tag when tag_with_logtag (``-V`` seen).
    """
    tag = make_tag(os.environ.get("MAIL_LOGTAG", "postfix"), process_name)
    handlers: list[logging.Handler] = [SyslogHandler(tag, _FACILITIES["mail"])]
    if stderr if stderr is not None else _stderr_is_terminal():
        handlers.append(StderrHandler(tag if tag_with_logtag else process_name))
    _install(handlers, verbose)


def setup(
    process_name: str,
    config: Mapping[str, str],
    *,
    stderr: bool = False,
    verbose: int = 0,
) -> None:
    """Logging as configured in main.cf (config: a MainConfig or any expanded mapping).

    stderr=True is ``-V``; a terminal on stderr adds stderr logging anyway.
    """
    tag = make_tag(config.get("syslog_name", "postfix"), process_name)
    handlers: list[logging.Handler] = []
    if config.get("maillog_file", ""):
        handlers.append(PostlogHandler(postlog_path(config), tag, postlog_hostname(config)))
    else:
        facility = _FACILITIES.get(config.get("syslog_facility", "mail").lower(), 2)
        handlers.append(SyslogHandler(tag, facility))
    if stderr:
        handlers.append(StderrHandler(tag))
    elif _stderr_is_terminal():
        handlers.append(StderrHandler(process_name))
    _install(handlers, verbose)


def postlog_path(config: Mapping[str, str]) -> str:
    path = os.environ.get("POSTLOG_SERVICE")
    if path:
        return path
    service = config.get("postlog_service_name", "postlog")
    queue = config.get("queue_directory") or DEFAULTS["queue_directory"]
    return os.path.join(queue, "public", service)


def postlog_hostname(config: Mapping[str, str]) -> str:
    return (
        os.environ.get("POSTLOG_HOSTNAME") or config.get("myhostname", "") or socket.gethostname()
    )


def _stderr_is_terminal() -> bool:
    try:
        return os.isatty(2)
    except OSError:
        return False


def fatal(message: str, *args: object, logger: str = "master") -> NoReturn:
    """Log ``fatal: <message>`` and exit with status 1 (Postfix msg_fatal)."""
    logging.getLogger(logger).critical(message, *args)
    _flush()
    sys.exit(1)


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - a broken handler must not keep us from exiting
            pass
