"""A test stand-in for the master(8) side of the master/child descriptor protocol.

NAME
    standin_master -- spawn one child exactly as master(8) would, and watch its status

SYNOPSIS
    from tests.support.standin_master import StandinMaster, python_module

    argv = python_module("tests.support.echo_service", "-t", "unix", "-o", "max_idle=5")
    with StandinMaster(argv, config_dir="/tmp/x/conf") as m:
        client = m.connect()                 # a socket connected to the child's fd 6
        client.sendall(b"hello\\n")
        m.read_status()                      # StatusMessage(pid, generation, avail=0)
        m.read_status()                      # ... avail=1
        m.close_status()                     # what a `postfix reload` does to old children
        m.child.wait(5)                      # subprocess.Popen: exit status 0

DESCRIPTION
    ``StandinMaster`` is not a master: it starts a single child and never forks more.
    It reproduces what the child inherits (``docs/PROTOCOL.md`` sections 4.2, 4.3):

      fd 3, 4   both ends of a pipe (the master's flow-control pipe)
      fd 5      one end of a socketpair(AF_UNIX, SOCK_STREAM); the stand-in keeps the
                other end, and a thread reads and decodes the 12-byte status messages
                as they come (``read_status`` takes them in order)
      fd 6      a listening, non-blocking AF_UNIX stream socket at ``socket_path``
                (the stand-in keeps it open too, like the master, so connections the
                child did not accept stay in the backlog: see ``accept_pending``)
      stdin     /dev/null (the master runs detached); stdout/stderr: see below
      env       exactly ``env`` plus GENERATION (octal), MAIL_CONFIG (when
                ``config_dir`` is given) and MAIL_LOGTAG=postfix unless ``env`` sets
                them. No PATH, as from the real master.

    Constructor (keywords after argv):
      argv          the child's command; argv[0] must be an executable path
      env           environment (default: LANG=C only, plus the above)
      config_dir    MAIL_CONFIG for the child
      socket_path   where the listen socket goes (default: a fresh temporary dir)
      generation    the number sent as GENERATION (default 0o123, i.e. "123")
      backlog       listen backlog (default 100, the master's default_process_limit)
      listener      a listening socket to share (default: a new one): two stand-ins
                    given the same socket start two sibling children, as the master
                    does for a service with a process limit above 1
      status_fd     False: give the child no fd 5 (a degraded test run)
      stdout, stderr  what subprocess.Popen accepts (default: PIPE for both)
      cwd           working directory of the child (default: the repository root)

    Methods: ``start``/``stop`` (also the context manager), ``connect``,
    ``read_status``, ``expect_no_status``, ``close_status``, ``accept_pending``,
    ``wait``, ``pid``, ``child`` (the Popen object), ``output`` (stdout, stderr
    after the child exited).
"""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from master.status import STATUS_SIZE, StatusMessage, unpack_status

REPO_ROOT = Path(__file__).resolve().parents[2]

# Descriptor numbers in the child, as the real master arranges them.
CHILD_FLOW_READ, CHILD_FLOW_WRITE, CHILD_STATUS, CHILD_LISTEN = 3, 4, 5, 6
# Parent-side copies are moved up here first so that dup2 never clobbers a source.
_HIGH_FD = 100


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs a module of this repository with the current interpreter."""
    return [sys.executable, "-m", module, *args]


class StandinMaster:
    """One child spawned with the master's descriptors; see the module docstring."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        config_dir: str | os.PathLike | None = None,
        socket_path: str | os.PathLike | None = None,
        generation: int = 0o123,
        backlog: int = 100,
        status_fd: bool = True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd: str | os.PathLike | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.generation = generation
        self.backlog = backlog
        self.with_status_fd = status_fd
        self.stdout_spec = stdout
        self.stderr_spec = stderr
        self.cwd = str(cwd or REPO_ROOT)
        self._tempdir: str | None = None
        self.shared_listener = listener
        if listener is not None:
            socket_path = listener.getsockname()
        elif socket_path is None:
            self._tempdir = tempfile.mkdtemp(prefix="standin-master-")
            socket_path = os.path.join(self._tempdir, "service")
        self.socket_path = str(socket_path)
        self.env = {"LANG": "C", "MAIL_LOGTAG": "postfix"}
        if config_dir is not None:
            self.env["MAIL_CONFIG"] = str(config_dir)
        self.env.update(env or {})
        self.env.setdefault("GENERATION", format(generation, "o"))
        self.child: subprocess.Popen | None = None
        self.listener: socket.socket | None = None
        self.status: socket.socket | None = None
        self._output: tuple[bytes, bytes] | None = None

    # -- life cycle --------------------------------------------------------------

    def __enter__(self) -> StandinMaster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> StandinMaster:
        if self.shared_listener is not None:
            self.listener = self.shared_listener.dup()  # ours to close in stop()
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
            self.listener.bind(self.socket_path)
            self.listener.listen(self.backlog)
        self.listener.setblocking(False)
        flow_read, flow_write = os.pipe()
        sources = [flow_read, flow_write]
        child_status = None
        if self.with_status_fd:
            self.status, child_status = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            sources.append(child_status.fileno())
        sources.append(self.listener.fileno())
        targets = [CHILD_FLOW_READ, CHILD_FLOW_WRITE]
        targets += [CHILD_STATUS] if self.with_status_fd else []
        targets.append(CHILD_LISTEN)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD) for fd in sources]

        def place_descriptors() -> None:
            # Runs in the child between fork and exec. dup2 clears close-on-exec on
            # the target; everything else Python opened is close-on-exec already.
            for source, target in zip(high, targets, strict=True):
                os.dup2(source, target)
            if not self.with_status_fd and _fd_open(CHILD_STATUS):
                os.close(CHILD_STATUS)

        try:
            self.child = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self.stdout_spec,
                stderr=self.stderr_spec,
                env=self.env,
                cwd=self.cwd,
                close_fds=False,
                preexec_fn=place_descriptors,
            )
        finally:
            for fd in high + [flow_read, flow_write]:
                os.close(fd)
            if child_status is not None:
                child_status.close()
        if self.status is not None:
            self._start_status_reader()
        return self

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
        if self.child is not None:
            self._collect_output(timeout=5)
        self.close_status()
        if self.listener is not None:
            self.listener.close()
        self.listener = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    @property
    def pid(self) -> int:
        assert self.child is not None, "not started"
        return self.child.pid

    def wait(self, timeout: float = 5.0) -> int:
        """The child's exit status (raises subprocess.TimeoutExpired)."""
        assert self.child is not None, "not started"
        self._collect_output(timeout)
        return self.child.returncode

    def _collect_output(self, timeout: float) -> None:
        if self._output is None:
            stdout, stderr = self.child.communicate(timeout=timeout)
            self._output = (stdout or b"", stderr or b"")

    def output(self) -> tuple[bytes, bytes]:
        """(stdout, stderr) of the exited child (PIPE mode only)."""
        self.wait()
        return self._output

    def alive(self) -> bool:
        return self.child is not None and self.child.poll() is None

    # -- clients -------------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A client connection to the service socket (blocking, with timeout)."""
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(timeout)
        client.connect(self.socket_path)
        return client

    def accept_pending(self) -> socket.socket | None:
        """Take a connection still waiting in the backlog (None if there is none)."""
        try:
            connection, _ = self.listener.accept()
        except BlockingIOError:
            return None
        return connection

    # -- status socket ---------------------------------------------------------------

    def _start_status_reader(self) -> None:
        """Read status messages as they come, like the master: a child whose status
        writes are not read would block once the socket buffer is full."""
        self._messages: queue.Queue[StatusMessage | None] = queue.Queue()

        def reader(sock: socket.socket, messages: queue.Queue) -> None:
            data = b""
            while True:
                try:
                    chunk = sock.recv(4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    messages.put(None)
                    return
                data += chunk
                while len(data) >= STATUS_SIZE:
                    messages.put(unpack_status(data[:STATUS_SIZE]))
                    data = data[STATUS_SIZE:]

        self._reader = threading.Thread(
            target=reader, args=(self.status, self._messages), daemon=True
        )
        self._reader.start()

    def read_status(self, timeout: float = 5.0) -> StatusMessage:
        """The next 12-byte status message (TimeoutError / EOFError otherwise)."""
        assert self.with_status_fd, "child has no status fd"
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no status message within {timeout}s") from None
        if message is None:
            self._messages.put(None)  # stays at end of stream
            raise EOFError("status socket closed")
        return message

    def expect_no_status(self, timeout: float = 0.3) -> bool:
        """True when no status message arrives within timeout (end of stream counts)."""
        assert self.with_status_fd, "child has no status fd"
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            return True
        if message is None:
            self._messages.put(None)
            return True
        return False

    def close_status(self) -> None:
        """Close the master end of fd 5, as a reload or a dying master does."""
        if self.status is not None:
            try:
                self.status.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._reader.join(timeout=5)
            self.status.close()
            self.status = None


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
