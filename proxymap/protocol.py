"""Proxymap requests and replies, for both client generations (sans-I/O).

NAME
    protocol -- request parsing and reply encoding for the proxymap service

DESCRIPTION
    Postfix 3.7-3.10 clients ("G1") and 3.11+ clients ("G2") share the socket and the
    announcement; they differ in request attributes (G2 adds ``instance_flags`` right
    after ``table``) and in reply shapes (G2 puts ``flags`` in every reply). The
    generation is detected per request. See ``../shared/spec/PROTOCOLS.md`` sections 2.3-2.9.

    The handler receives a well-formed ``Request`` and returns a ``Reply``; everything
    malformed is answered here (status BAD) or not at all, as Postfix does.
"""

from __future__ import annotations

from dataclasses import dataclass

# Status codes (PROXY_STAT_*), identical in both generations.
OK = 0
NOKEY = 1
RETRY = 2
BAD = 3
DENY = 4
CONFIG = 5

G1 = 1  # Postfix 3.7 .. 3.10
G2 = 2  # Postfix 3.11 and later

OPS = ("open", "lookup", "update", "delete", "sequence")


@dataclass(slots=True)
class Request:
    """A well-formed request. Table names are text (UTF-8, surrogateescape: byte-exact)."""

    op: str
    table: str
    generation: int
    flags: int = 0  # G1: the flags attribute; G2: the flags attribute (0 for open)
    instance_flags: int = 0  # G2 only
    key: bytes = b""
    value: bytes = b""
    function: int = 0


@dataclass(slots=True)
class Reply:
    """What the handler answers; the encoder picks the attributes by op and generation."""

    status: int
    flags: int = 0
    key: bytes = b""
    value: bytes = b""
