"""The private test servers start, answer through their own clients, restart and stop."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.support import servers
from tests.support.servers import (
    PrivateMariaDB,
    PrivateMemcached,
    PrivatePostgres,
    PrivateServer,
    PrivateSlapd,
    ServerCommandError,
    ServerStartError,
    ensure_server_packages,
    mariadb,  # noqa: F401  (fixture)
    memcached,  # noqa: F401  (fixture)
    postgres,  # noqa: F401  (fixture)
    slapd,  # noqa: F401  (fixture)
)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_gone(server: PrivateServer, pids: list[int]) -> None:
    assert pids, "the server had no process while running"
    server.stop()
    assert not server.running
    assert server.processes() == []
    for pid in pids:
        assert servers.process_state(pid) in (None, "Z"), f"pid {pid} survived stop()"


def idle_client(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A command-line client that holds one connection open until its stdin closes."""
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env if env is not None else servers._client_env(),
    )


def close_client(client: subprocess.Popen[bytes]) -> None:
    assert client.stdin is not None
    client.stdin.close()
    client.wait(10)


# ---------------------------------------------------------------------------
# MariaDB
# ---------------------------------------------------------------------------


def test_mariadb(mariadb: PrivateMariaDB) -> None:  # noqa: F811
    assert mariadb.running and mariadb.host == "127.0.0.1"
    assert mariadb.socket.startswith(str(mariadb.directory))
    assert mariadb.execute("SELECT 1 + 1") == "2\n"
    assert mariadb.execute("SELECT @@port, @@bind_address") == f"{mariadb.port}\t127.0.0.1\n"

    mariadb.create_user("pf", "pf'secret", "mail")
    mariadb.execute(
        "CREATE TABLE mail.aliases (k VARCHAR(255) PRIMARY KEY, v TEXT);"
        "INSERT INTO mail.aliases VALUES ('alice', 'alice@example.com'), ('Bob', 'bob@x')"
    )
    query = "SELECT v FROM aliases WHERE k = 'alice'"
    assert mariadb.query_as("pf", "pf'secret", query, database="mail") == "alice@example.com\n"
    assert (
        mariadb.query_as("pf", "pf'secret", query, database="mail", tcp=False)
        == "alice@example.com\n"
    )
    # utf8mb4_bin: keys are case-sensitive, as in Postfix's other tables.
    assert mariadb.execute("SELECT v FROM mail.aliases WHERE k = 'bob'") == ""
    with pytest.raises(ServerCommandError, match="Access denied"):
        mariadb.query_as("pf", "wrong", query, database="mail")
    with pytest.raises(ServerCommandError, match="syntax"):
        mariadb.execute("SELEC 1")

    assert mariadb.connection_count() == 0
    client = idle_client(mariadb.client_command(user="pf", password="pf'secret", tcp=True))
    try:
        assert wait_for(lambda: mariadb.connection_count("pf") == 1)
        assert mariadb.connection_count() == 1
        assert mariadb.connection_count("nobody") == 0
    finally:
        close_client(client)
    assert wait_for(lambda: mariadb.connection_count() == 0)

    port = mariadb.port
    mariadb.restart()
    assert mariadb.port == port
    assert mariadb.query_as("pf", "pf'secret", query, database="mail") == "alice@example.com\n"
    mariadb.kill()
    assert not mariadb.running
    with pytest.raises(ServerCommandError):
        mariadb.execute("SELECT 1")
    mariadb.start()
    assert mariadb.execute("SELECT COUNT(*) FROM mail.aliases") == "2\n"

    assert_gone(mariadb, mariadb.processes())


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------


def test_postgres(postgres: PrivatePostgres) -> None:  # noqa: F811
    assert postgres.running and postgres.host == "127.0.0.1"
    assert postgres.execute("SELECT 1 + 1") == "2\n"
    assert postgres.execute("SHOW max_connections") == "200\n"
    assert postgres.execute("SHOW server_encoding") == "UTF8\n"

    postgres.create_user("pf", "pf'secret", "mail")
    # Tables that postgres creates later are usable by pf (default privileges).
    postgres.execute(
        "CREATE TABLE aliases (k text PRIMARY KEY, v text);"
        "INSERT INTO aliases VALUES ('alice', 'alice@example.com'), ('jörg', 'jörg@example.com')",
        dbname="mail",
    )
    query = "SELECT v FROM aliases WHERE k = 'alice'"
    assert postgres.query_as("pf", "pf'secret", query, dbname="mail") == "alice@example.com\n"
    assert postgres.query_as("pf", "any", query, dbname="mail", tcp=False) == "alice@example.com\n"
    assert (
        postgres.execute("SELECT v FROM aliases WHERE k = 'jörg'", dbname="mail")
        == "jörg@example.com\n"
    )
    with pytest.raises(ServerCommandError, match="password authentication failed"):
        postgres.query_as("pf", "wrong", query, dbname="mail")
    with pytest.raises(ServerCommandError, match="syntax error"):
        postgres.execute("SELEC 1")

    assert postgres.connection_count() == 0
    env = servers._client_env(PGPASSWORD="pf'secret")
    client = idle_client(postgres.client_command(user="pf", dbname="mail", tcp=True), env)
    try:
        assert wait_for(lambda: postgres.connection_count("pf") == 1)
        assert postgres.connection_count(dbname="mail") == 1
        assert postgres.connection_count(dbname="postgres") == 0
        assert postgres.connection_count() == 1
    finally:
        close_client(client)
    assert wait_for(lambda: postgres.connection_count() == 0)

    port = postgres.port
    postgres.restart()
    assert postgres.port == port
    assert postgres.query_as("pf", "pf'secret", query, dbname="mail") == "alice@example.com\n"
    pids = postgres.processes()
    assert len(pids) > 1  # postmaster and its auxiliary processes, one process group
    postgres.kill()
    assert all(servers.process_state(pid) in (None, "Z") for pid in pids)
    postgres.start()
    assert postgres.execute("SELECT count(*) FROM aliases", dbname="mail") == "2\n"

    assert_gone(postgres, postgres.processes())


# ---------------------------------------------------------------------------
# OpenLDAP slapd
# ---------------------------------------------------------------------------

ALICE = """\
    dn: uid=alice,dc=example,dc=com
    objectClass: inetOrgPerson
    objectClass: mailUser
    uid: alice
    cn: Alice
    sn: Liddell
    mail: alice@example.com
    mailacceptinggeneralid: alice@example.org
    maildrop: alice@mail.example.com
    """


def test_slapd() -> None:
    ensure_server_packages("slapd", "ldap-utils")
    with PrivateSlapd(ALICE) as ldap:
        assert ldap.url == f"ldap://127.0.0.1:{ldap.port}/"
        assert ldap.ldapi_url.startswith("ldapi://%2F")
        # The base entry was prepended; the mail schema matches case-insensitively.
        assert "dn: dc=example,dc=com" in ldap.search(
            "(objectClass=*)", base=ldap.suffix, scope="base"
        )
        found = ldap.search("(mailacceptinggeneralid=ALICE@EXAMPLE.ORG)", "maildrop")
        assert found == "dn: uid=alice,dc=example,dc=com\nmaildrop: alice@mail.example.com\n\n"
        assert "uid=alice" in ldap.search("(maildrop=alice@mail*)", "1.1", ldapi=True)

        ldap.add("""
            dn: uid=bob,dc=example,dc=com
            objectClass: inetOrgPerson
            objectClass: mailUser
            uid: bob
            cn: Bob
            sn: Bob
            mailForwardingAddress: bob@elsewhere.example
            """)
        assert "bob@elsewhere.example" in ldap.search("(uid=bob)", "mailForwardingAddress")
        with pytest.raises(ServerCommandError, match="Already exists"):
            ldap.add(ALICE)

        assert ldap.connection_count() == 0
        with socket.create_connection((ldap.host, ldap.port)):
            assert wait_for(lambda: ldap.connection_count() == 1)
        assert wait_for(lambda: ldap.connection_count() == 0)

        # A hung directory: connections are accepted by the kernel, nothing answers.
        ldap.stop_signal()
        with socket.create_connection((ldap.host, ldap.port), timeout=0.3) as conn:
            conn.sendall(servers._LDAP_ANONYMOUS_BIND)
            with pytest.raises(TimeoutError):
                conn.recv(100)
        ldap.cont_signal()
        assert "uid=alice" in ldap.search("(uid=alice)", "1.1")

        port = ldap.port
        ldap.restart()
        assert ldap.port == port
        assert "uid=bob" in ldap.search("(uid=bob)", "1.1")
        ldap.kill()
        ldap.start()
        assert "uid=bob" in ldap.search("(uid=bob)", "1.1")

        # stop() works on a SIGSTOPped slapd too.
        ldap.stop_signal()
        assert_gone(ldap, ldap.processes())


def test_slapd_fixture_and_bad_ldif(slapd: PrivateSlapd) -> None:  # noqa: F811
    assert slapd.search("(objectClass=*)", "dc") == "dn: dc=example,dc=com\ndc: example\n\n"
    broken = PrivateSlapd("dn: cn=x,dc=elsewhere\nobjectClass: person\ncn: x\nsn: x\n")
    try:
        with pytest.raises(ServerStartError, match="(?s)slapadd failed.*not configured to hold"):
            broken.start()
        assert not broken.running
    finally:
        broken.close()
    assert not broken.directory.exists()


# ---------------------------------------------------------------------------
# memcached
# ---------------------------------------------------------------------------


def memcache_text(server: PrivateMemcached, request: bytes) -> bytes:
    """One request over a raw connection, as a client that knows only the protocol."""
    family = socket.AF_UNIX if server.socket else socket.AF_INET
    address = server.socket if server.socket else (server.host, server.port)
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(address)
        conn.sendall(request)
        reply = b""
        while not reply.endswith((b"END\r\n", b"STORED\r\n")):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


def test_memcached(memcached: PrivateMemcached) -> None:  # noqa: F811
    assert (
        memcached.socket is None and memcached.postfix_server == f"inet:127.0.0.1:{memcached.port}"
    )
    assert memcache_text(memcached, b"set alice 0 0 17\r\nalice@example.com\r\n") == b"STORED\r\n"
    assert (
        memcache_text(memcached, b"get alice\r\n")
        == b"VALUE alice 0 17\r\nalice@example.com\r\nEND\r\n"
    )
    assert memcached.get("alice") == b"alice@example.com"
    assert memcached.get("nobody") is None
    memcached.set("bin", b"\x00\r\n\xff", ttl=60)
    assert memcached.get("bin") == b"\x00\r\n\xff"
    assert memcached.delete("bin") and memcached.get("bin") is None

    # memcached notices the closed connections of the calls above asynchronously.
    assert wait_for(lambda: memcached.connection_count() == 0)
    with socket.create_connection((memcached.host, memcached.port)):
        assert wait_for(lambda: memcached.connection_count() == 1)
    assert wait_for(lambda: memcached.connection_count() == 0)

    port = memcached.port
    memcached.restart()
    assert memcached.port == port
    assert memcached.get("alice") is None  # memcached keeps nothing
    memcached.set("alice", b"again")
    memcached.kill()
    with pytest.raises(ConnectionRefusedError):
        memcached.get("alice")
    memcached.start()
    assert memcached.get("alice") is None

    assert_gone(memcached, memcached.processes())


def test_memcached_unix_socket() -> None:
    ensure_server_packages("memcached")
    with PrivateMemcached(unix_socket=True) as mc:
        assert mc.socket is not None and mc.port == 0
        assert os.stat(mc.socket).st_mode & 0o777 == 0o666
        assert mc.postfix_server == f"unix:{mc.socket}"
        mc.set("k", b"v")
        assert memcache_text(mc, b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
        mc.restart()
        assert mc.get("k") is None
        assert_gone(mc, mc.processes())


# ---------------------------------------------------------------------------
# Safety nets
# ---------------------------------------------------------------------------


def test_forgotten_instance_is_killed_and_removed() -> None:
    ensure_server_packages("memcached")
    server = PrivateMemcached().start()
    pids, directory = server.processes(), server.directory
    assert pids and directory.exists()
    del server
    gc.collect()
    assert all(servers.process_state(pid) in (None, "Z") for pid in pids)
    assert not directory.exists()


def test_missing_package_skips_unless_installs_are_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="unknown server package"):
        servers.missing_binaries("mysql-server")
    monkeypatch.setattr(servers, "missing_binaries", lambda *names: {"memcached": ["memcached"]})
    monkeypatch.setattr(servers, "_ensured", set())
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYPROXYMAP_INSTALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PYPROXYMAP_INSTALL=1"):
        ensure_server_packages("memcached")
