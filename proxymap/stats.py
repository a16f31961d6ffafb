"""Live statistics of one proxymap worker: counters, latency, snapshots, process title.

NAME
    stats -- per-table figures counted on the request paths, published once a second

SYNOPSIS
    settings = StatsSettings.from_params(main_cf)
    handler = RequestHandler(service, approved, main_cf)    # counts into handler.statistics
    directory_fd = open_directory(main_cf["mail_owner"])    # as root, cwd = queue_directory
    reporter = Reporter(server, handler, directory_fd, settings)
    reporter.start(loop)                                    # a tick per second
    reporter.close()                                        # at exit: the file goes

DESCRIPTION
    Counting (``TableStats``, one per table name and worker, shared by all instances of
    the table): the request handler adds to plain integer attributes -- lookups,
    misses, lookup failures, RETRY, CONFIG, DENY, updates, deletes, sequences; hits are
    lookups that were neither a miss nor a failure. On the synchronous fast path that
    is one attribute increment per hit and two per miss.

    Latency: an asynchronous (network) table's lookups are all timed (they cost
    milliseconds; the clock costs 0.1 microsecond). A synchronous table's lookups are
    timed while the table serves fewer than 1000 lookups a second, and one in 64 above
    that (the tick decides once a second), so that the fast path of a busy local table
    pays for the clock on 1.6 % of its lookups. Samples go to a histogram of
    eighth-octave buckets (each bound 9 % above the last, 1 µs to 2 minutes), kept in
    six 10-second slots: the figures cover the last minute. An exponentially smoothed
    latency (each sample weighs 1/8) drives the slow-table warning: when it passes
    ``pyproxymap_slow_table_threshold`` (default 100ms; 0 turns it off) the worker logs
    ``table NAME is slow: smoothed lookup latency N ms`` once, and then not again for a
    minute -- as postscreen warns about a slow DNSBL.

    Publishing (``Reporter``): once a second the worker builds its snapshot (format:
    ``master.stats``), and writes it only if it differs from the last one, to
    ``pid/pyproxymap-stats/.<pid>.tmp`` under the queue directory, renamed to
    ``<pid>.json``. The directory is opened once, as root, before the privilege drop
    and chroot (``open_directory``), created owned by mail_owner when missing; the
    worker then writes relative to that descriptor, so a chrooted worker writes to
    the same place. At exit the file is removed; the snapshots of workers that died
    without doing so are removed by readers and by the next worker to start.

    Process title (``pyproxymap_verbose_proctitle = yes``, default no, like Dovecot's
    ``verbose_proctitle``): the tick appends a one-line summary to the title that ps
    shows, when it changed, so at most once a second::

        proxymap -n proxymap -t unix -u [2 clients, 1 busy, 15034 lookups, 3 retry, 17/100 served]

    ``pyproxymap_statistics = no`` turns all of it off: no counting, no clock, no file
    (the fast path is then exactly what it was without statistics).

SECURITY
    The snapshots name the tables and their figures, not keys or values; the directory
    is mode 0755 (``proxymap-query --stats`` as any user). Nothing is ever read back by
    a worker except to remove the files of dead workers (``master.stats``).

SEE ALSO
    master.stats (the file format, reading, summing), proxymap.handler (the counting),
    master.cli ``status``, proxymap.query ``--stats``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from master.stats import DIRECTORY, FORMAT, process_start_ticks, remove_stale, snapshot_name
from proxymap.protocol import CONFIG, NOKEY, OK, RETRY

if TYPE_CHECKING:
    from master.multi_server import MultiServer
    from proxymap.handler import RequestHandler
    from proxymap.tables.base import Table

log = logging.getLogger("proxymap")

STATISTICS = "pyproxymap_statistics"
VERBOSE_PROCTITLE = "pyproxymap_verbose_proctitle"
SLOW_THRESHOLD = "pyproxymap_slow_table_threshold"
DEFAULT_SLOW_THRESHOLD = 0.1
SLOW_QUIET = 60.0  # seconds between two slow-table warnings for one table
SMOOTHING = 0.125

SLOT_SECONDS = 10
SLOTS = 6  # the window: six 10-second slots
WINDOW = SLOT_SECONDS * SLOTS
# Synchronous tables: every lookup timed below this rate (per second), 1 in 64 above.
SAMPLE_ALL_BELOW = 1000
ALWAYS, ONE_IN_64 = 0, 63  # masks: a lookup is timed when (count & mask) == 0
# Bucket upper bounds in seconds: 1 µs x 2^(i/8), up to about two minutes.
BOUNDS: tuple[float, ...] = tuple(1e-6 * 2 ** (i / 8) for i in range(8 * 27))
_LAST = len(BOUNDS)  # the bucket for anything slower


def _flag(params: Mapping[str, str], name: str, default: bool) -> bool:
    text = str(params.get(name, "")).strip().lower()
    if not text:
        return default
    if text in ("yes", "no"):
        return text == "yes"
    log.warning('%s: bad boolean value "%s", using %s', name, text, "yes" if default else "no")
    return default


def parse_milliseconds(text: str) -> float:
    """``100ms``, ``0.1s``, ``1m`` or a bare number of milliseconds -> seconds."""
    text = text.strip().lower()
    for unit, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text) / 1000


@dataclass(frozen=True, slots=True)
class StatsSettings:
    """The main.cf side of the statistics."""

    enabled: bool = True
    proctitle: bool = False
    slow_threshold: float = DEFAULT_SLOW_THRESHOLD  # seconds; 0: no warning

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> StatsSettings:
        threshold = DEFAULT_SLOW_THRESHOLD
        text = str(params.get(SLOW_THRESHOLD, "")).strip()
        if text:
            try:
                threshold = max(0.0, parse_milliseconds(text))
            except ValueError:
                log.warning('%s: bad value "%s", using 100ms', SLOW_THRESHOLD, text)
        return cls(
            enabled=_flag(params, STATISTICS, True),
            proctitle=_flag(params, VERBOSE_PROCTITLE, False),
            slow_threshold=threshold,
        )


class Latency:
    """A histogram of lookup times over a sliding window of ``SLOTS`` slots."""

    __slots__ = ("slots", "maxima", "index", "counts", "top")

    def __init__(self) -> None:
        self.slots = [[0] * (_LAST + 1) for _ in range(SLOTS)]
        self.maxima = [0.0] * SLOTS
        self.index = 0
        self.counts = self.slots[0]  # the current slot
        self.top = 0.0  # the current slot's largest

    def record(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        if seconds > self.top:
            self.top = seconds

    def rotate(self) -> None:
        """Start a new slot; the oldest one leaves the window."""
        self.maxima[self.index] = self.top
        self.index = (self.index + 1) % SLOTS
        self.counts = self.slots[self.index]
        self.counts[:] = [0] * (_LAST + 1)
        self.top = self.maxima[self.index] = 0.0

    def window(self) -> tuple[list[int], float]:
        """Counts per bucket over the window, and the largest sample in it."""
        totals = [sum(column) for column in zip(*self.slots, strict=True)]
        self.maxima[self.index] = self.top
        return totals, max(self.maxima)

    def figures(self) -> dict:
        counts, largest = self.window()
        histogram = [
            [round(BOUNDS[min(i, _LAST - 1)] * 1e6, 1), count]
            for i, count in enumerate(counts)
            if count
        ]
        samples = sum(counts)
        return {
            "samples": samples,
            "max_ms": round(largest * 1000, 3) if samples else None,
            "histogram": histogram,
        }


class TableStats:
    """The figures of one table in one worker (plain attributes: see DESCRIPTION)."""

    __slots__ = (
        "name",
        "lookups",
        "misses",
        "failures",
        "retry",
        "config",
        "deny",
        "updates",
        "deletes",
        "sequences",
        "sample_mask",
        "latency",
        "smoothed",
        "threshold",
        "quiet_until",
        "tables",
        "asynchronous",
        "_lookups_before",
    )

    def __init__(self, name: str, threshold: float = DEFAULT_SLOW_THRESHOLD) -> None:
        self.name = name
        self.lookups = self.misses = self.failures = 0
        self.retry = self.config = self.deny = 0
        self.updates = self.deletes = self.sequences = 0
        self.sample_mask = ALWAYS
        self.latency = Latency()
        self.smoothed = -1.0  # no sample yet
        self.threshold = threshold
        self.quiet_until = 0.0
        self.tables: list[Table] = []  # the instances, for their connection pools
        self.asynchronous = False
        self._lookups_before = 0

    @property
    def hits(self) -> int:
        return self.lookups - self.misses - self.failures

    def record(self, seconds: float) -> None:
        """One timed lookup (``Latency.record`` written out: once per lookup)."""
        latency = self.latency
        latency.counts[bisect_left(BOUNDS, seconds)] += 1
        if seconds > latency.top:
            latency.top = seconds
        smoothed = self.smoothed
        smoothed = seconds if smoothed < 0 else smoothed + (seconds - smoothed) * SMOOTHING
        self.smoothed = smoothed
        if smoothed > self.threshold > 0:
            self._slow(smoothed)

    def _slow(self, smoothed: float) -> None:
        now = time.monotonic()
        if now < self.quiet_until:
            return
        self.quiet_until = now + SLOW_QUIET
        log.warning(
            "table %s is slow: smoothed lookup latency %.0f ms (%s = %.0fms)",
            self.name,
            smoothed * 1000,
            SLOW_THRESHOLD,
            self.threshold * 1000,
        )

    def count(self, op: str, status: int) -> None:
        """One answered request of the general path."""
        if op == "lookup":
            self.lookups += 1
            if status == NOKEY:
                self.misses += 1
            elif status != OK:
                self.failures += 1
        elif op == "update":
            self.updates += 1
        elif op == "delete":
            self.deletes += 1
        elif op == "sequence":
            self.sequences += 1
        if status == RETRY:
            self.retry += 1
        elif status == CONFIG:
            self.config += 1

    def failed(self, status: int) -> None:
        """A fast-path lookup (already counted) that failed."""
        self.failures += 1
        if status == RETRY:
            self.retry += 1
        elif status == CONFIG:
            self.config += 1

    def tick(self) -> None:
        """Once a second: choose how synchronous lookups are sampled."""
        rate = self.lookups - self._lookups_before
        self._lookups_before = self.lookups
        self.sample_mask = ALWAYS if self.asynchronous or rate < SAMPLE_ALL_BELOW else ONE_IN_64

    def figures(self) -> dict:
        latency = self.latency.figures()
        latency["sampling"] = self.sample_mask + 1
        latency["smoothed_ms"] = round(self.smoothed * 1000, 3) if self.smoothed >= 0 else None
        figures = {
            "lookups": self.lookups,
            "hits": self.hits,
            "misses": self.misses,
            "retry": self.retry,
            "config": self.config,
            "deny": self.deny,
            "updates": self.updates,
            "deletes": self.deletes,
            "sequences": self.sequences,
            "latency": latency,
        }
        backend = backend_figures(self.tables)
        if backend is not None:
            figures["backend"] = backend
        return figures


# --- connection pools ---------------------------------------------------------------------------
def _pools(table: object, seen: set[int]) -> Iterator[object]:
    """The connection pools of a table and of the tables it wraps (UTF-8 layer, members)."""
    if id(table) in seen:
        return
    seen.add(id(table))
    pool = getattr(table, "pool", None)
    if pool is not None and hasattr(pool, "in_use") and id(pool) not in seen:
        seen.add(id(pool))
        yield pool
    inner = getattr(table, "inner", None)
    if inner is not None:
        yield from _pools(inner, seen)
    for member in getattr(table, "members", None) or ():
        yield from _pools(member, seen)


def backend_figures(tables: list) -> dict | None:
    """Summed figures of the pools behind these instances; None when there is none."""
    seen: set[int] = set()
    pools = [pool for table in tables for pool in _pools(table, seen)]
    if not pools:
        return None
    figures = {"open": 0, "in_use": 0, "waiting": 0, "limit": 0, "connects": 0, "failovers": 0}
    down: list[str] = []
    for pool in pools:
        for name, attribute in (
            ("open", "open"),
            ("in_use", "in_use"),
            ("waiting", "waiting"),
            ("limit", "size"),
            ("connects", "connects"),
            ("failovers", "failovers"),
        ):
            value = getattr(pool, attribute, 0)
            figures[name] += value if isinstance(value, int) else 0
        for endpoint in getattr(pool, "endpoints", ()):
            if getattr(endpoint, "down", False):
                reason = getattr(endpoint, "reason", "") or "down"
                down.append(f"{getattr(endpoint, 'label', '?')}: {reason}")
    return {**figures, "down": down}


# --- the snapshot directory ------------------------------------------------------------------
def open_directory(mail_owner: str | None) -> int | None:
    """The snapshot directory (relative to the queue directory, the current one), made
    if missing and owned by mail_owner when we are root; None (logged) if unusable."""
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(DIRECTORY)
            os.chmod(DIRECTORY, 0o755)  # whatever the umask (Postfix's master: 077)
        if os.geteuid() == 0 and mail_owner:
            import pwd

            owner = pwd.getpwnam(mail_owner)
            info = os.lstat(DIRECTORY)
            if (info.st_uid, info.st_gid) != (owner.pw_uid, owner.pw_gid):
                os.chown(DIRECTORY, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        fd = os.open(DIRECTORY, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except (OSError, KeyError) as exc:
        log.warning("statistics: cannot use %s/%s: %s", os.getcwd(), DIRECTORY, exc)
        return None
    with contextlib.suppress(OSError):
        remove_stale(fd)
    return fd


# --- publishing ------------------------------------------------------------------------------
class Reporter:
    """Once a second: rotate, sample, write the snapshot and the process title."""

    def __init__(
        self,
        server: MultiServer,
        handler: RequestHandler,
        directory_fd: int | None,
        settings: StatsSettings,
    ) -> None:
        self.server = server
        self.handler = handler
        self.directory_fd = directory_fd
        self.settings = settings
        self.pid = os.getpid()
        self.start_ticks = process_start_ticks(self.pid)
        self.started = time.time()
        self.last_request: float | None = None
        self._activity = 0
        self._ticks = 0
        self._written = ""
        self._title = ""
        self._write_failed = False
        self._timer = None

    def start(self, loop) -> None:
        """The first snapshot at once (the worker shows up idle), then one a second."""
        self.update()
        self._timer = loop.call_later(1.0, self._tick, loop)

    def _tick(self, loop) -> None:
        try:
            self.update()
        except Exception:  # statistics must never take a worker down
            log.exception("statistics update failed")
        self._timer = loop.call_later(1.0, self._tick, loop)

    def update(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._ticks += 1
        statistics = self.handler.statistics or {}
        rotate = self._ticks % SLOT_SECONDS == 0
        activity = self.handler.bad + self.server.open_connections + self.server.connections_closed
        for table in statistics.values():
            if rotate:
                table.latency.rotate()
            table.tick()
            activity += table.lookups + table.deny + table.updates + table.deletes + table.sequences
        if activity != self._activity:
            self._activity = activity
            self.last_request = now
        if self.directory_fd is not None:
            self._write(now)
        if self.settings.proctitle:
            self._set_title()

    def snapshot(self) -> dict:
        server = self.server
        handler = self.handler
        tables = {}
        caches = handler.cache_figures()
        for name, table in sorted((handler.statistics or {}).items()):
            figures = table.figures()
            if name in caches:
                figures["cache"] = caches[name]
            tables[name] = figures
        return {
            "format": FORMAT,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "service": handler.service_name,
            "generation": server.generation,
            "started": round(self.started, 3),
            "last_request": None if self.last_request is None else round(self.last_request),
            "clients": server.open_connections,
            "in_flight": server.requests_in_progress,
            "connections_served": server.connections_closed,
            "max_use": server.max_use,
            "max_idle": server.max_idle,
            "bad": handler.bad,
            "window": WINDOW,
            "tables": tables,
        }

    def _write(self, now: float) -> None:
        document = self.snapshot()
        text = json.dumps(document, separators=(",", ":"))
        if text == self._written:
            return
        document["written"] = round(now, 3)
        data = json.dumps(document, separators=(",", ":")).encode()
        name = snapshot_name(self.pid)
        temporary = f".{self.pid}.tmp"
        fd = self.directory_fd
        try:
            out = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=fd
            )
            try:
                os.fchmod(out, 0o644)  # readable by the operator, whatever the umask
                os.write(out, data)
            finally:
                os.close(out)
            os.rename(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as exc:
            if not self._write_failed:
                log.warning("statistics: cannot write %s: %s", name, exc)
            self._write_failed = True
            return
        self._write_failed = False
        self._written = text

    def title(self) -> str:
        server = self.server
        statistics = (self.handler.statistics or {}).values()
        lookups = sum(table.lookups for table in statistics)
        retry = sum(table.retry for table in statistics)
        uses = (
            f"{server.connections_closed}/{server.max_use}"
            if server.max_use
            else str(server.connections_closed)
        )
        return (
            f"[{server.open_connections} clients, {server.requests_in_progress} busy, "
            f"{lookups} lookups, {retry} retry, {uses} served]"
        )

    def _set_title(self) -> None:
        title = self.title()
        if title != self._title:
            self._title = title
            self.server.set_process_title(title)

    def close(self) -> None:
        """At exit: the snapshot goes with the worker."""
        if self._timer is not None:
            self._timer.cancel()
        if self.directory_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(snapshot_name(self.pid), dir_fd=self.directory_fd)
        with contextlib.suppress(OSError):
            os.unlink(f".{self.pid}.tmp", dir_fd=self.directory_fd)
