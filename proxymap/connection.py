"""One proxymap client connection on the worker's event loop.

NAME
    connection -- announcement, request framing, in-order replies, the 1-second deadline

SYNOPSIS
    protocol = ProxymapProtocol(server, handler, stream_name("proxymap"))

DESCRIPTION
    On accept the 28-byte announcement is written. Received bytes go through the
    attribute decoder (``proxymap.attr``); each complete list is scanned
    (``proxymap.protocol``) and handed to the request handler, between
    ``server.request_started()`` and ``server.request_done()`` so that the master sees
    the process TAKEN and AVAIL around every request, as from a Postfix daemon.

    Fast path: a table that answers inline returns a ``Reply``; it is encoded and written
    at once -- no task, no future. Faster still, the common case -- one whole lookup
    in one chunk, between requests -- skips decoding and parsing: the bytes before the
    key name the table, the flags and the generation, so once such a request has been
    through the general path, its prefix maps to the handler's compiled lookup
    (``RequestHandler.compile_lookup``) and the next ones are a dictionary hit, a
    slice and a call. A slow (asynchronous) table returns an awaitable: it
    runs as a task, which also writes the reply (no done callback: no extra loop
    turn), reading from this client pauses, and requests this client had
    already sent wait in order behind it, so its replies keep their order while other
    clients of the process are served meanwhile.

    Requests that arrive together (pipelining; real clients never do it, they wait for
    each reply) are all answered, in order, with one write. Postfix would answer only
    the first; answering all is harmless and never produces an unsolicited byte.

    Deadline: a request must arrive complete within 1 second of waiting (Postfix's
    deadline-mode stream). On expiry Postfix's warning is logged and the connection is
    closed -- the C server instead stays silent and spins on the readable socket.

    End of input in the middle of a request: the request is answered BAD in its shape
    (when its ``request`` attribute was complete), then the connection closes. An
    attribute list larger than ``attr.MAX_LIST_BYTES`` is handled the same way.

    A client that stops reading its replies is not read from either until the
    kernel takes the output again (the skeleton aborts it after ``ipc_timeout``).
    The skeleton's ``input_pending`` clock (ipc_timeout for a partial request) is
    not used: the 1-second deadline is stricter.

    Nothing a client sends raises out of this class: every failure is logged and
    turned into a reply or a closed connection, so a worker never dies of input (the
    master would throttle the whole service).
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING

from master.multi_server import ClientProtocol
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
    from master.multi_server import MultiServer
    from proxymap.handler import RequestHandler

log = logging.getLogger("proxymap")


@types.coroutine
def _first_step() -> Generator[None, None, None]:
    """A bare yield: ``_start_slow`` runs a slow request's coroutine up to here, and
    its task resumes it from here on its first step (asyncio's "yield None" means
    "again next turn")."""
    yield


#: Postfix's per-request read budget (proxymap puts the stream in deadline mode).
REQUEST_DEADLINE = 1.0

#: Every lookup ends with ``key NUL <key> NUL`` and the list terminator NUL.
_KEY_NAME = b"\x00key\x00"
_LIST_END = b"\x00\x00"
#: Bound on remembered request prefixes (a client cycling through flag words or table
#: names must not grow the cache without limit).
MAX_SHORTCUTS = 4096


class ProxymapProtocol(ClientProtocol):
    """Serves one client: strictly one reply per request, in request order."""

    def __init__(self, server: MultiServer, handler: RequestHandler, stream: str) -> None:
        super().__init__(server)
        self.handler = handler
        self.stream = stream
        self.decoder = attr.AttrDecoder()
        self._shortcuts = handler.lookup_shortcuts
        # Between requests: nothing buffered, nothing slow, not closing -- the only
        # state in which a chunk may take the shortcut.
        self._between_requests = True
        self._queue: deque[attr.Pairs] = deque()  # received, waiting behind a slow request
        self._slow: asyncio.Future | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._closing = False  # end of input, or oversized list: close once drained
        self._final_reply: bytes | None = None  # answer to a cut-short request, if any
        self._closed = False
        self._write_blocked = False  # the transport holds output the kernel did not take

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # sets self.transport, counts the connection
        transport.write(ANNOUNCEMENT)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._between_requests = False
        self._cancel_deadline()
        self._queue.clear()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests (so that
        # replies cannot pile up in memory) until the kernel takes them again.
        super().pause_writing()
        self._write_blocked = True
        if not self._closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_blocked = False
        if not self._closed and self._slow is None and not self._closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._between_requests and data[-2:] == _LIST_END:
            # One whole lookup whose prefix was seen before? The key is what follows
            # the last "key" name; a NUL in it means more than one list: general path.
            cut = data.rfind(_KEY_NAME) + 5
            # ``key NUL NUL`` ends the chunk: an empty key value, but no list terminator
            # yet (the fuzzer found it answered as a lookup of the empty key).
            answer = self._shortcuts.get(data[:cut]) if cut <= len(data) - 2 else None
            if answer is not None:
                key = data[cut:-2]
                if b"\x00" not in key:
                    server = self.server
                    server.request_started()
                    reply = answer(key)
                    if reply is not None:
                        self.transport.write(reply)
                        server.request_done()
                        return
                    server.request_done()  # the table is busy: the general path waits
        self._decode_and_serve(data)

    def _decode_and_serve(self, data: bytes) -> None:
        try:
            lists = self.decoder.feed(data)
        except attr.AttrTooLarge as exc:
            log.warning("attribute list from %s exceeds %d bytes", self.stream, self.decoder.limit)
            lists = exc.complete
            self._closing = True
            self._final_reply = reply_to_truncated(exc.partial)
        if lists:
            self._cancel_deadline()  # the request that was being timed is complete
            if self._slow is not None:
                self._queue.extend(lists)
            else:
                self._serve(lists)
        if self._slow is None:
            self._after_input()

    def eof_received(self) -> bool:
        if self.decoder.pending:
            if self.decoder.in_field:
                log.warning(
                    "unexpected end-of-input from %s while reading input attribute %s",
                    self.stream,
                    self.decoder.reading,
                )
            else:
                log.warning(
                    "premature end-of-input on %s while reading input attribute %s",
                    self.stream,
                    self.decoder.reading,
                )
            self._final_reply = reply_to_truncated(
                self.decoder.pairs_so_far, self.decoder.pending_name
            )
            self.decoder.reset()
        self._closing = True
        self._between_requests = False
        if self._slow is not None:
            return True  # keep the transport: the pending replies still go out
        self._finish()
        return False

    # --- serving -------------------------------------------------------------------------
    def _serve(self, lists: list[attr.Pairs]) -> None:
        """Answer complete lists in order; stop at a slow request and queue the rest."""
        server = self.server
        last = len(lists) - 1
        out: list[bytes] = []
        for index, pairs in enumerate(lists):
            server.request_started()
            parsed = parse_request(pairs, self.stream)
            if parsed is None:
                server.request_done()
                continue
            if parsed.__class__ is not Request:
                reply = parsed
            else:
                try:
                    result = self.handler.handle(parsed)
                except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the worker
                    log.error(
                        "%s request for %s failed: %r", parsed.op, parsed.table, exc, exc_info=exc
                    )
                    result = Reply(RETRY)
                if result.__class__ is not Reply:
                    # A slow table: flush what is ready, then wait for it off the fast path.
                    if out:
                        self.transport.write(b"".join(out))
                    self._queue.extendleft(reversed(lists[index + 1 :]))
                    self._start_slow(parsed, result)
                    return
                reply = encode_reply(parsed.op, parsed.generation, result)
                if parsed.op == "lookup":
                    self._learn_shortcut(pairs, parsed)
            if index < last:
                out.append(reply)
                server.request_done()
            else:
                # The last reply: TAKEN, write, AVAIL -- in Postfix's order.
                self.transport.write(b"".join(out) + reply if out else reply)
                server.request_done()
                return
        if out:
            self.transport.write(b"".join(out))

    def _learn_shortcut(self, pairs: attr.Pairs, request: Request) -> None:
        prefix = lookup_prefix(pairs, request.generation)
        if prefix is None or prefix in self._shortcuts:
            return
        if len(self._shortcuts) >= MAX_SHORTCUTS:
            self._shortcuts.clear()
        self._shortcuts[prefix] = self.handler.compile_lookup(request)

    def _start_slow(self, request: Request, awaitable) -> None:
        # One task per slow request, which writes the reply itself when the answer is
        # there: no done callback, so no extra turn of the event loop per request.
        serve = self._serve_slow(request, awaitable)
        serve.send(None)  # into its try block: a task cancelled before it ran is answered
        self._slow = asyncio.ensure_future(serve)
        self._between_requests = False
        if not self._closed:
            self.transport.pause_reading()

    async def _serve_slow(self, request: Request, awaitable) -> None:
        try:
            await _first_step()
            reply = await awaitable
            if reply.__class__ is not Reply:
                raise TypeError(f"handler result {reply!r} is not a Reply")
        except BaseException as exc:  # noqa: BLE001 - including cancellation
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()  # a coroutine cancelled before it started: not "never awaited"
            log.error("%s request for %s failed: %r", request.op, request.table, exc)
            reply = Reply(RETRY)
        self._slow_done(request, reply)

    def _slow_done(self, request: Request, reply: Reply) -> None:
        self._slow = None
        if not self._closed:
            self.transport.write(encode_reply(request.op, request.generation, reply))
        self.server.request_done()
        if self._closed:
            return
        if self._queue:
            queued = list(self._queue)
            self._queue.clear()
            self._serve(queued)
            if self._slow is not None:
                return
        if self._closing:
            self._finish()
            self.transport.close()
            return
        if not self._write_blocked:
            self.transport.resume_reading()
        self._after_input()

    # --- end of a request / connection ----------------------------------------------------
    def _after_input(self) -> None:
        if self._closing:
            self._between_requests = False
            if not self._closed and self.transport is not None:
                self._finish()
                self.transport.close()
            return
        # The deadline runs only while a request is incomplete: a client that sends
        # whole requests never arms a timer.
        if self.decoder.pending:
            self._between_requests = False
            if self._deadline is None:
                loop = asyncio.get_running_loop()
                self._deadline = loop.call_later(REQUEST_DEADLINE, self._deadline_expired)
        else:
            self._between_requests = not self._closed
            self._cancel_deadline()

    def _finish(self) -> None:
        """Answer a request cut short by end of input (or size), once."""
        reply, self._final_reply = self._final_reply, None
        if reply is not None and not self._closed:
            self.server.request_started()
            self.transport.write(reply)
            self.server.request_done()

    def _deadline_expired(self) -> None:
        self._deadline = None
        if self._closed or self._slow is not None:
            return
        log.warning(
            "timeout on %s while reading input attribute %s", self.stream, self.decoder.reading
        )
        self.decoder.reset()
        self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
