"""unionmap:{t1:n1, t2:n2, ...}: every member's result, joined with commas.

NAME
    unionmap -- query all member tables with the same key and join what they find

DESCRIPTION
    Members are split with the brace rules of table names (``textsyntax``) and opened
    through ``ctx.open_table`` with the union's own open mode and flags, so each member
    folds its keys (at load and at lookup) exactly as if it were opened alone; the
    union itself never folds (``docs/TABLES.md`` section 3.14).

    Joining: a comma goes between results only once something was collected, so an
    empty first result adds nothing while a later one yields ``x,``; an empty join is
    "not found". A member error (RETRY or CONFIG, e.g. from an unavailable member) ends
    the lookup at once with that error.

    The union is fixed or pattern like its first member, and asynchronous when any
    member is (then the members are awaited in order).
"""

from __future__ import annotations

from proxymap.tables.base import OpenContext, Table
from proxymap.tables.composite import AsyncComposite, Call, Plan, SyncComposite, choose
from proxymap.tables.pipemap import MemberPlans, open_members


class UnionmapPlans(MemberPlans):
    dict_type = "unionmap"

    def lookup_plan(self, key: bytes) -> Plan[bytes | None]:
        collected = bytearray()
        for member in self.members:  # a member error ends the lookup with that error
            value = yield Call(member, "lookup", key)
            if value is None:
                continue
            if collected:
                collected += b","
            collected += value
        return bytes(collected) if collected else None


class UnionmapTable(UnionmapPlans, SyncComposite):
    pass


class AsyncUnionmapTable(UnionmapPlans, AsyncComposite):
    pass


def open_unionmap(name: str, open_mode: int, flags: int, ctx: OpenContext) -> Table:
    members, flags = open_members(UnionmapPlans.dict_type, name, open_mode, flags, ctx)
    return choose(members, UnionmapTable, AsyncUnionmapTable)(name, open_mode, flags, members)
