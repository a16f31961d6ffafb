"""Start one child process with the file descriptors a Postfix daemon expects.

NAME
    spawn -- fork/exec a service child with fds 0-6 laid out as by Postfix master(8)

SYNOPSIS
    pid = spawn_child(path, argv, env, ChildFds(flow_read, flow_write, status, listen))

DESCRIPTION
    In the child: 0 = /dev/null, 1 = /dev/null, 2 = /dev/null or the master's stderr
    (``keep_stderr``, foreground mode, so that a crashing worker's traceback is seen),
    3/4 = the master's flow-control pipe, 5 = the service's status socket (child end),
    6 = the listen socket. Every other descriptor of the master is close-on-exec
    (Python's default), so nothing else leaks into the child -- in particular not the
    master's end of any status socket, which would keep children alive after a reload.

    The source descriptors may themselves be numbered 3..6, so they are first copied
    above the target range and only then moved into place; a plain dup2 chain could
    overwrite a source before it is used.

    Signals that Python ignores (SIGPIPE, SIGXFSZ) are reset to their defaults before
    exec, because "ignored" is inherited through exec and a C daemon expects defaults.
    The one exception is ``ignore_interrupt`` (a master in the foreground): SIGINT is
    ignored, so that Ctrl-C, which the terminal sends to the whole process group,
    leaves the children to the master's own stop (SIGTERM) -- a Python worker still
    importing its modules would otherwise die with a KeyboardInterrupt traceback.
    If exec fails the child writes one line to fd 2 and exits 1; the master then sees an
    abnormal exit of a child that served nothing and throttles the service, like Postfix.

BUGS
    fork() from Python is only safe because the master is single-threaded.
"""

from __future__ import annotations

import fcntl
import os
import signal
from dataclasses import dataclass

FLOW_READ_FD = 3
FLOW_WRITE_FD = 4
STATUS_FD = 5
LISTEN_FD = 6
# Above the target range, so that moving into place never clobbers a source.
_PARKING_FD = 64


@dataclass(frozen=True)
class ChildFds:
    """The master-side descriptors a child receives on fds 3, 4, 5 and 6."""

    flow_read: int
    flow_write: int
    status: int
    listen: int


def _child_side(
    path: str,
    argv: list[str],
    env: dict[str, str],
    fds: ChildFds,
    keep_stderr: bool,
    ignore_interrupt: bool,
) -> None:
    """Runs in the forked child; never returns."""
    try:
        for number in (
            signal.SIGPIPE,
            signal.SIGXFSZ,
            signal.SIGINT,
            signal.SIGTERM,
            signal.SIGHUP,
            signal.SIGQUIT,
            signal.SIGCHLD,
        ):
            signal.signal(number, signal.SIG_DFL)
        if ignore_interrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        sources = (fds.flow_read, fds.flow_write, fds.status, fds.listen)
        parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, _PARKING_FD) for fd in sources]
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        if not keep_stderr:
            os.dup2(null, 2)
        for target, fd in zip(
            (FLOW_READ_FD, FLOW_WRITE_FD, STATUS_FD, LISTEN_FD), parked, strict=True
        ):
            os.dup2(fd, target)  # dup2 targets are inheritable
        os.execve(path, argv, env)
    except OSError as err:
        try:
            os.write(2, f"fatal: exec {path}: {err.strerror}\n".encode())
        finally:
            os._exit(1)
    except BaseException:  # noqa: BLE001 - the forked child must never return to our code
        os._exit(1)


def spawn_child(
    path: str,
    argv: list[str],
    env: dict[str, str],
    fds: ChildFds,
    *,
    keep_stderr: bool = False,
    ignore_interrupt: bool = False,
) -> int:
    """Fork and exec one child; return its pid (raises OSError when fork fails)."""
    pid = os.fork()
    if pid == 0:
        _child_side(path, argv, env, fds, keep_stderr, ignore_interrupt)
    return pid
