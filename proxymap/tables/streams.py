"""Byte-stream connections for the socket protocols (tcp, socketmap, memcache).

NAME
    streams -- asyncio stream pairs as pool connections, endpoint syntax, our settings

DESCRIPTION
    ``Stream`` is the connection object these tables keep in a ``pool.ConnectionPool``:
    an asyncio reader/writer pair. ``stream_opener`` turns Postfix's endpoint forms
    (``inet:host:port``, ``[v6addr]:port``, ``unix:/path``) into the pool's connect
    function. ``param_number`` reads a numeric ``pyproxymap_*`` main.cf setting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxymap.tables.base import OpenContext

log = logging.getLogger("proxymap")


@dataclass(slots=True, eq=False)
class Stream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already closed, or its event loop is gone
            pass


StreamOpener = Callable[[str], Awaitable[Stream]]


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f'need host:port, not "{text}"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'bad port in "{text}"')
    return host, int(port)


def stream_opener(limit: int = 2**16) -> StreamOpener:
    """A connect function for endpoints ``inet:host:port``, ``host:port``, ``unix:/path``
    (also ``local:/path``); ValueError from it means a malformed endpoint."""

    async def connect(endpoint: str) -> Stream:
        transport, colon, address = endpoint.partition(":")
        if colon and transport in ("unix", "local"):
            reader, writer = await asyncio.open_unix_connection(address, limit=limit)
        else:
            host, port = split_host_port(address if colon and transport == "inet" else endpoint)
            reader, writer = await asyncio.open_connection(host, port, limit=limit)
        return Stream(reader, writer)

    return connect


def check_endpoint(endpoint: str) -> None:
    """ValueError unless ``endpoint`` is a form ``stream_opener`` connects to."""
    transport, colon, address = endpoint.partition(":")
    if colon and transport in ("unix", "local"):
        if not address:
            raise ValueError(f'invalid endpoint "{endpoint}"')
        return
    split_host_port(address if colon and transport == "inet" else endpoint)


def close_stream(stream: Stream) -> None:
    stream.close()


# Postfix time units (main.cf "10s", "5m"): a bare number is seconds.
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def param_number(ctx: OpenContext | None, name: str, default: float) -> float:
    """A numeric main.cf parameter of ours (times may carry a Postfix unit: 10s, 2m);
    a bad value falls back with a warning."""
    if ctx is None or name not in ctx.params:
        return default
    text = str(ctx.params[name]).strip()
    scale = _TIME_UNITS.get(text[-1:].lower(), 0) if text else 0
    try:
        return float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        log.warning('%s: bad numerical value "%s", using %s', name, text, default)
        return default
