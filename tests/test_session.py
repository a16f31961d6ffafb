"""The Session without a socket: bytes in, bytes out (docs/PROTOCOL.md 2.2-2.8).

The request handler is the real one, on inline tables and, for slowness, the
asynchronous ``slow:<seconds>`` table of tests/test_connection.py, whose awaitables
these tests await on a private loop (or answer themselves) in place of a driver.
Every conversation is also fed cut at every split point: the bytes out never depend
on the chunking.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import pytest

from proxymap import attr
from proxymap.handler import RequestHandler
from proxymap.protocol import ANNOUNCEMENT, OK, RETRY, Reply, stream_name
from proxymap.session import Session
from proxymap.tables import TABLE_TYPES
from tests.test_connection import SlowTable  # noqa: F401 - registered by name below

TABLE = "inline:{alice=alice@example.com,bob=bob@example.com}"
SLOW = "slow:0"
ALICE = b"status\x000\x00value\x00alice@example.com\x00\x00"
BOB = b"status\x000\x00value\x00bob@example.com\x00\x00"
NOT_FOUND = b"status\x001\x00value\x00\x00\x00"
BAD_LOOKUP = b"status\x003\x00value\x00\x00\x00"
SLOW_X = b"status\x000\x00value\x00slow:x\x00\x00"
UNKNOWN = b"status\x003\x00\x00"


class Hooks:
    """The skeleton's side: TAKEN and AVAIL, recorded."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.busy = 0

    def request_started(self) -> None:
        self.busy += 1
        self.events.append("TAKEN")

    def request_done(self) -> None:
        self.busy -= 1
        self.events.append("AVAIL")


@pytest.fixture(autouse=True)
def slow_table(monkeypatch):
    monkeypatch.setitem(TABLE_TYPES, "slow", "tests.test_connection:SlowTable")


def lookup(table: str, key: bytes) -> bytes:
    return attr.encode(
        [(b"request", b"lookup"), (b"table", table.encode()), (b"flags", b"64"), (b"key", key)]
    )


def new_session(hooks: Hooks | None = None, **options) -> Session:
    handler = RequestHandler("proxymap", {TABLE, SLOW}, {})
    return Session(handler, stream_name("proxymap"), hooks or Hooks(), **options)


def await_privately(awaitable: Awaitable[Reply]) -> object:
    async def wait() -> Reply:
        return await awaitable

    return asyncio.run(wait())


def converse(session: Session, chunks: list[bytes], eof: bool = False) -> bytes:
    """What a driver does: feed, await what is slow, end the input."""
    out = []
    for chunk in chunks:
        if session.finished:
            break
        out.append(session.receive_data(chunk))
        while session.slow is not None:
            out.append(session.slow_answered(await_privately(session.slow)))
    if eof and not session.finished:
        out.append(session.receive_eof())
        while session.slow is not None:
            out.append(session.slow_answered(await_privately(session.slow)))
    return b"".join(out)


def every_split(data: bytes, eof: bool = False, **options) -> set[tuple[bytes, bool]]:
    """The (output, finished) of the conversation cut at each point, and byte by byte."""
    outcomes = set()
    for cut in range(len(data) + 1):
        hooks = Hooks()
        session = new_session(hooks, **options)
        output = converse(session, [data[:cut], data[cut:]], eof)
        assert hooks.busy == 0, cut
        outcomes.add((output, session.finished))
    session = new_session(**options)
    pieces = [data[i : i + 1] for i in range(len(data))]
    outcomes.add((converse(session, pieces, eof), session.finished))
    return outcomes


def test_announcement():
    assert new_session().start() == ANNOUNCEMENT


def test_lookups_golden_bytes_with_taken_and_avail():
    hooks = Hooks()
    session = new_session(hooks)
    assert session.receive_data(lookup(TABLE, b"alice")) == ALICE
    assert session.receive_data(lookup(TABLE, b"nobody")) == NOT_FOUND
    g2_open = b"request\x00open\x00table\x00" + TABLE.encode() + b"\x00instance_flags\x000\x00\x00"
    assert session.receive_data(g2_open) == b"status\x000\x00flags\x0016\x00\x00"
    assert hooks.events == ["TAKEN", "AVAIL"] * 3
    assert session.idle and session.deadline_key is None and not session.finished


def test_repeated_lookups_take_the_shortcut_with_the_same_bytes():
    session = new_session()
    assert session.receive_data(lookup(TABLE, b"alice")) == ALICE
    (prefix,) = session.handler.lookup_shortcuts
    assert lookup(TABLE, b"bob").startswith(prefix)
    assert session.receive_data(lookup(TABLE, b"bob")) == BOB
    assert session.receive_data(lookup(TABLE, b"")) == NOT_FOUND
    # "key NUL NUL" with the list terminator still to come: not a lookup of "" yet.
    assert session.receive_data(lookup(TABLE, b"")[:-1]) == b""
    assert session.receive_data(b"\x00") == NOT_FOUND


def test_pipelined_conversation_is_the_same_at_every_split():
    data = (
        lookup(TABLE, b"alice")
        + b"\x00"  # an empty list: no reply
        + lookup(TABLE, b"nobody")
        + b"request\x00bogus\x00\x00"
        + b"table\x00x\x00\x00"  # not starting with request: no reply
        + lookup(TABLE, b"bob")
    )
    expected = ALICE + NOT_FOUND + UNKNOWN + BOB
    assert every_split(data) == {(expected, False)}
    assert every_split(data, eof=True) == {(expected, True)}


def test_end_of_input_at_every_point_of_a_request():
    request = lookup(TABLE, b"alice")
    request_name = len(b"request\x00lookup\x00")
    for cut in range(1, len(request) + 1):
        session = new_session()
        output = converse(session, [request[:cut]], eof=True)
        if cut == len(request):
            assert output == ALICE
        elif cut < request_name:
            assert output == b""  # "request" not complete: Postfix answers nothing
        else:
            assert output == BAD_LOOKUP, cut
        assert session.finished


def test_end_of_input_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="proxymap"):
        assert converse(new_session(), [b"request\x00lookup\x00tab"], eof=True) == BAD_LOOKUP
        assert converse(new_session(), [b"request\x00lookup\x00table\x00"], eof=True) == BAD_LOOKUP
    assert caplog.messages == [
        "unexpected end-of-input from proxymap socket while reading input attribute name",
        "premature end-of-input on proxymap socket while reading input attribute value",
    ]


def test_slow_request_replies_keep_their_order_at_every_split():
    data = lookup(TABLE, b"alice") + lookup(SLOW, b"x") + lookup(TABLE, b"bob")
    data += lookup(SLOW, b"x") + lookup(TABLE, b"nobody")
    expected = ALICE + SLOW_X + BOB + SLOW_X + NOT_FOUND
    assert every_split(data) == {(expected, False)}
    assert every_split(data + b"request\x00lookup\x00", eof=True) == {(expected + BAD_LOOKUP, True)}


def test_input_behind_a_slow_request_waits_for_it():
    hooks = Hooks()
    session = new_session(hooks)
    assert session.receive_data(lookup(SLOW, b"x")) == b""
    slow = session.slow
    assert slow is not None and not session.idle and session.deadline_key is None
    assert session.receive_data(lookup(TABLE, b"alice")) == b""  # queued, not answered
    assert session.receive_data(b"request\x00lookup\x00") == b""
    assert session.receive_eof() == b""  # the slow reply still goes first
    assert not session.finished and hooks.busy == 1
    slow.close()  # type: ignore[attr-defined]  # answered here instead
    reply = session.slow_answered(Reply(OK, value=b"made up"))
    assert reply == b"status\x000\x00value\x00made up\x00\x00" + ALICE + BAD_LOOKUP
    assert session.finished and hooks.busy == 0


def test_slow_request_that_fails_is_answered_retry(caplog):
    session = new_session()
    session.receive_data(lookup(SLOW, b"x") + lookup(TABLE, b"bob"))
    session.slow.close()  # type: ignore[union-attr]
    with caplog.at_level(logging.ERROR, logger="proxymap"):
        reply = session.slow_answered(asyncio.CancelledError())
    assert reply == b"status\x00%d\x00value\x00\x00\x00" % RETRY + BOB
    assert caplog.messages == [f"lookup request for {SLOW} failed: CancelledError()"]
    session.receive_data(lookup(SLOW, b"y"))
    session.slow.close()  # type: ignore[union-attr]
    with caplog.at_level(logging.ERROR, logger="proxymap"):
        assert session.slow_answered("not a reply") == b"status\x002\x00value\x00\x00\x00"
    assert "is not a Reply" in caplog.messages[-1]


def test_client_gone_while_slow_still_balances():
    hooks = Hooks()
    session = new_session(hooks)
    session.receive_data(lookup(SLOW, b"x") + lookup(TABLE, b"alice"))
    session.connection_lost()
    assert session.slow_answered(await_privately(session.slow)) == b""  # type: ignore[arg-type]
    assert hooks.events == ["TAKEN", "AVAIL"] and session.slow is None


def test_deadline_key_names_the_request_being_waited_for(caplog):
    session = new_session()
    assert session.deadline_key is None
    session.receive_data(b"request\x00lookup\x00")
    first = session.deadline_key
    assert first is not None
    session.receive_data(b"table\x00")  # more of the same request: the same clock
    assert session.deadline_key == first
    rest = lookup(TABLE, b"alice")[len(b"request\x00lookup\x00table\x00") :]
    assert session.receive_data(rest + b"request\x00") == ALICE
    second = session.deadline_key
    assert second is not None and second != first  # a new request: a new clock
    with caplog.at_level(logging.WARNING, logger="proxymap"):
        session.deadline_expired()
    assert caplog.messages == ["timeout on proxymap socket while reading input attribute value"]
    assert session.finished and session.deadline_key is None
    assert session.receive_data(lookup(TABLE, b"alice")) == b""  # nothing after that


def test_expired_clock_after_the_request_completed_is_ignored():
    session = new_session()
    session.receive_data(lookup(TABLE, b"alice"))
    session.deadline_expired()  # a driver's clock that had not been stopped yet
    assert not session.finished and session.idle


def test_oversized_list_is_answered_bad_and_finishes(caplog):
    data = lookup(TABLE, b"alice") + lookup(TABLE, b"k" * 500)
    outcomes = set()
    for cut in range(len(data) + 1):
        session = new_session()
        session.decoder.limit = 300
        with caplog.at_level(logging.WARNING, logger="proxymap"):
            outcomes.add((converse(session, [data[:cut], data[cut:]]), session.finished))
    assert outcomes == {(ALICE + BAD_LOOKUP, True)}
    assert "attribute list from proxymap socket exceeds 300 bytes" in caplog.messages


def test_one_request_answers_the_first_list_only():
    data = lookup(TABLE, b"alice") + lookup(TABLE, b"bob")
    assert every_split(data, one_request=True) == {(ALICE, True)}
    assert every_split(lookup(SLOW, b"x") + data, one_request=True) == {(SLOW_X, True)}
    assert every_split(b"\x00" + data, one_request=True) == {(b"", True)}
    session = new_session(one_request=True)
    assert converse(session, [b"request\x00lookup\x00table"], eof=True) == BAD_LOOKUP
    session = new_session(one_request=True)
    assert converse(session, [b""], eof=True) == b"" and session.finished


def test_size_cap_boundary_is_the_same_on_the_fast_path():
    request = lookup(TABLE, b"bob")
    for limit, expected in ((len(request) - 1, BOB), (len(request) - 2, BAD_LOOKUP)):
        outcomes = set()
        for pieces in ([request], [request[:9], request[9:]]):
            session = new_session()
            assert session.receive_data(request) == BOB  # the fast path learns it
            session.decoder.limit = limit
            outcomes.add(converse(session, pieces))
        assert outcomes == {expected}, limit


# --- the fast path of a slow table -------------------------------------------------------------
SLOW_Y = b"status\x000\x00value\x00slow:y\x00\x00"


def learnt_session(hooks: Hooks | None = None, **options) -> Session:
    """A session whose handler has learnt the slow and the inline table's lookups."""
    session = new_session(hooks, **options)
    assert converse(session, [lookup(SLOW, b"x"), lookup(TABLE, b"alice")]) == SLOW_X + ALICE
    assert len(session.handler.lookup_shortcuts) == 2
    return session


def converse_eagerly(session: Session, chunks: list[bytes], eof: bool = False) -> bytes:
    """A driver fed faster than the slow table answers: everything is received (and
    queued behind the slow request) before the first await."""
    out = [session.receive_data(chunk) for chunk in chunks]
    if eof:
        out.append(session.receive_eof())
    while session.slow is not None:
        out.append(session.slow_answered(await_privately(session.slow)))
    return b"".join(out)


def every_split_learnt(data: bytes, eof: bool = False) -> set[tuple[bytes, bool]]:
    """Like every_split, on a learnt session, with both drivers."""
    outcomes = set()
    cuts = [[data[:cut], data[cut:]] for cut in range(len(data) + 1)]
    cuts.append([data[i : i + 1] for i in range(len(data))])
    for chunks in cuts:
        for drive in (converse, converse_eagerly):
            hooks = Hooks()
            session = learnt_session(hooks)
            output = drive(session, chunks, eof)
            assert hooks.busy == 0 and hooks.events == ["TAKEN", "AVAIL"] * (len(hooks.events) // 2)
            outcomes.add((output, session.finished))
    return outcomes


def test_a_learnt_slow_lookup_takes_the_fast_path():
    hooks = Hooks()
    session = learnt_session(hooks)
    hooks.events.clear()
    assert session.answer_whole(lookup(SLOW, b"y")) == b""  # taken: the reply is awaited
    assert session.slow is not None and hooks.busy == 1
    assert not session.idle and session.deadline_key is None and not session.finished
    assert session.slow_answered(await_privately(session.slow)) == SLOW_Y
    assert session.idle and hooks.events == ["TAKEN", "AVAIL"]
    # Input received meanwhile waits behind it, in order, whatever path it would take.
    assert session.receive_data(lookup(SLOW, b"x")) == b""
    assert session.receive_data(lookup(TABLE, b"alice")) == b""
    assert session.receive_data(lookup(SLOW, b"y")) == b""
    assert session.slow_answered(await_privately(session.slow)) == SLOW_X + ALICE
    assert session.slow_answered(await_privately(session.slow)) == SLOW_Y
    assert session.slow is None and session.idle and hooks.busy == 0


def test_fast_slow_lookups_keep_their_order_at_every_split():
    data = lookup(SLOW, b"x") + lookup(TABLE, b"alice") + lookup(SLOW, b"y")
    data += lookup(TABLE, b"nobody") + lookup(SLOW, b"x")
    expected = SLOW_X + ALICE + SLOW_Y + NOT_FOUND + SLOW_X
    assert every_split_learnt(data) == {(expected, False)}
    cut_short = data + b"request\x00lookup\x00"
    assert every_split_learnt(cut_short, eof=True) == {(expected + BAD_LOOKUP, True)}


def test_end_of_input_during_a_fast_slow_lookup():
    hooks = Hooks()
    session = learnt_session(hooks)
    assert session.receive_data(lookup(SLOW, b"y")) == b""
    assert session.receive_eof() == b""  # its reply still goes out
    assert not session.finished and hooks.busy == 1
    assert session.slow_answered(await_privately(session.slow)) == SLOW_Y  # type: ignore[arg-type]
    assert session.finished and hooks.busy == 0


def test_client_gone_during_a_fast_slow_lookup_still_balances():
    hooks = Hooks()
    session = learnt_session(hooks)
    hooks.events.clear()
    session.receive_data(lookup(SLOW, b"y"))
    session.receive_data(lookup(TABLE, b"alice"))
    session.connection_lost()
    assert session.slow_answered(await_privately(session.slow)) == b""  # type: ignore[arg-type]
    assert hooks.events == ["TAKEN", "AVAIL"] and session.slow is None


def test_no_clock_runs_behind_a_fast_slow_lookup():
    session = learnt_session()
    session.receive_data(lookup(SLOW, b"y"))
    session.receive_data(b"request\x00lookup\x00")
    assert session.deadline_key is None  # the slow request is ahead
    assert session.slow_answered(await_privately(session.slow)) == SLOW_Y  # type: ignore[arg-type]
    assert session.deadline_key is not None  # now the partial request is waited for


def g2_lookup(table: str, key: bytes) -> bytes:
    return attr.encode(
        [
            (b"request", b"lookup"),
            (b"table", table.encode()),
            (b"instance_flags", b"540737"),
            (b"flags", b"540737"),
            (b"key", key),
        ]
    )


@pytest.mark.parametrize(
    "form, retry",
    [
        (lookup, b"status\x002\x00value\x00\x00\x00"),
        (g2_lookup, b"status\x002\x00flags\x000\x00value\x00\x00\x00"),
    ],
)
def test_a_failed_fast_slow_lookup_is_answered_as_on_the_general_path(caplog, form, retry):
    """Cancelled (the driver's task, before or while it ran): RETRY in the request's
    generation and the same log line, whichever path the request took."""
    replies = []
    for learnt in (False, True):
        hooks = Hooks()
        session = new_session(hooks)
        if learnt:
            assert converse(session, [form(SLOW, b"x")]) != b""
            assert session.answer_whole(form(SLOW, b"y")) == b""
        else:
            assert session.receive_data(form(SLOW, b"y")) == b""
        session.slow.close()  # type: ignore[union-attr]  # never started
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="proxymap"):
            replies.append(session.slow_answered(asyncio.CancelledError()))
        assert caplog.messages == [f"lookup request for {SLOW} failed: CancelledError()"]
        assert hooks.busy == 0 and session.idle
    assert replies == [retry, retry]
