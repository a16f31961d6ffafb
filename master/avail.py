"""Per-service process accounting: who runs, who is idle, when to spawn, when to listen.

NAME
    avail -- the bookkeeping behind Postfix's on-demand process creation, plus pre-forking

DESCRIPTION
    ``ServiceState`` holds one master.cf service at run time: its listen socket, its
    status socketpair, its workers and the counters Postfix keeps (``total_proc``,
    ``avail_proc``) and the throttle deadline.

    The rules (docs/PROTOCOL.md 4.5):

    * a freshly spawned worker counts as available at once, before it says anything;
    * TAKEN makes it busy (avail -1), AVAIL makes it idle again (avail +1), and an AVAIL
      that follows a TAKEN counts one use; repeated identical states are ignored;
    * the master polls the listen socket only while no worker is available, the service
      is not throttled and the process limit (``maxproc``; 0 = none) is not reached;
      readable means a client waits and nobody idle will take it: spawn one more.

    Pre-forking adds one rule: keep at least ``prefork`` workers of the current
    generation (never above maxproc). Workers leave normally at ``max_use`` or
    ``max_idle``; the master then starts replacements up to the minimum. So with the
    Postfix default ``max_idle = 100s`` an idle pre-forked worker is replaced by a fresh
    one every 100 s (harmless churn, and it re-reads changed tables); raise
    ``-o max_idle=...`` on the service to avoid it. Workers above the minimum (spawned
    on demand) expire on max_idle as in Postfix and are not replaced.

    After a reload the workers of the old generation are *retired*: they no longer
    count as available (they are on their way out) but still count towards ``maxproc``
    until reaped, so a single-writer service (maxproc 1) never has two writers.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from master.masterconf import ServiceEntry
from master.status import STATUS_AVAIL, STATUS_TAKEN


@dataclass
class Worker:
    """One child process as the master sees it."""

    pid: int
    generation: int
    started: float = field(default_factory=time.monotonic)
    available: bool = True
    use_count: int = 0
    retired: bool = False
    #: the master sent it SIGTERM itself (service removed, stop): its death is expected
    terminated_by_master: bool = False

    @property
    def state(self) -> str:
        if self.retired:
            return "retiring"
        return "idle" if self.available else "busy"


@dataclass
class ServiceState:
    """A running master.cf service."""

    entry: ServiceEntry
    path: str
    argv: list[str]
    prefork: int
    listener: socket.socket
    status_master: socket.socket
    status_child: socket.socket
    generation: int
    workers: dict[int, Worker] = field(default_factory=dict)
    avail_count: int = 0
    throttled_until: float | None = None
    status_buffer: bytes = b""
    spawn_count: int = 0

    # -- counters ------------------------------------------------------------

    @property
    def total(self) -> int:
        """total_proc: every live child, retired ones included (for maxproc)."""
        return len(self.workers)

    @property
    def current(self) -> int:
        """Children of the current generation."""
        return sum(1 for worker in self.workers.values() if not worker.retired)

    def under_limit(self) -> bool:
        return self.entry.maxproc == 0 or self.total < self.entry.maxproc

    def throttled(self, now: float) -> bool:
        return self.throttled_until is not None and now < self.throttled_until

    # -- decisions -----------------------------------------------------------

    def wants_listen(self, now: float) -> bool:
        """Poll the listen socket only when nobody idle could take a new client."""
        return self.avail_count == 0 and not self.throttled(now) and self.under_limit()

    def prefork_missing(self, now: float) -> int:
        """How many workers to start now to restore the pre-fork minimum."""
        if self.throttled(now):
            return 0
        missing = self.prefork - self.current
        if self.entry.maxproc > 0:
            missing = min(missing, self.entry.maxproc - self.total)
        return max(missing, 0)

    # -- events --------------------------------------------------------------

    def add_worker(self, pid: int) -> Worker:
        worker = Worker(pid=pid, generation=self.generation)
        self.workers[pid] = worker
        self.avail_count += 1
        self.spawn_count += 1
        return worker

    def remove_worker(self, pid: int) -> Worker | None:
        worker = self.workers.pop(pid, None)
        if worker is not None and worker.available and not worker.retired:
            self.avail_count -= 1
        return worker

    def retire_all(self) -> None:
        """Reload: the current workers become old-generation workers."""
        for worker in self.workers.values():
            if not worker.retired and worker.available:
                self.avail_count -= 1
            worker.retired = True

    def status_update(self, pid: int, generation: int, avail: int) -> str | None:
        """Apply one status record; returns a warning text when it was ignored."""
        worker = self.workers.get(pid)
        if worker is None:
            return None  # a child we already reaped, or a stranger: ignore silently
        if generation != worker.generation or worker.retired:
            return f"ignoring status update from child pid {pid} generation {generation}"
        if avail == STATUS_AVAIL and not worker.available:
            worker.available = True
            worker.use_count += 1
            self.avail_count += 1
        elif avail == STATUS_TAKEN and worker.available:
            worker.available = False
            self.avail_count -= 1
        elif avail not in (STATUS_AVAIL, STATUS_TAKEN):
            return f"child pid {pid} sent bad status {avail}"
        return None

    def snapshot(self, now: float) -> dict:
        """What ``proxymap-master status`` shows (JSON-able)."""
        return {
            "service": self.entry.name,
            "type": self.entry.transport,
            "command": self.entry.command,
            "maxproc": self.entry.maxproc,
            "prefork": self.prefork,
            "total": self.total,
            "avail": self.avail_count,
            "spawned": self.spawn_count,
            "throttled_for": (
                round(self.throttled_until - now, 1)
                if self.throttled(now) and self.throttled_until
                else 0
            ),
            "workers": [
                {
                    "pid": worker.pid,
                    "generation": worker.generation,
                    "state": worker.state,
                    "uses": worker.use_count,
                    "age": round(now - worker.started, 1),
                }
                for worker in sorted(self.workers.values(), key=lambda w: w.started)
            ],
        }
