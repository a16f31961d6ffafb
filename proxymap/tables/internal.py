"""internal: a private in-memory table, empty when opened (Postfix's dict_ht).

NAME
    internal -- per-process in-memory hash table

DESCRIPTION
    Each instance starts empty and lives as long as the worker process. It supports
    lookup, update (an existing key is overwritten), delete and sequence (insertion
    order; "next" before "first" starts at the top). Keys are ASCII lower-cased when
    the request asks FOLD_FIX (the UTF-8 layer, if any, has folded them already).
    Through proxymap it is only useful with proxywrite, for tests.
"""

from __future__ import annotations

from proxymap import flags as F
from proxymap.tables.base import OpenContext, SyncTable
from proxymap.tables.texthash import SequenceCursor


class InternalTable(SyncTable):
    dict_type = "internal"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        self.entries: dict[bytes, bytes] = {}
        self._cursor = SequenceCursor()

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(self.fold(key))

    def update(self, key: bytes, value: bytes) -> int:
        self.entries[self.fold(key)] = value
        return 0

    def delete(self, key: bytes) -> int:
        return 0 if self.entries.pop(self.fold(key), None) is not None else 1

    def sequence(self, function: int) -> tuple[bytes, bytes] | None:
        return self._cursor.step(function, self.entries)
