"""unix: tables: where lookups run, chosen from nsswitch.conf.

Local name-service sources answer inline; any other source makes the table
asynchronous (executor thread), so a slow directory never stops the worker's loop.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import time

import pytest

from proxymap import flags as F
from proxymap.tables import open_table, unix
from proxymap.tables.base import OpenContext

ROOT_ENTRY = ":".join(
    str(part)
    for part in (
        "root",
        pwd.getpwnam("root").pw_passwd,
        0,
        0,
        pwd.getpwnam("root").pw_gecos,
        pwd.getpwnam("root").pw_dir,
        pwd.getpwnam("root").pw_shell,
    )
).encode()


def nsswitch(tmp_path, text: str, monkeypatch) -> None:
    conf = tmp_path / "nsswitch.conf"
    conf.write_text(text)
    monkeypatch.setattr(unix, "NSSWITCH_CONF", str(conf))


def open_unix(name: str = "passwd.byname"):
    return open_table(f"unix:{name}", os.O_RDONLY, F.LOCK | F.FOLD_FIX, OpenContext())


@pytest.mark.parametrize(
    ("text", "database", "expected"),
    [
        ("passwd:         files systemd\ngroup: files\n", "passwd", ["files", "systemd"]),
        ("passwd: files [NOTFOUND=return] ldap\n", "passwd", ["files", "ldap"]),
        ("passwd: files [ NOTFOUND = return ] sss # comment\n", "passwd", ["files", "sss"]),
        ("# passwd: ldap\npasswd: compat\n", "passwd", ["compat"]),
        ("group: files winbind\n", "passwd", ["files"]),  # not listed: glibc's default
        ("passwd:\n", "passwd", ["files"]),
        ("passwd: files\ngroup: files nis\n", "group", ["files", "nis"]),
    ],
)
def test_nss_sources(tmp_path, monkeypatch, text, database, expected):
    nsswitch(tmp_path, text, monkeypatch)
    assert unix.nss_sources(database) == expected


def test_missing_nsswitch_means_files(tmp_path, monkeypatch):
    monkeypatch.setattr(unix, "NSSWITCH_CONF", str(tmp_path / "absent"))
    assert unix.nss_sources("passwd") == ["files"]
    assert not open_unix().asynchronous


@pytest.mark.parametrize(
    ("text", "asynchronous"),
    [
        ("passwd: files systemd\n", False),
        ("passwd: compat\n", False),
        ("passwd: files ldap\n", True),
        ("passwd: sss files\n", True),
        ("passwd: files\ngroup: files nis\n", False),  # the group database is another table
    ],
)
def test_remote_sources_make_the_table_asynchronous(tmp_path, monkeypatch, text, asynchronous):
    nsswitch(tmp_path, text, monkeypatch)
    assert open_unix().asynchronous is asynchronous


def test_asynchronous_lookup_answers_like_the_inline_one(tmp_path, monkeypatch):
    nsswitch(tmp_path, "passwd: files ldap\n", monkeypatch)
    table = open_unix()
    assert table.asynchronous

    async def both():
        table.flags |= F.FOLD_FIX
        return (await table.alookup(b"ROOT"), await table.alookup(b"no-such-user-x"))

    assert asyncio.run(both()) == (ROOT_ENTRY, None)
    monkeypatch.setattr(unix, "NSSWITCH_CONF", str(tmp_path / "absent"))
    inline = open_unix()
    assert not inline.asynchronous and inline.lookup(b"root") == ROOT_ENTRY


def test_a_slow_name_service_does_not_stop_the_loop(tmp_path, monkeypatch):
    """A stand-in for a slow directory (a FAKE: getpwnam delayed by 0.3 s in-process)."""
    nsswitch(tmp_path, "passwd: files ldap\n", monkeypatch)
    table = open_unix()
    real_entry = table._entry

    def slow_entry(name: str) -> str:
        time.sleep(0.3)
        return real_entry(name)

    table._entry = slow_entry

    async def lookup_while_ticking():
        ticks = 0
        lookup = asyncio.ensure_future(table.alookup(b"root"))
        while not lookup.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return lookup.result(), ticks

    value, ticks = asyncio.run(lookup_while_ticking())
    assert value == ROOT_ENTRY
    assert ticks >= 10  # the loop kept running (about 30 ticks) while the lookup waited


def test_the_handler_awaits_an_asynchronous_unix_table(tmp_path, monkeypatch):
    """Through the request handler (UTF-8 layer, status mapping) as the worker runs it."""
    from proxymap.handler import RequestHandler
    from proxymap.protocol import G1, NOKEY, OK, Request

    nsswitch(tmp_path, "passwd: files ldap\n", monkeypatch)
    spec = "unix:passwd.byname"
    handler = RequestHandler("proxymap", [spec], {})
    flags = F.LOCK | F.FOLD_FIX | F.UTF8_REQUEST

    async def ask(key: bytes):
        reply = handler.handle(Request("lookup", spec, G1, flags=flags, key=key))
        assert asyncio.iscoroutine(reply) or asyncio.isfuture(reply)
        return await reply

    found = asyncio.run(ask(b"root"))
    assert (found.status, found.value) == (OK, ROOT_ENTRY)
    assert asyncio.run(ask(b"no-such-user-x")).status == NOKEY
