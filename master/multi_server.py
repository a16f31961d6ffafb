"""The child side of master(8): a multi-client server skeleton on asyncio.

NAME
    multi_server -- run a Service as a Postfix daemon (Postfix's multi_server)

SYNOPSIS
    from master.multi_server import ClientProtocol, run

    class EchoProtocol(ClientProtocol):
        def data_received(self, data):
            self.server.request_started()
            self.transport.write(data)
            self.server.request_done()

    run(my_service)             # argv defaults to sys.argv; never returns

DESCRIPTION
    ``run`` does what a Postfix multi-threaded daemon does between exec and exit
    (``docs/PROTOCOL.md`` section 4.6):

    1.  Take note of the inherited descriptors (5: status socket, 6..: listen
        sockets) before anything else can reuse those numbers; honour MAIL_VERBOSE;
        ignore SIGPIPE and SIGXFSZ; SIGINT terminates quietly (see below); log to
        syslog under $MAIL_LOGTAG.
    2.  Parse the command line (``master.args``), read main.cf with the ``-o``,
        ``-i``, ``-m`` overrides, and log as main.cf says (``master.log``).
    3.  Refuse a terminal on stdin unless ``-d`` or ``-S``; parse GENERATION.
    4.  chdir($queue_directory), ``service.pre_init``, privilege drop and chroot
        (``-u``/``-c``), ``service.post_init``.
    5.  ``-S``: ``service.serve_standalone(server, stdin, stdout)``, exit 0.
    6.  Otherwise the event loop (uvloop when it is installed, else asyncio;
        $PYPROXYMAP_EVENT_LOOP or main.cf ``pyproxymap_event_loop`` = ``asyncio`` or
        ``uvloop`` chooses): accept on the listen
        sockets, exit 0 when fd 5 becomes readable (the master reloaded or died,
        even with clients connected), after ``max_use`` closed connections once none
        is open, or after ``max_idle`` seconds without any connection.

    Accepting, in Postfix's order: cancel the idle timer if nothing is open,
    ``service.pre_accept`` (which may call ``server.exit``: the connection then
    stays in the kernel backlog for a sibling or successor), ``accept`` (EAGAIN is
    silent: a sibling won the race), then the connection goes to the service's
    protocol (a ``ClientProtocol``), whose ``connection_made`` is the post-accept hook.
    A worker that already has N clients waits N ms (at most 3 ms; a saturated
    worker always 4 ms) before it accepts, so that a new client goes to the least
    loaded worker awake. In a flood (clients still waiting after 32 such waits in a
    row) it takes a growing batch of clients (up to 128) after each wait, so that a
    new client does not wait for each of the clients ahead of it (``Backlog``).

    Status: the service calls ``server.request_started()`` and
    ``server.request_done()`` around each request it serves. The master hears TAKEN
    only from a saturated process -- one whose requests wait for a backend at its
    bound (``service.waiting_for_backends``), or busy nine tenths of the time (a
    moving average over about 50 ms) with its loop on the CPU nine tenths of that
    busy time -- when a client waits to be accepted (a failure is ignored), and
    AVAIL when it is no longer saturated or a whole turn of the event
    loop found no new request (a failure means the master is gone, so the process
    exits 0). Other work is reported after it is done, TAKEN and AVAIL in one
    write per loop turn, for the first turns of a busy spell: a client that waits
    for each reply still sees TAKEN and AVAIL around every request, as from
    Postfix, and a steady load that one process carries makes the master spawn
    nothing. See the comment above ``MultiServer.request_started`` for why this is
    what the master needs.

    Without fd 5 (a test harness, or run by hand with ``-d``) no status is written
    and nothing is watched; a missing listen socket is fatal.

    Signals: SIGINT and SIGTERM end the process at once and silently, as they end a
    Postfix daemon (which leaves both at their defaults), not with a Python
    KeyboardInterrupt traceback: ``run`` restores the default before anything else.
    A master in the foreground starts its children with SIGINT ignored (Ctrl-C
    reaches its whole process group, also a worker still importing its modules,
    before ``run``); ``run`` leaves that as it is, and the master's own fast stop
    ends them with SIGTERM.

EXIT STATUS
    0 in every normal case, including a master that went away. 1 only for fatal
    configuration or command-line errors, as a Postfix daemon (which makes the
    master throttle the service if it happens before the first request).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from master import log as postfix_log
from master.args import ChildArgsError, ChildOptions, parse_child_args
from master.mainconf import MainConfig, MainConfigError, to_int
from master.privs import PrivilegeError, drop_privileges
from master.status import (
    FLOW_READ_FD,
    LISTEN_FD,
    STATUS_FD,
    GenerationError,
    StatusChannel,
    parse_generation,
)

if TYPE_CHECKING:
    from master.service import Service

log = logging.getLogger("master")

EVENT_LOOP_ENV = "PYPROXYMAP_EVENT_LOOP"
EVENT_LOOP_PARAMETER = "pyproxymap_event_loop"
# How long (microseconds) an idle loop keeps polling for the next request before it
# sleeps, after a short wait for the last one (MultiServer._poll_for_next_request).
POLL_WINDOW_PARAMETER = "pyproxymap_poll_window"
DEFAULT_POLL_WINDOW_US = 50


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _fd_is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


class ClientProtocol(asyncio.Protocol):
    """Base class of a service's connection protocol: the skeleton's bookkeeping.

    Subclasses that override ``connection_made``, ``connection_lost``,
    ``pause_writing`` or ``resume_writing`` must call ``super()``.

    ``connection_made`` counts the connection; ``connection_lost`` counts it closed
    (max_use) and restarts the idle timer when it was the last one. Output that
    cannot be delivered for ``ipc_timeout`` seconds (the client stopped reading)
    aborts the connection, as Postfix's stream timeout would. A service that waits
    for the rest of a partial request calls ``input_pending(True)`` and, once it has
    the whole request, ``input_pending(False)``: a client that stalls in between
    for ``ipc_timeout`` seconds is disconnected too. ``io_timeout(what)`` is called
    on either timeout (what = "read" or "write"); the default aborts the connection.
    """

    def __init__(self, server: MultiServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Any data the kernel does not take at once counts as a possible stall.
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        self.server._connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._write_timer, self._read_timer):
            if timer is not None:
                timer.cancel()
        self._write_timer = self._read_timer = None
        self.server._connection_lost(self)

    def pause_writing(self) -> None:
        if self._write_timer is None:
            self._write_timer = self._ipc_timer("write")

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def input_pending(self, pending: bool) -> None:
        """Start (True) or stop (False) the ipc_timeout clock for a partial request."""
        if pending and self._read_timer is None:
            self._read_timer = self._ipc_timer("read")
        elif not pending and self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _ipc_timer(self, what: str) -> asyncio.TimerHandle:
        # server.loop, not active_loop: test harnesses stand in for the server with
        # just the attributes a protocol uses.
        loop = self.server.loop
        assert loop is not None, "a connection without an event loop"
        return loop.call_later(self.server.ipc_timeout, self._timed_out, what)

    def _timed_out(self, what: str) -> None:
        if what == "write":
            self._write_timer = None
        else:
            self._read_timer = None
        self.io_timeout(what)

    def io_timeout(self, what: str) -> None:
        if self.transport is not None:
            self.transport.abort()


class MultiServer:
    """One child process: its options, configuration, descriptors and event loop.

    Public attributes: ``config`` (MainConfig), ``options`` (ChildOptions),
    ``service_name``, ``process_name``, ``transport_type``, ``verbose``,
    ``standalone``, ``generation``, ``loop`` (None before ``serve``), ``max_use``,
    ``max_idle``, ``ipc_timeout`` (seconds), ``open_connections``,
    ``connections_closed``, ``listen_sockets``, ``status_fd`` (None without fd 5),
    ``status`` (StatusChannel), ``exiting``, ``requests_in_progress``.
    Methods for the service: ``request_started()``, ``request_done()``,
    ``exit(status=0)``, ``on_exit(callback)``, ``set_process_title(status)``.

    ``exit`` ends the process with ``os._exit`` after the ``on_exit`` callbacks and a
    logging flush: interpreter teardown (atexit, garbage collection of transports) is
    skipped, so a service that must close something (a database it writes) registers
    that with ``on_exit``.
    """

    def __init__(self, service: Service, argv: list[str]) -> None:
        self.service = service
        self.argv = list(argv)
        # Inherited descriptors first, before logging or imports open new ones.
        self.status_fd: int | None = STATUS_FD if _fd_is_socket(STATUS_FD) else None
        self.options: ChildOptions = ChildOptions(argv0=argv[0] if argv else "")
        self.process_name = self.options.process_name
        self.config: MainConfig = MainConfig()
        self.service_name: str = getattr(service, "name", "") or self.process_name
        self.transport_type: str | None = None
        self.verbose = 0
        self.standalone = False
        self.generation = 0
        self.status = StatusChannel(self.status_fd, 0)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.max_use = 0
        self.max_idle = 0
        self.ipc_timeout = 3600
        self.daemon_timeout = 0
        self.open_connections = 0
        self.connections_closed = 0
        self.listen_sockets: list[socket.socket] = []
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_remaining: float | None = None
        self._exit_status: int | None = None
        self._exit_callbacks: list[Callable[[], None]] = []
        self._loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        self._requests_in_progress = 0
        self._reported_busy = False  # the last status message sent was TAKEN
        self._busy_since: float | None = None  # when the busy spell began; None: idle
        self._young_turns = 0  # busy turns of this spell left that report their use
        self._load = 0.0  # share of time busy (see _load_at) at the end of the last spell
        self._load_time = time.monotonic()
        self._busy_time = 0.0  # seconds spent in busy spells that have ended
        # CPU time and busy time at the last two marks of _cpu_bound (the older first)
        self._cpu_marks = [(time.thread_time(), 0.0)] * 2
        self._idle_check_pending = False  # _check_idle is scheduled
        self.poll_window = DEFAULT_POLL_WINDOW_US / 1e6  # seconds; 0: sleep at once
        self._idle_since: float | None = None  # the end of the last busy spell
        self._keep_polling = True  # the last wait for a request was within the window
        self._polling = False  # _poll is scheduled
        self._started_this_turn = False  # a request started since the last _check_idle

    # -- start-up --------------------------------------------------------------

    def initialize(self) -> None:
        """Steps 1-4 of the life cycle; fatal errors exit 1."""
        self.verbose = 1 if "MAIL_VERBOSE" in os.environ else 0
        for name in ("SIGPIPE", "SIGXFSZ"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        postfix_log.setup_early(self.process_name, verbose=self.verbose)
        try:
            self.options = parse_child_args(self.argv)
        except ChildArgsError as error:
            if error.options is not None and error.options.log_to_stderr:
                postfix_log.setup_early(
                    self.process_name, stderr=True, verbose=self.verbose, tag_with_logtag=True
                )
            postfix_log.fatal("%s", error)
        self.process_name = self.options.process_name
        self.verbose += self.options.verbose
        self.standalone = self.options.standalone
        self.transport_type = self.options.transport
        self.service_name = self.options.service_name or self.process_name
        self._set_process_title()
        try:
            self.config = MainConfig.load(
                overrides=self.options.overrides,
                process_name=self.process_name,
                service_name=self.service_name,
            )
            postfix_log.setup(
                self.process_name,
                self.config,
                stderr=self.options.log_to_stderr,
                verbose=self.verbose,
            )
            self._read_parameters()
        except MainConfigError as error:
            postfix_log.fatal("%s", error)
        if not self.standalone and not self.options.foreground and _isatty(0):
            postfix_log.fatal("do not run this command by hand")
        try:
            self.generation = parse_generation(os.environ.get("GENERATION"))
        except GenerationError as error:
            postfix_log.fatal("%s", error)
        self.status = StatusChannel(self.status_fd, self.generation)
        self._protect_inherited_descriptors()
        queue_directory = self.config["queue_directory"]
        try:
            os.chdir(queue_directory)
        except OSError as error:
            postfix_log.fatal('chdir("%s"): %s', queue_directory, error.strerror)

    def _protect_inherited_descriptors(self) -> None:
        """The master's descriptors must not leak into programs a service may run."""
        last_listen = LISTEN_FD + self.options.socket_count
        for fd in (*range(FLOW_READ_FD, STATUS_FD + 1), *range(LISTEN_FD, last_listen)):
            if _fd_is_open(fd):
                os.set_inheritable(fd, False)

    def _read_parameters(self) -> None:
        self.max_use = self.config.get_int("max_use")
        self.max_idle = self.config.get_time("max_idle")
        self.ipc_timeout = self.config.get_time("ipc_timeout")
        self.daemon_timeout = self.config.get_time("daemon_timeout")
        window = self.config.get(POLL_WINDOW_PARAMETER)
        micros = to_int(POLL_WINDOW_PARAMETER, window) if window else DEFAULT_POLL_WINDOW_US
        self.poll_window = max(micros, 0) / 1e6

    def _set_process_title(self) -> None:
        """What ps shows for a Postfix daemon: basename(argv[0]) and the arguments."""
        self.set_process_title()

    def set_process_title(self, status: str = "") -> None:
        """The daemon's title, followed by ``status`` (a live summary) when given."""
        try:
            import setproctitle
        except ImportError:
            return
        title = " ".join([self.process_name, *self.argv[1:]])
        setproctitle.setproctitle(f"{title} {status}" if status else title)

    @property
    def active_loop(self) -> asyncio.AbstractEventLoop:
        """``loop``, for the code that runs only once ``serve`` has made it."""
        loop = self.loop
        assert loop is not None, "the event loop is not made yet"
        return loop

    @property
    def requests_in_progress(self) -> int:
        """Requests started and not yet done (``request_started``/``request_done``)."""
        return self._requests_in_progress

    def drop_privileges(self) -> None:
        if not self.standalone:
            self.choose_event_loop()  # imports while still root (see there)
        user = self.config["mail_owner"] if self.options.drop_privileges else None
        root_dir = self.config["queue_directory"] if self.options.chroot else None
        if user is None and root_dir is None:
            return
        try:
            drop_privileges(user, root_dir)
        except PrivilegeError as error:
            postfix_log.fatal("%s", error)

    # -- status notifications -----------------------------------------------------
    #
    # The master keeps one bit per child, busy or idle, and acts on it in one place:
    # while no child is idle it watches the listen socket itself, and a connection
    # left waiting there makes it spawn another child (up to the process limit).
    # A Postfix daemon serves one request at a time and says TAKEN before each and
    # AVAIL after it. A worker that multiplexes clients takes a new client within a
    # loop turn even while it works: a sibling helps only once it is saturated:
    # either its requests queue for a backend at its bound (the service says so:
    # a sibling brings connections of its own), or its loop is busy SATURATED_LOAD of
    # the time (a moving average over about LOAD_TIME_CONSTANT; a busy spell runs
    # from a request after an idle loop turn to the next loop turn that finds no
    # work) and its thread was on the CPU SATURATED_LOAD of that busy time. A busy
    # worker off the CPU waits for backends that have room, or for a CPU that other
    # processes hold: a sibling would answer nobody sooner. So:
    #
    # * The master hears TAKEN only from a saturated worker, and then only when it
    #   matters: when a client waits to be accepted (the master may then spawn for
    #   it, and this worker lets its siblings accept first, see _accept_delay).
    #   AVAIL as soon as it is no longer saturated or at the end of the spell.
    # * The rest of the work is reported as it is done: after a turn that served
    #   requests, TAKEN and AVAIL in one write (a "use"; it gives the master nothing
    #   to act on), for the first YOUNG_TURNS turns of a spell. A client that waits
    #   for each reply so sees Postfix's TAKEN and AVAIL around every request (after
    #   its reply, which they no longer delay); clients that keep the loop busy cost
    #   a few messages per spell.
    # * AVAIL at the end of a spell is the last callback before the loop would sleep.
    # * A slow (asynchronous) request in progress keeps the spell going, like a slow
    #   table in Postfix; it saturates the worker only through the backend's bound.
    #
    # A steady load that one worker carries therefore never makes the master spawn,
    # however many clients connect meanwhile; once one worker is saturated the next
    # client brings up a sibling, and the new clients go to the sibling.

    LOAD_TIME_CONSTANT = 0.05  # seconds; from idle, 0.12 s of work make 0.9
    SATURATED_LOAD = 0.9
    YOUNG_TURNS = 2

    def request_started(self) -> None:
        """A request starts (a busy spell, if the loop was idle: see above)."""
        self._requests_in_progress += 1
        self._started_this_turn = True
        if self._busy_since is None:
            self._busy_since = now = time.monotonic()
            self._young_turns = self.YOUNG_TURNS
            if self._idle_since is not None:
                self._keep_polling = now - self._idle_since < self.poll_window
                self._idle_since = None

    def request_done(self) -> None:
        """A request is done: its use is reported after the loop turn (see above)."""
        self._requests_in_progress -= 1
        if self._requests_in_progress or self._idle_check_pending or self._busy_since is None:
            return
        loop = self.loop
        if loop is None or not loop.is_running():
            self._report_turn()  # no loop turn to wait for (-S, tests)
            self._end_busy_spell()
            return
        self._idle_check_pending = True
        loop.call_soon(self._check_idle)

    def _check_idle(self) -> None:
        """Runs once per busy loop turn until a turn started no request, then AVAIL."""
        if self._requests_in_progress:
            self._idle_check_pending = False  # request_done will schedule it again
            return
        if self._started_this_turn:
            self._started_this_turn = False
            if self._young_turns:
                self._young_turns -= 1
                self._report_turn()
            self.active_loop.call_soon(self._check_idle)  # runs after the next turn's poll
            return
        self._idle_check_pending = False
        self._end_busy_spell()

    def _report_turn(self) -> None:
        """A turn of a young spell served requests: a use, unless the master already
        hears TAKEN (a saturated worker: a client is waiting, see _accept_ready)."""
        if not self._reported_busy and not self.status.used():
            self.exit(0)  # the master is gone

    def _end_busy_spell(self) -> None:
        now = time.monotonic()
        self._load = self._load_at(now)
        self._load_time = now
        if self._busy_since is not None:
            self._busy_time += now - self._busy_since
        self._busy_since = None
        self._report_busy(False)
        self._poll_for_next_request(now)

    # -- polling before sleeping ---------------------------------------------------
    #
    # A loop without work sleeps in the kernel until the next request, and the CPU it
    # ran on may go idle: waking it again costs more than serving a lookup (a virtual
    # CPU halts and the host must resume it; real CPUs leave a power-saving state), and
    # the client waits for that too. So when the last wait for a request was shorter
    # than the poll window, the loop keeps polling (its poll with no timeout, as while
    # a callback is ready) for up to that long before it sleeps: a client that waits
    # for each reply and asks again at once finds the worker awake. Clients that pause
    # longer cost one window, then none until a wait is short again. Linux's guest
    # halt-polling makes the same bet one level down.

    def _poll_for_next_request(self, now: float) -> None:
        self._idle_since = now
        loop = self.loop
        if not self._keep_polling or not self.poll_window or self._polling:
            return
        if loop is not None and loop.is_running():
            self._polling = True
            loop.call_soon(self._poll)

    def _poll(self) -> None:
        """One more loop turn without sleeping, until the window closes or a request
        came (a busy spell began: its end polls again)."""
        idle_since = self._idle_since
        if idle_since is not None and time.monotonic() - idle_since < self.poll_window:
            self.active_loop.call_soon(self._poll)
        else:
            self._polling = False

    def _load_at(self, now: float) -> float:
        """The share of the recent past spent busy (exponentially weighted): the load
        as of the end of the last spell, decayed over the idle time since then and
        raised over the current spell."""
        busy_since = self._busy_since
        tau = self.LOAD_TIME_CONSTANT
        idle_until = now if busy_since is None else busy_since
        load = self._load * math.exp((self._load_time - idle_until) / tau)
        if busy_since is not None:
            load = 1.0 + (load - 1.0) * math.exp((busy_since - now) / tau)
        return load

    def _saturated(self) -> bool:
        """A request waits for a backend at its bound, or the process was busy nine
        tenths of the recent past and on the CPU nine tenths of that busy time."""
        busy_since = self._busy_since
        if busy_since is None:
            return False
        if self.service.waiting_for_backends(self):
            return True
        now = time.monotonic()
        return self._load_at(now) >= self.SATURATED_LOAD and self._cpu_bound(now - busy_since)

    def _cpu_bound(self, spell: float) -> bool:
        """The CPU time the loop's thread used per second of busy time, over the last
        one to two LOAD_TIME_CONSTANTs of busy time, is SATURATED_LOAD or more (the
        threads of blocking drivers say so through waiting_for_backends). SPELL: the
        length of the spell in progress."""
        cpu = time.thread_time()
        busy = self._busy_time + spell
        marks = self._cpu_marks
        tau = self.LOAD_TIME_CONSTANT
        if busy - marks[1][1] >= tau:  # a new mark; the window starts at the last one
            marks[0], marks[1] = marks[1], (cpu, busy)
        cpu_mark, busy_mark = marks[0]
        span = busy - busy_mark
        return span > 0.0 and (cpu - cpu_mark) / span >= self.SATURATED_LOAD

    def _report_busy(self, busy: bool) -> None:
        """Tell the master TAKEN (busy) or AVAIL, when that is news to it."""
        if busy == self._reported_busy:
            return
        self._reported_busy = busy
        if busy:
            self.status.taken()  # a failure is ignored, as in Postfix
        elif not self.status.available():
            self.exit(0)  # the master is gone

    # -- exit ------------------------------------------------------------------

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Run callback (no arguments) when the process exits through ``exit``."""
        self._exit_callbacks.append(callback)

    def exit(self, status: int = 0) -> None:
        """Leave the process with status. Inside the running loop, the loop stops
        first (promptly, open connections are dropped) and ``run`` exits."""
        if self.loop is not None and self.loop.is_running():
            if self._exit_status is None:
                self._exit_status = status
            self.loop.stop()
            return
        self._finish(status)

    def _finish(self, status: int) -> NoReturn:
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("exit handler failed")
        logging.shutdown()
        sys.stdout.flush()
        # Skip interpreter teardown of transports and the loop: the work is done.
        os._exit(status)

    @property
    def exiting(self) -> bool:
        return self._exit_status is not None

    # -- the event loop --------------------------------------------------------------

    def choose_event_loop(self) -> None:
        """uvloop when installed (much faster than asyncio on our hot path), unless
        $PYPROXYMAP_EVENT_LOOP or main.cf says ``asyncio``.

        Called before the privilege drop: once running as mail_owner, a Python
        installation only root can read would make the import fail (silently
        giving asyncio), as it would outside a chroot.
        """
        wanted = os.environ.get(EVENT_LOOP_ENV) or self.config.get(EVENT_LOOP_PARAMETER, "")
        wanted = wanted.strip().lower()
        self._loop_factory = asyncio.new_event_loop
        if wanted == "asyncio":
            return
        try:
            import uvloop
        except ImportError:
            if wanted == "uvloop":
                log.warning("%s=uvloop: uvloop is not installed, using asyncio", EVENT_LOOP_ENV)
        else:
            self._loop_factory = uvloop.new_event_loop

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop_factory is None:
            self.choose_event_loop()
        assert self._loop_factory is not None
        return self._loop_factory()

    def open_listen_sockets(self) -> None:
        for fd in range(LISTEN_FD, LISTEN_FD + self.options.socket_count):
            if not _fd_is_socket(fd):
                postfix_log.fatal(
                    "listen socket fd %d: %s",
                    fd,
                    "not open" if not _fd_is_open(fd) else "not a socket",
                )
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.listen_sockets.append(sock)

    def serve(self) -> NoReturn:
        """Step 6: the event loop until a reason to exit."""
        self.open_listen_sockets()
        loop = self.loop = self.new_event_loop()
        asyncio.set_event_loop(loop)
        self._protocol_factory = self.service.protocol_factory(self)
        for sock in self.listen_sockets:
            backlog = Backlog(sock)
            loop.add_reader(backlog.fd, self._accept_ready, backlog)
        if self.status_fd is not None:
            loop.add_reader(self.status_fd, self._master_gone)
            # libuv (uvloop) makes a polled descriptor non-blocking. Postfix writes
            # status messages blocking: a busy master must delay us, not lose AVAIL.
            os.set_blocking(self.status_fd, True)
        self._start_idle_timer()
        self._start_watchdog()
        self._cpu_marks = [(time.thread_time(), 0.0)] * 2  # start-up is nobody's request
        try:
            loop.run_forever()
        finally:
            status = self._exit_status if self._exit_status is not None else 0
        self._finish(status)

    def _master_gone(self) -> None:
        # Readable means EOF or junk: either way the master no longer wants us.
        if self.verbose:
            log.info("master disconnect -- exiting")
        self.exit(0)

    def _start_watchdog(self) -> None:
        """Kill the process if the loop stops turning for daemon_timeout seconds."""
        if self.daemon_timeout <= 0 or not hasattr(signal, "alarm"):
            return
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        interval = max(1, self.daemon_timeout // 2)

        def rearm() -> None:
            signal.alarm(self.daemon_timeout)
            self.active_loop.call_later(interval, rearm)

        rearm()

    # -- idle timer: runs only while no connection is open -----------------------------

    def _start_idle_timer(self, delay: float | None = None) -> None:
        if self.max_idle <= 0:
            return
        self._cancel_idle_timer()
        self._idle_timer = self.active_loop.call_later(
            self.max_idle if delay is None else max(0.0, delay), self._idle_expired
        )

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_remaining = self._idle_timer.when() - self.active_loop.time()
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.verbose:
            log.info("idle timeout -- exiting")
        self.exit(0)

    # -- accepting -------------------------------------------------------------------

    # A new client wakes every worker that polls the listen socket, and the first
    # to call accept() gets it. Left at that, one worker can collect all the
    # clients of a burst (the others woke a moment later) and use one CPU while
    # its siblings idle. So a worker that already has clients lets the others go
    # first, longer the more clients it has: new clients go to the least loaded
    # worker that is awake. A saturated worker waits the longest: it has asked the
    # master for a sibling (TAKEN), and the sibling should get the new clients. The
    # wait is short and bounded; a client nobody else takes is accepted after it.
    #
    # The wait is counted in whole milliseconds: the loops can wait no less. libuv
    # keeps its timers in milliseconds and uvloop rounds a delay to the nearest one
    # (under 0.5 ms: no wait at all), and asyncio's epoll rounds a timeout up. A
    # wait of 50 us per client, as it once was, let a uvloop worker take the first
    # ten clients of a burst at once (the benchmark's 16 clients often went 12 to 4).
    ACCEPT_DELAY_STEP = 0.001  # per client the worker has
    ACCEPT_DELAY_STEPS = 3  # at most, unless saturated
    ACCEPT_DELAY_MAX = 0.004  # saturated: longer than any sibling that is not

    # A flood is different: thousands of clients connect at once, the backlog stays
    # full, and one wait per client puts a new client behind the whole backlog
    # (100 clients x 3 ms). So once clients were still waiting after many waits in
    # a row (more than a burst the siblings share leaves), the wait is per batch
    # of clients, and the batch doubles while clients keep waiting: see Backlog.
    # Siblings that are flooded too wait and grow alike, so they still share the
    # clients; a less loaded one waits less, so it still takes more. (The load
    # stays the open connections, idle ones too: the clients of a burst have sent
    # nothing yet when the next ones are accepted.)

    def _accept_delay(self, saturated: bool) -> float:
        if saturated:
            return self.ACCEPT_DELAY_MAX  # any sibling that is not saturated goes first
        return min(self.open_connections, self.ACCEPT_DELAY_STEPS) * self.ACCEPT_DELAY_STEP

    def _accept_ready(self, backlog: Backlog) -> None:
        if self.exiting:
            return
        saturated = self._saturated()
        delay = self._accept_delay(saturated)
        if self._busy_since is not None:
            # A client waits: the master may spawn for it only if we are saturated.
            self._report_busy(saturated)
        if delay:
            # Stop polling meanwhile: the socket stays readable until someone accepts.
            self.active_loop.remove_reader(backlog.fd)
            self.active_loop.call_later(delay, self._accept_after_delay, backlog)
            return
        self._accept(backlog.sock)

    def _accept_after_delay(self, backlog: Backlog) -> None:
        if self.exiting:
            return
        loop = self.active_loop
        loop.add_reader(backlog.fd, self._accept_ready, backlog)
        for _ in range(backlog.batch_size(loop.time())):
            if not self._accept(backlog.sock):  # a sibling was faster, or none left
                backlog.drained()
                return
        if backlog.clients_waiting():
            backlog.still_deep(loop.time())
        else:
            backlog.drained()

    def _accept(self, listen_socket: socket.socket) -> bool:
        """Accept one client; False when there was none (or the process exits)."""
        was_idle = self.open_connections == 0
        if was_idle:
            self._cancel_idle_timer()
        self.service.pre_accept(self)
        if self.exiting:
            return False
        try:
            connection, _ = listen_socket.accept()
        except (BlockingIOError, InterruptedError):
            connection = None  # a sibling was faster: normal, silent
        except OSError as error:
            log.error("accept connection: %s", error.strerror)
            connection = None
        if connection is None:
            if was_idle and self.open_connections == 0:
                self._start_idle_timer(self._idle_remaining)
            return False
        connection.setblocking(False)
        # Counted now, not in connection_made: that runs one loop turn later.
        self.open_connections += 1
        loop = self.active_loop
        task = loop.create_task(loop.connect_accepted_socket(self._protocol_factory, connection))
        task.add_done_callback(self._connection_setup_done)
        return True

    def _connection_setup_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("connection setup: %s", task.exception())
            self._connection_closed()

    def _connection_made(self, protocol: ClientProtocol) -> None:
        if self.verbose > 1:
            log.info("connection established")

    def _connection_lost(self, protocol: ClientProtocol) -> None:
        self._connection_closed()

    def _connection_closed(self) -> None:
        self.open_connections -= 1
        self.connections_closed += 1
        if self.open_connections > 0:
            return
        if self.max_use > 0 and self.connections_closed >= self.max_use:
            if self.verbose:
                log.info("use limit -- exiting")
            self.exit(0)
            return
        self._start_idle_timer()


class Backlog:
    """A listen socket, and how many clients to accept there after each wait.

    One, until clients were still waiting after DEEP_AFTER waits in a row: a burst
    that two siblings share takes fewer (two workers split a burst of 64 with 32
    waits each). From then on twice as many after each wait that leaves clients
    waiting, up to BATCH_MAX. A wait after which none is left halves the batch: a
    flood whose clients come a little slower than they are taken stays a flood.
    After QUIET seconds without clients left waiting the flood is over: one again.
    """

    DEEP_AFTER = 32
    BATCH_MAX = 128  # more than the master's listen backlog (100): one wait takes all
    QUIET = 0.1

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = 1
        self.deep_waits = 0  # waits in a row after which clients were still waiting
        self.deep_at = 0.0  # loop time of the last of those
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def clients_waiting(self) -> bool:
        """A client is waiting to be accepted (the listen socket is readable)."""
        return bool(self._poll.poll(0))

    def batch_size(self, now: float) -> int:
        """How many clients to accept after the wait that ends now."""
        if now - self.deep_at > self.QUIET:
            self.batch = 1
            self.deep_waits = 0
        return self.batch

    def still_deep(self, now: float) -> None:
        self.deep_at = now
        self.deep_waits += 1
        if self.deep_waits >= self.DEEP_AFTER:
            self.batch = min(self.batch * 2, self.BATCH_MAX)

    def drained(self) -> None:
        self.batch = max(1, self.batch // 2)
        if self.batch == 1:
            self.deep_waits = 0


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def quiet_interrupt() -> None:
    """SIGINT at its default, as in a Postfix daemon: death by signal, no traceback
    (unless the master started us with SIGINT ignored: then it stays ignored)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(service: Service, argv: list[str] | None = None) -> NoReturn:
    """The whole life of a child process serving ``service``; never returns.

    ``-h`` or ``--help`` as the only argument prints the service module's manual
    page (its docstring) and exits 0: no daemon is ever started that way, and a
    Postfix administrator tries ``-h`` first.
    """
    quiet_interrupt()
    argv = list(sys.argv if argv is None else argv)
    if argv[1:] in (["-h"], ["--help"]):
        module = sys.modules.get(type(service).__module__)
        sys.stdout.write(inspect.cleandoc(getattr(module, "__doc__", None) or "") + "\n")
        sys.exit(0)
    server = MultiServer(service, argv)
    server.initialize()
    service.pre_init(server)
    server.drop_privileges()
    service.post_init(server)
    if server.standalone:
        service.serve_standalone(server, sys.stdin.buffer, sys.stdout.buffer)
        server.exit(0)
    server.serve()
