"""The benchmark's database workloads: tables, query forms, connection counts, targets.

The servers are real (tests.support.servers through tests.bench.databases); the direct
`postmap -q` of the installed Postfix checks that every .cf the benchmark writes answers
a hit and a miss, so a bench row never measures a misconfigured table.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench import databases
from tests.bench.databases import (
    DATABASE_KINDS,
    ROWS,
    ConnectionWatch,
    DatabaseBackends,
    bench_keys,
    ldif_entries,
)
from tests.bench.run import BenchTable, listed_tables, parse_args, run_direct, target_verdict
from tests.support.postfix import ensure_postfix, run_postmap, settle_files
from tests.support.servers import ensure_server_packages, install_wanted


@pytest.fixture(scope="module")
def backends() -> Iterator[DatabaseBackends]:
    ensure_postfix()
    ensure_server_packages("mariadb-server", "postgresql", "slapd", "ldap-utils")
    # Short paths under /tmp, as the servers' UNIX sockets need.
    directory = Path(tempfile.mkdtemp(prefix="pmbench-test-", dir="/tmp"))
    try:
        with DatabaseBackends(directory) as made:
            yield made
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_keys_miss_one_in_five_and_spread_over_the_table() -> None:
    keys = bench_keys()
    misses = [key for key in keys if key.startswith("nobody")]
    assert len(misses) * 5 == len(keys)
    hits = {int(re.match(r"user(\d+)@", key).group(1)) for key in keys if key not in misses}
    assert len(hits) == len(keys) - len(misses)
    assert max(hits) > ROWS * 0.9 and min(hits) < ROWS * 0.1


def test_ldif_has_every_row() -> None:
    text = ldif_entries()
    assert text.count("\nmaildrop: ") == ROWS
    assert "mail: user9999@example.com\nmaildrop: user9999@mail.example.net" in text


@pytest.mark.parametrize("kind", DATABASE_KINDS)
def test_tables_answer_hit_and_miss_directly(
    backends: DatabaseBackends, tmp_path: Path, kind: str
) -> None:
    tmp_path.chmod(0o755)
    table = backends.table(kind, tmp_path)
    settle_files(tmp_path)
    for side, spec in table.specs.items():
        hit = run_postmap(["-q", "user42@example.com", spec])
        assert (hit.exit, hit.stdout) == (0, "user42@mail.example.net"), (side, hit.stderr)
        miss = run_postmap(["-q", "nobody@example.com", spec])
        assert (miss.exit, miss.stderr) == (1, ""), (side, miss.stderr)
        # postmap has gone: nothing of this side stays connected.
        assert wait_until(lambda side=side: table.count_connections(side) == 0)


def test_sides_use_distinct_users(backends: DatabaseBackends, tmp_path: Path) -> None:
    table = backends.table("mysql", tmp_path)
    texts = {side: Path(spec.split(":", 1)[1]).read_text() for side, spec in table.specs.items()}
    assert "user = pm_c\n" in texts["c"] and "user = pm_ours\n" in texts["ours"]


def test_mysql_sleep_is_paid_by_a_miss(backends: DatabaseBackends) -> None:
    server = backends.mariadb()
    query = databases.QUERIES["mysql-5ms"] % "nobody@example.com"
    began = time.monotonic()
    assert server.query_as("pm_c", databases.PASSWORD, query, database="mail") == ""
    assert time.monotonic() - began >= 0.005


@pytest.mark.parametrize("key", ["user42@example.com", "nobody@example.com"])
def test_pgsql_sleep_runs_once_hit_or_miss(backends: DatabaseBackends, key: str) -> None:
    plan = backends.postgres().execute(
        "EXPLAIN ANALYZE " + databases.QUERIES["pgsql-5ms"] % key, dbname="mail"
    )
    sleep_line = next(line for line in plan.splitlines() if "pg_sleep" in line)
    assert "never executed" not in sleep_line and "loops=1" in sleep_line, plan


def test_the_shorter_pgsql_form_skips_the_sleep_on_a_miss(backends: DatabaseBackends) -> None:
    """Why databases.py does not use "FROM t, pg_sleep(0.005)": a miss never sleeps."""
    plan = backends.postgres().execute(
        "EXPLAIN ANALYZE SELECT dest FROM t, pg_sleep(0.005) WHERE addr='nobody@example.com'",
        dbname="mail",
    )
    assert "never executed" in next(line for line in plan.splitlines() if "pg_sleep" in line)


@pytest.fixture(scope="module")
def direct_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [name for name, header in databases.DIRECT_HEADERS.items() if not header.exists()]
    if missing and not install_wanted():
        pytest.skip(f"{' '.join(missing)} not installed (PYPROXYMAP_INSTALL=1 or CI=true)")
    return databases.build_direct_client(tmp_path_factory.mktemp("dbdirect"))


@pytest.mark.parametrize("kind", ["mysql", "pgsql", "pgsql-5ms"])
def test_direct_client_queries_as_postfix_would_and_counts_misses(
    backends: DatabaseBackends, direct_client: Path, tmp_path: Path, kind: str
) -> None:
    table = backends.table(kind, tmp_path)
    assert table.direct_args is not None
    load = run_direct(direct_client, table.direct_args, 4, 0.5)
    assert (load.exit, load.error, load.other) == (0, "", 0)
    assert load.requests == load.ok + load.nokey > 0
    assert 0.1 < load.nokey / load.requests < 0.3  # one key in five misses
    assert 0 < load.p50_us <= load.p99_us <= load.max_us
    if kind.endswith("-5ms"):
        assert load.p50_us >= 5000 and load.rps <= 4 / 0.005


def test_direct_client_reports_a_refused_login(
    backends: DatabaseBackends, direct_client: Path, tmp_path: Path
) -> None:
    table = backends.table("mysql", tmp_path)
    assert table.direct_args is not None
    args = list(table.direct_args)
    args[4] = "wrong-password"
    load = run_direct(direct_client, args, 2, 0.2)
    assert load.exit == 1 and "Access denied" in load.error and load.requests == 0


def test_ldap_has_no_direct_client(backends: DatabaseBackends, tmp_path: Path) -> None:
    assert backends.table("ldap", tmp_path).direct_args is None


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_watch_keeps_the_most_and_checks_the_bound() -> None:
    counts = iter([3, 9, 17, 5])
    workers = iter([1, 1, 2, 3])
    watch = ConnectionWatch(count=lambda: next(counts), workers=lambda: next(workers), per_worker=8)
    watch.during(time.monotonic(), 0.01)
    assert (watch.samples, watch.max_connections, watch.max_workers) == (4, 17, 3)
    assert watch.bound == 24
    assert watch.over_bound == 2  # 9 > 1 x 8, 17 > 2 x 8


def test_watch_reports_a_failed_sample() -> None:
    def broken() -> int:
        raise RuntimeError("server gone\nmore")

    watch = ConnectionWatch(count=broken, workers=lambda: 1)
    watch.sample()
    assert (watch.samples, watch.errors) == (0, ["server gone"])


def test_targets() -> None:
    c = {"rps": 1000.0, "p99_us": 90_000.0}
    assert target_verdict("mysql-5ms", c, {"rps": 5100.0, "p99_us": 14_000.0}).endswith(": met")
    assert target_verdict("pgsql-5ms", c, {"rps": 5100.0, "p99_us": 16_000.0}).endswith("NOT met")
    assert target_verdict("mysql-5ms", c, {"rps": 4900.0, "p99_us": 9_000.0}).endswith("NOT met")
    assert target_verdict("pgsql", c, {"rps": 1000.0}).endswith(": met")
    assert target_verdict("mysql", c, {"rps": 999.0}).endswith("NOT met")
    over = {"rps": 9000.0, "p99_us": 1.0, "db_over_bound": 1}
    assert target_verdict("mysql-5ms", c, over).endswith("NOT met")
    assert target_verdict("ldap", c, {"rps": 1.0}) == "-"


def test_options() -> None:
    options = parse_args(["--tables", "mysql-5ms,ldap", "--db-conns", "1,32", "--db-pool", "4"])
    assert options.tables == ["mysql-5ms", "ldap"]
    assert (options.db_conns, options.db_pool, options.slow_conns) == ([1, 32], 4, [32])


def test_instances_list_local_tables_and_only_their_own_database_table(tmp_path: Path) -> None:
    tables = {
        kind: BenchTable(kind, f"{kind}:x", tmp_path, "k") for kind in ("hash", "mysql", "ldap")
    }
    assert list(listed_tables(tables, "ldap")) == ["hash", "ldap"]
    assert list(listed_tables(tables, None)) == ["hash"]
    only_databases = {kind: tables[kind] for kind in ("mysql", "ldap")}
    assert list(listed_tables(only_databases, None)) == ["mysql"]
