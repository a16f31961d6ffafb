"""Fuzz targets for the sans-I/O layers: the attribute decoder and the request scanner.

NAME
    targets -- ``attr_one(data)`` and ``scanner_one(data)``, and the reply-shape oracle

DESCRIPTION
    ``attr_one``: the input (after three control bytes) is decoded whole, split at one
    point and cut into many small pieces; the three must give the same lists, the same
    refusal of an oversized list (a small limit is chosen by the first byte, so that
    the refusal is reachable) and the same leftover state. The lists re-encode to the
    exact prefix of the input they came from. A field of the input is also read as a
    number by ``parse_u32``/``parse_ulong`` and by glibc's ``sscanf("%u%c")`` /
    ``"%lu%c"`` (what Postfix's attr_scan0 calls): both accept or refuse it, with the
    same value.

    ``scanner_one``: every decoded list goes through ``parse_request``. Its verdict is
    checked against an independent reading of the rules (docs/PROTOCOL.md 1.3, 2.3):
    no reply unless the list starts with ``request``; status 3 alone for an unknown
    request name; a ``Request`` exactly when the expected names come in order with
    numbers that ``sscanf`` accepts (and a sequence function of 0 or 1), carrying the
    first values; otherwise BAD in the request's generation. ``lookup_prefix``,
    ``reply_to_truncated`` and ``encode_reply`` are checked for well-formed output.

    ``check_reply(op, generation, pairs)`` is the shape oracle shared with the
    connection target (docs/PROTOCOL.md 2.5, 2.6).
"""

from __future__ import annotations

import ctypes
import random

from proxymap import attr
from proxymap import protocol as P

G1, G2 = P.G1, P.G2
_U32 = (1 << 32) - 1
_LIBC = ctypes.CDLL(None)
_LIBC.sscanf.restype = ctypes.c_int


class PropertyViolation(AssertionError):
    """A fuzz property does not hold (the input that shows it is the fuzzer's crash)."""


def require(condition: bool, message: str, *details: object) -> None:
    if not condition:
        raise PropertyViolation(message + "".join(f"\n  {detail!r}" for detail in details))


# --- numbers, as glibc reads them ----------------------------------------------------------


def sscanf_u32(text: bytes) -> int | None:
    """``sscanf(text, "%u%c")`` as attr_scan0 uses it: the value, or None if malformed."""
    value, extra = ctypes.c_uint(), ctypes.c_char()
    if (
        b"\x00" in text
        or _LIBC.sscanf(text, b"%u%c", ctypes.byref(value), ctypes.byref(extra)) != 1
    ):
        return None
    return value.value


def sscanf_ulong(text: bytes) -> int | None:
    value, extra = ctypes.c_ulong(), ctypes.c_char()
    if (
        b"\x00" in text
        or _LIBC.sscanf(text, b"%lu%c", ctypes.byref(value), ctypes.byref(extra)) != 1
    ):
        return None
    return value.value


def _ours(parse, text: bytes) -> int | None:
    try:
        return parse(text)
    except ValueError:
        return None


def check_numbers(text: bytes) -> None:
    require(_ours(attr.parse_u32, text) == sscanf_u32(text), "parse_u32 != sscanf %u", text)
    require(_ours(attr.parse_ulong, text) == sscanf_ulong(text), "parse_ulong != sscanf %lu", text)


# --- reply shapes -------------------------------------------------------------------------

_SHAPES = {
    ("lookup", G1): (b"status", b"value"),
    ("lookup", G2): (b"status", b"flags", b"value"),
    ("open", G1): (b"status", b"flags"),
    ("open", G2): (b"status", b"flags"),
    ("update", G1): (b"status",),
    ("update", G2): (b"status", b"flags"),
    ("delete", G1): (b"status",),
    ("delete", G2): (b"status", b"flags"),
    ("sequence", G1): (b"status", b"key", b"value"),
    ("sequence", G2): (b"status", b"flags", b"key", b"value"),
}


def generation_of(pairs: attr.Pairs) -> int:
    """docs/PROTOCOL.md 2.9: G2 iff ``instance_flags`` comes right after ``table``."""
    return G2 if len(pairs) > 2 and pairs[2][0] == b"instance_flags" else G1


def _decimal(text: bytes, limit: int) -> bool:
    return (
        text.isdigit()
        and len(text) <= 10
        and int(text) <= limit
        and (text == b"0" or not text.startswith(b"0"))
    )


def check_reply(op: str | None, generation: int | tuple[int, ...], pairs: attr.Pairs) -> None:
    """One reply list has the shape of ``op`` in ``generation`` (None: unknown request).

    ``generation`` may be a tuple of acceptable generations.
    """
    names = tuple(name for name, _ in pairs)
    values = dict(pairs)
    if op is None:
        require(pairs == [(b"status", b"3")], "unknown request: not status 3 alone", pairs)
        return
    generations = generation if isinstance(generation, tuple) else (generation,)
    require(
        any(names == _SHAPES[op, g] for g in generations),
        f"reply shape for {op} {generations}",
        pairs,
    )
    require(_decimal(values[b"status"], 5), "status out of range", pairs)
    if b"flags" in values:
        require(_decimal(values[b"flags"], _U32), "flags not a 32-bit decimal", pairs)
    if values[b"status"] != b"0":
        require(
            values.get(b"value", b"") == b"" and values.get(b"key", b"") == b"",
            "key/value sent with a status other than OK",
            pairs,
        )


def expected_op(pairs: attr.Pairs) -> tuple[bool, str | None]:
    """(whether a reply is due, the op it answers: None = unknown request name)."""
    if not pairs or pairs[0][0] != b"request":
        return False, None
    op = pairs[0][1].decode("latin-1")
    return True, op if op in P.OPS else None


# --- the attribute decoder ----------------------------------------------------------------


def _pieces(data: bytes, seed: bytes) -> list[bytes]:
    """``data`` cut at pseudo-random points (reproducible from ``seed``)."""
    rng = random.Random(seed)
    out, start = [], 0
    while start < len(data):
        end = start + rng.randint(1, 8)
        out.append(data[start:end])
        start = end
    return out


def _decode(chunks: list[bytes], limit: int) -> tuple[list[attr.Pairs], bool, tuple]:
    decoder = attr.AttrDecoder(limit)
    lists: list[attr.Pairs] = []
    for chunk in chunks:
        try:
            lists += decoder.feed(chunk)
        except attr.AttrTooLarge as exc:
            lists += exc.complete
            require(not decoder.pending, "decoder not reset after AttrTooLarge")
            return lists, True, ()
    state = (
        decoder.pending,
        decoder.reading,
        decoder.in_field,
        list(decoder.pairs_so_far),
        decoder.pending_name,
    )
    return lists, False, state


def attr_one(data: bytes) -> None:
    if len(data) < 3:
        return
    control, seed, payload = data[0], data[1:3], data[3:]
    limit = 16 + (control & 0x7F) * 8 if control & 0x80 else attr.MAX_LIST_BYTES
    cut = int.from_bytes(seed, "big") % (len(payload) + 1)
    whole = _decode([payload], limit)
    split = _decode([payload[:cut], payload[cut:]], limit)
    pieces = _decode(_pieces(payload, seed), limit)
    require(whole == split, f"split at {cut} differs", whole, split)
    require(whole == pieces, "small pieces differ", whole, pieces)
    lists, raised, state = whole
    encoded = b"".join(map(attr.encode, lists))
    require(payload.startswith(encoded), "lists do not re-encode to the input", lists)
    if not raised:
        rest = _decode([payload[len(encoded) :]], limit)
        require(rest[0] == [] and rest[2] == state, "leftover decodes differently", rest, state)
        pending = state[3]
        if pending:
            require(
                payload[len(encoded) :].startswith(attr.encode(pending)[:-1]),
                "pending pairs are not the input's",
            )
    # A field of the input, read as a number both ways.
    field = payload.split(b"\x00", 1)[0][:64]
    check_numbers(field)


# --- the request scanner ------------------------------------------------------------------


def _valid_by_rules(pairs: attr.Pairs, op: str, generation: int) -> dict[bytes, object] | None:
    """The values an accepted request carries, read independently of the scanner."""
    wanted = P.EXPECTED[op, generation]
    if len(pairs) - 1 < len(wanted):
        return None
    values: dict[bytes, object] = {}
    for (name, value), want in zip(pairs[1:], wanted, strict=False):
        if name != want:
            return None
        if want in (b"flags", b"instance_flags", b"function"):
            number = sscanf_u32(value)
            if number is None:
                return None
            values[want] = number
        else:
            values[want] = value
    if op == "sequence" and values[b"function"] not in (0, 1):
        return None
    return values


def _check_parsed(pairs: attr.Pairs) -> None:
    parsed = P.parse_request(pairs, "fuzz socket")
    due, op = expected_op(pairs)
    if not due:
        require(parsed is None, "a reply to a list without request first", pairs, parsed)
        return
    if op is None:
        require(parsed == P.UNKNOWN_REQUEST_REPLY, "unknown request not status 3", pairs)
        return
    generation = generation_of(pairs)
    values = _valid_by_rules(pairs, op, generation)
    if values is None:
        require(parsed == P.BAD_REPLIES[op, generation], "malformed request not BAD", pairs, parsed)
        return
    require(isinstance(parsed, P.Request), "well-formed request refused", pairs, parsed)
    assert isinstance(parsed, P.Request)
    require((parsed.op, parsed.generation) == (op, generation), "op/generation", parsed)
    require(parsed.table.encode("utf-8", "surrogateescape") == values[b"table"], "table")
    keep = ~P.SERVER_IGNORED_FLAGS & _U32
    if generation == G1:
        require(parsed.flags == values[b"flags"] & keep, "G1 flags", parsed, values)
    else:
        require(parsed.instance_flags == values[b"instance_flags"] & keep, "instance flags")
        require(parsed.flags == values.get(b"flags", 0), "G2 flags", parsed, values)
    require(parsed.key == values.get(b"key", b""), "key")
    require(parsed.value == values.get(b"value", b""), "value")
    if op == "sequence":
        require(parsed.function == values[b"function"], "function")
    if op == "lookup":
        prefix = P.lookup_prefix(pairs, generation)
        exact = len(pairs) == len(P.EXPECTED[op, generation]) + 1
        require((prefix is not None) == exact, "lookup_prefix on an inexact list", pairs)
        if prefix is not None:
            require(
                attr.encode(pairs) == prefix + parsed.key + b"\x00\x00",
                "lookup prefix is not the wire form",
                pairs,
                prefix,
            )


def _one_list(wire: bytes) -> attr.Pairs:
    decoder = attr.AttrDecoder()
    lists = decoder.feed(wire)
    require(len(lists) == 1 and not decoder.pending, "not exactly one list", wire)
    return lists[0]


def scanner_one(data: bytes) -> None:
    decoder = attr.AttrDecoder()
    lists = decoder.feed(data)
    for pairs in lists:
        _check_parsed(pairs)
    # A request cut short at any attribute, with or without a name whose value never came.
    candidates = [*lists, decoder.pairs_so_far]
    for index, pairs in enumerate(candidates):
        cut = data[index % len(data)] % (len(pairs) + 1) if data else 0
        head = pairs[:cut]
        next_name = pairs[cut][0] if cut < len(pairs) and data and data[0] & 1 else None
        reply = P.reply_to_truncated(head, next_name)
        due, op = expected_op(head)
        require((reply is not None) == due, "truncated request: reply iff request came", head)
        if reply is not None:
            generation = (
                G2
                if (
                    generation_of(head) == G2 or (len(head) == 2 and next_name == b"instance_flags")
                )
                else G1
            )
            check_reply(op, generation, _one_list(reply))
            require(op is None or _one_list(reply)[0] == (b"status", b"3"), "truncated not BAD")
    # Any reply the handler could produce encodes to one well-formed list.
    fields = data.split(b"\x00")
    status = data[0] % 8 if data else 0
    flags = int.from_bytes(data[1:6], "big") if len(data) > 1 else 0
    reply = P.Reply(status, flags, key=fields[0], value=fields[-1])
    choice = data[-1] if data else 0
    op, generation = P.OPS[choice % len(P.OPS)], G2 if choice & 0x80 else G1
    pairs = _one_list(P.encode_reply(op, generation, reply))
    if status > 5:
        require(pairs[0] == (b"status", b"%d" % status), "odd status", pairs)
        return
    check_reply(op, generation, pairs)
    if status == 0 and op in ("lookup", "sequence"):
        require(pairs[-1][1] == reply.value.split(b"\x00")[0], "value not cut at NUL")
