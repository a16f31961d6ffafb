"""The supervisor: one loop that spawns, counts, reaps, reloads and stops service children.

NAME
    arbiter -- a pre-forking Postfix master(8) for the services of master.cf

SYNOPSIS
    arbiter = Arbiter(config_dir, foreground=True)
    arbiter.setup()          # config, directories, pid lock, sockets (before daemonizing)
    sys.exit(arbiter.run())  # the main loop, until SIGTERM/SIGINT/SIGQUIT

DESCRIPTION
    ``setup`` reads main.cf and master.cf, creates ``$queue_directory/{private,public,pid}``
    when missing, takes the lock on ``pid/master.pid`` and opens every listen socket and
    one status socketpair per service, plus the global flow-control pipe and the control
    socket (``control``). Nothing is spawned yet, so that a daemonizing caller can fork
    in between and keep these descriptors (``preserved_fds``).

    ``run`` installs the signal wake-up pipe (``sig``), starts the pre-forked workers and
    loops on one selector: the signal pipe, each service's status socket, the listen
    sockets of services that currently need a new child (``avail``), and the control
    socket. Each pass ends with ``waitpid(-1, WNOHANG)`` until no child is left to reap,
    then restores the pre-fork minimum. See ``avail`` for when a child is spawned.

    Signals (handled in the loop, never in a handler):

    SIGHUP   reload: re-read both files; a new generation; every surviving service gets
             a fresh status socketpair (the old one is closed, so old children see EOF
             on fd 5 and exit 0); new children get the new argv/environment; listen
             sockets of surviving services are kept; removed services' children get
             SIGTERM. A configuration error keeps the running configuration.
    SIGTERM  graceful stop: stop spawning, close the status sockets, SIGTERM every child,
             wait for all of them (at most ``pyproxymap_stop_timeout``, default 10s,
             then SIGKILL; a second SIGTERM/SIGINT/SIGQUIT meanwhile kills the rest at
             once), exit 0. Deadlines use the monotonic clock: a step of the wall
             clock neither stalls nor hurries spawning, throttling or stopping.
    SIGINT, SIGQUIT
             fast stop: close the status sockets, SIGTERM every child, exit 0 without
             waiting (children that survive the signal still see EOF on fd 5).

    Like Postfix, the master leaves the socket files in ``private/`` and ``public/`` and
    the pid file in place when it stops (observed with master 3.7.11); the control
    socket is removed. A stale socket file is replaced at the next start.

    Child exits are logged as by Postfix: nothing for exit 0, ``warning: process <path>
    pid <n> exit status <s>`` or ``... killed by signal <s>`` otherwise, and when such a
    child had not completed one request: ``warning: <path>: bad command startup --
    throttling`` (no spawning and no listening for ``service_throttle_time``).

    Pre-forked workers that exit 0 less than a second after they were started without
    serving anything are not replaced at once but after one second: Postfix never
    replaces idle children, so it cannot spin; a pre-forking master could.

EXIT STATUS
    0 after a stop; ``EX_CONFIG`` (78) for a configuration error at startup;
    ``EX_TEMPFAIL`` (75) when another master holds the lock; 1 otherwise.

BUGS
    The ``wakeup`` column is parsed but no wake-up events are sent (proxymap needs none).
    Only ``unix``, ``unix-dgram`` and ``inet`` services can run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Iterable

from master.avail import ServiceState
from master.control import answer_one, control_path, open_control_socket
from master.listen import ListenError, open_listener, owner_ids, prepare_queue_directory
from master.mainconf import MainConfig, MainConfigError, to_seconds
from master.masterconf import (
    PREFORK_PARAMETER,
    SUPPORTED_TRANSPORTS,
    MasterConfigError,
    ServiceEntry,
    child_argv,
    child_environment,
    read_master_cf,
)
from master.pidfile import AlreadyRunning, PidFile
from master.preflight import configuration_problems
from master.sdnotify import Notifier
from master.spawn import ChildFds, spawn_child
from master.status import STATUS_SIZE, unpack_status

log = logging.getLogger("master")

EX_TEMPFAIL = 75
EX_CONFIG = 78
STOP_TIMEOUT_PARAMETER = "pyproxymap_stop_timeout"
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
DEFAULT_STOP_TIMEOUT = "10s"
# A pre-forked worker that exits 0 sooner than this, unused, is replaced only later.
QUICK_EXIT = 1.0
RESPAWN_DELAY = 1.0
MASTER_VERSION = "pyproxymap master"


class ArbiterError(RuntimeError):
    """Fatal at startup; ``exit_status`` is what the process should exit with."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def load_configuration(config_dir: str) -> tuple[MainConfig, list[ServiceEntry]]:
    """main.cf and master.cf, or ArbiterError(EX_CONFIG) naming file and line.

    Values every child would die of (``preflight``) are errors here already: start
    and reload refuse them instead of starting children that crash-loop.
    """
    try:
        main = MainConfig.load(config_dir)
        entries = read_master_cf(config_dir, main)
    except (MainConfigError, MasterConfigError) as err:
        raise ArbiterError(str(err), EX_CONFIG) from None
    problems = configuration_problems(main, entries)
    if problems:
        raise ArbiterError("\n".join(problems), EX_CONFIG)
    return main, entries


def default_prefork(main: MainConfig) -> int:
    value = main.get(PREFORK_PARAMETER, "")
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit():
        raise ArbiterError(f"bad {PREFORK_PARAMETER} value: {value!r}", EX_CONFIG)
    return int(value)


class Arbiter:
    """The master process."""

    # Made by ``run``, in the process that runs the loop (after daemonizing), like the
    # signal pipe; ``setup`` opens the rest.
    selector: selectors.BaseSelector

    def __init__(
        self,
        config_dir: str,
        *,
        foreground: bool = True,
        verbose: int = 0,
        notifier: Notifier | None = None,
    ) -> None:
        self.config_dir = os.path.abspath(config_dir)
        self.foreground = foreground
        self.verbose = verbose
        self.notifier = notifier or Notifier()
        self.generation = 1
        self.services: dict[tuple[str, str], ServiceState] = {}
        self.children: dict[int, ServiceState] = {}
        self.leaving: list[ServiceState] = []  # removed by a reload, children still alive
        self.respawn_hold: dict[tuple[str, str], float] = {}
        self.stopping = False
        self._listening: set[tuple[str, str]] = set()
        self.started = time.monotonic()

    # ------------------------------------------------------------------
    # Setup (before any fork)
    # ------------------------------------------------------------------

    def setup(self) -> None:
        main, entries = load_configuration(self.config_dir)
        self.main = main
        self.queue_directory = main["queue_directory"]
        if not os.path.isabs(self.queue_directory):
            raise ArbiterError(
                f"queue_directory must be absolute: {self.queue_directory!r}", EX_CONFIG
            )
        try:
            self.owner = owner_ids(main.get("mail_owner") or "postfix")
            prepare_queue_directory(self.queue_directory, self.owner, main.get("data_directory"))
        except OSError as err:
            raise ArbiterError(f"queue directory {self.queue_directory}: {err}") from None
        self.pidfile = PidFile(os.path.join(self.queue_directory, "pid", "master.pid"))
        try:
            self.pidfile.acquire()
        except AlreadyRunning as err:
            raise ArbiterError(f"{self.queue_directory}: {err}", EX_TEMPFAIL) from None
        self.flow_read, self.flow_write = os.pipe()
        self.control = open_control_socket(control_path(self.queue_directory))
        self._apply_main(main)
        for entry in entries:
            self._add_service(entry)

    def _apply_main(self, main: MainConfig) -> None:
        """Settings derived from main.cf, (re)computed at start and at every reload.

        Everything is computed before anything is assigned, so that a bad value leaves
        the running settings untouched.
        """
        try:
            throttle_time = main.get_time("service_throttle_time")
            stop_timeout = to_seconds(
                STOP_TIMEOUT_PARAMETER, main.get(STOP_TIMEOUT_PARAMETER) or DEFAULT_STOP_TIMEOUT
            )
            default_process_limit = main.get_int("default_process_limit")
        except (MainConfigError, ValueError) as err:
            raise ArbiterError(str(err), EX_CONFIG) from None
        prefork_default = default_prefork(main)
        self.main = main
        self.throttle_time = throttle_time
        self.stop_timeout = float(stop_timeout)
        self.default_process_limit = default_process_limit
        self.prefork_default = prefork_default
        self.daemon_directory = main.get("daemon_directory") or "/usr/lib/postfix/sbin"
        self.child_env = child_environment(main, self.generation, self.config_dir)

    def _runnable(self, entry: ServiceEntry) -> ServiceEntry:
        """Without root nobody can drop privileges or chroot: run as we are."""
        if os.geteuid() != 0 and (entry.unprivileged or entry.chroot):
            log.warning(
                "%s: not running as root: ignoring the unpriv and chroot columns of service %s",
                entry.where,
                entry.name,
            )
            return dataclasses.replace(entry, unprivileged=False, chroot=False)
        return entry

    def _service_fields(self, entry: ServiceEntry) -> dict:
        entry = self._runnable(entry)
        return {
            "entry": entry,
            "path": entry.executable(self.daemon_directory),
            "argv": child_argv(entry, foreground=self.foreground, verbose=self.verbose),
            "prefork": entry.prefork(self.prefork_default),
        }

    def _add_service(self, entry: ServiceEntry) -> ServiceState | None:
        if entry.transport not in SUPPORTED_TRANSPORTS:
            log.warning(
                "%s: service %s: transport %s is not supported -- skipped",
                entry.where,
                entry.name,
                entry.transport,
            )
            return None
        backlog = max(entry.maxproc, self.default_process_limit)
        try:
            listener = open_listener(entry, self.queue_directory, backlog, self.owner)
        except ListenError as err:
            raise ArbiterError(str(err)) from None
        status_master, status_child = socket.socketpair()
        status_master.setblocking(False)
        service = ServiceState(
            listener=listener,
            status_master=status_master,
            status_child=status_child,
            generation=self.generation,
            **self._service_fields(entry),
        )
        self.services[entry.identity] = service
        return service

    def preserved_fds(self) -> list[int]:
        """Descriptors a daemonizing caller must keep open across its fork."""
        fds = [self.pidfile.fileno(), self.flow_read, self.flow_write, self.control.fileno()]
        for service in self.services.values():
            fds += [
                service.listener.fileno(),
                service.status_master.fileno(),
                service.status_child.fileno(),
            ]
        return fds

    # ------------------------------------------------------------------
    # Main loop
    # ------------------------------------------------------------------

    def run(self) -> int:
        from master.sig import SignalPipe  # after daemonizing: handlers belong to this pid

        self.pidfile.write_pid()
        self.signals = SignalPipe()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.signals.fileno(), selectors.EVENT_READ, ("signal", None))
        self.selector.register(self.control, selectors.EVENT_READ, ("control", None))
        for service in self.services.values():
            self._watch_status(service)
        log.info("daemon started -- version %s, configuration %s", MASTER_VERSION, self.config_dir)
        self.maintain()
        self.notifier.ready(self._summary())
        fast = False
        while not self.stopping:
            for key, _ in self.selector.select(self._next_timeout()):
                kind, service = key.data
                if kind == "status":
                    self._read_status(service)
                elif kind == "listen":
                    self._client_waiting(service)
                elif kind == "control":
                    answer_one(self.control, self.snapshot())
            for signum in self.signals.drain():
                fast = self._handle_signal(signum) or fast
            self.reap()
            if not self.stopping:
                self.maintain()
        return self.shutdown(fast=fast)

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = [
            s.throttled_until for s in self.services.values() if s.throttled_until is not None
        ]
        deadlines += self.respawn_hold.values()
        if not deadlines:
            return None
        return max(min(deadlines) - now, 0.0)

    def _handle_signal(self, signum: int) -> bool:
        """Returns True when the stop must be fast."""
        if signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGTERM:
            log.info("terminating on signal %d", signum)
            self.stopping = True
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            log.info("terminating on signal %d", signum)
            self.stopping = True
            return True
        return False

    def _summary(self) -> str:
        parts = [f"{s.entry.name}: {s.total} procs" for s in self.services.values()]
        return f"generation {self.generation}; " + ", ".join(parts)

    # ------------------------------------------------------------------
    # Spawning and listening
    # ------------------------------------------------------------------

    def maintain(self) -> None:
        """Restore pre-fork minimums, end expired throttles, fix listen registrations."""
        now = time.monotonic()
        for identity, service in self.services.items():
            if service.throttled_until is not None and now >= service.throttled_until:
                service.throttled_until = None
                log.info("%s: throttle ended", service.path)
            hold = self.respawn_hold.get(identity)
            if hold is not None and now >= hold:
                del self.respawn_hold[identity]
                hold = None
            if hold is None:
                for _ in range(service.prefork_missing(now)):
                    if not self.spawn(service):
                        break
            self._update_listen(service, now)

    def _update_listen(self, service: ServiceState, now: float | None = None) -> None:
        identity = service.entry.identity
        wanted = service.wants_listen(now if now is not None else time.monotonic())
        if wanted and identity not in self._listening:
            self.selector.register(service.listener, selectors.EVENT_READ, ("listen", service))
            self._listening.add(identity)
        elif not wanted and identity in self._listening:
            self.selector.unregister(service.listener)
            self._listening.discard(identity)

    def _client_waiting(self, service: ServiceState) -> None:
        """A client is in the backlog and nobody idle will take it: one more child."""
        if service.wants_listen(time.monotonic()):
            self.spawn(service)
        self._update_listen(service)

    def spawn(self, service: ServiceState) -> bool:
        fds = ChildFds(
            self.flow_read,
            self.flow_write,
            service.status_child.fileno(),
            service.listener.fileno(),
        )
        try:
            pid = spawn_child(
                service.path,
                service.argv,
                self.child_env,
                fds,
                keep_stderr=self.foreground,
                ignore_interrupt=self.foreground,
            )
        except OSError as err:
            log.warning("master_spawn: fork: %s -- throttling", err.strerror)
            self.throttle(service)
            return False
        service.add_worker(pid)
        self.children[pid] = service
        if self.verbose:
            log.info("spawn command %s; service %s; pid %d", service.path, service.entry.name, pid)
        return True

    def throttle(self, service: ServiceState) -> None:
        service.throttled_until = time.monotonic() + self.throttle_time
        self._update_listen(service)

    # ------------------------------------------------------------------
    # Status messages
    # ------------------------------------------------------------------

    def _watch_status(self, service: ServiceState) -> None:
        self.selector.register(service.status_master, selectors.EVENT_READ, ("status", service))

    def _read_status(self, service: ServiceState) -> None:
        try:
            data = service.status_master.recv(STATUS_SIZE * 64)
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("service %s: read status: %s", service.entry.name, err.strerror)
            return
        buffer = service.status_buffer + data
        whole = len(buffer) - len(buffer) % STATUS_SIZE
        for offset in range(0, whole, STATUS_SIZE):
            message = unpack_status(buffer[offset : offset + STATUS_SIZE])
            problem = service.status_update(*message)
            if problem:
                log.info("%s", problem)
        service.status_buffer = buffer[whole:]
        self._update_listen(service)

    # ------------------------------------------------------------------
    # Reaping
    # ------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            service = self.children.pop(pid, None)
            if service is not None:
                self._child_exited(service, pid, status)

    def _child_exited(self, service: ServiceState, pid: int, status: int) -> None:
        worker = service.remove_worker(pid)
        if worker is None:
            return
        if service in self.leaving and not service.workers:
            self.leaving.remove(service)
        if worker.terminated_by_master or self.stopping:
            # Stopping: a child may also have had the signal itself (Ctrl-C reaches the
            # whole process group): its death is part of the stop, not a failure.
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            age = time.monotonic() - worker.started
            if not worker.retired and worker.use_count == 0 and age < QUICK_EXIT:
                self.respawn_hold[service.entry.identity] = time.monotonic() + RESPAWN_DELAY
            return
        if os.WIFEXITED(status):
            log.warning(
                "process %s pid %d exit status %d", service.path, pid, os.WEXITSTATUS(status)
            )
        elif os.WIFSIGNALED(status):
            log.warning(
                "process %s pid %d killed by signal %d", service.path, pid, os.WTERMSIG(status)
            )
        if (
            worker.use_count == 0
            and not worker.retired
            and not service.throttled(time.monotonic())
            and service not in self.leaving
        ):
            log.warning("%s: bad command startup -- throttling", service.path)
            self.throttle(service)

    # ------------------------------------------------------------------
    # Reload
    # ------------------------------------------------------------------

    def reload(self) -> None:
        previous_generation = self.generation
        try:
            main, entries = load_configuration(self.config_dir)
            self.generation += 1
            self._apply_main(main)
        except ArbiterError as err:
            self.generation = previous_generation
            log.error("reload failed, keeping the running configuration: %s", err)
            return
        self.notifier.reloading()
        queue = main["queue_directory"]
        if queue != self.queue_directory:
            log.warning("queue_directory change ignored until restart: %s", queue)
        wanted = {entry.identity: entry for entry in entries}
        for identity in [i for i in self.services if i not in wanted]:
            self._remove_service(identity)
        for identity, entry in wanted.items():
            service = self.services.get(identity)
            if service is None:
                try:
                    service = self._add_service(entry)
                except ArbiterError as err:
                    log.error("reload: %s", err)
                    continue
                if service is not None:
                    self._watch_status(service)
            else:
                self._renew_service(service, entry)
        self.respawn_hold.clear()
        log.info("reload -- version %s, configuration %s", MASTER_VERSION, self.config_dir)
        self.notifier.ready(self._summary())

    def _close_status(self, service: ServiceState) -> None:
        """Both master ends go: every child of this status socket sees EOF and exits 0."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(service.status_master)
        service.status_master.close()
        service.status_child.close()
        service.status_buffer = b""

    def _renew_service(self, service: ServiceState, entry: ServiceEntry) -> None:
        self._close_status(service)
        service.retire_all()
        service.status_master, service.status_child = socket.socketpair()
        service.status_master.setblocking(False)
        service.generation = self.generation
        for name, value in self._service_fields(entry).items():
            setattr(service, name, value)
        self._watch_status(service)

    def _remove_service(self, identity: tuple[str, str]) -> None:
        service = self.services.pop(identity)
        self._close_status(service)
        if identity in self._listening:
            self.selector.unregister(service.listener)
            self._listening.discard(identity)
        service.listener.close()  # the socket file stays, as with Postfix
        service.retire_all()
        self._terminate(service.workers.values())
        if service.workers:
            self.leaving.append(service)

    def _terminate(self, workers: Iterable, signum: int = signal.SIGTERM) -> None:
        for worker in list(workers):
            worker.terminated_by_master = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    # ------------------------------------------------------------------
    # Stop
    # ------------------------------------------------------------------

    def shutdown(self, *, fast: bool) -> int:
        self.notifier.stopping()
        # Only the signal pipe stays watched: a waiting client must not spin the loop.
        for identity in list(self._listening):
            self.selector.unregister(self.services[identity].listener)
        self._listening.clear()
        self.selector.unregister(self.control)
        for service in self.services.values():
            self._close_status(service)
            self._terminate(service.workers.values())
        for service in self.leaving:
            self._terminate(service.workers.values())
        if not fast:
            self._wait_for_children(self.stop_timeout)
        for service in self.services.values():
            service.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(control_path(self.queue_directory))
        self.control.close()
        self.signals.close()
        self.pidfile.release()
        return 0

    def _wait_for_children(self, timeout: float) -> None:
        """Wait for the children of a graceful stop; a second stop signal meanwhile
        (the operator pressing Ctrl-C again) ends the wait at once, as a fast stop."""
        deadline = time.monotonic() + timeout
        hurried = False
        while self.children and time.monotonic() < deadline and not hurried:
            self.reap()
            if self.children:
                self.selector.select(0.05)
                hurried = any(signum in _STOP_SIGNALS for signum in self.signals.drain())
        if self.children and hurried:
            log.warning(
                "%d children still alive after a second stop signal -- killing them",
                len(self.children),
            )
        elif self.children:
            log.warning(
                "%d children still alive after %.0fs -- killing them", len(self.children), timeout
            )
        if self.children:
            for pid in list(self.children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            while self.children:
                try:
                    pid, _ = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                self.children.pop(pid, None)

    # ------------------------------------------------------------------
    # State for `proxymap-master status`
    # ------------------------------------------------------------------

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "config_directory": self.config_dir,
            "queue_directory": self.queue_directory,
            "uptime": round(now - self.started, 1),
            "services": [s.snapshot(now) for s in self.services.values()],
            "leaving": [s.snapshot(now) for s in self.leaving],
        }
