"""Composite plans: one logic, run inline or awaited, with member errors thrown in."""

from __future__ import annotations

import asyncio

import pytest

from proxymap.tables.base import AsyncTable, DictBusy, DictRetry, SyncTable
from proxymap.tables.composite import (
    AsyncComposite,
    Call,
    Composite,
    Plan,
    SyncComposite,
    choose,
    run_async,
    run_sync,
)


class Upper(SyncTable):
    """Synchronous member: upper-cases; ``busy`` times DictBusy first, ``fail`` raises."""

    def __init__(self, busy: int = 0) -> None:
        super().__init__("upper", 0, 0)
        self.busy = busy

    def lookup(self, key: bytes) -> bytes | None:
        if self.busy:
            self.busy -= 1
            raise DictBusy("locked")
        if key == b"fail":
            raise DictRetry("member failed")
        return key.upper()


class Reverse(AsyncTable):
    def __init__(self) -> None:
        super().__init__("reverse", 0, 0)

    async def alookup(self, key: bytes) -> bytes | None:
        await asyncio.sleep(0)
        return key[::-1]


class ChainPlans(Composite):
    spec = "chain:test"

    def __init__(self, members) -> None:
        super().__init__("chain", 0, 0)
        self.members = members
        self.cleanups = 0

    def lookup_plan(self, key: bytes) -> Plan[bytes | None]:
        value = key
        for member in self.members:
            try:
                value = yield Call(member, "lookup", value)
            finally:
                self.cleanups += 1
        return value


class Chain(ChainPlans, SyncComposite):
    pass


class AsyncChain(ChainPlans, AsyncComposite):
    pass


def open_chain(members):
    return choose(members, Chain, AsyncChain)(members)


def test_all_synchronous_members_make_a_synchronous_composite():
    chain = open_chain([Upper(), Upper()])
    assert isinstance(chain, SyncTable) and not chain.asynchronous
    assert chain.lookup(b"abc") == b"ABC" and chain.cleanups == 2


def test_an_asynchronous_member_makes_it_asynchronous():
    chain = open_chain([Upper(), Reverse()])
    assert isinstance(chain, AsyncTable) and chain.asynchronous
    assert asyncio.run(chain.alookup(b"abc")) == b"CBA"


def test_member_errors_are_thrown_into_the_plan_both_ways():
    sync = open_chain([Upper(), Upper()])
    with pytest.raises(DictRetry):
        sync.lookup(b"fail")
    assert sync.cleanups == 1  # the plan's finally ran at the failing call
    mixed = open_chain([Upper(), Reverse()])
    with pytest.raises(DictRetry):
        asyncio.run(mixed.alookup(b"fail"))
    assert mixed.cleanups == 1


def test_a_busy_synchronous_member_is_retried_on_the_loop():
    busy = Upper(busy=3)
    chain = open_chain([busy, Reverse()])

    async def scenario():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        ticker = asyncio.create_task(tick())
        value = await chain.alookup(b"abc")
        ticker.cancel()
        return value, ticks

    value, ticks = asyncio.run(scenario())
    assert value == b"CBA" and busy.busy == 0 and ticks > 0


def test_the_drivers_return_what_a_plan_returns_without_yielding():
    def nothing() -> Plan[int]:
        return 7
        yield  # a generator all the same

    assert run_sync(nothing()) == 7
    assert asyncio.run(run_async(nothing())) == 7
