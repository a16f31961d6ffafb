"""Requests and replies of both generations against the golden transcripts (docs/PROTOCOL.md 6).

Every byte string below is copied from docs/PROTOCOL.md section 6 (observed on Postfix 3.7.11
and 3.12). A row is (request bytes, the table outcome the handler reports, reply bytes):
the test decodes the request, checks the parsed Request, encodes the handler's Reply in
the request's generation and compares with the observed reply, byte for byte. Rows whose
reply comes from the protocol layer itself (malformed input) have no table outcome.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxymap import attr
from proxymap import flags as F
from proxymap.handler import RequestHandler
from proxymap.protocol import (
    BAD,
    DENY,
    G1,
    G2,
    LOOKUP_END,
    NOKEY,
    OK,
    RETRY,
    UNKNOWN_REQUEST_REPLY,
    Reply,
    Request,
    encode_reply,
    g2_lookup_templates,
    lookup_replies,
    parse_request,
    reply_to_truncated,
)

STREAM = "proxymap socket"
TM = b"hash:/etc/postfix/testmap"


def g1(op: bytes, table: bytes = TM, flags: bytes = b"64", **rest: bytes) -> bytes:
    pairs = [(b"request", op), (b"table", table), (b"flags", flags)]
    pairs += [(name.encode(), value) for name, value in rest.items()]
    return attr.encode(pairs)


ALICE = b"alice@example.com"

# (label, request bytes, handler outcome or None, observed reply bytes)
TRANSCRIPT = [
    # 6.1 3.7 postmap -q alice proxy:hash:/etc/postfix/testmap
    (
        "6.1 open",
        b"request\x00open\x00table\x00hash:/etc/postfix/testmap\x00flags\x000\x00\x00",
        Reply(OK, flags=28),
        b"status\x000\x00flags\x0028\x00\x00",
    ),
    (
        "6.1 lookup",
        b"request\x00lookup\x00table\x00hash:/etc/postfix/testmap\x00flags\x00524353\x00key\x00alice\x00\x00",
        Reply(OK, value=ALICE),
        b"status\x000\x00value\x00alice@example.com\x00\x00",
    ),
    # 6.2 cross-talk: the second open reply shows the shared instance's flags
    (
        "6.2 open again",
        b"request\x00open\x00table\x00hash:/etc/postfix/testmap\x00flags\x000\x00\x00",
        Reply(OK, flags=524377),
        b"status\x000\x00flags\x00524377\x00\x00",
    ),
    # 6.3 3.7 server, one request per connection
    (
        "6.3 nobody",
        g1(b"lookup", flags=b"524353", key=b"nobody"),
        Reply(NOKEY),
        b"status\x001\x00value\x00\x00\x00",
    ),
    (
        "6.3 ALICE fold",
        g1(b"lookup", flags=b"16448", key=b"ALICE"),
        Reply(OK, value=ALICE),
        b"status\x000\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.3 ALICE nofold",
        g1(b"lookup", key=b"ALICE"),
        Reply(NOKEY),
        b"status\x001\x00value\x00\x00\x00",
    ),
    (
        "6.3 proxy:proxy:",
        g1(b"lookup", table=b"proxy:proxy:hash:/etc/postfix/testmap", key=b"alice"),
        Reply(OK, value=ALICE),
        b"status\x000\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.3 no colon",
        g1(b"lookup", table=b"foo", key=b"alice"),
        Reply(BAD),
        b"status\x003\x00value\x00\x00\x00",
    ),
    (
        "6.3 unapproved lookup",
        g1(b"lookup", table=b"hash:/etc/postfix/nope", key=b"alice"),
        Reply(DENY),
        b"status\x004\x00value\x00\x00\x00",
    ),
    (
        "6.3 unapproved open",
        g1(b"open", table=b"hash:/etc/postfix/nope", flags=b"0"),
        Reply(DENY),
        b"status\x004\x00flags\x000\x00\x00",
    ),
    (
        "6.3 open nocolon",
        g1(b"open", table=b"nocolon", flags=b"0"),
        Reply(BAD),
        b"status\x003\x00flags\x000\x00\x00",
    ),
    (
        "6.3 update on proxymap",
        b"request\x00update\x00table\x00hash:/etc/postfix/testmap\x00flags\x000\x00key\x00k\x00value\x00v\x00\x00",
        Reply(DENY),
        b"status\x004\x00\x00",
    ),
    (
        "6.3 delete on proxymap",
        g1(b"delete", flags=b"0", key=b"k"),
        Reply(DENY),
        b"status\x004\x00\x00",
    ),
    (
        "6.3 bogus",
        b"request\x00bogus\x00table\x00hash:/etc/postfix/testmap\x00\x00",
        None,
        b"status\x003\x00\x00",
    ),
    (
        "6.3 seq first",
        g1(b"sequence", function=b"0"),
        Reply(OK, key=b"alice", value=ALICE),
        b"status\x000\x00key\x00alice\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.3 seq next",
        g1(b"sequence", function=b"1"),
        Reply(OK, key=b"bob", value=b"bob@example.com"),
        b"status\x000\x00key\x00bob\x00value\x00bob@example.com\x00\x00",
    ),
    (
        "6.3 seq next 2",
        g1(b"sequence", function=b"1"),
        Reply(OK, key=b"carol", value=b"carol@example.com"),
        b"status\x000\x00key\x00carol\x00value\x00carol@example.com\x00\x00",
    ),
    (
        "6.3 seq end",
        g1(b"sequence", function=b"1"),
        Reply(NOKEY),
        b"status\x001\x00key\x00\x00value\x00\x00\x00",
    ),
    (
        "6.3 seq function 2",
        g1(b"sequence", function=b"2"),
        None,
        b"status\x003\x00key\x00\x00value\x00\x00\x00",
    ),
    (
        "6.3 open pcre",
        g1(b"open", table=b"pcre:/etc/postfix/test.pcre", flags=b"0"),
        Reply(OK, flags=32),
        b"status\x000\x00flags\x0032\x00\x00",
    ),
    (
        "6.3 open texthash",
        g1(b"open", table=b"texthash:/etc/postfix/testmap", flags=b"0"),
        Reply(OK, flags=16),
        b"status\x000\x00flags\x0016\x00\x00",
    ),
    (
        "6.3 open lmdb",
        g1(b"open", table=b"lmdb:/etc/postfix/testmap", flags=b"0"),
        Reply(OK, flags=262172),
        b"status\x000\x00flags\x00262172\x00\x00",
    ),
    (
        "6.3 unix root",
        g1(b"lookup", table=b"unix:passwd.byname", flags=b"0", key=b"root"),
        Reply(OK, value=b"root:x:0:0:root:/root:/bin/bash"),
        b"status\x000\x00value\x00root:x:0:0:root:/root:/bin/bash\x00\x00",
    ),
    ("6.3 missing key", g1(b"lookup"), None, b"status\x003\x00value\x00\x00\x00"),
    (
        "6.3 extra trailing",
        g1(b"lookup", key=b"alice", extra=b"x"),
        Reply(OK, value=ALICE),
        b"status\x000\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.3 out of order",
        attr.encode(
            [(b"request", b"lookup"), (b"flags", b"64"), (b"table", TM), (b"key", b"alice")]
        ),
        None,
        b"status\x003\x00value\x00\x00\x00",
    ),
    (
        "6.3 200000-byte key",
        g1(b"lookup", key=b"k" * 200000),
        Reply(NOKEY),
        b"status\x001\x00value\x00\x00\x00",
    ),
    # 6.4 3.7 writer
    ("6.4 update", g1(b"update", key=b"newkey", value=b"v1"), Reply(OK), b"status\x000\x00\x00"),
    (
        "6.4 lookup",
        g1(b"lookup", key=b"newkey"),
        Reply(OK, value=b"v2"),
        b"status\x000\x00value\x00v2\x00\x00",
    ),
    ("6.4 delete", g1(b"delete", key=b"newkey"), Reply(OK), b"status\x000\x00\x00"),
    ("6.4 delete again", g1(b"delete", key=b"newkey"), Reply(NOKEY), b"status\x001\x00\x00"),
    (
        "6.4 open cross-talk",
        g1(b"open", flags=b"0"),
        Reply(OK, flags=344),
        b"status\x000\x00flags\x00344\x00\x00",
    ),
    (
        "6.4 update unapproved",
        g1(b"update", table=b"hash:/srv/pmh/r37", key=b"k", value=b"v"),
        Reply(DENY),
        b"status\x004\x00\x00",
    ),
    (
        "6.4 surrogate open",
        g1(b"open", flags=b"0"),
        Reply(OK, flags=32),
        b"status\x000\x00flags\x0032\x00\x00",
    ),
    (
        "6.4 surrogate update",
        g1(b"update", key=b"k", value=b"v"),
        Reply(RETRY),
        b"status\x002\x00\x00",
    ),
    (
        "6.4 surrogate lookup",
        g1(b"lookup", key=b"k"),
        Reply(RETRY, value=b"ignored"),
        b"status\x002\x00value\x00\x00\x00",
    ),
    # 6.5 3.12 client <-> 3.12 server
    (
        "6.5 open",
        b"request\x00open\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x00540737\x00\x00",
        Reply(OK, flags=1589329),
        b"status\x000\x00flags\x001589329\x00\x00",
    ),
    (
        "6.5 lookup",
        b"request\x00lookup\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x00540737\x00flags\x001589329\x00key\x00alice\x00\x00",
        Reply(OK, flags=1589329, value=ALICE),
        b"status\x000\x00flags\x001589329\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.5 sequence",
        b"request\x00sequence\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x00540737\x00flags\x001589329\x00function\x000\x00\x00",
        Reply(OK, flags=1589329, key=b"bob", value=b"bob@example.com"),
        b"status\x000\x00flags\x001589329\x00key\x00bob\x00value\x00bob@example.com\x00\x00",
    ),
    (
        "6.5 sequence end",
        b"request\x00sequence\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x00540737\x00flags\x001589329\x00function\x001\x00\x00",
        Reply(NOKEY, flags=1589329),
        b"status\x001\x00flags\x001589329\x00key\x00\x00value\x00\x00\x00",
    ),
    (
        "6.5 writer open",
        b"request\x00open\x00table\x00internal:w312\x00instance_flags\x00540673\x00\x00",
        Reply(OK, flags=1589265),
        b"status\x000\x00flags\x001589265\x00\x00",
    ),
    (
        "6.5 update k1",
        b"request\x00update\x00table\x00internal:w312\x00instance_flags\x00540673\x00flags\x001589265\x00key\x00k1\x00value\x00v1\x00\x00",
        Reply(OK, flags=1589649),
        b"status\x000\x00flags\x001589649\x00\x00",
    ),
    (
        "6.5 update K2",
        b"request\x00update\x00table\x00internal:w312\x00instance_flags\x00540673\x00flags\x001589649\x00key\x00K2\x00value\x00v2\x00\x00",
        Reply(OK, flags=1589649),
        b"status\x000\x00flags\x001589649\x00\x00",
    ),
    (
        "6.5 delete",
        b"request\x00delete\x00table\x00internal:w312\x00instance_flags\x00540737\x00flags\x001589329\x00key\x00k1\x00\x00",
        Reply(NOKEY, flags=1589585),
        b"status\x001\x00flags\x001589585\x00\x00",
    ),
    (
        "6.5 unapproved open",
        b"request\x00open\x00table\x00texthash:/srv/pmh/notproxied\x00instance_flags\x00540737\x00\x00",
        Reply(DENY),
        b"status\x004\x00flags\x000\x00\x00",
    ),
    # 6.6 3.12 server, raw requests (G2 tables opened with instance flags 0)
    (
        "6.6 open inst 0",
        b"request\x00open\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00\x00",
        Reply(OK, flags=16),
        b"status\x000\x00flags\x0016\x00\x00",
    ),
    (
        "6.6 lookup flags 0",
        b"request\x00lookup\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x000\x00key\x00alice\x00\x00",
        Reply(OK, flags=0, value=ALICE),
        b"status\x000\x00flags\x000\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.6 lookup ALICE flags 16",
        b"request\x00lookup\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x0016\x00key\x00ALICE\x00\x00",
        Reply(NOKEY, flags=16),
        b"status\x001\x00flags\x0016\x00value\x00\x00\x00",
    ),
    (
        "6.6 lookup ALICE flags 16400",
        b"request\x00lookup\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x0016400\x00key\x00ALICE\x00\x00",
        Reply(OK, flags=16400, value=ALICE),
        b"status\x000\x00flags\x0016400\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.6 lookup flags -1",
        b"request\x00lookup\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x004294967295\x00key\x00alice\x00\x00",
        Reply(OK, flags=0xFFFFFFFF, value=ALICE),
        b"status\x000\x00flags\x004294967295\x00value\x00alice@example.com\x00\x00",
    ),
    (
        "6.6 lookup unapproved",
        b"request\x00lookup\x00table\x00texthash:/nope\x00instance_flags\x000\x00flags\x000\x00key\x00a\x00\x00",
        Reply(DENY),
        b"status\x004\x00flags\x000\x00value\x00\x00\x00",
    ),
    (
        "6.6 lookup nocolon",
        b"request\x00lookup\x00table\x00nocolon\x00instance_flags\x000\x00flags\x000\x00key\x00a\x00\x00",
        Reply(BAD),
        b"status\x003\x00flags\x000\x00value\x00\x00\x00",
    ),
    (
        "6.6 update on proxymap",
        b"request\x00update\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x000\x00key\x00a\x00value\x00b\x00\x00",
        Reply(DENY),
        b"status\x004\x00flags\x000\x00\x00",
    ),
    (
        "6.6 delete on proxymap",
        b"request\x00delete\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x000\x00key\x00a\x00\x00",
        Reply(DENY),
        b"status\x004\x00flags\x000\x00\x00",
    ),
    (
        "6.6 sequence function 7",
        b"request\x00sequence\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x000\x00function\x007\x00\x00",
        None,
        b"status\x003\x00flags\x000\x00key\x00\x00value\x00\x00\x00",
    ),
    (
        "6.6 frob",
        b"request\x00frob\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00\x00",
        None,
        b"status\x003\x00\x00",
    ),
    (
        "6.6 writer update",
        b"request\x00update\x00table\x00internal:w312\x00instance_flags\x000\x00flags\x0016\x00key\x00a\x00value\x00b\x00\x00",
        Reply(OK, flags=400),
        b"status\x000\x00flags\x00400\x00\x00",
    ),
    (
        "6.6 writer lookup",
        b"request\x00lookup\x00table\x00internal:w312\x00instance_flags\x000\x00flags\x0016\x00key\x00a\x00\x00",
        Reply(OK, flags=16, value=b"b"),
        b"status\x000\x00flags\x0016\x00value\x00b\x00\x00",
    ),
    (
        "6.6 writer delete",
        b"request\x00delete\x00table\x00internal:w312\x00instance_flags\x000\x00flags\x0016\x00key\x00a\x00\x00",
        Reply(OK, flags=272),
        b"status\x000\x00flags\x00272\x00\x00",
    ),
    (
        "6.6 writer delete again",
        b"request\x00delete\x00table\x00internal:w312\x00instance_flags\x000\x00flags\x0016\x00key\x00a\x00\x00",
        Reply(NOKEY, flags=272),
        b"status\x001\x00flags\x00272\x00\x00",
    ),
    (
        "6.6 surrogate update",
        b"request\x00update\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x000\x00flags\x0016\x00key\x00a\x00value\x00b\x00\x00",
        Reply(RETRY, flags=400),
        b"status\x002\x00flags\x00400\x00\x00",
    ),
    # 6.7 cross-generation: each request is answered in its own generation's shape
    (
        "6.7 3.7 open",
        b"request\x00open\x00table\x00texthash:/srv/pmh/r312\x00flags\x000\x00\x00",
        Reply(OK, flags=16),
        b"status\x000\x00flags\x0016\x00\x00",
    ),
    (
        "6.7 3.12 open",
        b"request\x00open\x00table\x00hash:/etc/postfix/testmap\x00instance_flags\x00540737\x00\x00",
        Reply(OK, flags=1589341),
        b"status\x000\x00flags\x001589341\x00\x00",
    ),
]


@pytest.mark.parametrize(
    ("label", "wire", "outcome", "expected"), TRANSCRIPT, ids=[row[0] for row in TRANSCRIPT]
)
def test_transcript(label, wire, outcome, expected):
    lists = attr.AttrDecoder().feed(wire)
    assert len(lists) == 1
    parsed = parse_request(lists[0], STREAM)
    if outcome is None:
        assert parsed == expected  # answered by the protocol layer itself
        return
    assert isinstance(parsed, Request)
    assert encode_reply(parsed.op, parsed.generation, outcome) == expected


def test_parsed_fields_g1_and_g2():
    req = parse_request(attr.AttrDecoder().feed(TRANSCRIPT[1][1])[0], STREAM)
    assert req == Request("lookup", "hash:/etc/postfix/testmap", G1, flags=524353, key=b"alice")
    req = parse_request(
        attr.AttrDecoder().feed(
            b"request\x00update\x00table\x00internal:w312\x00instance_flags\x00540673\x00flags\x001589265\x00key\x00k1\x00value\x00v1\x00\x00"
        )[0],
        STREAM,
    )
    assert req == Request(
        "update", "internal:w312", G2, flags=1589265, instance_flags=540673, key=b"k1", value=b"v1"
    )
    req = parse_request(attr.AttrDecoder().feed(g1(b"sequence", function=b"1"))[0], STREAM)
    assert (req.op, req.function, req.flags) == ("sequence", 1, 64)
    req = parse_request(
        attr.AttrDecoder().feed(
            b"request\x00open\x00table\x00texthash:/srv/pmh/r312\x00instance_flags\x00540737\x00\x00"
        )[0],
        STREAM,
    )
    assert (req.op, req.generation, req.instance_flags, req.flags) == ("open", G2, 540737, 0)


def test_table_name_is_byte_exact_text():
    req = parse_request(
        [
            (b"request", b"lookup"),
            (b"table", b"hash:/t/\xff\xc3\xa9"),
            (b"flags", b"0"),
            (b"key", b"k"),
        ],
        STREAM,
    )
    assert req.table.encode("utf-8", "surrogateescape") == b"hash:/t/\xff\xc3\xa9"


def parse(wire: bytes):
    lists = attr.AttrDecoder().feed(wire)
    assert len(lists) == 1
    return parse_request(lists[0], STREAM)


# --- docs/PROTOCOL.md 6.3: malformed input, every row -----------------------------------------


def test_g2_lookup_is_served_as_g2_not_refused_like_37():
    # 3.7 answered BAD (it only speaks G1); a dual server detects the generation instead.
    req = parse(
        b"request\x00lookup\x00table\x00hash:/etc/postfix/testmap\x00instance_flags\x000\x00flags\x0064\x00key\x00alice\x00\x00"
    )
    assert (req.generation, req.instance_flags, req.flags, req.key) == (G2, 0, 64, b"alice")


def test_missing_attribute_is_bad_with_warning(caplog):
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert parse(g1(b"lookup")) == b"status\x003\x00value\x00\x00\x00"
    assert caplog.messages == ["missing attribute key in input from proxymap socket"]


def test_extra_trailing_attribute_processed_with_warning(caplog):
    with caplog.at_level(logging.WARNING, "proxymap"):
        req = parse(g1(b"lookup", key=b"alice", extra=b"x"))
    assert req.key == b"alice"
    assert caplog.messages == [
        "unexpected attribute extra from proxymap socket (expecting: (list terminator))"
    ]


def test_out_of_order_is_bad_with_postfix_warning(caplog):
    wire = attr.encode(
        [(b"request", b"lookup"), (b"flags", b"64"), (b"table", TM), (b"key", b"alice")]
    )
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert parse(wire) == b"status\x003\x00value\x00\x00\x00"
    assert caplog.messages == ["unexpected attribute flags from proxymap socket (expecting: table)"]


def test_unknown_attribute_in_the_middle_is_bad(caplog):
    wire = attr.encode(
        [
            (b"request", b"lookup"),
            (b"table", TM),
            (b"flags", b"64"),
            (b"color", b"red"),
            (b"key", b"a"),
        ]
    )
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert parse(wire) == b"status\x003\x00value\x00\x00\x00"
    assert caplog.messages == ["unexpected attribute color from proxymap socket (expecting: key)"]


def test_g1_open_to_a_g2_shape_is_bad_in_g2():
    # instance_flags right after table, then G1's flags where G2 wants nothing more: G2 open
    # with an extra attribute -> processed; a G2 lookup lacking key -> BAD in G2 shape.
    wire = b"request\x00lookup\x00table\x00x:y\x00instance_flags\x000\x00flags\x000\x00\x00"
    assert parse(wire) == b"status\x003\x00flags\x000\x00value\x00\x00\x00"


def test_duplicate_last_attribute_first_value_wins(caplog):
    wire = attr.encode(
        [
            (b"request", b"lookup"),
            (b"table", TM),
            (b"flags", b"64"),
            (b"key", b"alice"),
            (b"key", b"bob"),
        ]
    )
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert parse(wire).key == b"alice"
    assert caplog.messages == [
        "unexpected attribute key from proxymap socket (expecting: (list terminator))"
    ]


@pytest.mark.parametrize("text", [b" 64", b"+64", b"\t64", b"\n64", b"00064", b"4294967360"])
def test_flag_numbers_accepted_as_64(text):
    assert parse(g1(b"lookup", flags=text, key=b"alice")).flags == 64


def test_flag_number_is_decimal_not_octal():
    assert parse(g1(b"lookup", flags=b"0100", key=b"alice")).flags == 100


@pytest.mark.parametrize("text", [b"0x40", b"", b"64abc", b"64 "])
def test_malformed_flag_numbers_are_bad(text, caplog):
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert parse(g1(b"lookup", flags=text, key=b"alice")) == b"status\x003\x00value\x00\x00\x00"
    assert caplog.messages == [
        f"malformed numerical data from proxymap socket while reading input attribute value: {text.decode()}"
    ]


@pytest.mark.parametrize("text", [b"-1", b"18446744073709551680"])
def test_flags_that_crash_postfix_are_sanitised(text, tmp_path):
    # 3.7 panics (OPEN_LOCK from the instance part together with LOCK). The protocol drops
    # instance states a client may not claim; the handler keeps OPEN_LOCK/BULK_UPDATE
    # from the table. End to end, the request is simply served.
    req = parse(
        g1(b"lookup", table=b"texthash:%s" % str(tmp_path / "t").encode(), flags=text, key=b"alice")
    )
    assert req.flags & (F.UTF8_ACTIVE | F.SURROGATE | 0xFF800000) == 0
    assert req.flags & F.LOCK
    (tmp_path / "t").write_text("alice alice@example.com\n")
    handler = RequestHandler("proxymap", {f"texthash:{tmp_path / 't'}"}, {})
    assert (
        encode_reply(req.op, req.generation, handler.handle(req))
        == b"status\x000\x00value\x00alice@example.com\x00\x00"
    )


def test_open_lock_with_lock_in_g2_is_served(tmp_path):
    (tmp_path / "t").write_text("alice alice@example.com\n")
    name = f"texthash:{tmp_path / 't'}".encode()
    req = parse(b"request\x00open\x00table\x00%s\x00instance_flags\x0065600\x00\x00" % name)
    assert req.instance_flags == 65600
    handler = RequestHandler("proxymap", {name.decode()}, {})
    wire = encode_reply(req.op, req.generation, handler.handle(req))
    assert wire.startswith(b"status\x000\x00flags\x00")


def test_g2_request_flags_round_trip_unchanged():
    row = next(row for row in TRANSCRIPT if row[0] == "6.6 lookup flags -1")
    req = parse(row[1])
    assert req.flags == 0xFFFFFFFF


def test_empty_list_gets_no_reply(caplog):
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert parse(b"\x00") is None
    assert caplog.messages == ["missing attribute request in input from proxymap socket"]


def test_list_without_request_gets_no_reply(caplog):
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert parse(b"table\x00hash:/etc/postfix/testmap\x00flags\x0064\x00\x00") is None
    assert caplog.messages == [
        "unexpected attribute table from proxymap socket (expecting: request)"
    ]


def test_unknown_request_single_status(caplog):
    with caplog.at_level(logging.WARNING, "proxymap"):
        assert (
            parse(b"request\x00bogus\x00table\x00hash:/etc/postfix/testmap\x00\x00")
            == UNKNOWN_REQUEST_REPLY
        )
    assert caplog.messages == ['unrecognized request: "bogus", ignored']


def test_request_name_is_case_sensitive():
    assert parse(g1(b"LOOKUP", key=b"a")) == b"status\x003\x00\x00"


def test_half_closed_request_is_bad_in_its_shape():
    decoder = attr.AttrDecoder()
    assert decoder.feed(b"request\x00lookup\x00table") == []
    assert decoder.pending and decoder.in_field
    assert reply_to_truncated(decoder.pairs_so_far) == b"status\x003\x00value\x00\x00\x00"


def test_truncated_g2_request_gets_g2_shape():
    decoder = attr.AttrDecoder()
    decoder.feed(b"request\x00sequence\x00table\x00x:y\x00instance_flags\x00")
    assert (
        reply_to_truncated(decoder.pairs_so_far, decoder._name)
        == b"status\x003\x00flags\x000\x00key\x00\x00value\x00\x00\x00"
    )


def test_truncated_without_request_gets_nothing():
    assert reply_to_truncated([]) is None
    assert reply_to_truncated([(b"table", b"x")]) is None
    assert reply_to_truncated([(b"request", b"frob")]) == UNKNOWN_REQUEST_REPLY


# --- reply encoding details ---------------------------------------------------------------


@pytest.mark.parametrize("op", ["open", "lookup", "update", "delete", "sequence"])
def test_bad_and_deny_shapes(op):
    shapes_g1 = {
        "open": b"flags\x000\x00",
        "lookup": b"value\x00\x00",
        "update": b"",
        "delete": b"",
        "sequence": b"key\x00\x00value\x00\x00",
    }
    shapes_g2 = {
        "open": b"flags\x000\x00",
        "lookup": b"flags\x000\x00value\x00\x00",
        "update": b"flags\x000\x00",
        "delete": b"flags\x000\x00",
        "sequence": b"flags\x000\x00key\x00\x00value\x00\x00",
    }
    for status in (BAD, DENY):
        assert (
            encode_reply(op, G1, Reply(status))
            == b"status\x00%d\x00" % status + shapes_g1[op] + b"\x00"
        )
        assert (
            encode_reply(op, G2, Reply(status))
            == b"status\x00%d\x00" % status + shapes_g2[op] + b"\x00"
        )


def test_value_with_nul_is_cut_like_a_c_string():
    assert (
        encode_reply("lookup", G1, Reply(OK, value=b"ab\x00cd"))
        == b"status\x000\x00value\x00ab\x00\x00"
    )


def test_negative_flags_sent_unsigned():
    assert (
        encode_reply("open", G2, Reply(OK, flags=-1))
        == b"status\x000\x00flags\x004294967295\x00\x00"
    )


# --- properties ---------------------------------------------------------------------------------


_names = st.sampled_from(
    [b"request", b"table", b"flags", b"instance_flags", b"key", b"value", b"function", b"x"]
)
_values = st.one_of(
    st.sampled_from(
        [
            b"open",
            b"lookup",
            b"update",
            b"delete",
            b"sequence",
            b"0",
            b"1",
            b"-1",
            b" 7",
            b"x:y",
            b"",
        ]
    ),
    st.binary(max_size=12).map(lambda b: b.replace(b"\x00", b"")),
)


@settings(max_examples=1000, deadline=None)
@given(pairs=st.lists(st.tuples(_names, _values), max_size=8))
def test_any_list_gets_a_request_a_wellformed_reply_or_nothing(pairs):
    parsed = parse_request(pairs, STREAM)
    if parsed is None:
        assert not pairs or pairs[0][0] != b"request"
    elif isinstance(parsed, bytes):
        reply = attr.AttrDecoder().feed(parsed)
        assert len(reply) == 1 and reply[0][0] == (b"status", b"3")
    else:
        assert parsed.op in ("open", "lookup", "update", "delete", "sequence")
        assert parsed.generation in (G1, G2)
        wire = encode_reply(
            parsed.op, parsed.generation, Reply(OK, flags=parsed.flags, key=b"k", value=b"v")
        )
        assert len(attr.AttrDecoder().feed(wire)) == 1


@settings(max_examples=300, deadline=None)
@given(flags=st.integers(0, (1 << 32) - 1), value=st.binary(max_size=40))
def test_fast_path_replies_equal_encode_reply(flags, value):
    """The handler's pre-encoded lookup replies are encode_reply's, byte for byte."""
    sent = value.split(b"\x00", 1)[0]  # the fast path cuts the value at its first NUL
    for generation in (G1, G2):
        found, not_found = lookup_replies(generation, flags)
        assert found + sent + LOOKUP_END == encode_reply(
            "lookup", generation, Reply(OK, flags, value=value)
        )
        assert not_found == encode_reply("lookup", generation, Reply(NOKEY, flags))
    found_template, not_found_template = g2_lookup_templates()
    assert found_template % (flags & F.ALL, sent) == encode_reply(
        "lookup", G2, Reply(OK, flags, value=value)
    )
    assert not_found_template % (flags & F.ALL) == encode_reply("lookup", G2, Reply(NOKEY, flags))
