"""pipemap:{t1:n1, t2:n2, ...}: a pipeline of lookups.

NAME
    pipemap -- look the key up in the first table, its result in the next, and so on

DESCRIPTION
    The last member's result is the answer (``docs/TABLES.md`` section 3.15).
    A member that does not find its key ends the pipeline with "not found"; a member
    error (RETRY, CONFIG; an unavailable member answers RETRY) ends it with that error.

    ``open_members`` is shared with unionmap: the name must be ``{ member, ... }`` with
    every member of the form ``type:name`` (kept verbatim, braces included); members are
    opened through ``ctx.open_table`` with the composite's open mode and flags, and
    the composite takes the fixed/pattern kind of its first member. A composite with an
    asynchronous member is itself asynchronous (``composite.choose``).
"""

from __future__ import annotations

import os

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, OpenContext, Table
from proxymap.tables.composite import AsyncComposite, Call, Composite, Plan, SyncComposite, choose
from proxymap.tables.textsyntax import BraceError, braced_elements

_KIND = F.FIXED | F.PATTERN


def open_members(
    dict_type: str, name: str, open_mode: int, flags: int, ctx: OpenContext
) -> tuple[list[Table], int]:
    """Open the members of ``{t1:n1, ...}``; returns them and the composite's flags."""
    if open_mode != os.O_RDONLY:
        raise DictOpenError(f"{dict_type}:{name} map requires O_RDONLY access mode")
    try:
        specs = braced_elements(name)
    except BraceError as exc:
        raise DictOpenError(f'bad syntax: "{dict_type}:{name}"; {exc}') from None
    if not specs:
        raise DictOpenError(f'bad syntax: "{dict_type}:{name}"; need at least one table')
    for spec in specs:
        if ":" not in spec:
            raise DictOpenError(
                f'bad syntax: "{dict_type}:{name}"; need "type:name" instead of "{spec}"'
            )
    if ctx is None or ctx.open_table is None:
        raise DictOpenError(f"{dict_type}:{name}: no way to open member tables")
    members = [ctx.open_table(spec, open_mode, flags) for spec in specs]
    kind = members[0].flags & _KIND
    return members, (flags & ~_KIND) | kind


class MemberPlans(Composite):
    """A composite of member tables (pipemap, unionmap): keeps and closes them."""

    def __init__(self, name: str, open_mode: int, flags: int, members: list[Table]) -> None:
        super().__init__(name, open_mode, flags)
        self.members = members

    def close(self) -> None:
        for member in self.members:
            member.close()


class PipemapPlans(MemberPlans):
    dict_type = "pipemap"

    def lookup_plan(self, key: bytes) -> Plan[bytes | None]:
        value: bytes | None = key
        for member in self.members:
            value = yield Call(member, "lookup", value)
            if value is None:
                return None
        return value


class PipemapTable(PipemapPlans, SyncComposite):
    pass


class AsyncPipemapTable(PipemapPlans, AsyncComposite):
    pass


def open_pipemap(name: str, open_mode: int, flags: int, ctx: OpenContext) -> Table:
    members, flags = open_members(PipemapPlans.dict_type, name, open_mode, flags, ctx)
    return choose(members, PipemapTable, AsyncPipemapTable)(name, open_mode, flags, members)
