"""One proxymap client connection on the worker's event loop: the driver of a Session.

NAME
    connection -- the socket, the clock and the awaiting around ``proxymap.session``

SYNOPSIS
    protocol = ProxymapProtocol(server, handler, stream_name("proxymap"))

DESCRIPTION
    The protocol itself (announcement, framing, in-order replies, end of input, the
    size cap, what the deadline times) is the ``Session``'s; this class moves its bytes
    and runs what it cannot: the transport, the task of slow requests, the deadline's
    clock. The skeleton (``server``) is told TAKEN and AVAIL around every request by
    the session, as from a Postfix daemon.

    Fast path: a chunk the session answers between requests is one call and one
    write -- no task, no future, no timer. A slow table's lookup on the fast path
    (``answer_whole`` gives b"") is handed to the connection's task at once.

    A slow (asynchronous) table: the connection's task awaits it, and the slow
    requests queued behind it, and writes their replies itself (no done callback:
    no extra loop turn), while the other clients of the process are served. The
    task is made at the client's first slow request and waits on a future between
    them, which the next one resolves: a task per request cost about 4 000 more
    instructions (its name formatted, its registration in asyncio's weak set of
    tasks and back out, a coroutine stepped into its try block). It ends with the
    connection, or when cancelled (the loop closing; a cancellation that arrives
    while it serves a request is answered RETRY first); the next slow request then
    makes another. A client that sends more meanwhile (pipelining) has that chunk
    queued and is not read from again until the slow reply is out; a client that
    waits for its reply, as real clients do, costs no pause and resume (two system
    calls per slow request).

    Not done: running a slow lookup's first step in ``data_received`` and making a
    task only if it suspends (Python 3.12's eager tasks). Python 3.11 has no way to
    run a step as a task's, and the drivers need ``asyncio.current_task()`` (the
    mysql query deadline cancels it); every database lookup suspends anyway.

    A client that stops reading its replies is not read from either until the
    kernel takes the output again (the skeleton aborts it after ``ipc_timeout``).
    The skeleton's ``input_pending`` clock (ipc_timeout for a partial request) is
    not used: the 1-second deadline is stricter.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING

from master.multi_server import ClientProtocol
from proxymap.handler import PendingReply
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
        self._slow_task: asyncio.Task[None] | None = None  # serves this client's slow requests
        # that task while it serves them, or the reply of a started lookup
        self._slow: asyncio.Task[None] | PendingReply | None = None
        self._wake: asyncio.Future[None] | None = None  # what it waits on between them
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
        if self._wake is not None and self._slow_task is not None:
            self._slow_task.cancel()  # it waits for a next slow request: none will come
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
        """Hand the session's slow request to the connection's task (made at the first),
        or, for a lookup its table started, have its reply come to ``_pending_done``."""
        pending = self.session.slow
        if type(pending) is PendingReply:
            self._slow = pending
            if pending.reply is None:
                pending.on_reply = self._pending_done
            else:  # not from a table as base.py has it; in order all the same
                asyncio.get_running_loop().call_soon(self._pending_done, pending.reply)
            return
        wake = self._wake
        if wake is not None:  # the task waits between slow requests
            self._wake = None
            self._slow = self._slow_task
            wake.set_result(None)
            return
        serve = self._serve_slow()
        serve.send(None)  # into its try block: a task cancelled before it ran is answered
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # Not loop.create_task (uvloop's names the task "Task-<n>" by a string format,
        # then renames it) nor ensure_future (which raises and clears an AttributeError
        # to learn that a coroutine is no future, then looks the loop up: a getpid()).
        self._slow = self._slow_task = asyncio.Task(serve, loop=loop, name="slow requests")

    async def _serve_slow(self) -> None:
        """The connection's task: it serves the session's slow requests in turn, writes
        their replies, and between them waits on ``_wake`` until ``_start_slow`` hands
        it the next. It ends with the connection, when cancelled between requests, and
        after a cancellation it answered (the loop is closing)."""
        session = self.session
        wait: Awaitable[None] | None = _first_step()
        try:
            while True:
                try:
                    if wait is not None:
                        await wait
                    outcome: object = await session.slow  # type: ignore[misc]
                except BaseException as exc:  # including cancellation (re-raised if idle)
                    if session.slow is None:
                        raise  # cancelled between slow requests: the task ends
                    close = getattr(session.slow, "close", None)
                    if close is not None:
                        close()  # a coroutine cancelled before it started: not "never awaited"
                    outcome = exc
                out = session.slow_answered(outcome)
                if out and not self._closed:
                    self.transport.write(out)
                if session.slow is not None:
                    wait = None  # the next one was queued behind it
                    continue
                if not self._slow_done():
                    return
                wait = self._wake = asyncio.Future(loop=self._loop)
        finally:
            self._slow = self._slow_task = self._wake = None

    def _pending_done(self, reply: bytes) -> None:
        """A started lookup's reply (``_serve_slow``'s work for it, without the task)."""
        session = self.session
        out = session.slow_answered(reply)
        if out and not self._closed:
            self.transport.write(out)
        if session.slow is None:
            self._slow_done()
        elif not self._closed:
            self._slow = None
            self._start_slow()  # the next one was queued behind it

    def _slow_done(self) -> bool:
        """Between slow requests: read again, follow the session. False when the task
        ends: the connection is gone or finished, or the task was cancelled."""
        self._slow = None
        if self._closed:
            return False
        self._paused_behind_slow = False
        session = self.session
        if self._reading_paused and not session.finished and not self._write_blocked:
            self._resume_reading()
        if not session.idle or self._deadline is not None:
            self._follow()  # as data_received: idle and no clock to stop, nothing to do
        task = self._slow_task
        return not session.finished and task is not None and not task.cancelling()

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
