"""Database-backed workloads of the benchmark: mysql, pgsql and ldap tables.

NAME
    databases -- private MariaDB, PostgreSQL and slapd servers, tables and key files for
    `make bench`, and the server-side count of the connections each proxymap holds

SYNOPSIS
    with DatabaseBackends(directory) as backends:
        table = backends.table("mysql-5ms", directory / "tables")
        table.specs["c"]               # "mysql:/.../mysql-5ms-c.cf" (user pm_c)
        table.count_connections("ours")  # as the server sees them, user pm_ours only

DESCRIPTION
    Table kinds (the --tables names of tests.bench.run):

      mysql-5ms   MariaDB, SELECT dest FROM t JOIN (SELECT SLEEP(0.005) AS s) AS d
                  WHERE addr='%s': the derived table is materialised while the
                  statement is optimised, so a hit and a miss both pay 5 ms.
      pgsql-5ms   PostgreSQL, SELECT dest FROM t WHERE (SELECT true FROM
                  pg_sleep(0.005)) AND addr='%s'. Not the shorter "FROM t,
                  pg_sleep(0.005)": its plan is a nested loop that scans the index
                  first and never runs pg_sleep when no row matches (EXPLAIN ANALYZE:
                  "never executed"), so a miss took 0.05 ms. The uncorrelated subquery
                  becomes a One-Time Filter, run before the scan, hit or miss.
      mysql       MariaDB, SELECT dest FROM t WHERE addr='%s' (the server's own cost).
      pgsql       PostgreSQL, the same query.
      ldap        slapd (back_mdb, an equality index on mail), query_filter mail=%s,
                  result_attribute maildrop, under dc=example,dc=com.

    Every table holds ROWS entries user<N>@example.com -> user<N>@mail.example.net; the
    keys (KEYS of them, spread over the table) miss one time in five.

    One MariaDB and one PostgreSQL serve both sides, each side as its own user (pm_c for
    the C proxymap, pm_ours for ours), so that the server's session list tells the two
    apart: information_schema.PROCESSLIST and pg_stat_activity by user. slapd cannot
    tell anonymous clients apart, so each side gets its own slapd with the same LDIF and
    connection_count() counts the established TCP connections to that side's port.
    Servers start when a table first needs them and stop when the context exits.

FILES
    Under DIRECTORY: the servers' trees. Under the tables directory: <kind>-<side>.cf
    and keys-<kind>, world-readable (the workers run as postfix).

SEE ALSO
    run.py, tests/support/servers.py, mysql_table(5), pgsql_table(5), ldap_table(5)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers import (
    PrivateMariaDB,
    PrivatePostgres,
    PrivateSlapd,
    install_server_packages,
    missing_binaries,
)

DATABASE_KINDS = ("mysql-5ms", "pgsql-5ms", "mysql", "pgsql", "ldap")
SIDES = ("c", "ours")
DBNAME = "mail"
PASSWORD = "bench-secret"
ROWS = 10_000
KEYS = 1_000

QUERIES = {
    "mysql-5ms": "SELECT dest FROM t JOIN (SELECT SLEEP(0.005) AS s) AS d WHERE addr='%s'",
    "pgsql-5ms": "SELECT dest FROM t WHERE (SELECT true FROM pg_sleep(0.005)) AND addr='%s'",
    "mysql": "SELECT dest FROM t WHERE addr='%s'",
    "pgsql": "SELECT dest FROM t WHERE addr='%s'",
}

PACKAGES = {
    "mysql": ("mariadb-server",),
    "pgsql": ("postgresql",),
    "ldap": ("slapd", "ldap-utils"),
}


def dict_type(kind: str) -> str:
    """The Postfix table type of a bench table kind: mysql-5ms -> mysql."""
    return kind.split("-", 1)[0]


def is_database_kind(kind: str) -> bool:
    return kind in DATABASE_KINDS


def db_user(side: str) -> str:
    return f"pm_{side}"


def bench_keys() -> list[str]:
    """KEYS keys spread over the table; every fifth one is not in it."""
    return [
        f"nobody{i}@example.com" if i % 5 == 0 else f"user{(i * 7919) % ROWS}@example.com"
        for i in range(KEYS)
    ]


def ldif_entries() -> str:
    """ROWS mail entries under ou=people (slapadd adds the base entry)."""
    parts = ["dn: ou=people,dc=example,dc=com\nobjectClass: organizationalUnit\nou: people\n"]
    parts += [
        f"dn: uid=user{i},ou=people,dc=example,dc=com\n"
        "objectClass: inetOrgPerson\nobjectClass: mailUser\n"
        f"uid: user{i}\ncn: User {i}\nsn: {i}\n"
        f"mail: user{i}@example.com\nmaildrop: user{i}@mail.example.net\n"
        for i in range(ROWS)
    ]
    return "\n".join(parts)


# dbdirect.c: the database's own latency from a C client, without a proxy.
DIRECT_SOURCE = Path(__file__).with_name("dbdirect.c")
# The client libraries' development packages and a header of each.
DIRECT_HEADERS = {
    "libmariadb-dev": Path("/usr/include/mariadb/mysql.h"),
    "libpq-dev": Path("/usr/include/postgresql/libpq-fe.h"),
}


def build_direct_client(cache: Path) -> Path:
    """Compile dbdirect.c once per source version (installing the client libraries'
    development packages first when they are missing, as for the servers)."""
    missing = [package for package, header in DIRECT_HEADERS.items() if not header.exists()]
    if missing:
        install_server_packages(*missing)
    digest = hashlib.sha256(DIRECT_SOURCE.read_bytes()).hexdigest()[:12]
    binary = cache / f"dbdirect-{digest}"
    if binary.exists():
        return binary
    flags = subprocess.run(
        ["mariadb_config", "--cflags", "--libs"], capture_output=True, text=True, check=True
    ).stdout.split()
    includes = subprocess.run(
        ["pg_config", "--includedir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(f".{os.getpid()}.tmp")  # two builds may race
    command = ["gcc", "-O2", "-o", str(partial), str(DIRECT_SOURCE), *flags]
    subprocess.run([*command, f"-I{includes}", "-lpq", "-lpthread"], check=True)
    partial.rename(binary)
    return binary


def require_packages(*packages: str) -> None:
    """Install missing server packages (the benchmark runs as root, as make bench does
    for Postfix itself); no system service is started."""
    missing = missing_binaries(*packages)
    if missing:
        install_server_packages(*missing)
    still = missing_binaries(*packages)
    if still:
        raise SystemExit(f"server packages not usable: {still}")


@dataclass
class DatabaseTable:
    """One database workload: a .cf file per side and the server's connection counter."""

    kind: str
    specs: dict[str, str]
    keyfile: Path
    probe_key: str
    count_connections: Callable[[str], int] = field(repr=False)
    # The arguments of dbdirect.c after the program (CONNS and SECONDS appended by the
    # caller): the same query from a C client without any proxy. None for ldap.
    direct_args: list[str] | None = None


class DatabaseBackends(contextlib.AbstractContextManager):
    """The private servers of the database workloads, started on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        self._mariadb: PrivateMariaDB | None = None
        self._postgres: PrivatePostgres | None = None
        self._slapd: dict[str, PrivateSlapd] = {}

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        servers = [self._mariadb, self._postgres, *self._slapd.values()]
        for server in servers:
            if server is not None:
                server.close()
        self._mariadb = self._postgres = None
        self._slapd = {}

    # -- servers -----------------------------------------------------------------

    def mariadb(self) -> PrivateMariaDB:
        if self._mariadb is None:
            require_packages(*PACKAGES["mysql"])
            server = self._mariadb = PrivateMariaDB(base_dir=self.directory)
            server.start()
            for side in SIDES:
                server.create_user(db_user(side), PASSWORD, DBNAME)
            # The SEQUENCE engine's seq_0_to_N: no 10 000-row statement to send.
            server.execute(
                "CREATE TABLE t (addr VARCHAR(255) PRIMARY KEY, dest VARCHAR(255) NOT NULL);"
                "INSERT INTO t SELECT CONCAT('user', seq, '@example.com'), "
                f"CONCAT('user', seq, '@mail.example.net') FROM seq_0_to_{ROWS - 1};"
                "ANALYZE TABLE t;",
                database=DBNAME,
            )
        return self._mariadb

    def postgres(self) -> PrivatePostgres:
        if self._postgres is None:
            require_packages(*PACKAGES["pgsql"])
            server = self._postgres = PrivatePostgres(base_dir=self.directory)
            server.start()
            for side in SIDES:
                server.create_user(db_user(side), PASSWORD, DBNAME)
            server.execute(
                "CREATE TABLE t (addr text PRIMARY KEY, dest text NOT NULL);"
                "INSERT INTO t SELECT 'user' || i || '@example.com', "
                f"'user' || i || '@mail.example.net' FROM generate_series(0, {ROWS - 1}) i;"
                "ANALYZE t;",
                dbname=DBNAME,
            )
        return self._postgres

    def slapd(self, side: str) -> PrivateSlapd:
        if side not in self._slapd:
            require_packages(*PACKAGES["ldap"])
            server = self._slapd[side] = PrivateSlapd(ldif_entries(), base_dir=self.directory)
            server.start()
        return self._slapd[side]

    # -- tables ------------------------------------------------------------------

    def table(self, kind: str, tables_dir: Path) -> DatabaseTable:
        """Start what KIND needs; write its .cf files (one per side) and key file."""
        keyfile = tables_dir / f"keys-{kind}"
        keyfile.write_text("".join(f"{key}\n" for key in bench_keys()))
        specs = {}
        for side in SIDES:
            path = tables_dir / f"{kind}-{side}.cf"
            path.write_text(self._cf_text(kind, side))
            specs[side] = f"{dict_type(kind)}:{path}"
        return DatabaseTable(
            kind,
            specs,
            keyfile,
            "user1@example.com",
            self._counter(kind),
            self._direct_args(kind, keyfile),
        )

    def _direct_args(self, kind: str, keyfile: Path) -> list[str] | None:
        """dbdirect.c's arguments for KIND, as the C side's user (runs never overlap)."""
        kind_type = dict_type(kind)
        if kind_type not in ("mysql", "pgsql"):
            return None
        port = self.mariadb().port if kind_type == "mysql" else self.postgres().port
        user = db_user("c")
        query = QUERIES[kind]
        return [kind_type, "127.0.0.1", str(port), user, PASSWORD, DBNAME, query, str(keyfile)]

    def _cf_text(self, kind: str, side: str) -> str:
        kind_type = dict_type(kind)
        if kind_type == "ldap":
            server = self.slapd(side)
            lines = [
                f"server_host = ldap://{server.host}:{server.port}",
                f"search_base = {server.suffix}",
                "query_filter = (mail=%s)",
                "result_attribute = maildrop",
                "version = 3",
            ]
        else:
            port = self.mariadb().port if kind_type == "mysql" else self.postgres().port
            lines = [
                f"hosts = inet:127.0.0.1:{port}",
                f"user = {db_user(side)}",
                f"password = {PASSWORD}",
                f"dbname = {DBNAME}",
                f"query = {QUERIES[kind]}",
            ]
        return "".join(f"{line}\n" for line in lines)

    def _counter(self, kind: str) -> Callable[[str], int]:
        kind_type = dict_type(kind)
        if kind_type == "mysql":
            mariadb = self.mariadb()
            return lambda side: mariadb.connection_count(db_user(side))
        if kind_type == "pgsql":
            postgres = self.postgres()
            return lambda side: postgres.connection_count(db_user(side), DBNAME)
        return lambda side: self.slapd(side).connection_count()


# Points in a run (fractions of its length) at which the server is asked.
SAMPLE_POINTS = (0.2, 0.45, 0.7, 0.9)


@dataclass
class ConnectionWatch:
    """The most connections the server saw from one side during a run, and its bound.

    PER_WORKER is the side's configured limit per worker process (None: no bound
    stated, the C proxymap); the bound is checked at every sample against the workers
    counted just after the connections (workers only come, so the bound is not low).
    """

    count: Callable[[], int]
    workers: Callable[[], int]
    per_worker: int | None = None
    max_connections: int = 0
    max_workers: int = 0
    samples: int = 0
    over_bound: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def bound(self) -> int | None:
        return None if self.per_worker is None else self.max_workers * self.per_worker

    def sample(self) -> None:
        try:
            connections = self.count()
        except Exception as error:  # noqa: BLE001 - a failed sample is reported, not fatal
            self.errors.append(str(error).splitlines()[0] if str(error) else repr(error))
            return
        workers = self.workers()
        self.samples += 1
        self.max_connections = max(self.max_connections, connections)
        self.max_workers = max(self.max_workers, workers)
        if self.per_worker is not None and connections > workers * self.per_worker:
            self.over_bound += 1

    def during(self, began: float, seconds: float) -> None:
        """Sample at SAMPLE_POINTS of a run that began at monotonic time BEGAN."""
        for point in SAMPLE_POINTS:
            delay = began + point * seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.sample()
