"""Private, throw-away database and directory servers for table-driver tests.

NAME
    servers -- private MariaDB, PostgreSQL 15, OpenLDAP slapd and memcached instances

SYNOPSIS
    from tests.support.servers import PrivateMariaDB, mariadb, postgres, slapd, memcached

    ensure_server_packages("mariadb-server")
    with PrivateMariaDB() as db:
        db.create_user("pf", "secret", "mail")
        db.execute("CREATE TABLE mail.aliases (k VARCHAR(255) PRIMARY KEY, v TEXT)")
        db.query_as("pf", "secret", "SELECT v FROM aliases", database="mail")
        db.restart(); db.kill(); db.start()

    def test_lookup(postgres: PrivatePostgres) -> None:   # a fixture: started, then removed
        postgres.create_user("pf", "secret", "mail")
        postgres.execute("CREATE TABLE aliases (k text, v text)", dbname="mail")

    with PrivateSlapd("dn: uid=alice,dc=example,dc=com\\n...") as ldap:
        ldap.search("(uid=alice)", "mail")

    with PrivateMemcached(unix_socket=True) as mc:
        mc.set("key", b"value"); mc.get("key")

DESCRIPTION
    Every instance owns a new directory under /tmp (never pytest's long tmp_path: UNIX
    socket paths are limited to 107 bytes), listens on 127.0.0.1 and a port that was free
    when the instance was made (or, memcached with unix_socket=True, only on a UNIX
    socket in that directory), and never touches a system instance or its
    configuration: the servers run with --no-defaults or a private configuration file,
    and the command-line clients run with an environment cleaned of PG*, MYSQL_* and
    LDAP* variables (and LDAPNOINIT=1).

    The classes share one life cycle:

      start()     prepare the data on the first call (mariadb-install-db, initdb,
                  slapadd), launch the server and wait until it answers a probe (the
                  MariaDB greeting on the socket and TCP, an anonymous LDAP bind, the
                  memcached "version"; PostgreSQL: postmaster.pid says "ready", as for
                  pg_ctl -w); ServerStartError (with the server's log tail) after
                  start_timeout seconds, or at once when the server dies. If the port
                  was taken meanwhile, the first start retries on another. Idempotent.
      stop()      the server's graceful shutdown signal, SIGKILL after a timeout; every
                  process of the instance is gone when it returns. Idempotent.
      restart()   stop() then start() on the same port and data (memcached loses its data).
      kill()      SIGKILL to every process of the instance (an outage); start() recovers.
      close()     kill what runs and remove the directory (the context manager's exit).

    A weakref.finalize finalizer (which also runs at interpreter exit) kills the
    processes and removes the directory of an instance that was not closed, so a failing
    or interrupted test leaves nothing behind (except after os._exit or SIGKILL of
    pytest).

    Each server is started in its own session, as our child, so its pid is its process
    group id: ``processes()`` lists the live members and descendants (PostgreSQL's
    backends each call setsid()), ``pid`` the server (the postmaster for PostgreSQL).

SERVERS
    PrivateMariaDB(*, extra_args=())
        mariadbd as user mysql, --no-defaults plus the flags of server_command().
        Root authenticates by unix_socket (OS user root) through ``socket`` only; TCP
        from 127.0.0.1 is refused ("Host '127.0.0.1' is not allowed") until an account
        for '%' exists. ``create_user`` makes USER@'%' (TCP, seen as 127.0.0.1 thanks
        to --skip-name-resolve) and USER@'localhost' (the socket), both with
        mysql_native_password and ALL on the database. Character set utf8mb4,
        collation utf8mb4_bin (case-sensitive keys), max_connections 200.
        ``query_as(user, password, sql, database=, tcp=True)`` runs the mariadb client
        as that user; ``client_command(...)`` gives its command line.
    PrivatePostgres(*, settings=None)
        initdb (runuser) and then the postmaster in the foreground as user postgres,
        with the options pg_ctl would pass; stop() is pg_ctl's fast shutdown (SIGINT).
        pg_hba: "local" (the socket in ``socket_dir``) is trust for every user (the
        password is not checked), "host" (127.0.0.1) is scram-sha-256. UTF8, locale C,
        max_connections 200, fsync off. ``create_user`` makes a login role owning the
        database (or with ALL on an existing one) that may also use the tables postgres
        creates later in its public schema. ``query_as(user, password, sql, dbname=,
        tcp=True)``, ``client_command(...)`` as for MariaDB.
    PrivateSlapd(ldif="", *, debug="none", extra_config="")
        slapd.conf (``config_text()``) with the core, cosine, inetorgperson and nis
        schemas plus MAIL_SCHEMA (maildrop, mailacceptinggeneralid,
        mailForwardingAddress: case-insensitive directory strings; auxiliary objectclass
        mailUser allowing them and mail), back_mdb, equality indexes on the mail
        attributes, ``access to * by * read`` (anonymous read; simple binds as any entry
        with a userPassword), rootdn/rootpw for writes. LDIF (dedented) is loaded with
        slapadd before the first start; the base entry dc=example,dc=com is prepended
        unless LDIF has it. At run time: add(), modify() (as the rootdn) and search()
        (anonymous, ldapsearch -LLL). slapd runs with -d none: its log holds start,
        stop and errors only (debug="stats" logs every operation). connection_count()
        counts TCP connections only (not ldapi).
    PrivateMemcached(unix_socket=False, *, memory_mb=16)
        memcached -u nobody -U 0 -m 16 on TCP, or only on a UNIX socket (mode 0666;
        then port is 0). ``postfix_server`` is the memcache_table(5) notation. stop()
        is SIGKILL: memcached keeps nothing, and its own SIGTERM handling takes a second.

FIXTURES
    mariadb, postgres, slapd, memcached                function scope: a fresh instance
    mariadb_module, postgres_module, slapd_module,     module scope: shared by the tests
    memcached_module                                   of a module (use distinct names)

    Import them into the test module (``from tests.support.servers import mariadb``);
    each calls ensure_server_packages first.

TIMINGS (this machine, Debian 12; first start = preparation + start)
    MariaDB 0.7-1.7 s + 0.1 s (restart 0.15 s), PostgreSQL 0.8-0.9 s + 0.05 s (restart
    0.1 s), slapd 0.02 s + 0.05 s, memcached 0.03 s. ``prepare_seconds`` and
    ``start_seconds`` record an instance's figures.

ENVIRONMENT
    CI=true, PYPROXYMAP_INSTALL=1
        when a server package is missing and we are root, apt-get install it (with a
        policy-rc.d returning 101, so that no system service starts); otherwise skip
        (which tests/conftest.py turns into a failure under CI=true).
    PYPROXYMAP_KEEP_TREES=1
        keep the instance directories (data and logs) after the tests.

SEE ALSO
    postfix.py (ensure_postfix, the same installation pattern for Postfix itself)
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self
from urllib.parse import quote

import pytest

from tests.support.locks import APT_WAIT_FOR_LOCK, PACKAGE_INSTALL_LOCK, exclusive

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

HOST = "127.0.0.1"
POSTGRES_VERSION = "15"
LDAP_SCHEMA_DIR = Path("/etc/ldap/schema")
LDAP_MODULE_DIR = Path("/usr/lib/ldap")

# Generous for a loaded CI machine; a server that is not up by then is broken.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CLIENT_TIMEOUT = 60.0

_KEEP_TREES = os.environ.get("PYPROXYMAP_KEEP_TREES") == "1"
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Client environment variables that could point a command-line client elsewhere.
_CLIENT_ENV_PREFIXES = ("PG", "MYSQL", "MARIADB", "LDAP")

# The private arc of the mail schema: 1.3.6.1.4.1.99999.1.x attributes, .2.x classes.
MAIL_SCHEMA = """\
# pyproxymap test schema: Postfix-style mail routing attributes (private OID arc).
attributetype ( 1.3.6.1.4.1.99999.1.1 NAME 'maildrop'
    DESC 'Delivery address of a mail recipient'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{1024} )

attributetype ( 1.3.6.1.4.1.99999.1.2 NAME 'mailacceptinggeneralid'
    DESC 'An address the mail system accepts for this entry'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{1024} )

attributetype ( 1.3.6.1.4.1.99999.1.3 NAME 'mailForwardingAddress'
    DESC 'An address mail for this entry is forwarded to'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{1024} )

objectclass ( 1.3.6.1.4.1.99999.2.1 NAME 'mailUser'
    DESC 'Mail routing information'
    SUP top AUXILIARY
    MAY ( mail $ maildrop $ mailacceptinggeneralid $ mailForwardingAddress ) )
"""

LDAP_SUFFIX = "dc=example,dc=com"
LDAP_BASE_LDIF = """\
dn: dc=example,dc=com
objectClass: top
objectClass: dcObject
objectClass: organization
o: Example
dc: example
"""


class ServerStartError(RuntimeError):
    """A private server could not be prepared or did not become ready."""


class ServerCommandError(RuntimeError):
    """A command-line client (mariadb, psql, ldapadd, ...) failed."""

    def __init__(self, command: Sequence[str], returncode: int | str, stdout: str, stderr: str):
        self.command = list(command)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        shown = " ".join(shlex.quote(arg) for arg in _hide_passwords(command))
        super().__init__(f"{shown} -> {returncode}:\n{stderr.strip() or stdout.strip()}")


# ---------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The PostgreSQL server binaries: version 15 if present, else the newest."""
    preferred = Path("/usr/lib/postgresql") / POSTGRES_VERSION / "bin"
    if preferred.is_dir():
        return preferred
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.name)] or [0],
    )
    return versions[-1] if versions else preferred


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def _program(name: str) -> str:
    """Full path of an installed program (or the bare name, for a clear error later)."""
    return _which(name) or name


def _package_binaries() -> dict[str, tuple[str, ...]]:
    pg = postgres_bin_dir()
    return {
        "mariadb-server": ("mariadbd", "mariadb-install-db", "mariadb"),
        "postgresql": (str(pg / "initdb"), str(pg / "pg_ctl"), str(pg / "postgres"), "psql"),
        "slapd": ("slapd", "slapadd"),
        "ldap-utils": ("ldapadd", "ldapmodify", "ldapsearch"),
        "memcached": ("memcached",),
    }


SERVER_PACKAGES = ("mariadb-server", "postgresql", "slapd", "ldap-utils", "memcached")


def missing_binaries(*packages: str) -> dict[str, list[str]]:
    """{package: [missing programs]} for the packages (all server packages if none)."""
    table = _package_binaries()
    unknown = [name for name in packages if name not in table]
    if unknown:
        raise ValueError(f"unknown server package(s) {unknown}; known: {sorted(table)}")
    missing: dict[str, list[str]] = {}
    for package in packages or SERVER_PACKAGES:
        absent = [
            program
            for program in table[package]
            if not (os.access(program, os.X_OK) if "/" in program else _which(program))
        ]
        if absent:
            missing[package] = absent
    return missing


def install_wanted() -> bool:
    """Whether the environment asks the tests to install what they need."""
    return os.environ.get("CI") == "true" or os.environ.get("PYPROXYMAP_INSTALL") == "1"


_ensured: set[str] = set()


def ensure_server_packages(*names: str) -> None:
    """Make the server packages usable, or skip the calling test.

    NAMES are Debian package names (default: all of SERVER_PACKAGES). A missing package
    is installed when the environment asks for it (CI=true or PYPROXYMAP_INSTALL=1) and
    we are root; otherwise the test is skipped with the reason. The private servers
    run as root and drop to their service users, so non-root is a skip as well.
    """
    wanted = [name for name in (names or SERVER_PACKAGES) if name not in _ensured]
    if not wanted:
        return
    missing = missing_binaries(*wanted)
    if missing:
        described = ", ".join(f"{pkg} (no {' '.join(progs)})" for pkg, progs in missing.items())
        if not install_wanted():
            pytest.skip(
                f"server packages not installed: {described}; run as root with "
                "PYPROXYMAP_INSTALL=1 (or CI=true) to have the tests install them"
            )
        if os.geteuid() != 0:
            pytest.skip(f"server packages not installed and not root: {described}")
        if not _which("apt-get"):
            pytest.skip(f"server packages not installed and no apt-get: {described}")
        with exclusive(PACKAGE_INSTALL_LOCK):
            # Another test process (a parallel worker) may have installed them meanwhile.
            again = missing_binaries(*missing)
            if again:
                install_server_packages(*again)
        still = missing_binaries(*missing)
        if still:
            pytest.fail(f"server package installation incomplete: {still}")
    if os.geteuid() != 0:
        pytest.skip("private servers start as root and drop to their service users")
    _ensured.update(wanted)


def install_server_packages(*packages: str) -> None:
    """apt-get install PACKAGES without starting any system service.

    A policy-rc.d answering 101 ("action forbidden") is put in place for the duration
    (an existing one is set aside and restored): invoke-rc.d and deb-systemd-invoke
    consult it, so the postinst scripts start nothing.
    """
    policy = Path("/usr/sbin/policy-rc.d")
    saved = policy.with_name("policy-rc.d.pyproxymap-saved")
    had_policy = policy.exists() or policy.is_symlink()
    if had_policy:
        policy.replace(saved)
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    env["PATH"] = env.get("PATH", "") + ":" + _SBIN_PATH
    install = ["apt-get", *APT_WAIT_FOR_LOCK, "install", "-y", "-q", "--no-install-recommends"]
    install += packages
    try:
        if subprocess.run(install, env=env, check=False).returncode != 0:
            # A fresh machine has no package lists yet.
            subprocess.run(["apt-get", *APT_WAIT_FOR_LOCK, "update", "-q"], env=env, check=True)
            subprocess.run(install, env=env, check=True)
    finally:
        policy.unlink(missing_ok=True)
        if had_policy:
            saved.replace(policy)


# ---------------------------------------------------------------------------
# Processes, ports, commands
# ---------------------------------------------------------------------------

_handed_out_ports: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (never the same twice in a process)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _proc_table() -> dict[int, tuple[str, int, int]]:
    """{pid: (state, ppid, pgrp)} of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def instance_pids(leader: int, *, descendants: bool = True) -> list[int]:
    """Live (non-zombie) processes of LEADER's process group and its descendants.

    Descendants matter for PostgreSQL: every child of the postmaster calls setsid().
    Without DESCENDANTS (the leader is known to be dead: its pid may be reused), only
    the remaining members of the process group.
    """
    table = _proc_table()
    if not descendants:
        return sorted(
            pid
            for pid, (state, _, pgrp) in table.items()
            if pgrp == leader and pid != leader and state not in ("Z", "X")
        )
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, _, pgrp) in table.items() if pgrp == leader}
    todo = [leader]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.add(pid)
        todo.extend(child for child in children.get(pid, ()) if child not in found)
    return sorted(pid for pid in found if table.get(pid, ("X",))[0] not in ("Z", "X"))


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of PID is in the stopped state (T) of a SIGSTOP."""
    task = Path(f"/proc/{pid}/task")
    try:
        stats = [(task / tid / "stat").read_text() for tid in os.listdir(task)]
    except OSError:
        return False
    return all(stat.rsplit(")", 1)[1].split()[0] == "T" for stat in stats)


def process_state(pid: int) -> str | None:
    """The /proc state letter of PID (R, S, T, Z, ...), None when it does not exist."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _client_env(**extra: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(_CLIENT_ENV_PREFIXES)
    }
    env["PATH"] = env.get("PATH", "") + ":" + _SBIN_PATH
    env["LDAPNOINIT"] = "1"
    env.update(extra)
    return env


def _hide_passwords(command: Sequence[str]) -> list[str]:
    shown = []
    hide_next = False
    for arg in command:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg.startswith("--password="):
            shown.append("--password=***")
        else:
            shown.append(arg)
            hide_next = arg == "-w"
    return shown


def run_client(
    command: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = CLIENT_TIMEOUT,
    cwd: str | os.PathLike[str] | None = None,
) -> str:
    """Run a command-line client; its stdout, or ServerCommandError."""
    try:
        done = subprocess.run(
            list(command),
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            errors="surrogateescape",
            env=dict(env) if env is not None else _client_env(),
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr or ""
        if isinstance(stderr, bytes):
            stderr = stderr.decode("utf-8", "replace")
        raise ServerCommandError(command, f"timeout after {timeout}s", "", stderr) from None
    if done.returncode != 0:
        raise ServerCommandError(command, done.returncode, done.stdout, done.stderr)
    return done.stdout


def _user_ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: Path, user: str) -> None:
    uid, gid = _user_ids(user)
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _tmp_base() -> str:
    # /tmp: short (socket paths) and world-searchable (the servers drop privileges).
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def _probe(
    family: int,
    address: str | tuple[str, int],
    send: bytes,
    expect: Callable[[bytes], bool],
    need: int,
    timeout: float = 1.0,
) -> bool:
    """Connect, send SEND, read up to NEED bytes; whether EXPECT likes them."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(address)
            if send:
                conn.sendall(send)
            data = b""
            while len(data) < need:
                chunk = conn.recv(need - len(data))
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return expect(data)


# ---------------------------------------------------------------------------
# The common life cycle
# ---------------------------------------------------------------------------


class _Resources:
    """What must be killed and removed, kept apart from the server for the finalizer."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None  # the server's pid, also its process group id

    def pids(self) -> list[int]:
        if self.leader is None:
            return []
        # poll() reaps an exited child, whose pid may then be reused by anybody.
        exited = self.process is not None and self.process.poll() is not None
        return instance_pids(self.leader, descendants=not exited)

    def kill(self, timeout: float = STOP_TIMEOUT) -> None:
        leader = self.leader
        # Collected before the leader dies: then its children lose their parent link.
        pids = self.pids()
        for pid in sorted(pids, key=lambda pid: pid != leader):  # the leader first
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _wait_until(lambda: all(process_state(pid) in (None, "Z", "X") for pid in pids), timeout)
        self.process = None
        self.leader = None

    def cleanup(self) -> None:
        self.kill()
        if not _KEEP_TREES:
            shutil.rmtree(self.directory, ignore_errors=True)


class PrivateServer:
    """Base class: a directory, a port, one process group, a readiness probe."""

    kind = "server"
    host = HOST

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
        tcp: bool = True,
    ) -> None:
        self.directory = Path(
            tempfile.mkdtemp(prefix=f"pyproxymap-{self.kind}-", dir=base_dir or _tmp_base())
        )
        # The servers drop privileges: their users must be able to enter the directory.
        self.directory.chmod(0o755)
        self.port: int = free_port() if tcp else 0
        self.start_timeout = start_timeout
        self.log_path = self.directory / f"{self.kind}.log"
        self.prepare_seconds: float | None = None
        self.start_seconds: float | None = None
        self._prepared = False
        self._started_once = False
        self._log_offset = 0
        self._resources = _Resources(self.directory)
        self._finalizer = weakref.finalize(self, self._resources.cleanup)

    # -- to be provided by the servers ---------------------------------------

    def _prepare(self) -> None:
        """Create the data (once, before the first start)."""

    def _launch(self) -> None:
        """Start the server; set self._resources.process and/or .pgid."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """One readiness probe (a real protocol exchange)."""
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Ask the server to stop (graceful signal)."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGTERM)

    # -- life cycle ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The server process (the process group leader), while it runs."""
        leader = self._resources.leader
        if leader is None or leader not in self._resources.pids():
            return None
        return leader

    @property
    def running(self) -> bool:
        return bool(self._resources.pids())

    def processes(self) -> list[int]:
        """Live processes of the instance (its process group)."""
        return self._resources.pids()

    def start(self) -> Self:
        """Prepare (first time), launch and wait until ready; a no-op when running."""
        if self.running:
            return self
        if not self._prepared:
            began = time.monotonic()
            self._prepare()
            self._prepared = True
            self.prepare_seconds = time.monotonic() - began
        attempts = 1 if self._started_once or not self.port else 3
        for attempt in range(attempts):
            began = time.monotonic()
            try:
                self._launch_and_wait()
            except ServerStartError:
                if attempt + 1 < attempts and "Address already in use" in self.log_since_launch():
                    # Somebody took the port between free_port() and now: take another.
                    self.port = free_port()
                    continue
                raise
            self.start_seconds = time.monotonic() - began
            self._started_once = True
            return self
        raise AssertionError("unreachable")

    def _launch_and_wait(self) -> None:
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0
        deadline = time.monotonic() + self.start_timeout
        try:
            self._launch()
            while not self._ready():
                if not self._resources.pids():
                    raise ServerStartError(
                        f"{self.kind} exited before it was ready (port {self.port}, "
                        f"{self.directory}):\n{self.log_tail()}"
                    )
                if time.monotonic() >= deadline:
                    raise ServerStartError(
                        f"{self.kind} not ready after {self.start_timeout:.0f} s (port "
                        f"{self.port}, {self.directory}):\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        except BaseException:
            self._resources.kill()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful shutdown, SIGKILL after TIMEOUT; no process of the instance remains."""
        if self.running:
            pid = self.pid
            if pid is not None and process_state(pid) in ("T", "t"):
                os.kill(pid, signal.SIGCONT)  # a stopped server cannot act on SIGTERM
            try:
                self._shutdown()
            except ProcessLookupError:
                pass
            _wait_until(lambda: not self.running, timeout)
        self._resources.kill()

    def kill(self) -> None:
        """SIGKILL every process of the instance (an outage); start() recovers."""
        self._resources.kill()

    def restart(self) -> Self:
        """stop() then start(), same port and data."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Kill what runs and remove the directory (unless PYPROXYMAP_KEEP_TREES=1)."""
        self._finalizer()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.close()

    # -- observation ---------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_since_launch(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for error messages."""
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else f"(no log in {self.log_path})"

    def _popen(self, command: Sequence[str], *, user: str | None = None) -> None:
        """Start COMMAND in a new session (as USER), output appended to the log."""
        ids = _user_ids(user) if user is not None else None
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(self.directory),
                env=_client_env(),
                user=ids[0] if ids else None,
                group=ids[1] if ids else None,
                extra_groups=[] if ids else None,
            )
        self._resources.process = process
        self._resources.leader = process.pid

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} port {self.port} {state} {self.directory}>"


# ---------------------------------------------------------------------------
# MariaDB
# ---------------------------------------------------------------------------


def _sql_string(value: str) -> str:
    """A MariaDB string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    """A MariaDB quoted identifier."""
    return "`" + name.replace("`", "``") + "`"


def _mysql_greeting_ok(data: bytes) -> bool:
    # 3-byte length, sequence 0, then protocol version 10.
    return len(data) >= 5 and data[3] == 0 and data[4] == 10


def _mysql_answer_ok(data: bytes) -> bool:
    # A greeting, or an error packet (0xff) that a running server sends instead, e.g.
    # "Host '127.0.0.1' is not allowed to connect" while only root@localhost exists.
    return len(data) >= 5 and data[3] == 0 and data[4] in (10, 0xFF)


class PrivateMariaDB(PrivateServer):
    """A private mariadbd on 127.0.0.1:port and a UNIX socket in its directory."""

    kind = "mariadb"

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(base_dir=base_dir, start_timeout=start_timeout)
        self.data_dir = self.directory / "data"
        self.run_dir = self.directory / "run"
        self.socket: str = str(self.run_dir / "mysql.sock")
        self.extra_args = list(extra_args)

    def _prepare(self) -> None:
        self.run_dir.mkdir()
        _chown_tree(self.run_dir, "mysql")
        command = [
            _program("mariadb-install-db"),
            "--no-defaults",
            "--user=mysql",
            f"--datadir={self.data_dir}",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ]
        try:
            run_client(command, cwd=self.directory, timeout=max(self.start_timeout, 60))
        except ServerCommandError as error:
            raise ServerStartError(f"mariadb-install-db failed: {error}") from None

    def server_command(self) -> list[str]:
        return [
            _program("mariadbd"),
            "--no-defaults",
            "--user=mysql",
            f"--datadir={self.data_dir}",
            f"--socket={self.socket}",
            f"--pid-file={self.run_dir / 'mariadbd.pid'}",
            f"--port={self.port}",
            f"--bind-address={HOST}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_bin",
            "--innodb-buffer-pool-size=32M",
            "--skip-log-bin",
            "--max-connections=200",
            *self.extra_args,
        ]

    def _launch(self) -> None:
        self._popen(self.server_command())

    def _ready(self) -> bool:
        # The socket first: each probe is an "Aborted connection" warning in the log.
        return _probe(socket.AF_UNIX, self.socket, b"", _mysql_greeting_ok, 5) and _probe(
            socket.AF_INET, (HOST, self.port), b"", _mysql_answer_ok, 5
        )

    # -- clients -------------------------------------------------------------

    def client_command(
        self,
        *,
        user: str = "root",
        password: str | None = None,
        database: str | None = None,
        tcp: bool = False,
    ) -> list[str]:
        """The `mariadb` command line (batch, -N) for USER over the socket or TCP."""
        command = [_program("mariadb"), "--no-defaults", f"--user={user}", "--batch", "-N"]
        if tcp:
            command += ["--protocol=tcp", f"--host={HOST}", f"--port={self.port}"]
        else:
            command += ["--protocol=socket", f"--socket={self.socket}"]
        if password is not None:
            command.append(f"--password={password}")
        if database is not None:
            command.append(f"--database={database}")
        return command

    def execute(self, sql: str, *, database: str | None = None) -> str:
        """Run SQL as root through the socket (`mariadb --batch -N`); its stdout."""
        return run_client([*self.client_command(database=database), "-e", sql])

    def query_as(
        self,
        user: str,
        password: str,
        sql: str,
        *,
        database: str | None = None,
        tcp: bool = True,
    ) -> str:
        """Run SQL as a password user over TCP (default) or the socket; its stdout."""
        command = self.client_command(user=user, password=password, database=database, tcp=tcp)
        return run_client([*command, "-e", sql])

    def create_user(self, user: str, password: str, dbname: str) -> None:
        """USER@'%' and USER@'localhost' (PASSWORD) with ALL on DBNAME (created)."""
        accounts = [f"{_sql_string(user)}@{_sql_string(host)}" for host in ("%", "localhost")]
        statements = [f"CREATE DATABASE IF NOT EXISTS {_sql_ident(dbname)}"]
        for account in accounts:
            statements.append(
                f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {_sql_string(password)}"
            )
            statements.append(f"ALTER USER {account} IDENTIFIED BY {_sql_string(password)}")
            statements.append(f"GRANT ALL PRIVILEGES ON {_sql_ident(dbname)}.* TO {account}")
        self.execute(";\n".join(statements) + ";")

    def connection_count(self, user: str | None = None) -> int:
        """Client connections (all, or USER's), not counting the asking session."""
        sql = (
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Killed') "
            "AND USER NOT IN ('system user', 'event_scheduler')"
        )
        if user is not None:
            sql += f" AND USER = {_sql_string(user)}"
        return int(self.execute(sql).strip())


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------


def _pg_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PrivatePostgres(PrivateServer):
    """A private PostgreSQL cluster (initdb, then the postmaster as user postgres)."""

    kind = "postgres"

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base_dir=base_dir, start_timeout=start_timeout)
        self.data_dir = self.directory / "data"
        self.socket_dir: str = str(self.directory / "run")
        self.bin_dir = postgres_bin_dir()
        self.settings = {
            "listen_addresses": HOST,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            **(settings or {}),
        }

    def _as_postgres(self, *command: str) -> list[str]:
        return [_program("runuser"), "-u", "postgres", "--", *command]

    def _prepare(self) -> None:
        self.data_dir.mkdir(mode=0o700)
        Path(self.socket_dir).mkdir()
        self.log_path.touch()
        for path in (self.data_dir, Path(self.socket_dir), self.log_path):
            _chown_tree(path, "postgres")
        command = self._as_postgres(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-N",
        )
        try:
            run_client(command, cwd=self.directory, timeout=max(self.start_timeout, 60))
        except ServerCommandError as error:
            raise ServerStartError(f"initdb failed: {error}") from None

    def server_command(self) -> list[str]:
        command = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            self.socket_dir,
        ]
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _launch(self) -> None:
        # The postmaster runs in the foreground as our child (what pg_ctl start runs,
        # without its daemonizing): after kill() we reap it at once, while an orphan
        # left to init could stay a zombie long enough for the next postmaster to see
        # its pid in postmaster.pid alive and refuse to start.
        self._popen(self.server_command(), user="postgres")

    def _ready(self) -> bool:
        # As pg_ctl -w: postmaster.pid of *this* postmaster says "ready".
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self._resources.leader)
            and lines[7].strip() == "ready"
        )

    def _shutdown(self) -> None:
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGINT)  # "fast" shutdown, as pg_ctl -m fast stop

    # -- clients -------------------------------------------------------------

    def client_command(
        self, *, user: str = "postgres", dbname: str = "postgres", tcp: bool = False
    ) -> list[str]:
        """The `psql -X -A -t` command line for USER over the socket or TCP."""
        return [
            _program("psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST if tcp else self.socket_dir,
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            dbname,
        ]

    def execute(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as superuser postgres through the socket (psql -X -A -t); stdout."""
        return run_client([*self.client_command(dbname=dbname), "-c", sql])

    def query_as(
        self, user: str, password: str, sql: str, *, dbname: str = "postgres", tcp: bool = True
    ) -> str:
        """Run SQL as USER over TCP (scram-sha-256, default) or the socket (trust)."""
        env = _client_env(PGPASSWORD=password, PGCONNECT_TIMEOUT="10")
        return run_client(
            [*self.client_command(user=user, dbname=dbname, tcp=tcp), "-c", sql], env=env
        )

    def create_user(self, user: str, password: str, dbname: str) -> None:
        """Login role USER (PASSWORD, scram) owning DBNAME, or with ALL on it if it exists.

        USER may also use the tables postgres creates later in DBNAME's public schema
        (default privileges), as a MariaDB user with ALL on the database could.
        """
        role = _pg_ident(user)
        exists = self.execute(f"SELECT 1 FROM pg_roles WHERE rolname = {_pg_string(user)}")
        verb = "ALTER" if exists.strip() else "CREATE"
        self.execute(f"{verb} ROLE {role} LOGIN PASSWORD {_pg_string(password)}")
        database = _pg_ident(dbname)
        if self.execute(f"SELECT 1 FROM pg_database WHERE datname = {_pg_string(dbname)}").strip():
            self.execute(f"GRANT ALL ON DATABASE {database} TO {role}")
        else:
            self.execute(f"CREATE DATABASE {database} OWNER {role}")
        self.execute(
            f"GRANT ALL ON SCHEMA public TO {role};"
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public "
            f"GRANT ALL ON TABLES TO {role};"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public "
            f"GRANT ALL ON SEQUENCES TO {role};",
            dbname=dbname,
        )

    def connection_count(self, user: str | None = None, dbname: str | None = None) -> int:
        """Client backends (all, or USER's / on DBNAME), not counting the asking one."""
        sql = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        if user is not None:
            sql += f" AND usename = {_pg_string(user)}"
        if dbname is not None:
            sql += f" AND datname = {_pg_string(dbname)}"
        return int(self.execute(sql).strip())


# ---------------------------------------------------------------------------
# OpenLDAP slapd
# ---------------------------------------------------------------------------

# An anonymous LDAPv3 simple bind, message id 1.
_LDAP_ANONYMOUS_BIND = bytes.fromhex("300c020101600702010304008000")


def _ldap_bind_ok(data: bytes) -> bool:
    # SEQUENCE, ..., BindResponse [APPLICATION 1] with resultCode success (0a 01 00).
    return len(data) >= 10 and data[0] == 0x30 and b"\x61" in data[:8] and b"\x0a\x01\x00" in data


def _has_base_entry(ldif: str, suffix: str) -> bool:
    wanted = re.sub(r"\s*,\s*", ",", suffix).lower()
    for match in re.finditer(r"^dn:\s*(.+?)\s*$", ldif, re.MULTILINE | re.IGNORECASE):
        if re.sub(r"\s*,\s*", ",", match.group(1)).lower() == wanted:
            return True
    return False


def _ldif_text(ldif: str) -> str:
    """LDIF from a (possibly indented) triple-quoted string, ending with a newline."""
    text = textwrap.dedent(ldif).strip("\n")
    return text + "\n" if text else ""


class PrivateSlapd(PrivateServer):
    """A private slapd (slapd.conf, back_mdb) on ldap://127.0.0.1:port/ and ldapi://."""

    kind = "slapd"
    suffix = LDAP_SUFFIX
    rootdn = "cn=admin,dc=example,dc=com"
    rootpw = "secret"

    def __init__(
        self,
        ldif: str = "",
        *,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
        debug: str = "none",
        extra_config: str = "",
    ) -> None:
        super().__init__(base_dir=base_dir, start_timeout=start_timeout)
        self.ldif = ldif
        self.debug = debug
        self.extra_config = extra_config
        self.conf_path = self.directory / "slapd.conf"
        self.schema_path = self.directory / "mail.schema"
        self.ldif_path = self.directory / "data.ldif"
        self.data_dir = self.directory / "data"
        self.run_dir = self.directory / "run"
        self.ldapi_path = self.run_dir / "ldapi"
        self.ldapi_url: str = "ldapi://" + quote(str(self.ldapi_path), safe="")

    @property
    def url(self) -> str:
        return f"ldap://{HOST}:{self.port}/"

    def initial_ldif(self) -> str:
        """What slapadd loads: the base entry (unless given) and the constructor's LDIF."""
        data = _ldif_text(self.ldif)
        if _has_base_entry(data, self.suffix):
            return data
        return LDAP_BASE_LDIF + ("\n" + data if data else "")

    def config_text(self) -> str:
        def q(path: Path) -> str:
            return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

        schemas = [
            LDAP_SCHEMA_DIR / f"{name}.schema"
            for name in ("core", "cosine", "inetorgperson", "nis")
        ]
        lines = [f"include {q(path)}" for path in schemas]
        lines += [
            f"include {q(self.schema_path)}",
            f"pidfile {q(self.run_dir / 'slapd.pid')}",
            f"argsfile {q(self.run_dir / 'slapd.args')}",
            f"modulepath {q(LDAP_MODULE_DIR)}",
            "moduleload back_mdb",
            "",
            "database mdb",
            "maxsize 104857600",
            f'suffix "{self.suffix}"',
            f'rootdn "{self.rootdn}"',
            f"rootpw {self.rootpw}",
            f"directory {q(self.data_dir)}",
            "index objectClass eq",
            "index uid,cn,mail,maildrop,mailacceptinggeneralid,mailForwardingAddress eq",
            "access to * by * read",
            self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        self.schema_path.write_text(MAIL_SCHEMA)
        self.conf_path.write_text(self.config_text())
        self.ldif_path.write_text(self.initial_ldif())
        self.data_dir.mkdir()
        self.run_dir.mkdir()
        command = [
            _program("slapadd"),
            "-q",
            "-f",
            str(self.conf_path),
            "-l",
            str(self.ldif_path),
        ]
        try:
            run_client(command, cwd=self.directory, timeout=max(self.start_timeout, 60))
        except ServerCommandError as error:
            raise ServerStartError(f"slapadd failed: {error}") from None
        for path in (self.data_dir, self.run_dir):
            _chown_tree(path, "openldap")

    def _launch(self) -> None:
        self._popen(
            [
                _program("slapd"),
                "-d",
                self.debug,
                "-f",
                str(self.conf_path),
                "-h",
                f"{self.url} {self.ldapi_url}",
                "-u",
                "openldap",
                "-g",
                "openldap",
            ]
        )

    def _ready(self) -> bool:
        return self.ldapi_path.exists() and _probe(
            socket.AF_INET, (HOST, self.port), _LDAP_ANONYMOUS_BIND, _ldap_bind_ok, 14
        )

    # -- clients -------------------------------------------------------------

    def _ldap_tool(self, tool: str, ldif: str) -> str:
        command = [_program(tool), "-x", "-H", self.url, "-D", self.rootdn, "-w", self.rootpw]
        return run_client(command, input=_ldif_text(ldif))

    def add(self, ldif: str) -> None:
        """ldapadd the entries (as the rootdn), on the running server."""
        self._ldap_tool("ldapadd", ldif)

    def modify(self, ldif: str) -> None:
        """ldapmodify (changetype records, as the rootdn), on the running server."""
        self._ldap_tool("ldapmodify", ldif)

    def search(
        self,
        filter: str = "(objectClass=*)",
        *attributes: str,
        base: str | None = None,
        scope: str = "sub",
        ldapi: bool = False,
    ) -> str:
        """Anonymous ldapsearch -LLL; the LDIF it prints."""
        command = [
            _program("ldapsearch"),
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            self.ldapi_url if ldapi else self.url,
            "-b",
            base or self.suffix,
            "-s",
            scope,
            filter,
            *attributes,
        ]
        return run_client(command)

    def stop_signal(self) -> None:
        """SIGSTOP slapd: a hung directory (the kernel still completes TCP handshakes).

        Returns once every thread is stopped: kill() only queues the signal, and a thread
        running on another CPU meanwhile would still answer a request sent right after.
        """
        pid = self.pid
        if pid is None:
            raise RuntimeError("slapd is not running")
        os.kill(pid, signal.SIGSTOP)
        if not _wait_until(lambda: _all_threads_stopped(pid), STOP_TIMEOUT, interval=0.001):
            raise RuntimeError(f"slapd (pid {pid}) did not stop on SIGSTOP")

    def cont_signal(self) -> None:
        """SIGCONT slapd after stop_signal."""
        pid = self.pid
        if pid is None:
            raise RuntimeError("slapd is not running")
        os.kill(pid, signal.SIGCONT)

    def connection_count(self) -> int:
        """Established TCP connections to the port, server side (ldapi not counted)."""
        return established_connections(self.port)


def established_connections(port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is PORT (/proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 3
                and fields[3] == "01"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                count += 1
    return count


# ---------------------------------------------------------------------------
# memcached
# ---------------------------------------------------------------------------


class PrivateMemcached(PrivateServer):
    """A private memcached on 127.0.0.1:port, or only on a UNIX socket (port 0)."""

    kind = "memcached"

    def __init__(
        self,
        unix_socket: bool = False,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
        memory_mb: int = 16,
    ) -> None:
        super().__init__(base_dir=base_dir, start_timeout=start_timeout, tcp=not unix_socket)
        self.run_dir = self.directory / "run"
        self.socket: str | None = str(self.run_dir / "memcached.sock") if unix_socket else None
        self.memory_mb = memory_mb

    @property
    def postfix_server(self) -> str:
        """The endpoint in memcache_table(5) notation: inet:127.0.0.1:PORT or unix:PATH."""
        return f"unix:{self.socket}" if self.socket else f"inet:{HOST}:{self.port}"

    def _prepare(self) -> None:
        if self.socket:
            # memcached creates the socket after dropping to nobody.
            self.run_dir.mkdir()
            _chown_tree(self.run_dir, "nobody")

    def _launch(self) -> None:
        command = [_program("memcached"), "-u", "nobody", "-U", "0", "-m", str(self.memory_mb)]
        if self.socket:
            command += ["-s", self.socket, "-a", "0666"]
        else:
            command += ["-l", HOST, "-p", str(self.port)]
        self._popen(command)

    def _shutdown(self) -> None:
        # memcached keeps nothing, and after SIGTERM/SIGINT it waits for its next clock
        # tick (up to a second) before it exits; clients see the same closed connections.
        self._resources.kill()

    def _address(self) -> tuple[int, str | tuple[str, int]]:
        if self.socket:
            return socket.AF_UNIX, self.socket
        return socket.AF_INET, (HOST, self.port)

    def _ready(self) -> bool:
        family, address = self._address()
        return _probe(family, address, b"version\r\n", lambda data: data.startswith(b"VERSION "), 8)

    # -- a tiny text-protocol client -----------------------------------------

    def request(self, data: bytes, terminators: Sequence[bytes], timeout: float = 10.0) -> bytes:
        """Send DATA on a new connection; the reply up to one of TERMINATORS."""
        family, address = self._address()
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(address)
            conn.sendall(data)
            reply = b""
            while not any(reply.endswith(end) for end in terminators):
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError(f"memcached closed the connection after {reply!r}")
                reply += chunk
        return reply

    def get(self, key: str) -> bytes | None:
        reply = self.request(f"get {key}\r\n".encode(), (b"END\r\n",))
        if reply == b"END\r\n":
            return None
        header, _, rest = reply.partition(b"\r\n")
        if not header.startswith(b"VALUE "):
            raise RuntimeError(f"memcached get {key!r}: {reply!r}")
        size = int(header.split()[3])
        return rest[:size]

    def set(self, key: str, value: bytes, ttl: int = 0) -> None:
        data = f"set {key} 0 {ttl} {len(value)}\r\n".encode() + value + b"\r\n"
        reply = self.request(data, (b"\r\n",))
        if reply != b"STORED\r\n":
            raise RuntimeError(f"memcached set {key!r}: {reply!r}")

    def delete(self, key: str) -> bool:
        reply = self.request(f"delete {key}\r\n".encode(), (b"\r\n",))
        return reply == b"DELETED\r\n"

    def stats(self) -> dict[str, str]:
        reply = self.request(b"stats\r\n", (b"END\r\n",))
        stats = {}
        for line in reply.decode().splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0] == "STAT":
                stats[parts[1]] = parts[2]
        return stats

    def connection_count(self) -> int:
        """Client connections ("stats" curr_connections) minus the asking one."""
        return int(self.stats()["curr_connections"]) - 1


# ---------------------------------------------------------------------------
# pytest fixtures
# ---------------------------------------------------------------------------


@pytest.fixture
def mariadb() -> Iterator[PrivateMariaDB]:
    """A fresh private MariaDB for one test."""
    ensure_server_packages("mariadb-server")
    with PrivateMariaDB() as server:
        yield server


@pytest.fixture(scope="module")
def mariadb_module() -> Iterator[PrivateMariaDB]:
    """One private MariaDB shared by the tests of a module."""
    ensure_server_packages("mariadb-server")
    with PrivateMariaDB() as server:
        yield server


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    """A fresh private PostgreSQL for one test."""
    ensure_server_packages("postgresql")
    with PrivatePostgres() as server:
        yield server


@pytest.fixture(scope="module")
def postgres_module() -> Iterator[PrivatePostgres]:
    """One private PostgreSQL shared by the tests of a module."""
    ensure_server_packages("postgresql")
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
def slapd() -> Iterator[PrivateSlapd]:
    """A fresh private slapd (base entry only; add data with .add()) for one test."""
    ensure_server_packages("slapd", "ldap-utils")
    with PrivateSlapd() as server:
        yield server


@pytest.fixture(scope="module")
def slapd_module() -> Iterator[PrivateSlapd]:
    """One private slapd shared by the tests of a module."""
    ensure_server_packages("slapd", "ldap-utils")
    with PrivateSlapd() as server:
        yield server


@pytest.fixture
def memcached() -> Iterator[PrivateMemcached]:
    """A fresh private memcached on TCP for one test."""
    ensure_server_packages("memcached")
    with PrivateMemcached() as server:
        yield server


@pytest.fixture(scope="module")
def memcached_module() -> Iterator[PrivateMemcached]:
    """One private memcached on TCP shared by the tests of a module."""
    ensure_server_packages("memcached")
    with PrivateMemcached() as server:
        yield server
