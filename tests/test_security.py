"""Small tests for guarantees of SECURITY.rst that no other test file shows.

Each test names the guarantee it shows; SECURITY.rst points here.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from proxymap import attr
from proxymap import flags as F
from proxymap.handler import RequestHandler
from proxymap.instances import MAX_PER_TABLE
from proxymap.protocol import DENY, G1, G2, OK, RETRY, Request
from tests.support.postfix import ensure_postfix

LOCK = 0x40


@pytest.fixture
def approved(tmp_path):
    (tmp_path / "aliases").write_text("alice alice@example.com\n")
    (tmp_path / "secret").write_text("root hunter2\n")
    os.symlink(tmp_path / "secret", tmp_path / "link")
    return f"texthash:{tmp_path}/aliases"


@pytest.mark.parametrize(
    "variant",
    [
        "texthash:{d}/../{b}/aliases",  # dot-dot back into the same directory
        "texthash:{d}/./aliases",
        "texthash:{d}//aliases",
        "texthash:{d}/aliases/",
        "texthash:{d}/aliases ",
        "TEXTHASH:{d}/aliases",  # type names are case-sensitive
        "texthash:{d}/link",  # a symlink to a file nobody approved
        "texthash:{d}/secret",
        "hash:{d}/aliases",  # same file, another type
        "pipemap:{{texthash:{d}/aliases}}",  # an approved table inside an unapproved one
    ],
)
def test_path_tricks_are_refused(tmp_path, approved, variant, caplog):
    """Approval is an exact match of the name after ``proxy:`` is removed: no path
    normalisation, so no other spelling reaches a table, and nothing is opened."""
    name = variant.format(d=tmp_path, b=tmp_path.name)
    for service in ("proxymap", "proxywrite"):
        handler = RequestHandler(service, {approved}, {})
        with caplog.at_level(logging.INFO, logger="proxymap"):
            reply = handler.handle(Request("lookup", name, G1, flags=LOCK, key=b"root"))
        assert reply.status == DENY
    # The name itself may hold "open" (a worker's tmp_path: .../popen-gw0/...).
    assert not any("open" in r.getMessage().replace(name, "") for r in caplog.records)


def test_proxy_prefixes_are_the_only_accepted_variation(approved):
    handler = RequestHandler("proxymap", {approved}, {})
    for name in (approved, "proxy:" + approved, "proxy:proxy:" + approved):
        reply = handler.handle(Request("lookup", name, G1, flags=LOCK, key=b"alice"))
        assert (reply.status, reply.value) == (OK, b"alice@example.com")


def test_unapproved_table_is_never_opened(tmp_path):
    """A refused name is not opened: a FIFO would block an open for ever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    handler = RequestHandler("proxymap", set(), {})
    for generation in (G1, G2):
        request = Request("lookup", f"texthash:{fifo}", generation, flags=LOCK, key=b"k")
        assert handler.handle(request).status == DENY  # returns: nothing opened the FIFO


def test_writes_need_the_write_service_and_write_approval(tmp_path):
    """proxymap refuses every update; proxywrite takes only proxy_write_maps names."""
    spec = f"btree:{tmp_path}/cache"
    reader = RequestHandler("proxymap", {spec}, {})
    update = Request("update", spec, G1, flags=LOCK, key=b"k", value=b"v")
    assert reader.handle(update).status == DENY
    writer = RequestHandler("proxywrite", set(), {})  # approved for reading elsewhere only
    assert writer.handle(update).status == DENY
    assert not os.path.exists(f"{tmp_path}/cache.db")


# --- instances per table -----------------------------------------------------------------
# Postfix's 3.12 postmap -q opens with these instance flags (docs/PROTOCOL.md 3.3). The
# hostile client adds combinations of bits that change nothing in a lookup of a fixed
# table (the server ignores bits from 22 up and UTF8_ACTIVE: 2**21 words are left).
POSTMAP_Q = 0x84041
HARMLESS_BITS = [
    F.DUP_IGNORE,
    F.DUP_REPLACE,
    F.SYNC_UPDATE,
    F.FOLD_KEY,
    F.NO_REGSUB,
    F.NO_PROXY,
    F.FOLD_MUL,
    F.OPEN_LOCK,
    F.BULK_UPDATE,
]


def cycled(number: int) -> int:
    """The number-th flag word of the hostile client (0 is postmap -q's own)."""
    bits = [bit for position, bit in enumerate(HARMLESS_BITS) if number >> position & 1]
    return POSTMAP_Q | sum(bits)


def g2_lookup(table: str, instance_flags: int) -> Request:
    return Request(
        "lookup", table, G2, flags=instance_flags, instance_flags=instance_flags, key=b"alice"
    )


def test_instances_per_table_are_bounded(approved, caplog):
    """A client cycling through instance_flags values gets at most MAX_PER_TABLE
    instances of a table (G1 and G2 together); new flags beyond are answered RETRY,
    with one warning naming the table, and the instances already open keep answering."""
    handler = RequestHandler("proxymap", {approved}, {})
    words = [cycled(number) for number in range(300)]
    with caplog.at_level(logging.WARNING, logger="proxymap"):
        statuses = [handler.handle(g2_lookup(approved, flags)).status for flags in words]
        legacy = handler.handle(Request("lookup", approved, G1, flags=LOCK | F.TRY0NULL, key=b"a"))
        fast = handler.compile_lookup(g2_lookup(approved, words[-1]))
    assert statuses == [OK] * MAX_PER_TABLE + [RETRY] * (len(words) - MAX_PER_TABLE)
    assert legacy.status == RETRY
    assert fast is not None and fast(b"alice").startswith(b"status\x00%d\x00" % RETRY)
    assert handler.instance_limit.open_instances[approved] == MAX_PER_TABLE
    assert len({id(i.table) for i in handler._instances.values()}) == MAX_PER_TABLE
    for flags in words[:MAX_PER_TABLE]:  # the open ones still answer, also on the fast path
        reply = handler.handle(g2_lookup(approved, flags))
        assert (reply.status, reply.value) == (OK, b"alice@example.com")
        compiled = handler.compile_lookup(g2_lookup(approved, flags))
        assert compiled is not None and b"alice@example.com" in compiled(b"alice")
    warnings = [r.getMessage() for r in caplog.records if "instances" in r.getMessage()]
    assert warnings == [
        f"{approved}: {MAX_PER_TABLE} instances with other flags are open already; "
        f"these new flags ({F.flag_names(words[MAX_PER_TABLE])}) and any others get RETRY"
    ]


def test_the_bound_is_per_table(tmp_path, approved):
    """Another table's instances are not limited by the first table's."""
    other = f"texthash:{tmp_path}/secret"
    handler = RequestHandler("proxymap", {approved, other}, {})
    for number in range(MAX_PER_TABLE + 1):
        handler.handle(g2_lookup(approved, cycled(number)))
    reply = handler.handle(Request("lookup", other, G1, flags=LOCK, key=b"root"))
    assert (reply.status, reply.value) == (OK, b"hunter2")


def test_a_worker_keeps_its_descriptors_under_a_flag_cycling_client(tmp_path):
    """The real worker, a hash table (descriptors per instance): 500 flag words more
    later it holds as many descriptors as after MAX_PER_TABLE (without the bound:
    over 1 000), answers RETRY to the new words and the value to the first ones, and
    logged one warning."""
    from tests.support.postmap import build_table
    from tests.test_server_worker import handshake, recv_exactly, start_worker, worker_tree

    ensure_postfix()
    table = build_table("hash", tmp_path / "map", [("alice", "alice@example.com")])
    conf = worker_tree(tmp_path, f"proxy:{table}")

    def ask(client, instance_flags: int) -> tuple[int, bytes]:
        client.sendall(
            attr.encode(
                [
                    (b"request", b"lookup"),
                    (b"table", table.encode()),
                    (b"instance_flags", b"%d" % instance_flags),
                    (b"flags", b"%d" % instance_flags),
                    (b"key", b"alice"),
                ]
            )
        )
        decoder = attr.AttrDecoder()
        while True:
            replies = decoder.feed(recv_exactly(client, 1))
            if replies:
                fields = dict(replies[0])
                return int(fields[b"status"]), fields[b"value"]

    def descriptors(pid: int) -> int:
        # The fewest of a few looks: the worker's statistics file is written now and
        # then (open, write, rename, close), one descriptor more for a moment.
        counts = []
        for _ in range(5):
            counts.append(len(os.listdir(f"/proc/{pid}/fd")))
            time.sleep(0.02)
        return min(counts)

    with start_worker(tmp_path, conf) as master:
        client = handshake(master)
        first = [cycled(number) for number in range(MAX_PER_TABLE)]
        answers = [ask(client, flags) for flags in first]
        assert answers == [(OK, b"alice@example.com")] * len(first)
        bounded = descriptors(master.pid)
        beyond = [ask(client, cycled(number)) for number in range(MAX_PER_TABLE, 512)]
        assert beyond == [(RETRY, b"")] * len(beyond)
        assert descriptors(master.pid) == bounded
        assert ask(client, first[0]) == (OK, b"alice@example.com")
        client.close()
        master.close_status()
        assert master.wait(5) == 0
        log = master.output()[1].decode()
    assert log.count("instances with other flags are open already") == 1, log
