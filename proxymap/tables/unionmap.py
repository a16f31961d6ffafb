"""unionmap:{t1:n1, t2:n2, ...}: every member's result, joined with commas.

NAME
    unionmap -- query all member tables with the same key and join what they find

DESCRIPTION
    Members are split with the brace rules of table names (``textsyntax``) and opened
    through ``ctx.open_table`` with the union's own open mode and flags, so each member
    folds its keys (at load and at lookup) exactly as if it were opened alone; the
    union itself never folds (``../shared/spec/TABLES.md`` section 3.14).

    Joining: a comma goes between results only once something was collected, so an
    empty first result adds nothing while a later one yields ``x,``; an empty join is
    "not found". A member error (RETRY or CONFIG, e.g. from an unavailable member) ends
    the lookup at once with that error.

    The union is fixed or pattern like its first member, and asynchronous when any
    member is (then ``alookup`` awaits the members in order).
"""

from __future__ import annotations

from proxymap.tables.base import OpenContext, Table
from proxymap.tables.pipemap import open_members


class UnionmapTable(Table):
    dict_type = "unionmap"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags)
        self.members, self.flags = open_members(self.dict_type, name, open_mode, flags, ctx)
        self.asynchronous = any(member.asynchronous for member in self.members)

    def lookup(self, key: bytes) -> bytes | None:
        return _joined(member.lookup(key) for member in self.members)

    async def alookup(self, key: bytes) -> bytes | None:
        results = []
        for member in self.members:
            results.append(await member.alookup(key))
        return _joined(results)

    def close(self) -> None:
        for member in self.members:
            member.close()


def _joined(results) -> bytes | None:
    collected = bytearray()
    for value in results:  # a generator: a member error stops the remaining lookups
        if value is None:
            continue
        if collected:
            collected += b","
        collected += value
    return bytes(collected) if collected else None
