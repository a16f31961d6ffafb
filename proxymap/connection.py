"""One proxymap client connection on the worker's event loop: the driver of a Session.

NAME
    connection -- the socket, the clock and the awaiting around ``proxymap.session``

SYNOPSIS
    protocol = ProxymapProtocol(server, handler, stream_name("proxymap"))

DESCRIPTION
    The protocol itself (announcement, framing, in-order replies, end of input, the
    size cap, what the deadline times) is the ``Session``'s; this class moves its bytes
    and runs what it cannot: the transport, a slow request's task, the deadline's
    clock. The skeleton (``server``) is told TAKEN and AVAIL around every request by
    the session, as from a Postfix daemon.

    Fast path: a chunk the session answers between requests is one call and one
    write -- no task, no future, no timer. A slow table's lookup on the fast path
    (``answer_whole`` gives b"") starts its task at once.

    A slow (asynchronous) table: one task awaits it, and the slow requests queued
    behind it, and writes their replies itself (no done callback: no extra loop
    turn), while the other clients of the process are served. The task is made
    with ``loop.create_task``, not ``ensure_future`` (which raises and clears an
    AttributeError to learn that a coroutine is no future). A client that sends
    more meanwhile (pipelining) has that chunk queued and is not read from again
    until the slow reply is out; a client that waits for its reply, as real clients
    do, costs no pause and resume (two system calls per slow request).

    A client that stops reading its replies is not read from either until the
    kernel takes the output again (the skeleton aborts it after ``ipc_timeout``).
    The skeleton's ``input_pending`` clock (ipc_timeout for a partial request) is
    not used: the 1-second deadline is stricter.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Generator
from typing import TYPE_CHECKING

from master.multi_server import ClientProtocol
from proxymap.session import REQUEST_DEADLINE, Session

if TYPE_CHECKING:
    from master.multi_server import MultiServer
    from proxymap import attr
    from proxymap.handler import RequestHandler


@types.coroutine
def _first_step() -> Generator[None, None, None]:
    """A bare yield: ``_start_slow`` runs the task's coroutine up to here, and the task
    resumes it from here on its first step (asyncio's "yield None" means "again next
    turn"), so that a task cancelled before it ran still answers and counts."""
    yield


class ProxymapProtocol(ClientProtocol):
    """Serves one client through its ``Session``."""

    transport: asyncio.Transport  # set by connection_made, before any other call

    def __init__(self, server: MultiServer, handler: RequestHandler, stream: str) -> None:
        super().__init__(server)
        self.session = Session(handler, stream, server)
        self._answer_whole = self.session.answer_whole  # bound once: the fast path's call
        self._slow: asyncio.Future[None] | None = None  # the task awaiting slow requests
        self._loop: asyncio.AbstractEventLoop | None = None  # known from the first slow one
        self._deadline: asyncio.TimerHandle | None = None
        self._timed: int | None = None  # the session's deadline key the clock runs for
        self._closed = False
        self._write_blocked = False  # the transport holds output the kernel did not take
        self._paused_behind_slow = False  # input came while a slow request was pending
        self._reading_paused = False

    @property
    def decoder(self) -> attr.AttrDecoder:
        """The session's attribute decoder (its limit, its pending state)."""
        return self.session.decoder

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # sets self.transport, counts the connection
        transport.write(self.session.start())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_deadline()
        self.session.connection_lost()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests (so that
        # replies cannot pile up in memory) until the kernel takes them again.
        super().pause_writing()
        self._write_blocked = True
        if not self._closed:
            self._pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_blocked = False
        if not self._closed and not self._paused_behind_slow and not self.session.closing:
            self._resume_reading()

    def data_received(self, data: bytes) -> None:
        reply = self._answer_whole(data)
        if reply:  # the fast path: the session stays idle, no clock runs
            self.transport.write(reply)
            return
        if reply is not None:  # the fast path of a slow table: nothing else is running
            self._start_slow()
            return
        out = self.session.decode_and_serve(data)
        if out:
            self.transport.write(out)
        if self.session.idle and self._deadline is None:
            return  # between requests, no clock to stop
        if self._slow is not None and not self._paused_behind_slow:
            # Input behind a slow request is queued, not served: read no more of it.
            self._paused_behind_slow = True
            self._pause_reading()
        self._follow()

    def eof_received(self) -> bool:
        session = self.session
        out = session.receive_eof()
        if out:
            self.transport.write(out)
        self._cancel_deadline()
        # Keep the transport while a slow request's reply (and the queue) still go out.
        return session.slow is not None

    # --- following the session -----------------------------------------------------------
    def _follow(self) -> None:
        """Do what the session's state asks: await a slow request, time, close."""
        if self._closed:
            return
        session = self.session
        if session.slow is not None and self._slow is None:
            self._start_slow()
        key = session.deadline_key
        if key != self._timed:
            self._cancel_deadline()
            if key is not None:
                loop = asyncio.get_running_loop()
                self._deadline = loop.call_later(REQUEST_DEADLINE, self._deadline_expired)
                self._timed = key
        if session.finished:
            self.transport.close()

    def _start_slow(self) -> None:
        serve = self._serve_slow()
        serve.send(None)  # into its try block: a task cancelled before it ran is answered
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # Not ensure_future: it asks whether a coroutine is a future (an AttributeError
        # raised and cleared) and looks the loop up again (a getpid() in Python 3.11).
        self._slow = loop.create_task(serve)

    async def _serve_slow(self) -> None:
        session = self.session
        first = True
        while (awaitable := session.slow) is not None:
            try:
                if first:
                    first = False
                    await _first_step()
                outcome: object = await awaitable
            except BaseException as exc:  # noqa: BLE001 - including cancellation
                close = getattr(awaitable, "close", None)
                if close is not None:
                    close()  # a coroutine cancelled before it started: not "never awaited"
                outcome = exc
            out = session.slow_answered(outcome)
            if out and not self._closed:
                self.transport.write(out)
        self._slow = None
        if self._closed:
            return
        self._paused_behind_slow = False
        if not session.finished and not self._write_blocked:
            self._resume_reading()
        self._follow()

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- the deadline --------------------------------------------------------------------
    def _deadline_expired(self) -> None:
        self._deadline = self._timed = None
        if self._closed:
            return
        self.session.deadline_expired()
        if self.session.finished:
            self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = self._timed = None
