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
      anything     echoed back

    Parameters (``-o`` or main.cf):
      echo_greeting = text        sent on every new connection (the post-accept hook)
      echo_exit_before_accept = yes   the pre-accept hook asks the skeleton to exit
                                  instead of accepting (the client stays in the backlog)

    With ``-S`` the lines of stdin are answered on stdout, without greeting.
"""

from __future__ import annotations

import logging
import os
import socket
import time
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


class EchoProtocol(ClientProtocol):
    def __init__(self, server: MultiServer) -> None:
        super().__init__(server)
        self.buffer = b""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        greeting = self.server.config.get("echo_greeting", "")
        if greeting:
            transport.write(greeting.encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.server.request_started()
            self.transport.write(answer(self.server, line))
            self.server.request_done()
        self.input_pending(bool(self.buffer))


class EchoService:
    name = "echo"

    def pre_init(self, server: MultiServer) -> None:
        pass

    def post_init(self, server: MultiServer) -> None:
        pass

    def pre_accept(self, server: MultiServer) -> None:
        if server.config.get("echo_exit_before_accept", "no") == "yes":
            server.exit(0)

    def protocol_factory(self, server: MultiServer) -> Callable[[], EchoProtocol]:
        return lambda: EchoProtocol(server)

    def serve_standalone(self, server: MultiServer, infile: BinaryIO, outfile: BinaryIO) -> None:
        for line in infile:
            outfile.write(answer(server, line.rstrip(b"\n")))
        outfile.flush()


def main() -> None:
    run(EchoService())


if __name__ == "__main__":
    main()
