"""The result cache in our worker under the real Postfix master.

One worker (maxproc 1, so every client shares it and its cache) serves two pgsql
tables with the same settings against the private PostgreSQL: ``cached.cf`` is named
in ``pyproxymap_cache_maps`` (TTL 1 s, stale window 3 s), ``plain.cf`` is not. The
server is stopped mid-run: the plain table answers RETRY at once, the cached one
keeps answering what it answered before (a value, and a "not found") until its
entries are 4 s old, then RETRY; once the server is back the worker answers from it
again and logs one line for the outage with the number of stale answers. The same
worker process serves throughout (nothing restarted it).

Then proxywrite with the real memcached: an update is seen by the next lookup
through proxywrite, although the key's earlier answer was cached for a minute there;
the read-only worker, another process, sees it when its own entry expires.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.support.postfix import PrivatePostfix, ensure_postfix, settle_files
from tests.support.servers import (  # noqa: F401  (fixtures)
    PrivateMemcached,
    PrivatePostgres,
    memcached,
    postgres,
)

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
USER, PASSWORD, DBNAME = "pmcache", "cache-secret", "pmcache"
TTL, STALE = 1, 3
QUERY = "SELECT v FROM aliases WHERE k = '%s'"


def write_cf(path: Path, settings: dict[str, str]) -> str:
    path.write_text("".join(f"{name} = {value}\n" for name, value in settings.items()))
    path.chmod(0o644)
    return str(path)


@pytest.fixture
def stale_worker(postgres: PrivatePostgres):  # noqa: F811
    ensure_postfix()
    postgres.create_user(USER, PASSWORD, DBNAME)
    postgres.execute(
        "CREATE TABLE aliases (k text PRIMARY KEY, v text);"
        "INSERT INTO aliases VALUES ('alice', 'alice@example.com');"
        f"ALTER TABLE aliases OWNER TO {USER};",
        dbname=DBNAME,
    )
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP, name="cache-worker", proxymap_maxproc="1"
    )
    settings = {
        "hosts": f"inet:127.0.0.1:{postgres.port}",
        "user": USER,
        "password": PASSWORD,
        "dbname": DBNAME,
        "query": QUERY,
    }
    cached = "pgsql:" + write_cf(instance.tables / "cached.cf", settings)
    plain = "pgsql:" + write_cf(instance.tables / "plain.cf", settings)
    instance.extra_main_cf.update(
        {
            "pyproxymap_cache_maps": f"proxy:{cached}",
            "pyproxymap_cache_ttl": f"{TTL}s",
            "pyproxymap_cache_negative_ttl": f"{TTL}s",
            "pyproxymap_cache_stale_ttl": f"{STALE}s",
            "pyproxymap_pgsql_timeout": "1.5",
        }
    )
    instance.proxy_read_maps = f"proxy:{cached} proxy:{plain}"
    settle_files(instance.tables)
    with instance:
        instance.wait_until_serving("alice", plain)
        yield instance, cached, plain, postgres


def answer(client, table: str, key: str) -> tuple[bytes, bytes]:
    reply = client.lookup(table, key)
    return reply["status"], reply.get("value", b"")


FOUND = (b"0", b"alice@example.com")
NOT_FOUND = (b"1", b"")
RETRY = (b"2", b"")
UPDATE = 0x4040  # LOCK|FOLD_FIX: a 3.7 client's update and delete, keys folded


@pytest.mark.serial
def test_stale_answers_through_an_outage(stale_worker) -> None:
    instance, cached, plain, server = stale_worker
    [worker] = instance.worker_pids("proxymap")
    with instance.client() as client:
        assert answer(client, plain, "alice") == FOUND
        assert answer(client, cached, "nobody") == NOT_FOUND
        assert answer(client, cached, "alice") == FOUND
        stored = time.monotonic()
        server.stop()
        started = time.monotonic()
        assert answer(client, plain, "alice") == RETRY  # not configured: at once
        assert answer(client, cached, "bob") == RETRY  # never answered before
        assert time.monotonic() - started < 0.5
        answers = []
        while True:
            answers.append((answer(client, cached, "nobody"), answer(client, cached, "alice")))
            if answers[-1][1] == RETRY:
                break
            time.sleep(0.05)
        retry_after = time.monotonic() - stored
        assert set(answers[:-1]) == {(NOT_FOUND, FOUND)}
        assert TTL + STALE <= retry_after < TTL + STALE + 1, retry_after
        assert answer(client, cached, "nobody") == RETRY
        stale_seen = 2 * sum(1 for _ in answers[:-1])
        server.start()
        deadline = time.monotonic() + 5
        while answer(client, cached, "alice") != FOUND:
            assert time.monotonic() < deadline, instance.log_tail()
            time.sleep(0.1)
    assert instance.worker_pids("proxymap") == [worker]
    deadline = time.monotonic() + 5
    while not (lines := re.findall(r".*stale answers.*", instance.maillog())):
        assert time.monotonic() < deadline, instance.log_tail()
        time.sleep(0.1)
    assert len(lines) == 1, lines
    match = re.search(
        rf"{re.escape(cached)}: backend answering again after \d+s; "
        r"(\d+) stale answers and (\d+) RETRY during the outage",
        lines[0],
    )
    assert match, lines
    # Every answer of the fresh second was a hit, not a stale answer; all later ones were.
    assert stale_seen - 2 * 25 <= int(match.group(1)) <= stale_seen, (stale_seen, lines)
    assert int(match.group(2)) >= 2


def test_proxywrite_sees_its_own_updates(memcached: PrivateMemcached) -> None:  # noqa: F811
    ensure_postfix()
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP, name="cache-writer", proxymap_maxproc="1"
    )
    spec = "memcache:" + write_cf(
        instance.tables / "verify.cf", {"memcache": memcached.postfix_server}
    )
    instance.extra_main_cf.update(
        {"pyproxymap_cache_maps": f"proxy:{spec}", "pyproxymap_cache_ttl": "2s"}
    )
    instance.proxy_read_maps = instance.proxy_write_maps = f"proxy:{spec}"
    settle_files(instance.tables)
    with instance, instance.client("proxywrite") as writer, instance.client() as reader:
        assert writer.update(spec, "alice", "v1", UPDATE)["status"] == b"0"
        assert answer(writer, spec, "alice") == (b"0", b"v1")
        assert answer(reader, spec, "alice") == (b"0", b"v1")
        gets = int(memcached.stats()["cmd_get"])
        assert answer(writer, spec, "alice") == (b"0", b"v1")  # hits in both workers
        assert answer(reader, spec, "alice") == (b"0", b"v1")
        assert int(memcached.stats()["cmd_get"]) == gets
        assert writer.update(spec, "Alice", "v2", UPDATE)["status"] == b"0"  # folded
        assert answer(writer, spec, "alice") == (b"0", b"v2")  # the next lookup
        assert answer(reader, spec, "alice") == (b"0", b"v1")  # until its TTL
        assert writer.delete(spec, "ALICE", UPDATE)["status"] == b"0"
        assert answer(writer, spec, "alice")[0] == b"1"
        time.sleep(2.05)
        assert answer(reader, spec, "alice")[0] == b"1"
        # A worker logs its cache's figures when it leaves (a reload, max_idle, max_use;
        # "postfix stop" kills it outright, as it does every Postfix daemon).
        writer.close()
        reader.close()
        instance.reload()
        deadline = time.monotonic() + 10
        while len(re.findall(r"cache memcache:\S+: hits=", instance.maillog())) < 2:
            assert time.monotonic() < deadline, instance.maillog()[-2000:]
            time.sleep(0.1)
        figures = re.findall(r"cache memcache:\S+: (hits=\d+ .*)", instance.maillog())
        assert all("misses=" in line and "invalidations=" in line for line in figures)
