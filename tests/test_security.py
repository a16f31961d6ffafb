"""Small tests for guarantees of SECURITY.rst that no other test file shows.

Each test names the guarantee it shows; SECURITY.rst points here.
"""

from __future__ import annotations

import logging
import os

import pytest

from proxymap.handler import RequestHandler
from proxymap.protocol import DENY, G1, G2, OK, Request

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


def test_unapproved_table_is_never_opened(tmp_path, caplog):
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
