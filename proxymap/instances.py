"""A bound on the instances of one table that a worker keeps open.

NAME
    instances -- at most MAX_PER_TABLE instances per table name; the others answer RETRY

SYNOPSIS
    limit = InstanceLimit()
    if limit.admits(canonical):          # before opening a new instance
        ... open it ...
        limit.opened(canonical)
    else:
        table = limit.stand_in(canonical, open_mode, flags)   # answers RETRY

DESCRIPTION
    The handler keeps one instance per (table name, open mode, generation, instance
    flags), for the life of the worker. A client chooses the flags, so without a bound
    it could make a worker open one more instance of an approved table per flag word
    (2**32 of them): a descriptor each and, for text tables, a copy in memory.

    Postfix programs use a handful of flag words per table: the daemons' maps (LOCK |
    FOLD_FIX | UTF8_REQUEST, some with NO_REGSUB, NO_PROXY or NO_UNAUTH), ``postmap
    -q``, ``-i`` and ``-d`` (docs/PROTOCOL.md section 3.3), and the instance bits of a
    3.7-3.10 client (section 3.2: usually none). MAX_PER_TABLE leaves room for twice
    that.

    Beyond it a new flag word gets a stand-in: an unavailable table (Postfix's
    dict_surrogate: its open succeeds, every operation answers RETRY) that is not
    kept, so it costs neither a descriptor nor a copy. The first time a table reaches
    the bound the worker logs one warning naming it; the refusals after that are
    silent, since a client cycling through flag words would flood the log. The
    instances already open are never closed: replacing one could cut a sequence short
    or pull a table from under an asynchronous lookup in flight, for the sake of a
    client that no Postfix program is.
"""

from __future__ import annotations

import logging
from collections import Counter

from proxymap import flags as F
from proxymap.tables.base import DictRetry, SurrogateTable

log = logging.getLogger("proxymap")

MAX_PER_TABLE = 8


class TooManyInstances(SurrogateTable):
    """The stand-in beyond the bound: a surrogate that does not log each request."""

    def _fail(self) -> DictRetry:
        return DictRetry(self.reason)


class InstanceLimit:
    """Counts the open instances of each table name; makes the stand-ins beyond."""

    def __init__(self, max_per_table: int = MAX_PER_TABLE) -> None:
        self.max_per_table = max_per_table
        self.open_instances: Counter[str] = Counter()
        self._warned: set[str] = set()

    def admits(self, table: str) -> bool:
        """Whether one more instance of the table may be opened."""
        return self.open_instances[table] < self.max_per_table

    def opened(self, table: str) -> None:
        self.open_instances[table] += 1

    def stand_in(self, table: str, open_mode: int, flags: int) -> TooManyInstances:
        """The unavailable table a request beyond the bound gets (warned once per table)."""
        reason = f"{self.max_per_table} instances with other flags are open already"
        if table not in self._warned:
            self._warned.add(table)
            log.warning(
                "%s: %s; these new flags (%s) and any others get RETRY",
                table,
                reason,
                F.flag_names(flags) or "0",
            )
        dict_type, _, name = table.partition(":")
        return TooManyInstances(dict_type, name, open_mode, flags, reason)
