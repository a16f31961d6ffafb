"""A trivial service for testing the multi-server skeleton.

NAME
    echo_service -- one line in, one line out, under master.multi_server

SYNOPSIS
    python -m tests.support.echo_service -t unix [-o name=value ...]
    python -m tests.support.echo_service -S < requests

DESCRIPTION
    Every newline-terminated line a client sends is one request, answered with one
    line, between ``request_started`` (TAKEN) and ``request_done`` (AVAIL):

      ?<name>      the expanded main.cf parameter <name> as this process sees it
      !<text>      logs <text> as a warning and answers "logged"
      @service     the service name (-n, else the command name)
      @loop        the module of the event loop class (asyncio... or uvloop)
      @ids         "uid gid cwd" of the process
      @pid         the process id (which sibling took this client)
      @work MS     "worked" after keeping the loop busy MS milliseconds (a slow
                   synchronous lookup: a few clients asking it saturate the process)
      @wait MS     "waited" after MS milliseconds in which the loop is free (a lookup
                   waiting for a backend that has room for every request)
      @backend MS  "served" after MS milliseconds on a backend that serves one request
                   at a time (``echo_backend_slots``): the others wait for their turn,
                   and the service says it waits for backends (``waiting_for_backends``)
      anything     echoed back

    A connection answers its lines in order: the lines after a ``@wait`` or a
    ``@backend`` wait for its answer.

    Parameters (``-o`` or main.cf):
      echo_greeting = text        sent on every new connection (the post-accept hook)
      echo_exit_before_accept = yes   the pre-accept hook asks the skeleton to exit
                                  instead of accepting (the client stays in the backlog)
      echo_backend_slots = 1      requests the ``@backend`` serves at once

    With ``-S`` the lines of stdin are answered on stdout, without greeting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

from master.multi_server import ClientProtocol, MultiServer, run

log = logging.getLogger("echo")


def ask(client: socket.socket, line: str) -> str:
    """The client side: send one line, return the answer line."""
    client.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = client.recv(4096)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    return data[:-1].decode()


def answer(server: MultiServer, line: bytes) -> bytes:
    text = line.decode("utf-8", "surrogateescape")
    if text.startswith("?"):
        text = server.config.get(text[1:], "")
    elif text.startswith("!"):
        log.warning("%s", text[1:])
        text = "logged"
    elif text == "@service":
        text = server.service_name
    elif text == "@loop":
        text = type(server.loop).__module__
    elif text == "@pid":
        text = str(os.getpid())
    elif text == "@ids":
        text = f"{os.getuid()} {os.getgid()} {os.getcwd()}"
    elif text.startswith("@work "):
        busy_until = time.perf_counter() + float(text[6:]) / 1000
        while time.perf_counter() < busy_until:
            pass
        text = "worked"
    return text.encode("utf-8", "surrogateescape") + b"\n"


class Backend:
    """What ``@backend`` asks: SLOTS requests at a time, the others queue for a slot."""

    def __init__(self, slots: int) -> None:
        self.free = slots
        self.queue: deque[tuple[float, Callable[[], None]]] = deque()
        self.queued_at = float("-inf")  # time.monotonic() when a request last queued

    def ask(
        self, loop: asyncio.AbstractEventLoop, seconds: float, done: Callable[[], None]
    ) -> None:
        if self.free:
            self.free -= 1
            loop.call_later(seconds, self._served, loop, done)
        else:
            self.queue.append((seconds, done))
            self.queued_at = time.monotonic()

    def _served(self, loop: asyncio.AbstractEventLoop, done: Callable[[], None]) -> None:
        done()
        if self.queue:
            seconds, following = self.queue.popleft()
            loop.call_later(seconds, self._served, loop, following)
        else:
            self.free += 1


class EchoProtocol(ClientProtocol):
    def __init__(self, server: MultiServer, backend: Backend) -> None:
        super().__init__(server)
        self.buffer = b""
        self.backend = backend
        self.waiting = False  # for the answer to a @wait or @backend line

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        greeting = self.server.config.get("echo_greeting", "")
        if greeting:
            transport.write(greeting.encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while not self.waiting and b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.server.request_started()
            words = line.split()
            if len(words) == 2 and words[0] in (b"@wait", b"@backend"):
                self.waiting = True
                seconds = float(words[1]) / 1000
                loop = asyncio.get_running_loop()
                if words[0] == b"@wait":
                    loop.call_later(seconds, self._answered, b"waited\n")
                else:
                    self.backend.ask(loop, seconds, lambda: self._answered(b"served\n"))
                break
            self.transport.write(answer(self.server, line))
            self.server.request_done()
        self.input_pending(bool(self.buffer))

    def _answered(self, reply: bytes) -> None:
        self.waiting = False
        if not self.transport.is_closing():
            self.transport.write(reply)
        self.server.request_done()
        self._serve()


class EchoService:
    name = "echo"
    backend: Backend | None = None

    def pre_init(self, server: MultiServer) -> None:
        pass

    def post_init(self, server: MultiServer) -> None:
        pass

    def pre_accept(self, server: MultiServer) -> None:
        if server.config.get("echo_exit_before_accept", "no") == "yes":
            server.exit(0)

    def waiting_for_backends(self, _server: MultiServer) -> bool:
        """As proxymap's pools: a request waits, or waited in the last 50 ms."""
        backend = self.backend
        return backend is not None and (
            bool(backend.queue) or time.monotonic() - backend.queued_at < 0.05
        )

    def protocol_factory(self, server: MultiServer) -> Callable[[], EchoProtocol]:
        backend = self.backend = Backend(int(server.config.get("echo_backend_slots", "1")))
        return lambda: EchoProtocol(server, backend)

    def serve_standalone(self, server: MultiServer, infile: BinaryIO, outfile: BinaryIO) -> None:
        for line in infile:
            outfile.write(answer(server, line.rstrip(b"\n")))
        outfile.flush()


def main() -> None:
    run(EchoService())


if __name__ == "__main__":
    main()
