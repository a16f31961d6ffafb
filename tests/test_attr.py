"""The attr0 codec: golden bytes, every chunking, size limit, numbers (docs/PROTOCOL.md 1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxymap import attr
from proxymap.attr import AttrDecoder, AttrTooLarge, encode, parse_u32, parse_ulong
from tests.test_protocol import TRANSCRIPT

ANNOUNCEMENT = b"protocol\x00proxymap_protocol\x00\x00"

# Every request and reply of docs/PROTOCOL.md 6, plus the announcement (the 200000-byte key
# is left out of the all-split-points sweep only, for time).
GOLDEN = [ANNOUNCEMENT] + [row[1] for row in TRANSCRIPT] + [row[3] for row in TRANSCRIPT]
SMALL_GOLDEN = [wire for wire in GOLDEN if len(wire) < 1000]


def decode_in_chunks(wire: bytes, sizes) -> list:
    decoder = AttrDecoder()
    lists = []
    pos = 0
    for size in sizes:
        lists += decoder.feed(wire[pos : pos + size])
        pos += size
    lists += decoder.feed(wire[pos:])
    assert not decoder.pending
    return lists


def test_announcement_and_lookup_golden():
    assert encode([(b"protocol", b"proxymap_protocol")]) == ANNOUNCEMENT
    assert len(ANNOUNCEMENT) == 28
    lookup = bytes.fromhex(
        "72657175657374006c6f6f6b7570007461626c6500686173683a2f6574632f706f73746669782f746573746d617000666c61677300353234333533006b657900616c6963650000"
    )
    assert AttrDecoder().feed(lookup) == [
        [
            (b"request", b"lookup"),
            (b"table", b"hash:/etc/postfix/testmap"),
            (b"flags", b"524353"),
            (b"key", b"alice"),
        ]
    ]


@pytest.mark.parametrize("wire", GOLDEN, ids=range(len(GOLDEN)))
def test_round_trip(wire):
    lists = AttrDecoder().feed(wire)
    assert len(lists) == 1
    assert encode(lists[0]) == wire


@pytest.mark.parametrize("wire", SMALL_GOLDEN, ids=range(len(SMALL_GOLDEN)))
def test_every_split_point(wire):
    whole = AttrDecoder().feed(wire)
    for cut in range(len(wire) + 1):
        assert decode_in_chunks(wire, [cut]) == whole, cut
    for first in range(len(wire)):
        for second in range(first, len(wire) + 1, 7):
            assert decode_in_chunks(wire, [first, second - first]) == whole


@pytest.mark.parametrize("wire", GOLDEN, ids=range(len(GOLDEN)))
def test_one_byte_at_a_time(wire):
    whole = AttrDecoder().feed(wire)
    decoder = AttrDecoder()
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
        assert bool(out) == (i == len(wire) - 1)
    assert out == whole


def test_pipelined_lists_in_one_chunk_and_across_chunks():
    stream = b"".join(row[1] for row in TRANSCRIPT[:6])
    expected = [AttrDecoder().feed(row[1])[0] for row in TRANSCRIPT[:6]]
    assert AttrDecoder().feed(stream) == expected
    for size in (1, 2, 3, 5, 13, 64):
        assert decode_in_chunks(stream, [size] * (len(stream) // size)) == expected


def test_empty_list_and_empty_values():
    assert AttrDecoder().feed(b"\x00") == [[]]
    assert AttrDecoder().feed(b"\x00\x00") == [[], []]
    assert AttrDecoder().feed(b"status\x001\x00key\x00\x00value\x00\x00\x00") == [
        [(b"status", b"1"), (b"key", b""), (b"value", b"")]
    ]


def test_eight_bit_values_pass_unchanged():
    pairs = [(b"key", bytes(range(1, 256))), (b"value", "\u00e9\n\t".encode())]
    assert AttrDecoder().feed(encode(pairs)) == [pairs]


def test_writer_output_with_group_finds_the_terminator():
    # The group is not interpreted, but the list still ends at the right byte.
    wire = b"request\x00lookup\x00flags\x004294967295\x00size\x001234567890123\x00blob\x00YQBi\x00{\x00k1\x00v1\x00}\x00empty\x00\x00\x00"
    decoder = AttrDecoder()
    lists = decoder.feed(wire + b"next\x00x\x00")
    assert (
        len(lists) == 1
        and lists[0][0] == (b"request", b"lookup")
        and lists[0][-1] == (b"empty", b"")
    )
    assert decoder.pairs_so_far == [(b"next", b"x")]


def test_state_for_timeout_and_eof_messages():
    decoder = AttrDecoder()
    assert not decoder.pending
    decoder.feed(b"request\x00")
    assert decoder.pending and decoder.reading == "value" and not decoder.in_field
    decoder.feed(b"lookup\x00tab")
    assert decoder.reading == "name" and decoder.in_field
    assert decoder.pairs_so_far == [(b"request", b"lookup")]
    decoder.reset()
    assert not decoder.pending


def test_200000_byte_key_accepted():
    wire = encode([(b"request", b"lookup"), (b"key", b"k" * 200000)])
    decoder = AttrDecoder()
    out = []
    for pos in range(0, len(wire), 4096):
        out += decoder.feed(wire[pos : pos + 4096])
    assert out[0][1] == (b"key", b"k" * 200000)


def test_size_limit_is_malformed_input():
    decoder = AttrDecoder(limit=1000)
    decoder.feed(b"request\x00lookup\x00key\x00")
    with pytest.raises(AttrTooLarge):
        decoder.feed(b"x" * 1000)
    assert not decoder.pending
    decoder = AttrDecoder(limit=1000)
    with pytest.raises(AttrTooLarge):
        for _ in range(200):
            decoder.feed(b"name\x00value\x00")
    # The default limit is 1 MiB; a list just under it passes.
    big = encode([(b"key", b"v" * (attr.MAX_LIST_BYTES - 20))])
    assert len(AttrDecoder().feed(big)) == 1
    with pytest.raises(AttrTooLarge):
        AttrDecoder().feed(encode([(b"key", b"v" * attr.MAX_LIST_BYTES)]))


def test_huge_value_in_small_pieces_is_linear():
    import time

    decoder = AttrDecoder()
    decoder.feed(b"key\x00")
    start = time.perf_counter()
    for _ in range(100000):
        decoder.feed(b"abcdefghij")
    decoder.feed(b"\x00\x00")
    assert time.perf_counter() - start < 2.0


# --- numbers (docs/PROTOCOL.md 1.4) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"64", 64),
        (b" 64", 64),
        (b"\t64", 64),
        (b"\n64", 64),
        (b"\v\f\r 64", 64),
        (b"+64", 64),
        (b"00064", 64),
        (b"0100", 100),
        (b"4294967360", 64),
        (b"4294967295", 0xFFFFFFFF),
        (b"-1", 0xFFFFFFFF),
        (b"-0", 0),
        (b"18446744073709551680", 0xFFFFFFFF),
        (b"-18446744073709551680", 0xFFFFFFFF),
        (b"0", 0),
        (b"524353", 524353),
    ],
)
def test_u32(text, value):
    assert parse_u32(text) == value


@pytest.mark.parametrize(
    "text",
    [b"0x40", b"", b"64abc", b"64 ", b" ", b"+", b"-", b"+-1", b"6 4", b"\xd9\xa4", b"\x0064"],
)
def test_u32_malformed(text):
    with pytest.raises(ValueError):
        parse_u32(text)


def test_ulong_no_truncation_and_saturation():
    assert parse_ulong(b"1234567890123") == 1234567890123
    assert parse_ulong(b"-1") == 2**64 - 1
    assert parse_ulong(b"99999999999999999999999") == 2**64 - 1


def test_encode_uint():
    assert attr.encode_uint(-1) == b"4294967295"
    assert attr.encode_uint(28) == b"28"


# --- properties ---------------------------------------------------------------------------------


_field = st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"\x01"))
_name = _field.filter(bool)
_lists = st.lists(st.lists(st.tuples(_name, _field), max_size=6), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(lists=_lists, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_lists_in_any_chunking(lists, cuts):
    wire = b"".join(encode(pairs) for pairs in lists)
    points = sorted({min(c, len(wire)) for c in cuts})
    decoder = AttrDecoder()
    out = []
    previous = 0
    for point in [*points, len(wire)]:
        out += decoder.feed(wire[previous:point])
        previous = point
    assert out == lists
    assert not decoder.pending


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data):
    decoder = AttrDecoder(limit=100)
    try:
        lists = decoder.feed(data)
    except AttrTooLarge:
        return
    for pairs in lists:
        assert all(name and b"\x00" not in name + value for name, value in pairs)
