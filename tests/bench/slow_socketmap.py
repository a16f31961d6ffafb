"""A socketmap(5) server that answers every lookup after a fixed delay.

NAME
    slow_socketmap -- a stand-in for a high-latency backend (a remote SQL or LDAP server)

SYNOPSIS
    python tests/bench/slow_socketmap.py PORT DELAY_MS

DESCRIPTION
    Listens on 127.0.0.1:PORT; every request "NAME KEY" is answered "OK KEY@slow.example"
    after DELAY_MS milliseconds, one request at a time per connection, connections
    served concurrently. The project's slow socketmap server, kept
    here so that the benchmark reads nothing outside the repository at run time.

SEE ALSO
    run.py (table kind socketmap)
"""

from __future__ import annotations

import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:
            length = await reader.readuntil(b":")
            body = await reader.readexactly(int(length[:-1]) + 1)
            _name, key = body[:-1].split(b" ", 1)
            await asyncio.sleep(delay)
            reply = b"OK " + key + b"@slow.example"
            writer.write(b"%d:%s," % (len(reply), reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main(port: int, delay: float) -> None:
    server = await asyncio.start_server(
        lambda reader, writer: handle(reader, writer, delay), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) / 1000))
