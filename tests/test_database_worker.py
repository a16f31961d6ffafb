"""A stalled database inside one worker: every other client keeps being answered.

The proxymap manual says the C daemon "must not be used for tables that have
high-latency lookups": while one of its processes waits for a database, every client
of that process waits too. Here one worker (maxproc 1, so that every client shares
it) serves a texthash table, a mysql table and a pgsql table, under the real Postfix
master. A lookup whose query stalls (SLEEP / pg_sleep) must not hold up the other
clients: their texthash lookups, and lookups of the other database, keep answering
within milliseconds, and the stalled lookup answers RETRY (status 2, never "not
found") at the configured timeout. The databases count how many connections the
worker opened: never more than its bound.
"""

from __future__ import annotations

import os
import select
import statistics
import sys
import time
from pathlib import Path

import pytest

from tests.support.postfix import PrivatePostfix, ensure_postfix, settle_files
from tests.support.servers import (  # noqa: F401  (fixtures)
    PrivateMariaDB,
    PrivatePostgres,
    mariadb_module,
    postgres_module,
)

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
USER, PASSWORD, DBNAME = "pmworker", "worker-secret", "pmworker"
TIMEOUT = 1.5  # pyproxymap_{mysql,pgsql}_timeout for this test
STALL = 5  # seconds a "stall" key makes the query wait
LIMIT = 3  # pyproxymap_{mysql,pgsql}_connections for this test
LOOKUP_FLAGS = 0x80041  # what postmap -q sends: UTF8_REQUEST | LOCK | DUP_WARN

MYSQL_QUERY = (
    "SELECT v FROM aliases JOIN (SELECT SLEEP(IF('%s' = 'stall', "
    f"{STALL}, 0)) AS s) AS d WHERE k = '%s'"
)
PGSQL_QUERY = (
    "SELECT v FROM aliases, pg_sleep(CASE WHEN '%s' = 'stall' "
    f"THEN {STALL} ELSE 0 END) WHERE k = '%s'"
)
# "stall" has a row: with no row to join, PostgreSQL need not call pg_sleep at all.
ROWS = [("alice", "alice@example.com"), ("bob", "bob@example.com"), ("stall", "stall@example.com")]


@pytest.fixture(scope="module")
def databases(
    mariadb_module: PrivateMariaDB,  # noqa: F811
    postgres_module: PrivatePostgres,  # noqa: F811
):
    values = ", ".join(f"('{k}', '{v}')" for k, v in ROWS)
    mariadb_module.create_user(USER, PASSWORD, DBNAME)
    mariadb_module.execute(
        "CREATE TABLE IF NOT EXISTS aliases (k VARCHAR(64) PRIMARY KEY, "
        f"v VARCHAR(255)); REPLACE INTO aliases VALUES {values};",
        database=DBNAME,
    )
    postgres_module.create_user(USER, PASSWORD, DBNAME)
    postgres_module.execute(
        "CREATE TABLE IF NOT EXISTS aliases (k text PRIMARY KEY, v text);"
        f"INSERT INTO aliases VALUES {values} ON CONFLICT DO NOTHING;",
        dbname=DBNAME,
    )
    return mariadb_module, postgres_module


def write_cf(path: Path, settings: dict[str, str]) -> str:
    path.write_text("".join(f"{name} = {value}\n" for name, value in settings.items()))
    path.chmod(0o644)
    return str(path)


@pytest.fixture(scope="module")
def worker(databases):
    ensure_postfix()
    mariadb, postgres = databases
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP,
        name="db-worker",
        proxymap_maxproc="1",
        main_cf={
            "pyproxymap_mysql_timeout": str(TIMEOUT),
            "pyproxymap_pgsql_timeout": str(TIMEOUT),
            "pyproxymap_mysql_connections": str(LIMIT),
            "pyproxymap_pgsql_connections": str(LIMIT),
        },
    )
    tables = instance.tables
    (tables / "aliases").write_text("".join(f"{k} {v}\n" for k, v in ROWS))
    mysql_cf = write_cf(
        tables / "mysql.cf",
        {
            "hosts": f"inet:127.0.0.1:{mariadb.port}",
            "user": USER,
            "password": PASSWORD,
            "dbname": DBNAME,
            "query": MYSQL_QUERY,
        },
    )
    pgsql_cf = write_cf(
        tables / "pgsql.cf",
        {
            "hosts": f"inet:127.0.0.1:{postgres.port}",
            "user": USER,
            "password": PASSWORD,
            "dbname": DBNAME,
            "query": PGSQL_QUERY,
        },
    )
    names = {
        "texthash": f"texthash:{tables}/aliases",
        "mysql": f"mysql:{mysql_cf}",
        "pgsql": f"pgsql:{pgsql_cf}",
    }
    instance.proxy_read_maps = " ".join(f"proxy:{name}" for name in names.values())
    settle_files(tables)
    with instance:
        instance.wait_until_serving("alice", names["texthash"])
        yield instance, names, mariadb, postgres


def send_lookup(client, table: str, key: str) -> None:
    client.send(("request", "lookup"), ("table", table), ("flags", LOOKUP_FLAGS), ("key", key))


def timed_lookup(client, table: str, key: str) -> tuple[dict[str, bytes], float]:
    started = time.monotonic()
    reply = client.lookup(table, key)
    return reply, time.monotonic() - started


@pytest.mark.serial
@pytest.mark.parametrize("stalled", ["mysql", "pgsql"])
def test_a_stalled_query_holds_up_no_other_client(worker, stalled):
    instance, names, mariadb, postgres = worker
    other = "pgsql" if stalled == "mysql" else "mysql"
    with instance.client() as waiting, instance.client() as client:
        # Open both tables in the worker first: opening costs a connect.
        assert client.lookup(names[stalled], "alice")["value"] == b"alice@example.com"
        assert client.lookup(names[other], "bob")["value"] == b"bob@example.com"
        send_lookup(waiting, names[stalled], "stall")
        started = time.monotonic()
        latencies = []
        while time.monotonic() - started < TIMEOUT - 0.5:
            for table, key, value in (
                (names["texthash"], "alice", b"alice@example.com"),
                (names[other], "bob", b"bob@example.com"),
            ):
                reply, seconds = timed_lookup(client, table, key)
                assert (reply["status"], reply["value"]) == (b"0", value)
                latencies.append(seconds)
        readable, _, _ = select.select([waiting.sock], [], [], 0)
        assert not readable, (
            "the stalled lookup answered before its timeout",
            waiting.read_reply() if readable else None,
        )
        reply = waiting.read_reply()
        waited = time.monotonic() - started
    assert reply["status"] == b"2"  # RETRY: never "not found"
    assert TIMEOUT - 0.3 <= waited < TIMEOUT + 1.0
    # Medians and a high percentile, not the maximum: this is a shared 2-CPU machine.
    assert len(latencies) >= 20
    assert statistics.median(latencies) < 0.010, latencies
    assert sorted(latencies)[int(len(latencies) * 0.9)] < 0.010, latencies
    assert len(instance.worker_pids("proxymap")) == 1


def test_the_worker_never_opens_more_than_its_bound(worker):
    """Twenty clients with a stalling lookup each: three connections per database."""
    instance, names, mariadb, postgres = worker
    clients = [instance.client() for _ in range(20)]
    try:
        for n, client in enumerate(clients):
            client.__enter__()
            send_lookup(client, names["mysql" if n % 2 else "pgsql"], "stall")
        peak_mysql = peak_pgsql = 0
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            peak_mysql = max(peak_mysql, mariadb.connection_count(USER))
            peak_pgsql = max(peak_pgsql, postgres.connection_count(USER))
            time.sleep(0.1)
        statuses = [client.read_reply()["status"] for client in clients]
    finally:
        for client in clients:
            client.close()
    assert peak_mysql == LIMIT and peak_pgsql == LIMIT
    assert statuses == [b"2"] * 20  # each one RETRY at its timeout, none "not found"
