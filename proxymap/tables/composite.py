"""Tables built on other tables, written once for both ways of answering.

NAME
    composite -- plans over member tables, run inline or awaited

SYNOPSIS
    class UnionPlans(Composite):
        def lookup_plan(self, key):
            value = yield Call(member, "lookup", key)      # a member operation
            return value

    class UnionmapTable(UnionPlans, SyncComposite): ...        # all members synchronous
    class AsyncUnionmapTable(UnionPlans, AsyncComposite): ...  # any member asynchronous

DESCRIPTION
    The UTF-8 layer, pipemap and unionmap do the same thing whether their members
    answer inline or must be awaited. Their logic is written once as a *plan*: a
    generator that yields each member operation it needs (``Call``) and receives its
    result (or has the member's exception thrown in at the ``yield``, so ``try`` and
    ``finally`` in a plan behave as around a direct call). Two drivers run plans:

    * ``run_sync`` calls ``member.lookup(...)`` inline: a ``SyncComposite`` is a
      ``SyncTable`` and keeps the fast path of local tables;
    * ``run_async`` awaits ``member.alookup(...)`` for an asynchronous member and calls
      a synchronous member inline; when that member's file is locked by a writer
      (``DictBusy``) it pauses on the event loop and tries again, as the request handler
      does for a bare table.

    A composite is asynchronous when any of its members is; the opening function picks
    the class (``choose``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from proxymap.tables.base import (
    BUSY_PAUSE_MAX,
    BUSY_PAUSE_MIN,
    AsyncTable,
    DictBusy,
    DictUnsupported,
    SyncTable,
    Table,
)

R = TypeVar("R")


@dataclass(slots=True, frozen=True)
class Call:
    """One member operation a plan needs: ``op`` is lookup, update, delete or sequence."""

    table: Table
    op: str
    args: tuple[Any, ...]

    def __init__(self, table: Table, op: str, *args: Any) -> None:
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", args)


Plan = Generator[Call, Any, R]


def run_sync(plan: Plan[R]) -> R:
    """Run a plan whose members are all synchronous tables."""
    try:
        call = next(plan)
        while True:
            try:
                result = getattr(call.table, call.op)(*call.args)
            except BaseException as exc:  # noqa: BLE001 - thrown into the plan: its try/finally runs
                call = plan.throw(exc)
            else:
                call = plan.send(result)
    except StopIteration as done:
        return done.value


async def run_async(plan: Plan[R]) -> R:
    """Run a plan on the event loop: asynchronous members awaited, the others inline."""
    try:
        call = next(plan)
        while True:
            try:
                result = await _perform(call)
            except BaseException as exc:  # noqa: BLE001 - thrown into the plan, as above
                call = plan.throw(exc)
            else:
                call = plan.send(result)
    except StopIteration as done:
        return done.value


async def _perform(call: Call) -> Any:
    table = call.table
    if table.asynchronous:
        return await getattr(table, "a" + call.op)(*call.args)
    pause = BUSY_PAUSE_MIN
    while True:
        flags = table.flags
        try:
            return getattr(table, call.op)(*call.args)
        except DictBusy:
            await asyncio.sleep(pause)
            pause = min(pause * 2, BUSY_PAUSE_MAX)
            table.flags = flags  # another request may have used the member meanwhile


class Composite(Table):
    """The plans of a composite table; what a type does not support raises at once."""

    def lookup_plan(self, key: bytes) -> Plan[bytes | None]:
        raise DictUnsupported(f"{self.spec}: lookup is not supported")

    def update_plan(self, key: bytes, value: bytes) -> Plan[int]:
        raise DictUnsupported(f"table {self.spec}: update operation is not supported")

    def delete_plan(self, key: bytes) -> Plan[int]:
        raise DictUnsupported(f"table {self.spec}: delete operation is not supported")

    def sequence_plan(self, function: int) -> Plan[tuple[bytes, bytes] | None]:
        raise DictUnsupported(f"table {self.spec}: sequence operation is not supported")


class SyncComposite(Composite, SyncTable):
    def lookup(self, key: bytes) -> bytes | None:
        return run_sync(self.lookup_plan(key))

    def update(self, key: bytes, value: bytes) -> int:
        return run_sync(self.update_plan(key, value))

    def delete(self, key: bytes) -> int:
        return run_sync(self.delete_plan(key))

    def sequence(self, function: int) -> tuple[bytes, bytes] | None:
        return run_sync(self.sequence_plan(function))


class AsyncComposite(Composite, AsyncTable):
    async def alookup(self, key: bytes) -> bytes | None:
        return await run_async(self.lookup_plan(key))

    async def aupdate(self, key: bytes, value: bytes) -> int:
        return await run_async(self.update_plan(key, value))

    async def adelete(self, key: bytes) -> int:
        return await run_async(self.delete_plan(key))

    async def asequence(self, function: int) -> tuple[bytes, bytes] | None:
        return await run_async(self.sequence_plan(function))


T = TypeVar("T", bound=Table)


def choose(members: Sequence[Table], sync_class: type[T], async_class: type[T]) -> type[T]:
    """The composite class for these members: asynchronous when any member is."""
    return async_class if any(member.asynchronous for member in members) else sync_class
