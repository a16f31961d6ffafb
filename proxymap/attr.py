"""Postfix's null-terminated attribute encoding (attr_print0 / attr_scan0), sans-I/O.

NAME
    attr -- incremental decoder and encoder for attribute lists on Postfix internal sockets

SYNOPSIS
    decoder = AttrDecoder()
    for pairs in decoder.feed(data):       # any chunking; complete lists only
        ...                                # pairs: list[(name: bytes, value: bytes)]
    encode([(b"status", b"0"), (b"flags", b"28")])  # -> b"status\\x000\\x00flags\\x0028\\x00\\x00"
    parse_u32(b" +64")                     # -> 64; ValueError if malformed

DESCRIPTION
    A list is ``name NUL value NUL`` repeated, then one NUL in name position (an empty
    name). There is no length prefix and no escaping. See docs/PROTOCOL.md section 1.

    The decoder never touches a socket: it takes bytes and hands back complete lists,
    so every chunking of every request can be tested without a network (h11's design).
    It is the hot path of the worker: each chunk is split on NUL by one C call and
    only attributes (not bytes) are visited in Python.

    Group delimiters (``{`` / ``}``) are not interpreted: proxymap never uses them, and
    for the proxymap scanner they are just names that are not the expected ones.

    Numbers follow the C scanner (``sscanf("%u")`` on glibc): optional leading
    whitespace, optional sign, decimal digits only, wrap to the type's width, saturate
    on overflow, and nothing may follow.

BUGS
    Postfix imposes no size limit on a list; this decoder refuses a list larger than
    ``MAX_LIST_BYTES`` (``AttrTooLarge``), which the caller treats as malformed input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Pairs = list[tuple[bytes, bytes]]

# Postfix has no limit (a 200 000-byte key was accepted by 3.7); keys and values of real
# tables are a few hundred bytes at most, so 1 MiB leaves room and bounds memory.
MAX_LIST_BYTES = 1 << 20

NUL = b"\x00"

# An INT attribute is a C unsigned int: values wrap to 32 bits both ways.
UINT_MASK = 0xFFFFFFFF


class AttrTooLarge(ValueError):
    """A list grew beyond the decoder's size limit.

    ``complete`` holds the lists that ended before it in the same input (to be answered
    before the connection is given up); ``partial`` the first pairs of the oversized one.
    """

    def __init__(self, message: str, complete: list[Pairs], partial: Pairs) -> None:
        super().__init__(message)
        self.complete = complete
        self.partial = partial


class AttrDecoder:
    """Turns a byte stream into complete attribute lists, whatever the chunking.

    State between calls: the complete pairs of the list being received, a name whose
    value has not arrived yet, and the bytes of the field still being received.
    """

    __slots__ = ("limit", "_pairs", "_name", "_partial", "_size")

    def __init__(self, limit: int = MAX_LIST_BYTES) -> None:
        self.limit = limit
        self._pairs: Pairs = []
        self._name: bytes | None = None  # a name waiting for its value
        self._partial = bytearray()  # the unterminated field at the end of the input
        self._size = 0  # bytes of the current list consumed into _pairs/_name

    # -- state, for timeouts and end-of-input handling -------------------------------------
    @property
    def pending(self) -> bool:
        """True while part of a list has been received but not its terminator."""
        return bool(self._pairs or self._name is not None or self._partial)

    @property
    def pairs_so_far(self) -> Pairs:
        """The complete pairs of the unfinished list (what a scanner had already read)."""
        return self._pairs

    @property
    def reading(self) -> str:
        """``"name"`` or ``"value"``: which part of an attribute the decoder waits for."""
        return "value" if self._name is not None else "name"

    @property
    def pending_name(self) -> bytes | None:
        """A name received without its value yet."""
        return self._name

    @property
    def in_field(self) -> bool:
        """True when the input stopped inside a field (some bytes, no NUL yet)."""
        return bool(self._partial)

    def reset(self) -> None:
        """Forget the unfinished list."""
        self._pairs = []
        self._name = None
        self._partial.clear()
        self._size = 0

    # -- decoding --------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Pairs]:
        """Add received bytes; return the lists they complete (often none, usually one).

        Raises ``AttrTooLarge`` when a list exceeds the limit; the decoder
        is then reset (the caller closes the connection: there is no way to resynchronise).
        """
        if 0 not in data:  # the byte value: `bytes in bytes` first raises and clears an error
            # Still inside one field: accumulate without splitting (amortised O(1), so a
            # large value arriving in small pieces stays linear).
            self._partial += data
            self._check_size(self._size)
            return []
        if self._partial:
            data = bytes(self._partial) + data
            self._partial.clear()
        fields = data.split(NUL)
        tail = fields.pop()  # bytes after the last NUL: an unterminated field (maybe empty)
        done: list[Pairs] = []
        pairs = self._pairs
        size = self._size
        name = self._name
        i = 0
        count = len(fields)
        if name is not None:
            value = fields[0]
            pairs.append((name, value))
            size += len(value) + 1
            name = None
            i = 1
            # Checked here too, so that the verdict does not depend on the chunking
            # (the fuzzer found a list refused whole but accepted in pieces).
            if size > self.limit:
                self.reset()
                raise AttrTooLarge(f"attribute list exceeds {self.limit} bytes", done, pairs)
        while i < count:
            field = fields[i]
            if not field:  # empty name: end of list
                done.append(pairs)
                pairs = []
                size = 0
                i += 1
            elif i + 1 < count:
                value = fields[i + 1]
                pairs.append((field, value))
                size += len(field) + len(value) + 2
                if size > self.limit:
                    self.reset()
                    raise AttrTooLarge(f"attribute list exceeds {self.limit} bytes", done, pairs)
                i += 2
            else:
                name = field
                size += len(field) + 1
                i += 1
        self._pairs = pairs
        self._name = name
        self._size = size
        if tail:
            self._partial += tail
        self._check_size(size, done)
        return done

    def _check_size(self, size: int, done: list[Pairs] | None = None) -> None:
        if size + len(self._partial) > self.limit and self.pending:
            pairs = self._pairs
            self.reset()
            raise AttrTooLarge(f"attribute list exceeds {self.limit} bytes", done or [], pairs)


# -- encoding --------------------------------------------------------------------------------
def encode(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """One attribute list, terminator included. Names and values must not contain NUL."""
    parts = []
    for name, value in pairs:
        parts.append(name)
        parts.append(value)
    parts.append(b"")
    return NUL.join(parts) + NUL


def encode_uint(value: int) -> bytes:
    """An INT attribute value: the 32-bit pattern as an unsigned decimal (-1 -> 4294967295)."""
    return b"%d" % (value & UINT_MASK)


# -- numbers ---------------------------------------------------------------------------------
_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)\Z")
_U64 = (1 << 64) - 1


def parse_ulong(text: bytes) -> int:
    """A LONG attribute value as the C scanner reads it (64-bit unsigned). ValueError if bad."""
    match = _NUMBER.match(text)
    if match is None:
        raise ValueError(text)
    value = int(match.group(2))
    if value > _U64:
        return _U64  # strtoul saturates on overflow, whatever the sign
    if match.group(1) == b"-":
        return -value & _U64
    return value


def parse_u32(text: bytes) -> int:
    """An INT attribute value as the C scanner reads it (wraps to 32 bits). ValueError if bad."""
    # Fast path: what real clients send (plain decimal, fits in 32 bits).
    if text.isdigit() and len(text) < 10:
        return int(text)
    return parse_ulong(text) & UINT_MASK
