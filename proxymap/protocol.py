"""Proxymap requests and replies, for both client generations (sans-I/O).

NAME
    protocol -- request parsing and reply encoding for the proxymap service

DESCRIPTION
    Postfix 3.7-3.10 clients ("G1") and 3.11+ clients ("G2") share the socket and the
    announcement; they differ in request attributes (G2 adds ``instance_flags`` right
    after ``table``) and in reply shapes (G2 puts ``flags`` in every reply). The
    generation is detected per request. See ``docs/PROTOCOL.md`` sections 2.3-2.9.

    The handler receives a well-formed ``Request`` and returns a ``Reply``; everything
    malformed is answered here (status BAD) or not at all, as Postfix does.

    ``parse_request(pairs, stream)`` applies Postfix's STRICT scanner rules to one
    decoded list (docs/PROTOCOL.md 1.3): missing, out-of-order or unknown attributes
    before the expected set is complete, or a malformed number, give BAD in the
    request's generation; attributes after a complete set are reported once and
    ignored (so a repeated last attribute keeps its first value); an unknown request
    name gives ``status 3`` alone; a list that is empty or does not start with
    ``request`` gets no reply. Warnings use Postfix's words, with ``<service> socket``
    as the stream name. ``encode_reply(op, generation, reply)`` builds the reply
    shape of 2.5 (G1) or 2.6 (G2); key and value are sent only with status OK.
    ``reply_to_truncated`` answers a request cut short by end of input.
    ``lookup_replies`` and ``g2_lookup_templates`` give the handler's fast path its
    lookup replies, encoded ahead of the requests. No reply byte is built elsewhere.

    What stays with the handler: the DENY of update/delete on the read-only service
    (logged with the raw table name), ``proxy:`` stripping, the no-colon BAD and the
    approval check -- in Postfix's order, which puts the DENY first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from proxymap import attr
from proxymap import flags as F

log = logging.getLogger("proxymap")

# Status codes (PROXY_STAT_*), identical in both generations.
OK = 0
NOKEY = 1
RETRY = 2
BAD = 3
DENY = 4
CONFIG = 5

#: Sent on every accepted connection before anything is read (both services, both generations).
ANNOUNCEMENT = b"protocol\x00proxymap_protocol\x00\x00"

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


# ---------------------------------------------------------------------------------------------
# Request scanning (Postfix attr_scan0 with STRICT = MISSING|EXTRA), docs/PROTOCOL.md 1.3, 2.3.
# ---------------------------------------------------------------------------------------------

#: What each request must carry after ``request``, in this order, per generation.
EXPECTED: dict[tuple[str, int], tuple[bytes, ...]] = {
    ("open", G1): (b"table", b"flags"),
    ("lookup", G1): (b"table", b"flags", b"key"),
    ("update", G1): (b"table", b"flags", b"key", b"value"),
    ("delete", G1): (b"table", b"flags", b"key"),
    ("sequence", G1): (b"table", b"flags", b"function"),
    ("open", G2): (b"table", b"instance_flags"),
    ("lookup", G2): (b"table", b"instance_flags", b"flags", b"key"),
    ("update", G2): (b"table", b"instance_flags", b"flags", b"key", b"value"),
    ("delete", G2): (b"table", b"instance_flags", b"flags", b"key"),
    ("sequence", G2): (b"table", b"instance_flags", b"flags", b"function"),
}
_NUMERIC = frozenset({b"flags", b"instance_flags", b"function"})
_OP_NAMES = {op.encode(): op for op in OPS}
_NUMERIC_WANTED = {names: tuple(n for n in names if n in _NUMERIC) for names in EXPECTED.values()}

#: Flag bits dropped here from the flags that select and open a table instance (G1
#: ``flags``, G2 ``instance_flags``): UTF8_ACTIVE and SURROGATE are states a server sets
#: on an instance, not options a client may claim, and undefined high bits would only
#: multiply table instances. Real clients never send any of them there.
#: OPEN_LOCK and BULK_UPDATE (postmap's build-time options; OPEN_LOCK with LOCK makes
#: the C server panic) are kept from the table by the handler, which also echoes them
#: in G2 replies. G2 ``flags`` (the per-request word) is left alone: the server echoes
#: it back and the client stores it, so it must round-trip unchanged.
SERVER_IGNORED_FLAGS = F.UTF8_ACTIVE | F.SURROGATE | 0xFF800000
_KEEP = ~SERVER_IGNORED_FLAGS & F.ALL


def stream_name(service_name: str) -> str:
    """How Postfix names the client stream in scanner warnings."""
    return f"{service_name} socket"


STANDALONE_STREAM = "unknown_stream"  # the name of stdin in -S mode


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def detect_generation(pairs: attr.Pairs) -> int:
    """G2 iff ``instance_flags`` comes right after ``table`` (docs/PROTOCOL.md 2.9)."""
    return G2 if len(pairs) > 2 and pairs[2][0] == b"instance_flags" else G1


def parse_request(pairs: attr.Pairs, stream: str) -> Request | bytes | None:
    """One received list -> a ``Request`` to handle, an encoded reply, or ``None`` (no reply).

    ``None``: the list is empty or does not start with ``request`` (Postfix answers
    nothing). ``bytes``: the request is malformed (status BAD, or status 3 alone for an
    unknown request name), already encoded for the request's generation. Warnings are
    logged with Postfix's wording.
    """
    if not pairs:
        log.warning("missing attribute request in input from %s", stream)
        return None
    first_name, op_raw = pairs[0]
    if first_name != b"request":
        log.warning(
            "unexpected attribute %s from %s (expecting: request)", _text(first_name), stream
        )
        return None
    op = _OP_NAMES.get(op_raw)
    if op is None:
        log.warning('unrecognized request: "%s", ignored', _text(op_raw))
        return UNKNOWN_REQUEST_REPLY
    generation = detect_generation(pairs)
    values = _scan(pairs, EXPECTED[op, generation], stream)
    if values is None:
        return BAD_REPLIES[op, generation]
    request = Request(op, values[b"table"].decode("utf-8", "surrogateescape"), generation)
    if generation == G1:
        request.flags = values[b"flags"] & _KEEP
    else:
        request.instance_flags = values[b"instance_flags"] & _KEEP
        request.flags = values.get(b"flags", 0)
    if op == "sequence":
        function = values[b"function"]
        if function not in (0, 1):
            return BAD_REPLIES[op, generation]
        request.function = function
    else:
        request.key = values.get(b"key", b"")
        request.value = values.get(b"value", b"")
    return request


#: Scanned values by name: bytes, or int for the numeric attributes.
Values = dict[bytes, Any]


def _scan(pairs: attr.Pairs, wanted: tuple[bytes, ...], stream: str) -> Values | None:
    """Match ``pairs[1:]`` against the wanted names like attr_scan0 with STRICT.

    Returns the converted values, or ``None`` after logging why the count is short.
    Attributes after a complete set are reported once and otherwise ignored (the C
    scanner stops there, leaving them unread), so a repeated last attribute keeps its
    first value.
    """
    # Fast path, what every real client sends: exactly the wanted names, in order.
    if len(pairs) == len(wanted) + 1 and tuple([pair[0] for pair in pairs[1:]]) == wanted:
        values: Values = dict(pairs)
        try:
            for name in _NUMERIC_WANTED[wanted]:
                values[name] = attr.parse_u32(values[name])
        except ValueError:
            pass  # the slow path below reports it in Postfix's words
        else:
            return values
    values = {}
    available = len(pairs) - 1
    for index, want in enumerate(wanted, start=1):
        if index > available:
            log.warning("missing attribute %s in input from %s", want.decode(), stream)
            return None
        name, value = pairs[index]
        if name != want:
            log.warning(
                "unexpected attribute %s from %s (expecting: %s)",
                _text(name),
                stream,
                want.decode(),
            )
            return None
        if want in _NUMERIC:
            try:
                values[want] = attr.parse_u32(value)
            except ValueError:
                log.warning(
                    "malformed numerical data from %s while reading input attribute value: %s",
                    stream,
                    _text(value[:100]),
                )
                return None
        else:
            values[want] = value
    if available > len(wanted):
        extra = pairs[len(wanted) + 1][0]
        log.warning(
            "unexpected attribute %s from %s (expecting: (list terminator))", _text(extra), stream
        )
    return values


def lookup_prefix(pairs: attr.Pairs, generation: int) -> bytes | None:
    """The wire bytes of a lookup up to its key value: ``request NUL lookup NUL ...
    key NUL``, when ``pairs`` are exactly the attributes of a lookup of
    ``generation``, in order. Any two lookups with this prefix differ only in the key."""
    if pairs[0] != (b"request", b"lookup"):
        return None
    if tuple([name for name, _ in pairs[1:]]) != EXPECTED["lookup", generation]:
        return None
    return b"".join([name + b"\x00" + value + b"\x00" for name, value in pairs[:-1]]) + b"key\x00"


# ---------------------------------------------------------------------------------------------
# Reply encoding, docs/PROTOCOL.md 2.5 (G1) and 2.6 (G2).
# ---------------------------------------------------------------------------------------------

_STATUS = [b"status\x00%d\x00" % status for status in range(6)]


def _status(status: int) -> bytes:
    return _STATUS[status] if 0 <= status < 6 else b"status\x00%d\x00" % (status & attr.UINT_MASK)


def _c_string(data: bytes) -> bytes:
    """Values are C strings on the wire: anything from a NUL on cannot be sent."""
    return data.split(b"\x00", 1)[0] if 0 in data else data


def encode_reply(op: str, generation: int, reply: Reply) -> bytes:
    """The reply list for ``op`` in the request's generation (key/value empty unless OK)."""
    status = reply.status
    head = _status(status)
    if generation == G2 or op == "open":
        head += b"flags\x00%d\x00" % (reply.flags & F.ALL)
    if op == "lookup":
        value = _c_string(reply.value) if status == OK else b""
        return head + b"value\x00" + value + b"\x00\x00"
    if op == "sequence":
        if status == OK:
            key, value = _c_string(reply.key), _c_string(reply.value)
            return b"%skey\x00%s\x00value\x00%s\x00\x00" % (head, key, value)
        return head + b"key\x00\x00value\x00\x00\x00"
    return head + b"\x00"


#: ``status 3`` alone: the answer to an unknown request name, in both generations.
UNKNOWN_REQUEST_REPLY = b"status\x003\x00\x00"

#: Precomputed constant replies, by (op, generation).
BAD_REPLIES = {key: encode_reply(key[0], key[1], Reply(BAD)) for key in EXPECTED}


# ---------------------------------------------------------------------------------------------
# The fast path's lookup replies (``RequestHandler.compile_lookup``): encoded once, completed
# per request by one concatenation or one %-format. Equal to ``encode_reply``'s (tested).
# ---------------------------------------------------------------------------------------------

#: What follows a found value: its NUL and the list terminator.
LOOKUP_END = b"\x00\x00"


def lookup_replies(generation: int, reply_flags: int = 0) -> tuple[bytes, bytes]:
    """(found, not_found) for lookups answered with ``reply_flags`` (G1 replies carry no
    flags): a hit is ``found + value + LOOKUP_END``, the value cut at its first NUL."""
    found = encode_reply("lookup", generation, Reply(OK, reply_flags))
    return found[: -len(LOOKUP_END)], encode_reply("lookup", generation, Reply(NOKEY, reply_flags))


def g2_lookup_templates() -> tuple[bytes, bytes]:
    """For G2 lookups whose reply flags change per request: a hit is
    ``found % (flags & flags.ALL, value)``, a miss ``not_found % (flags & flags.ALL)``."""
    return (
        _status(OK) + b"flags\x00%d\x00value\x00%s" + LOOKUP_END,
        _status(NOKEY) + b"flags\x00%d\x00value\x00" + LOOKUP_END,
    )


def reply_to_truncated(pairs: attr.Pairs, next_name: bytes | None = None) -> bytes | None:
    """The answer to a request cut short by end-of-input (or an oversized list).

    Postfix has read ``request`` by then and dispatched on it, and the request-specific
    scan fails: status BAD in the request's generation (G2 only if ``instance_flags``
    was seen after ``table``; ``next_name`` is a name whose value never came). Without a
    complete ``request`` attribute there is no reply. The end-of-input warning itself is
    the caller's (it knows whether a field was cut).
    """
    if not pairs or pairs[0][0] != b"request":
        return None
    op = _OP_NAMES.get(pairs[0][1])
    if op is None:
        log.warning('unrecognized request: "%s", ignored', _text(pairs[0][1]))
        return UNKNOWN_REQUEST_REPLY
    generation = detect_generation(pairs)
    if len(pairs) == 2 and next_name == b"instance_flags":
        generation = G2
    return BAD_REPLIES[op, generation]
