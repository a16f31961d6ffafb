"""Started lookups in tests: ``AsyncTable.lookup_start`` as the handler's fast path
calls it, and a fixture that runs a test class's lookups both ways."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxymap.tables.base import LATER, STARTED, AsyncTable


async def started(table: AsyncTable, key: bytes) -> object:
    """STARTED's outcome (the value or the exception, as given to the callback), the
    value at once, or LATER."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[object] = loop.create_future()
    value = table.lookup_start(key, outcome.set_result)
    if value is STARTED:
        assert not outcome.done(), "answered from within lookup_start"
        return await outcome
    return value


def both_ways(table_class: type[AsyncTable]) -> Any:
    """A ``way`` fixture: the lookups made as they are written (``alookup``), then
    through ``lookup_start`` -- with ``alookup`` after LATER, as the handler does."""

    @pytest.fixture(params=["alookup", "lookup_start"])
    def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
        if request.param == "lookup_start":
            original = table_class.alookup

            async def alookup(self: AsyncTable, key: bytes) -> bytes | None:
                outcome = await started(self, key)
                if outcome is LATER:
                    return await original(self, key)
                if isinstance(outcome, Exception):
                    raise outcome
                assert outcome is None or isinstance(outcome, bytes)
                return outcome

            monkeypatch.setattr(table_class, "alookup", alookup)
        return str(request.param)

    return way
