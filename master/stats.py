"""Live statistics of the proxymap workers: the snapshot files, read and summed.

NAME
    stats -- read, clean up, aggregate and print the workers' statistics snapshots

SYNOPSIS
    from master.stats import collect, format_statistics
    figures = collect(queue_directory)         # {"directory": ..., "services": {...}}
    print(format_statistics(figures))

DESCRIPTION
    Every worker (``proxymap.stats``) writes its figures to one file in
    ``$queue_directory/pid/pyproxymap-stats/`` named ``<pid>.json``, at most once a
    second and only when a figure changed: written to ``.<pid>.tmp`` and renamed, so a
    reader sees a whole snapshot or the previous one, never half of one. A worker that
    exits normally removes its file; one that was killed (``kill -9``, a crash) leaves
    it, and the next reader (or the next worker to start) removes it: a file whose pid
    does not run, or runs with another start time (a reused pid), is stale. So the
    figures are right across respawns (a new pid, a new file), reloads (the old
    generation's workers exit and remove theirs) and kills, with nothing to register
    and nobody to ask: the Postfix master (drop-in) and ours need not know about it.
    This module reads the files generically and does not import ``proxymap``.

    The snapshot is a JSON object (FORMAT 1)::

        format            1
        pid, start_ticks  the worker; start_ticks: its start time in clock ticks after
                          boot (/proc/PID/stat field 22), null when unknown
        service           proxymap or proxywrite (the -n service name)
        generation        the master's generation (GENERATION; 0 under Postfix's)
        started, written  epoch seconds: the worker's start, this snapshot
        last_request      epoch seconds of the last request seen (1 s resolution), or null
        clients           connections open now
        in_flight         requests in progress now
        connections_served, max_use, max_idle
                          closed connections (what max_use counts) and the limits
        bad               requests answered BAD (malformed table name)
        window            seconds the latency figures cover (the last minute)
        tables            one object per table name (``proxy:`` removed):
            lookups, hits, misses      lookups answered, of which OK, NOKEY
            retry, config, deny        RETRY, CONFIG and DENY answers (any request)
            updates, deletes, sequences
            latency   samples          lookups timed within the window
                      sampling         1 in N lookups timed (N = 1 or 64: a fast local
                                       table is sampled, a network table always timed)
                      histogram        [[upper bound in microseconds, count], ...] over
                                       the window, eighth-octave buckets (+9 %)
                      max_ms           largest in the window
                      smoothed_ms      exponentially smoothed (weight 1/8 per sample)
            backend   (tables with connection pools) open, in_use, waiting, limit,
                      connects (opened since the worker started), failovers, and
                      down: ["<server>: <reason>", ...] for servers in back-off
            cache     the result cache's counters (when the table is cached):
                      hits, misses, coalesced, stale, evictions, invalidations, size

    Aggregation (``collect``) groups the workers by service, sums the counters of each
    table over its workers, merges the histograms (the percentiles come from the
    merged histogram, so p99 is over all workers' lookups, at bucket resolution) and
    takes the largest ``max_ms`` and ``smoothed_ms``.

SECURITY
    The directory belongs to mail_owner (the workers write as that user). A reader
    running as root opens the files with O_NOFOLLOW, reads at most 1 MB of each,
    ignores what does not parse, and removes only names of the form ``<digits>.json``
    or ``.<digits>.tmp`` relative to the directory.

SEE ALSO
    proxymap.stats (the writer), master.cli (``status``), proxymap.query (``--stats``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable

FORMAT = 1
DIRECTORY = os.path.join("pid", "pyproxymap-stats")  # relative to queue_directory
FILE_PATTERN = re.compile(r"^\.?(\d+)\.(json|tmp)$")
MAX_BYTES = 1 << 20
COUNTERS = (
    "lookups",
    "hits",
    "misses",
    "retry",
    "config",
    "deny",
    "updates",
    "deletes",
    "sequences",
)
BACKEND_SUMS = ("open", "in_use", "waiting", "limit", "connects", "failovers")
CACHE_SHOWN = ("hits", "misses", "coalesced", "stale", "evictions", "size")
# A temporary file older than this belongs to a worker that died in the middle of a write.
STALE_TMP = 60.0


def stats_directory(queue_directory: str) -> str:
    return os.path.join(queue_directory, DIRECTORY)


def snapshot_name(pid: int) -> str:
    return f"{pid}.json"


# --- is the writer alive? ---------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) from /proc/PID/stat; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])  # fields 3 and 22
    except (OSError, IndexError, ValueError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time after boot, clock ticks); None if unknown."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def writer_alive(pid: int, start_ticks: object) -> bool:
    """True while ``pid`` runs and is the process that wrote the snapshot: not gone,
    not a zombie (an orphan nobody reaped yet), not a newer process with its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists (another user's process)
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: kill() is all we can tell
    state, ticks = stat
    if state in ("Z", "X", "x"):
        return False
    return not isinstance(start_ticks, int) or ticks == start_ticks


# --- reading ---------------------------------------------------------------------------------
def _read(directory_fd: int, name: str) -> dict | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as snapshot:
        data = snapshot.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return None
    return document


def _remove(directory_fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=directory_fd)


def read_snapshots(directory: str, *, clean: bool = True) -> list[dict]:
    """The snapshots of live workers, by pid; with ``clean``, stale files are removed."""
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        return _read_all(directory_fd, clean)
    finally:
        os.close(directory_fd)


def _read_all(directory_fd: int, clean: bool) -> list[dict]:
    snapshots = []
    for name in sorted(os.listdir(directory_fd)):
        match = FILE_PATTERN.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if match.group(2) == "tmp":
            if clean and not writer_alive(pid, None) and _older_than(directory_fd, name):
                _remove(directory_fd, name)
            continue
        document = _read(directory_fd, name)
        if document is None or document.get("pid") != pid:
            continue
        if not writer_alive(pid, document.get("start_ticks")):
            if clean:
                _remove(directory_fd, name)
            continue
        snapshots.append(document)
    return sorted(snapshots, key=lambda doc: (str(doc.get("service")), doc["pid"]))


def _older_than(directory_fd: int, name: str, age: float = STALE_TMP) -> bool:
    try:
        return (
            time.time() - os.stat(name, dir_fd=directory_fd, follow_symlinks=False).st_mtime > age
        )
    except OSError:
        return False


def remove_stale(directory_fd: int) -> None:
    """Remove the snapshots of workers that are gone (a worker does this at start)."""
    _read_all(directory_fd, True)


# --- aggregation -----------------------------------------------------------------------------
def _number(value: object) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def percentile(histogram: dict[float, int], fraction: float) -> float | None:
    """The upper bound (µs) of the bucket holding the fraction-th lookup; None if empty."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    wanted = max(1, fraction * total)
    seen = 0
    for bound in sorted(histogram):
        seen += histogram[bound]
        if seen >= wanted:
            return bound
    return max(histogram)


def _merge_histogram(into: dict[float, int], pairs: object) -> None:
    if not isinstance(pairs, list):
        return
    for pair in pairs:
        if isinstance(pair, list) and len(pair) == 2:
            bound, count = _number(pair[0]), _number(pair[1])
            if count > 0:
                into[bound] = into.get(bound, 0) + int(count)


def _new_table() -> dict:
    table: dict = dict.fromkeys(COUNTERS, 0)
    table["workers"] = 0
    table["latency"] = {
        "samples": 0,
        "sampling": 1,
        "max_ms": None,
        "smoothed_ms": None,
        "histogram": {},
    }
    return table


def _add_table(total: dict, figures: dict) -> None:
    total["workers"] += 1
    for name in COUNTERS:
        total[name] += int(_number(figures.get(name)))
    latency = figures.get("latency")
    if isinstance(latency, dict):
        merged = total["latency"]
        merged["samples"] += int(_number(latency.get("samples")))
        merged["sampling"] = max(merged["sampling"], int(_number(latency.get("sampling")) or 1))
        for name in ("max_ms", "smoothed_ms"):
            value = latency.get(name)
            if isinstance(value, (int, float)) and (merged[name] is None or value > merged[name]):
                merged[name] = value
        _merge_histogram(merged["histogram"], latency.get("histogram"))
    backend = figures.get("backend")
    if isinstance(backend, dict):
        merged_backend = total.setdefault("backend", {**dict.fromkeys(BACKEND_SUMS, 0), "down": []})
        for name in BACKEND_SUMS:
            merged_backend[name] += int(_number(backend.get(name)))
        down = backend.get("down")
        if isinstance(down, list):
            merged_backend["down"] = sorted({*merged_backend["down"], *map(str, down)})
    cache = figures.get("cache")
    if isinstance(cache, dict):
        merged_cache = total.setdefault("cache", {})
        for name, value in cache.items():
            merged_cache[name] = merged_cache.get(name, 0) + int(_number(value))


def _finish_table(table: dict) -> None:
    latency = table["latency"]
    histogram = latency.pop("histogram")
    for name, fraction in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        bound = percentile(histogram, fraction)
        if bound is not None and latency["max_ms"] is not None:
            bound = min(bound, latency["max_ms"] * 1000)  # the bucket may overshoot the max
        latency[name] = None if bound is None else round(bound / 1000, 3)
    latency["histogram"] = [[bound, histogram[bound]] for bound in sorted(histogram)]


def _worker_row(doc: dict, now: float) -> dict:
    last = doc.get("last_request")
    started = _number(doc.get("started"))
    quiet_since = last if isinstance(last, (int, float)) else started
    return {
        "pid": doc["pid"],
        "generation": doc.get("generation"),
        "clients": int(_number(doc.get("clients"))),
        "in_flight": int(_number(doc.get("in_flight"))),
        "connections_served": int(_number(doc.get("connections_served"))),
        "max_use": int(_number(doc.get("max_use"))),
        "idle": None if _number(doc.get("in_flight")) else max(0.0, now - quiet_since),
        "age": max(0.0, now - started) if started else None,
        "lookups": sum(int(_number(t.get("lookups"))) for t in _tables(doc).values()),
        "snapshot_age": max(0.0, now - _number(doc.get("written"))),
    }


def _tables(doc: dict) -> dict[str, dict]:
    tables = doc.get("tables")
    if not isinstance(tables, dict):
        return {}
    return {str(name): figures for name, figures in tables.items() if isinstance(figures, dict)}


def aggregate(snapshots: Iterable[dict], now: float | None = None) -> dict[str, dict]:
    """Per service: its workers' rows and its tables summed over the workers."""
    now = time.time() if now is None else now
    services: dict[str, dict] = {}
    for doc in snapshots:
        service = services.setdefault(
            str(doc.get("service") or "?"), {"workers": [], "tables": {}, "bad": 0}
        )
        service["workers"].append(_worker_row(doc, now))
        service["bad"] += int(_number(doc.get("bad")))
        for name, figures in _tables(doc).items():
            _add_table(service["tables"].setdefault(name, _new_table()), figures)
    for service in services.values():
        for table in service["tables"].values():
            _finish_table(table)
        service["tables"] = dict(sorted(service["tables"].items()))
    return dict(sorted(services.items()))


def collect(queue_directory: str, *, clean: bool = True) -> dict:
    """Everything a ``status`` needs: the directory and the aggregated services."""
    directory = stats_directory(queue_directory)
    snapshots = read_snapshots(directory, clean=clean)
    return {"directory": directory, "workers": len(snapshots), "services": aggregate(snapshots)}


# --- the table ------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value:.3f}"  # a local table: microseconds matter
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def _hit_rate(table: dict) -> str:
    return f"{100 * table['hits'] / table['lookups']:.1f}" if table["lookups"] else "-"


def _connections(table: dict) -> str:
    backend = table.get("backend")
    if backend is None:
        return "-"
    return f"{backend['open']}/{backend['limit']}"


def format_table_rows(tables: dict[str, dict], indent: str = "    ") -> list[str]:
    lines = [
        f"{indent}{'LOOKUPS':>9} {'HIT%':>5} {'MISS':>7} {'RETRY':>6} {'CONFIG':>6} "
        f"{'DENY':>5} {'P50ms':>7} {'P99ms':>7} {'MAXms':>7} {'BACKEND':>7} "
        f"{'CONNECTS':>8} TABLE"
    ]
    for name, table in tables.items():
        latency = table["latency"]
        backend = table.get("backend") or {}
        lines.append(
            f"{indent}{table['lookups']:>9} {_hit_rate(table):>5} {table['misses']:>7} "
            f"{table['retry']:>6} {table['config']:>6} {table['deny']:>5} "
            f"{_ms(latency['p50_ms']):>7} {_ms(latency['p99_ms']):>7} "
            f"{_ms(latency['max_ms']):>7} {_connections(table):>7} "
            f"{backend.get('connects', '-'):>8} {name}"
        )
        for down in backend.get("down", []):
            lines.append(f"{indent}{'':>9} down: {down}")
        if backend.get("failovers"):
            lines.append(f"{indent}{'':>9} failovers: {backend['failovers']}")
        cache = table.get("cache")
        if cache:
            figures = ", ".join(f"{name} {cache[name]}" for name in CACHE_SHOWN if name in cache)
            lines.append(f"{indent}{'':>9} cache: {figures}")
    return lines


def format_worker_rows(workers: list[dict], indent: str = "    ") -> list[str]:
    lines = [
        f"{indent}{'PID':>8} {'GEN':>4} {'CLIENTS':>7} {'BUSY':>4} {'SERVED':>11} "
        f"{'IDLE':>8} {'LOOKUPS':>9} {'AGE':>8}"
    ]
    for worker in workers:
        max_use = worker["max_use"]
        uses = f"{worker['connections_served']}/{max_use if max_use else '-'}"
        generation = worker["generation"] if worker["generation"] is not None else "-"
        lines.append(
            f"{indent}{worker['pid']:>8} {generation:>4} {worker['clients']:>7} "
            f"{worker['in_flight']:>4} {uses:>11} {_duration(worker['idle']):>8} "
            f"{worker['lookups']:>9} {_duration(worker['age']):>8}"
        )
    return lines


def format_statistics(figures: dict) -> str:
    """The operator's view: per service, its tables, then its workers."""
    services = figures["services"]
    if not services:
        return (
            f"no worker statistics in {figures['directory']} (no worker running, or "
            "pyproxymap_statistics = no)"
        )
    lines = []
    for name, service in services.items():
        window = "last minute"
        bad = f", {service['bad']} BAD" if service["bad"] else ""
        lines.append(f"{name}: {len(service['workers'])} worker(s){bad}; latency over the {window}")
        lines += format_table_rows(service["tables"])
        lines += format_worker_rows(service["workers"])
    return "\n".join(lines)
