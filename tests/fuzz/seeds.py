"""Seed inputs and a libFuzzer dictionary for the fuzz targets.

NAME
    seeds -- valid requests of both client generations, framed for each target

DESCRIPTION
    Coverage-guided mutation gets far faster from well-formed requests than from
    nothing: every operation in both generations, on every approved table, with
    the flag words real clients send, plus a few malformed classics (bad numbers,
    unknown request, missing attributes). Connection seeds carry the target's
    control bytes (service, half-close, split point) in front.
    ``dictionary_lines`` gives libFuzzer the protocol's words and the table names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxymap import attr

OPS = ("lookup", "open", "update", "delete", "sequence")
#: postmap -q (UTF8_REQUEST|LOCK|DUP_WARN), smtpd-ish FOLD_FIX|LOCK, none, all bits.
FLAG_WORDS = (b"524353", b"16448", b"64", b"0", b"4294967295")
KEYS = (b"alice", b"a", b"tx", b"px", b"nx", b"127.0.0.1", b"ALICE", b"\xc3\xa9")


def request(
    op: str,
    table: bytes,
    generation: int,
    flags: bytes = b"64",
    key: bytes = b"alice",
    value: bytes = b"v",
    function: bytes = b"0",
) -> bytes:
    pairs = [(b"request", op.encode()), (b"table", table)]
    if generation == 2:
        pairs.append((b"instance_flags", flags))
        if op == "open":
            return attr.encode(pairs)
    pairs.append((b"flags", flags))
    if op in ("lookup", "update", "delete"):
        pairs.append((b"key", key))
    if op == "update":
        pairs.append((b"value", value))
    if op == "sequence":
        pairs.append((b"function", function))
    return attr.encode(pairs)


MALFORMED = (
    b"request\x00lookup\x00table\x00hash:h\x00flags\x0064abc\x00key\x00k\x00\x00",
    b"request\x00bogus\x00\x00",
    b"request\x00lookup\x00flags\x0064\x00\x00",
    b"table\x00hash:h\x00\x00",
    b"\x00",
    b"request\x00sequence\x00table\x00btree:b\x00flags\x0064\x00function\x002\x00\x00",
    b"request\x00lookup\x00table\x00hash:h\x00flags\x00-1\x00key\x00a\x00key\x00b\x00\x00",
    b"request\x00open\x00table\x00proxy:proxy:hash:h\x00instance_flags\x00 +64\x00\x00",
    b"request\x00lookup\x00table\x00nocolon\x00flags\x0064\x00key\x00a\x00\x00",
)


def requests_for(tables: Sequence[str]) -> list[bytes]:
    out = []
    for index, table in enumerate(tables):
        name = table.encode()
        for op in OPS:
            for generation in (1, 2):
                flags = FLAG_WORDS[(index + len(op)) % len(FLAG_WORDS)]
                key = KEYS[index % len(KEYS)]
                out.append(request(op, name, generation, flags, key))
    return out + list(MALFORMED)


def attr_seeds() -> list[bytes]:
    raw = requests_for(["hash:h", "texthash:a"])
    return [bytes([control, 0, 9]) + body for control in (0x00, 0x85) for body in raw[:12]] + [
        b"\x00\x00\x01" + b"".join(raw[:6])
    ]


def scanner_seeds() -> list[bytes]:
    return requests_for(["hash:h", "texthash:a"]) + [b"".join(requests_for(["btree:b"]))]


def connection_seeds(read_tables: Iterable[str], write_tables: Iterable[str]) -> list[bytes]:
    seeds = []
    for service, tables in ((0, list(read_tables)), (1, list(write_tables))):
        for index, body in enumerate(requests_for(tables)):
            control = service | (2 if index % 3 == 0 else 0) | (4 if index % 7 == 0 else 0)
            seeds.append(bytes([control, index % 256, 17]) + body)
        batch = b"".join(requests_for(tables)[:8])
        seeds.append(bytes([service | 2, 1, 0]) + batch)
    return seeds


WORDS = (
    b"request",
    b"lookup",
    b"open",
    b"update",
    b"delete",
    b"sequence",
    b"table",
    b"flags",
    b"instance_flags",
    b"key",
    b"value",
    b"function",
    b"proxy:",
    b"status",
    b"4294967295",
    b"4294967296",
    b"-1",
    b" +64",
    b"524353",
    b"65600",
    b"0x40",
    b"18446744073709551616",
    b"\xff\xfe",
    b"\xc3\xa9",
    b"\x00\x00",
)


def _escape(token: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def dictionary_lines(tables: Iterable[str] = ()) -> list[str]:
    tokens = list(WORDS) + [t.encode() for t in tables]
    tokens += [word + b"\x00" for word in WORDS[:12]]
    return [f'"{_escape(token)}"' for token in dict.fromkeys(tokens)]
