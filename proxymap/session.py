"""One client's conversation with the proxymap server, without I/O (sans-I/O).

NAME
    session -- announcement, request framing, in-order replies, end of input, deadline

SYNOPSIS
    session = Session(handler, stream_name("proxymap"), hooks)
    send(session.start())                     # the announcement
    send(session.receive_data(data))          # the replies ready now (b"" if none)
    while session.slow is not None:           # a slow table's answer is awaited first:
        send(session.slow_answered(await session.slow))   # it, and what queued behind
    send(session.receive_eof())               # end of input
    session.deadline_key                      # None, or the request the clock times
    session.finished                          # all said: close the connection

DESCRIPTION
    A ``Session`` takes what the client sends and end of input, and gives the bytes to
    send; its driver owns the socket, the clock and the awaiting (``proxymap.connection``
    on the worker's event loop, ``proxymap.server``'s ``-S`` mode on stdin/stdout).

    Announcement: ``start()`` gives the 28 bytes every accepted connection receives
    before anything is read (docs/PROTOCOL.md 2.2); ``-S`` sends none.

    Requests: received bytes go through the attribute decoder (``proxymap.attr``);
    each complete list is scanned (``proxymap.protocol``), handled by the request
    handler and encoded, between ``hooks.request_started()`` and
    ``hooks.request_done()`` (the master's TAKEN and AVAIL). Requests that arrive
    together (pipelining; real clients never do it) are all answered, in order, in one
    piece of output; Postfix would answer only the first, answering all is harmless.

    Fast path: one whole lookup in one chunk, between requests, whose bytes before the
    key were seen before, is answered by the handler's compiled lookup for that prefix
    (``RequestHandler.compile_lookup``): a dictionary hit, a slice and a call, no
    decoding or parsing. A slow table's compiled lookup gives an awaitable of the
    encoded reply instead: it becomes ``slow`` as below (``answer_whole`` returns
    b""), and only if it fails is the request parsed, for its log line and its
    RETRY reply.

    Slow (asynchronous) tables: the handler's awaitable becomes ``slow``; the driver
    awaits it, stops reading, and hands the outcome (a ``Reply``, the encoded reply of
    a fast-path lookup, or the exception that ended the wait) to ``slow_answered``.
    Requests received meanwhile wait in order behind it, so replies keep their order.

    Deadline: a request must arrive complete within ``REQUEST_DEADLINE`` seconds of
    waiting for it (Postfix's deadline-mode stream). ``deadline_key`` names the
    request being waited for; the driver runs one clock per key and calls
    ``deadline_expired()`` when it runs out: Postfix's warning, then the connection
    is closed without a reply (the C server instead spins on the readable socket).
    No clock runs between requests or while a slow request is ahead.

    End of input in the middle of a request: it is answered BAD in its shape (when
    its ``request`` attribute was complete), then the session finishes. So does a
    list larger than the decoder's limit (``attr.MAX_LIST_BYTES``).

    ``one_request`` (``-S``): the first list is answered and everything after it
    ignored.

    Nothing a client sends raises out of this class: every failure is logged and turned
    into a reply or the end of the session, so a worker never dies of input (the master
    would throttle the whole service).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

from proxymap import attr
from proxymap.protocol import (
    ANNOUNCEMENT,
    RETRY,
    Reply,
    Request,
    encode_reply,
    lookup_prefix,
    parse_request,
    reply_to_truncated,
)

if TYPE_CHECKING:
    from proxymap.handler import RequestHandler

log = logging.getLogger("proxymap")

#: Postfix's per-request read budget (proxymap puts the stream in deadline mode).
REQUEST_DEADLINE = 1.0

#: Every lookup ends with ``key NUL <key> NUL`` and the list terminator NUL.
_KEY_NAME = b"\x00key\x00"
_LIST_END = b"\x00\x00"
#: Bound on remembered request prefixes (a client cycling through flag words or table
#: names must not grow the cache without limit).
MAX_SHORTCUTS = 4096


class RequestHooks(Protocol):
    """Told around every request (the multi-server skeleton: TAKEN and AVAIL)."""

    def request_started(self) -> None: ...

    def request_done(self) -> None: ...


class _Unobserved:
    def request_started(self) -> None:
        pass

    def request_done(self) -> None:
        pass


class Session:
    """Serves one client: strictly one reply per request, in request order."""

    def __init__(
        self,
        handler: RequestHandler,
        stream: str,
        hooks: RequestHooks | None = None,
        *,
        one_request: bool = False,
    ) -> None:
        self.handler = handler
        self.stream = stream
        self.hooks: RequestHooks = hooks if hooks is not None else _Unobserved()
        self.one_request = one_request
        self.decoder = attr.AttrDecoder()
        self._shortcuts = handler.lookup_shortcuts
        #: Between requests: nothing buffered, nothing slow, not closing -- the only
        #: state in which a chunk may take the fast path (and no clock runs).
        self.idle = True
        #: What the driver must await before anything else is answered: the handler's
        #: ``Reply``, or the encoded reply of a fast-path lookup.
        self.slow: Awaitable[Reply] | Awaitable[bytes] | None = None
        #: The request ``slow`` answers; a fast-path lookup's bytes, parsed only if
        #: it fails.
        self._slow_request: Request | bytes | None = None
        self._queue: deque[attr.Pairs] = deque()  # received, waiting behind a slow request
        self.closing = False  # no more input is served: end of input, size, deadline
        self.finished = False  # everything is answered: the driver closes the connection
        self._final_reply: bytes | None = None  # answer to a cut-short request, if any
        self._lost = False  # the client is gone: nothing more is sent
        self._lists = 0  # complete lists received: which request the deadline times

    # --- input ---------------------------------------------------------------------------
    def start(self) -> bytes:
        """What an accepted connection is sent before anything is read."""
        return ANNOUNCEMENT

    def receive_data(self, data: bytes) -> bytes:
        """Take received bytes; return the replies they complete."""
        reply = self.answer_whole(data)
        return reply if reply is not None else self.decode_and_serve(data)

    def answer_whole(self, data: bytes) -> bytes | None:
        """The fast path alone: the reply when ``data`` is one whole lookup, between
        requests, whose prefix was seen before; else None, and nothing changed (the
        caller goes on with ``decode_and_serve``). A driver calls them apart to skip
        looking at the state after a fast answer: it leaves the session idle. b""
        when the table is slow: ``slow`` is then set, as on the general path."""
        if self.idle and data[-2:] == _LIST_END:
            # The key is what follows the last "key" name; a NUL in it means more than
            # one list: general path.
            size = len(data)
            cut = data.rfind(_KEY_NAME) + 5
            # ``key NUL NUL`` ends the chunk: an empty key value, but no list terminator
            # yet (the fuzzer found it answered as a lookup of the empty key). A list
            # over the size cap is refused, as in any other chunking.
            if cut <= size - 2 and size <= self.decoder.limit + 1:
                answer = self._shortcuts.get(data[:cut])
                if answer is not None:
                    key = data[cut:-2]
                    if 0 not in key:  # the byte value (cheaper than b"\x00")
                        hooks = self.hooks
                        hooks.request_started()
                        reply = answer(key)
                        if isinstance(reply, bytes):
                            hooks.request_done()
                            return reply
                        if reply is None:  # the table is busy: the general path waits
                            hooks.request_done()
                            return None
                        return self._await_answer(reply, data)
        return None

    def _await_answer(self, answer: Awaitable[bytes], request: bytes) -> bytes:
        """A fast-path lookup of a slow table: ``slow`` is its encoded reply."""
        self.slow = answer
        self._slow_request = request  # parsed only if it fails
        self.idle = False
        return b""

    def decode_and_serve(self, data: bytes) -> bytes:
        """The general path of ``receive_data``: decode, answer in order, queue behind
        a slow request."""
        if self.closing:
            return b""  # after end of input, an oversized list or the one request
        try:
            lists = self.decoder.feed(data)
        except attr.AttrTooLarge as exc:
            log.warning("attribute list from %s exceeds %d bytes", self.stream, self.decoder.limit)
            lists = exc.complete
            self.closing = True
            self._final_reply = reply_to_truncated(exc.partial)
        if not lists:
            return self._settle() if self.slow is None else b""
        self._lists += len(lists)
        if self.one_request:
            lists = lists[:1]
            self.closing = True
            self._final_reply = None
            self.decoder.reset()
        if self.slow is not None:
            self._queue.extend(lists)  # their turn comes after the slow reply
            return b""
        out = self._serve(lists)
        if self.slow is not None:
            return out
        return out + self._settle()

    def receive_eof(self) -> bytes:
        """End of input: the answer to a request it cut short, if any."""
        if not self.closing and self.decoder.pending:
            self._warn_truncated()
            self._final_reply = reply_to_truncated(
                self.decoder.pairs_so_far, self.decoder.pending_name
            )
            self.decoder.reset()
        self.closing = True
        self.idle = False
        return self._settle() if self.slow is None else b""

    def _warn_truncated(self) -> None:
        decoder = self.decoder
        if decoder.in_field:
            log.warning(
                "unexpected end-of-input from %s while reading input attribute %s",
                self.stream,
                decoder.reading,
            )
        else:
            log.warning(
                "premature end-of-input on %s while reading input attribute %s",
                self.stream,
                decoder.reading,
            )

    def connection_lost(self) -> None:
        """The client is gone: nothing more is served (a slow request still ends)."""
        self._lost = True
        self.closing = True
        self.idle = False
        self._queue.clear()
        self._final_reply = None

    # --- the deadline --------------------------------------------------------------------
    @property
    def deadline_key(self) -> int | None:
        """The request the clock times (one clock per key), None when none runs."""
        if self.idle or self.closing or self.slow is not None or not self.decoder.pending:
            return None
        return self._lists

    def deadline_expired(self) -> None:
        """The clock of ``deadline_key`` ran out: warn and finish, without a reply."""
        if self.deadline_key is None:
            return  # a clock the driver had not stopped yet: nothing is late
        log.warning(
            "timeout on %s while reading input attribute %s", self.stream, self.decoder.reading
        )
        self.decoder.reset()
        self.closing = self.finished = True

    # --- serving -------------------------------------------------------------------------
    def _serve(self, lists: list[attr.Pairs]) -> bytes:
        """Answer complete lists in order; stop at a slow request and queue the rest."""
        hooks = self.hooks
        out: list[bytes] = []
        for index, pairs in enumerate(lists):
            hooks.request_started()
            parsed = parse_request(pairs, self.stream)
            if isinstance(parsed, Request):
                request = parsed
                try:
                    result = self.handler.handle(request)
                except Exception as exc:  # a handler bug must not kill the worker
                    log.error(
                        "%s request for %s failed: %r", request.op, request.table, exc, exc_info=exc
                    )
                    result = Reply(RETRY)
                if request.op == "lookup":
                    self._learn_shortcut(pairs, request)
                if not isinstance(result, Reply):
                    # A slow table: what is ready goes out, the rest waits behind it.
                    self.slow = result
                    self._slow_request = request
                    self._queue.extendleft(reversed(lists[index + 1 :]))
                    self.idle = False
                    return b"".join(out)
                out.append(encode_reply(request.op, request.generation, result))
            elif parsed is not None:
                out.append(parsed)
            hooks.request_done()
        return b"".join(out)

    def _learn_shortcut(self, pairs: attr.Pairs, request: Request) -> None:
        prefix = lookup_prefix(pairs, request.generation)
        if prefix is None or prefix in self._shortcuts:
            return
        if len(self._shortcuts) >= MAX_SHORTCUTS:
            self._shortcuts.clear()
        self._shortcuts[prefix] = self.handler.compile_lookup(request)

    def slow_answered(self, outcome: object) -> bytes:
        """The end of the wait for ``slow``: its ``Reply``, or the exception that ended
        it. Returns its reply and the replies of the requests queued behind it (up to
        the next slow one)."""
        request = self._slow_request
        assert request is not None, "slow_answered without a slow request"
        self.slow = self._slow_request = None
        if isinstance(outcome, bytes) and isinstance(request, bytes):
            reply = outcome  # a fast-path lookup's reply, encoded by the handler
        else:
            if isinstance(request, bytes):
                request = self._parsed(request)
            if not isinstance(outcome, Reply):
                if not isinstance(outcome, BaseException):
                    outcome = TypeError(f"handler result {outcome!r} is not a Reply")
                log.error("%s request for %s failed: %r", request.op, request.table, outcome)
                outcome = Reply(RETRY)
            reply = encode_reply(request.op, request.generation, outcome)
        self.hooks.request_done()
        if self._lost:
            return b""
        if self._queue:
            queued = list(self._queue)
            self._queue.clear()
            reply += self._serve(queued)
            if self.slow is not None:
                return reply
        elif not self.closing:  # the usual case, as _settle has it
            self.idle = not self.decoder.pending
            return reply
        return reply + self._settle()

    def _parsed(self, request: bytes) -> Request:
        """The ``Request`` of a fast-path lookup (the prefix was learnt from one)."""
        (pairs,) = attr.AttrDecoder().feed(request)
        parsed = parse_request(pairs, self.stream)
        assert isinstance(parsed, Request), "a fast-path lookup that does not parse"
        return parsed

    # --- between requests ----------------------------------------------------------------
    def _settle(self) -> bytes:
        """Nothing slow is pending: finish when closing, else wait for more input."""
        if self.closing:
            self.idle = False
            return self._finish()
        self.idle = not self.decoder.pending and not self._lost
        return b""

    def _finish(self) -> bytes:
        """Answer a request cut short by end of input (or size), once."""
        self.finished = True
        reply, self._final_reply = self._final_reply, None
        if reply is None or self._lost:
            return b""
        self.hooks.request_started()
        self.hooks.request_done()
        return reply
