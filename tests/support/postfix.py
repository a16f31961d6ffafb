"""Run the real Postfix in a private tree, for drop-in, differential and benchmark tests.

NAME
    postfix -- private Postfix master instances and a raw proxymap client for tests

SYNOPSIS
    ensure_postfix()
    with PrivatePostfix(proxymap_program=path, proxy_read_maps="proxy:texthash:/t/a") as pf:
        pf.postmap_q("alice", "proxy:texthash:/t/a")     # -> (0, "alice@example.com")
        ProxymapClient(pf.socket_path("proxymap")).lookup("texthash:/t/a", "alice")

DESCRIPTION
    ``ensure_postfix`` installs the Debian Postfix packages when they are missing, the
    environment asks for it (CI=true or PYPROXYMAP_INSTALL=1) and we are root -- never
    starting the system instance -- and skips the calling test otherwise.

    A running system Postfix is left alone: a private instance shares nothing with it
    (its own queue, data and daemon directories, pid and lock files, maillog and
    postlog socket; no inet service), so both run side by side. Only
    ``meta_directory`` (/etc/postfix) is read, never written.

    ``PrivatePostfix`` builds a throw-away tree (conf/, queue/, data/, daemon/, tables/,
    maillog) and runs the real ``master -d`` on it, so that every daemon the master
    spawns is the installed Postfix one except ``proxymap``, which may point at any
    executable (the C one by default, or our worker). See
    ``docs/PROTOCOL.md`` section 5.4.

    Clients always run with a timeout: a Postfix client that cannot parse a reply
    retries forever, so a timeout is reported as the exit value ``"HANG"``.

    ``ProxymapClient`` speaks the proxymap attribute protocol directly (both request
    generations), for what ``postmap`` cannot do: open-reply flags, sequence, update.

SECURITY
    The master runs as root; its children drop to ``mail_owner`` (postfix). Everything
    a child touches after that (the tree, the tables, and for a Python worker the
    interpreter's library directories) must be readable by postfix. ``start`` checks
    this and fails with an explanation, instead of letting a worker die obscurely.

ENVIRONMENT
    CI=true, PYPROXYMAP_INSTALL=1
                              install missing Postfix packages (as root) instead of skipping.
    PYPROXYMAP_KEEP_TREES=1   keep the private trees after the test, for post-mortems.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.locks import APT_WAIT_FOR_LOCK, PACKAGE_INSTALL_LOCK, exclusive

POSTFIX_SBIN = Path("/usr/lib/postfix/sbin")
POSTFIX_LIB = Path("/usr/lib/postfix")
MASTER = POSTFIX_SBIN / "master"
C_PROXYMAP = POSTFIX_SBIN / "proxymap"
POSTFIX_USER = "postfix"

# What `apt-get install` brings: the core and every dynamically loaded table type.
DEBIAN_PACKAGES = (
    "postfix",
    "postfix-lmdb",
    "postfix-pcre",
    "postfix-cdb",
    "postfix-mysql",
    "postfix-pgsql",
    "postfix-ldap",
    "postfix-sqlite",
)
TABLE_PLUGINS = ("lmdb", "pcre", "cdb", "mysql", "pgsql", "ldap", "sqlite")
SYSTEM_MASTER_PID = Path("/var/spool/postfix/pid/master.pid")

# Generous for a loaded CI machine, short enough that a hang is noticed.
CLIENT_TIMEOUT = 15.0
HANG = "HANG"

_KEEP_TREES = os.environ.get("PYPROXYMAP_KEEP_TREES") == "1"


# ---------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------


def postmap_path() -> str:
    """The real postmap(1); /usr/sbin is not on every test runner's PATH."""
    return shutil.which("postmap") or "/usr/sbin/postmap"


def missing_postfix_parts() -> list[str]:
    """Files of the Postfix installation that are absent (empty list: usable)."""
    wanted = [MASTER, C_PROXYMAP, POSTFIX_SBIN / "postlogd", Path(postmap_path())]
    wanted += [POSTFIX_LIB / f"postfix-{name}.so" for name in TABLE_PLUGINS]
    return [str(path) for path in wanted if not path.exists()]


_postfix_checked = False


def ensure_postfix() -> None:
    """Make the real Postfix usable for this test session, or skip the calling test."""
    global _postfix_checked
    if _postfix_checked:
        return
    import pytest

    missing = missing_postfix_parts()
    if missing:
        if not install_wanted():
            pytest.skip(
                f"Postfix not installed ({', '.join(missing)}); run as root with "
                "PYPROXYMAP_INSTALL=1 (or CI=true) to have the tests install it"
            )
        if os.geteuid() != 0:
            pytest.skip(f"Postfix not installed and not root: {missing}")
        if not shutil.which("apt-get"):
            pytest.skip("Postfix not installed and no apt-get to install it")
        with exclusive(PACKAGE_INSTALL_LOCK):
            # Another test process (a parallel worker) may have installed it meanwhile.
            if missing_postfix_parts():
                install_postfix()
        if missing_postfix_parts():
            pytest.fail(f"Postfix installation incomplete: {missing_postfix_parts()}")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix master must run as root")
    # A running system instance is not stopped: private instances coexist with it.
    _postfix_checked = True


def install_wanted() -> bool:
    """Whether the environment asks the tests to install packages (as CI does)."""
    return os.environ.get("CI") == "true" or os.environ.get("PYPROXYMAP_INSTALL") == "1"


def install_postfix() -> None:
    """apt-get install the Debian packages without starting the system instance."""
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = not policy.exists()
    if created_policy:
        # invoke-rc.d consults this: 101 = "action forbidden", so no daemon is started.
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(
            ["debconf-set-selections"],
            input=b"postfix postfix/main_mailer_type select Local only\n",
            env=env,
            check=False,
        )
        install = ["apt-get", *APT_WAIT_FOR_LOCK, "install", "-y", "-q", *DEBIAN_PACKAGES]
        if subprocess.run(install, env=env, check=False).returncode != 0:
            # A fresh machine has no package lists yet.
            subprocess.run(["apt-get", *APT_WAIT_FOR_LOCK, "update", "-q"], env=env, check=True)
            subprocess.run(install, env=env, check=True)
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)


def system_postfix_running() -> bool:
    """Whether the system instance runs. Nothing here ever stops it: private instances
    coexist with it, and the benchmark only notes it."""
    try:
        pid = int(SYSTEM_MASTER_PID.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return _alive(pid) and Path(f"/proc/{pid}/exe").resolve() == MASTER.resolve()


def settle_files(*paths: str | os.PathLike) -> None:
    """Back-date files (and directory contents) by a minute.

    Postfix refuses to use a table or configuration file younger than a second or two
    (it might still be being written) and sleeps until it is older; tests and the
    benchmark should not measure that sleep.
    """
    settled = time.time() - 60
    for path in map(Path, paths):
        for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.utime(item, (settled, settled), follow_symlinks=False)


# ---------------------------------------------------------------------------
# Running postmap
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PostmapResult:
    """One `postmap -q` run. exit is the exit status, or HANG after a timeout."""

    exit: int | str
    stdout: str
    stderr: str

    def outcome(self) -> tuple[str, str]:
        """The vectors.tsv notation: ("0", value) / ("1", "") / ("E", "") / ("HANG", "")."""
        if self.exit == HANG:
            return HANG, ""
        if self.exit == 0:
            return "0", self.stdout
        if "fatal:" in self.stderr:
            return "E", ""
        return "1", ""


def run_postmap(
    args: Sequence[str],
    *,
    conf_dir: str | os.PathLike | None = None,
    stdin: bytes | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> PostmapResult:
    """Run the real postmap with a timeout; stdout loses its final newline."""
    command = [postmap_path()]
    if conf_dir is not None:
        command += ["-c", str(conf_dir)]
    command += list(args)
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    try:
        done = subprocess.run(
            command,
            input=stdin if stdin is not None else b"",
            capture_output=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as expired:
        stderr = (expired.stderr or b"").decode("utf-8", "surrogateescape")
        return PostmapResult(HANG, "", stderr)
    stdout = done.stdout.decode("utf-8", "surrogateescape")
    if stdout.endswith("\n"):
        stdout = stdout[:-1]
    return PostmapResult(done.returncode, stdout, done.stderr.decode("utf-8", "surrogateescape"))


def postmap_lookup(
    key: str,
    table: str,
    *,
    conf_dir: str | os.PathLike | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> PostmapResult:
    """`postmap -q KEY TABLE` (direct, or through proxy: when TABLE says so)."""
    return run_postmap(["-q", key, table], conf_dir=conf_dir, timeout=timeout)


# ---------------------------------------------------------------------------
# Processes, seen through /proc
# ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    return _proc_state(pid) not in ("Z", "X", None)


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def proc_cmdline(pid: int) -> list[str]:
    """argv of a process as shown by ps (a setproctitle title comes back as one string)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    args = [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")]
    while args and args[-1] == "":
        args.pop()
    if len(args) == 1 and " " in args[0]:
        args = args[0].split()
    return args


def proc_ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime in clock ticks (0 when the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _proc_kib(path: str, field: str) -> int | None:
    """The kB figure of the line starting with FIELD in a /proc file; None if gone."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_rss_kib(pid: int) -> int | None:
    return _proc_kib(f"/proc/{pid}/status", "VmRSS:")


def proc_pss_kib(pid: int) -> int | None:
    """Proportional set size (shared pages divided among their users); None if gone."""
    return _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:")


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def service_name_of(argv: Sequence[str]) -> str:
    """The Postfix service a daemon serves: its -n value, else basename of the command.

    A Python worker whose title was not set shows the interpreter first; skip it.
    """
    args = list(argv)
    if args and os.path.basename(args[0]).startswith("python"):
        args = args[1:]
    if not args:
        return ""
    for index, arg in enumerate(args[1:-1], start=1):
        if arg == "-n":
            return args[index + 1]
    return os.path.basename(args[0])


# ---------------------------------------------------------------------------
# Permissions as the postfix user sees them
# ---------------------------------------------------------------------------


def paths_unreadable_by_postfix(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The paths (files or directories) that user postfix cannot read or enter."""
    paths = [str(p) for p in paths]
    if not paths:
        return []
    check = (
        'for p; do if [ -d "$p" ]; then [ -r "$p" ] && [ -x "$p" ] || echo "$p"; '
        'else [ -r "$p" ] || echo "$p"; fi; done'
    )
    done = subprocess.run(
        ["/bin/sh", "-c", check, "sh", *paths],
        user=POSTFIX_USER,
        group=POSTFIX_USER,
        extra_groups=[],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    return [line for line in done.stdout.splitlines() if line]


def python_paths_of(program: Path) -> dict[str, str]:
    """Library directories of the interpreter a Python console script runs with."""
    try:
        first_line = program.resolve().read_bytes().split(b"\n", 1)[0]
    except OSError:
        return {}
    if not first_line.startswith(b"#!"):
        return {}
    interpreter = first_line[2:].decode().split()[0]
    probe = (
        "import json, sys, sysconfig; p = sysconfig.get_paths(); "
        "print(json.dumps({'interpreter': sys.executable, 'realpath': __import__('os')."
        "path.realpath(sys.executable), 'stdlib': p['stdlib'], 'platstdlib': p['platstdlib'], "
        "'purelib': p['purelib'], 'platlib': p['platlib']}))"
    )
    done = subprocess.run([interpreter, "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {}
    import json

    return json.loads(done.stdout)


# ---------------------------------------------------------------------------
# The private instance
# ---------------------------------------------------------------------------


class PostfixPermissionError(RuntimeError):
    """Something the postfix user must read after dropping privileges is not readable."""


class PrivatePostfix:
    """A real Postfix master on a private tree; proxymap may be any executable.

    Constructor arguments (all keyword):
      proxymap_program   executable that daemon/proxymap points to (default: the C one)
      proxymap_command   master.cf command of both services (default "proxymap"); another
                         name gets its own daemon/ link to proxymap_program and the master
                         adds "-n proxymap" (the documented drop-in, docs/DROPIN.md)
      proxy_read_maps    main.cf value (string, or entries joined by spaces)
      proxy_write_maps   main.cf value
      main_cf            extra main.cf parameters (override the defaults)
      proxymap_args      extra master.cf arguments for proxymap and proxywrite
      proxymap_maxproc   master.cf process limit of the proxymap service ("-" = default)
      proxywrite_maxproc master.cf process limit of the proxywrite service (default "1")
      extra_services     extra master.cf lines
      readable_paths     files the worker must read as postfix (checked by start)
      base_dir, name     where the tree goes (default: a new dir under /tmp)

    The tree exists from construction on: put table files into ``tables`` before start.
    """

    def __init__(
        self,
        *,
        proxymap_program: str | os.PathLike | None = None,
        proxymap_command: str = "proxymap",
        proxy_read_maps: str | Iterable[str] = "",
        proxy_write_maps: str | Iterable[str] = "",
        main_cf: Mapping[str, str] | None = None,
        proxymap_args: str = "",
        proxymap_maxproc: str = "-",
        proxywrite_maxproc: str = "1",
        extra_services: Sequence[str] = (),
        readable_paths: Iterable[str | os.PathLike] = (),
        base_dir: str | os.PathLike | None = None,
        name: str = "pyproxymap-pf",
    ) -> None:
        self.proxymap_program = Path(proxymap_program or C_PROXYMAP)
        self.proxymap_command = proxymap_command
        self.proxy_read_maps = _as_value(proxy_read_maps)
        self.proxy_write_maps = _as_value(proxy_write_maps)
        self.extra_main_cf = dict(main_cf or {})
        self.proxymap_args = proxymap_args
        self.proxymap_maxproc = proxymap_maxproc
        self.proxywrite_maxproc = proxywrite_maxproc
        self.extra_services = list(extra_services)
        self.readable_paths = [Path(p) for p in readable_paths]
        self.tree = Path(tempfile.mkdtemp(prefix=name + "-", dir=base_dir))
        # Children chdir into the queue and run as postfix: the whole path must be open.
        self.tree.chmod(0o755)
        self.conf_dir = self.tree / "conf"
        self.queue_dir = self.tree / "queue"
        self.data_dir = self.tree / "data"
        self.daemon_dir = self.tree / "daemon"
        self.tables = self.tree / "tables"
        self.maillog_path = self.tree / "maillog"
        self.master_output = self.tree / "master.out"
        self.master: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.permission_warnings: list[str] = []
        self._make_tree()

    # -- construction -------------------------------------------------------

    def _make_tree(self) -> None:
        for directory in (self.conf_dir, self.daemon_dir, self.tables, self.queue_dir):
            directory.mkdir(mode=0o755)
        self.tables.chmod(0o755)
        postfix_uid, postfix_gid = _postfix_ids()
        for sub, mode in (("private", 0o700), ("public", 0o710), ("pid", 0o755)):
            path = self.queue_dir / sub
            path.mkdir()
            path.chmod(mode)
            if sub != "pid":
                os.chown(path, postfix_uid, postfix_gid)
        self.data_dir.mkdir()
        self.data_dir.chmod(0o700)
        os.chown(self.data_dir, postfix_uid, postfix_gid)
        self._link_daemons()

    def _link_daemons(self) -> None:
        for program in sorted(POSTFIX_SBIN.iterdir()):
            (self.daemon_dir / program.name).symlink_to(program)
        self.set_proxymap_program(self.proxymap_program)

    def set_proxymap_program(self, program: str | os.PathLike) -> None:
        """Point daemon/<proxymap_command> at another executable (for new processes)."""
        self.proxymap_program = Path(program)
        link = self.daemon_dir / self.proxymap_command
        link.unlink(missing_ok=True)
        link.symlink_to(self.proxymap_program)

    def main_cf_params(self) -> dict[str, str]:
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "daemon_directory": str(self.daemon_dir),
            "meta_directory": "/etc/postfix",
            "shlib_directory": str(POSTFIX_LIB),
            "mail_owner": POSTFIX_USER,
            "setgid_group": "postdrop",
            "myhostname": "pyproxymap.test",
            "inet_interfaces": "loopback-only",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.tree),
            "proxy_read_maps": self.proxy_read_maps,
            "proxy_write_maps": self.proxy_write_maps,
        }
        params.update(self.extra_main_cf)
        return params

    def master_cf_lines(self) -> list[str]:
        command = self.proxymap_command
        if self.proxymap_args:
            command += " " + self.proxymap_args
        maxproc = self.proxymap_maxproc
        return [
            f"proxymap   unix  -  -  n  -  {maxproc}  {command}",
            f"proxywrite unix  -  -  n  -  {self.proxywrite_maxproc}  {command}",
            "postlog    unix-dgram n  -  n  -  1  postlogd",
            *self.extra_services,
        ]

    def write_config(self) -> None:
        main = "".join(f"{name} = {value}\n" for name, value in self.main_cf_params().items())
        (self.conf_dir / "main.cf").write_text(main)
        (self.conf_dir / "master.cf").write_text("\n".join(self.master_cf_lines()) + "\n")
        # Postfix waits until a configuration file is a few seconds old (it might still
        # be being written); back-date ours so that start and reload are immediate.
        settle_files(self.conf_dir / "main.cf", self.conf_dir / "master.cf")

    def set_main(self, **params: str) -> None:
        """Change main.cf parameters (call reload() afterwards on a running instance)."""
        for name, value in params.items():
            if name == "proxy_read_maps":
                self.proxy_read_maps = value
            elif name == "proxy_write_maps":
                self.proxy_write_maps = value
            else:
                self.extra_main_cf[name] = value
        self.write_config()

    # -- permissions --------------------------------------------------------

    def check_permissions(self) -> None:
        """Fail clearly when postfix cannot read what its worker needs after -u."""
        required = [self.queue_dir, self.tables, *self.readable_paths]
        python = python_paths_of(self.proxymap_program)
        if python:
            required += [self.proxymap_program.resolve(), python["purelib"], python["platlib"]]
            required += _editable_sources(Path(python["purelib"]))
        blocked = paths_unreadable_by_postfix(dict.fromkeys(map(str, required)))
        if blocked:
            raise PostfixPermissionError(
                "user postfix cannot read " + ", ".join(blocked) + ". The master starts "
                "proxymap as root and the worker drops to postfix (master.cf unpriv column "
                "'-'), after which it still loads tables and lazily imported modules. Make "
                "every parent directory of these paths world-searchable (chmod o+x) and the "
                "files world-readable, or move the checkout/venv below a readable directory "
                "(e.g. /opt or /srv)."
            )
        if python:
            stdlib = [python["stdlib"], python["platstdlib"], python["realpath"]]
            blocked_stdlib = paths_unreadable_by_postfix(dict.fromkeys(stdlib))
            if blocked_stdlib:
                message = (
                    "user postfix cannot read the worker's Python installation ("
                    + ", ".join(blocked_stdlib)
                    + "): the interpreter starts as root so this works only if the worker "
                    "imports every standard module it needs before dropping privileges. "
                    "A venv for a real drop-in should be built from a system Python "
                    "(see docs/DROPIN.md)."
                )
                self.permission_warnings.append(message)
                warnings.warn(message, stacklevel=2)

    # -- life cycle ---------------------------------------------------------

    def master_command(self) -> list[str]:
        """The supervisor in the foreground on this tree (Postfix's master -d)."""
        return [str(MASTER), "-c", str(self.conf_dir), "-d"]

    def start(self, timeout: float = 20.0) -> PrivatePostfix:
        """Write the configuration, start the master and wait for the proxymap and
        proxywrite sockets (the master creates them one after the other)."""
        self.write_config()
        self.check_permissions()
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        with open(self.master_output, "ab") as output:
            self.started_at = time.monotonic()
            self.master = subprocess.Popen(
                self.master_command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                env=env,
                cwd=str(self.tree),
            )
        for service in ("proxymap", "proxywrite"):
            socket_file = self.socket_path(service)
            if not _wait_until(
                lambda path=socket_file: path.exists() or self.master.poll() is not None, timeout
            ):
                self.stop()
                raise RuntimeError(f"master did not create {socket_file}:\n{self.diagnostics()}")
        if self.master.poll() is not None:
            raise RuntimeError(
                f"master exited with {self.master.returncode}:\n{self.diagnostics()}"
            )
        return self

    def reload(self, settle: float = 0.3) -> None:
        """SIGHUP the master (as `postfix reload` does) and give it a moment to act."""
        assert self.master is not None, "not started"
        self.master.send_signal(signal.SIGHUP)
        time.sleep(settle)

    def stop(self, timeout: float = 15.0) -> list[tuple[int, list[str]]]:
        """SIGTERM the master; return (pid, argv) of instance processes that outlived it.

        Leftovers are killed after being recorded, so a failing test leaks nothing.
        """
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)
            try:
                self.master.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _wait_until(lambda: not self.instance_pids(), timeout)
        leftovers = [(pid, proc_cmdline(pid)) for pid in self.instance_pids()]
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.master is not None and self.master.poll() is None:
            self.master.kill()
            self.master.wait()
        return leftovers

    def cleanup(self) -> None:
        if not _KEEP_TREES:
            shutil.rmtree(self.tree, ignore_errors=True)

    def __enter__(self) -> PrivatePostfix:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()

    # -- observation --------------------------------------------------------

    @property
    def master_pid(self) -> int | None:
        return self.master.pid if self.master is not None else None

    def socket_path(self, service: str = "proxymap") -> Path:
        return self.queue_dir / "private" / service

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        try:
            master_out = self.master_output.read_text(errors="replace")
        except OSError:
            master_out = ""
        return f"--- master output ---\n{master_out}--- maillog ---\n{self.maillog()}"

    def log_tail(self, lines: int = 25) -> str:
        """The end of the maillog and the master's output, for assertion messages."""
        return "\n".join(self.diagnostics().splitlines()[-lines:])

    def child_pids(self) -> list[int]:
        """Live children of the master (every Postfix daemon it spawned)."""
        master = self.master_pid
        if master is None:
            return []
        return [pid for pid in all_pids() if proc_ppid(pid) == master and _alive(pid)]

    def worker_pids(self, service: str = "proxymap") -> list[int]:
        """Live children of the master that serve SERVICE (proxymap or proxywrite)."""
        return [pid for pid in self.child_pids() if service_name_of(proc_cmdline(pid)) == service]

    def instance_pids(self) -> list[int]:
        """Every live process that belongs to this instance, including orphans.

        The master and its children carry MAIL_CONFIG=<our conf> in their environment
        (children may setsid, so session ids do not tell) or run inside the tree.
        """
        marker = f"MAIL_CONFIG={self.conf_dir}".encode()
        tree = str(self.tree)
        found = []
        for pid in all_pids():
            if pid == os.getpid() or not _alive(pid):
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if marker in environ.split(b"\0") or cwd == tree or cwd.startswith(tree + "/"):
                found.append(pid)
        return found

    def wait_for_workers(self, service: str = "proxymap", timeout: float = 5.0) -> list[int]:
        _wait_until(lambda: bool(self.worker_pids(service)), timeout)
        return self.worker_pids(service)

    # -- clients ------------------------------------------------------------

    def postmap(self, args: Sequence[str], **kwargs) -> PostmapResult:
        return run_postmap(args, conf_dir=self.conf_dir, **kwargs)

    def postmap_q(
        self, key: str, table: str, timeout: float = CLIENT_TIMEOUT
    ) -> tuple[int | str, str]:
        """`postmap -c conf -q KEY TABLE`: (exit status or "HANG", stdout without newline)."""
        result = self.lookup(key, table, timeout=timeout)
        return result.exit, result.stdout

    def lookup(self, key: str, table: str, timeout: float = CLIENT_TIMEOUT) -> PostmapResult:
        """Like postmap_q, with stderr and the vectors notation (``.outcome()``)."""
        return postmap_lookup(key, table, conf_dir=self.conf_dir, timeout=timeout)

    def postmap_q_many(
        self, keys: Iterable[str], table: str, timeout: float = CLIENT_TIMEOUT
    ) -> tuple[int | str, dict[str, str]]:
        """`postmap -q - TABLE` with keys on stdin: (exit, {key: value} of found keys).

        Keys must not contain whitespace or newlines (postmap splits its input lines).
        """
        data = "".join(f"{key}\n" for key in keys).encode("utf-8", "surrogateescape")
        result = self.postmap(["-q", "-", table], stdin=data, timeout=timeout)
        found = {}
        for line in result.stdout.split("\n") if result.stdout else []:
            key, _, value = line.partition("\t")
            found[key] = value
        return result.exit, found

    def client(self, service: str = "proxymap", timeout: float = 5.0) -> ProxymapClient:
        return ProxymapClient(self.socket_path(service), timeout=timeout)

    def time_to_first_answer(self, key: str, table: str, timeout: float = 20.0) -> float:
        """Seconds from start() until a raw lookup on a fresh connection succeeds."""
        assert self.started_at is not None, "not started"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.client(timeout=timeout) as client:
                    reply = client.lookup(table, key)
                if reply.get("status") in (b"0", b"1"):
                    return time.monotonic() - self.started_at
            except OSError:
                pass
            time.sleep(0.005)
        raise TimeoutError(f"no answer for {key!r} from {table} within {timeout}s")

    def wait_until_serving(self, key: str, table: str, timeout: float = 20.0) -> None:
        """Fail fast, with the logs, when the proxymap service never answers.

        Without this, every later lookup would wait for its own client timeout.
        """
        try:
            self.time_to_first_answer(key, table, timeout=timeout)
        except TimeoutError as error:
            raise RuntimeError(
                f"{error}; the proxymap service does not answer:\n{self.log_tail(40)}"
            ) from None


def _as_value(value: str | Iterable[str]) -> str:
    return value if isinstance(value, str) else " ".join(value)


def _postfix_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(POSTFIX_USER)
    return entry.pw_uid, entry.pw_gid


def _editable_sources(purelib: Path) -> list[str]:
    """Source directories an editable install points to (.pth lines, setuptools finders)."""
    import re

    sources = []
    for hook in [*purelib.glob("*.pth"), *purelib.glob("__editable__*finder.py")]:
        try:
            text = hook.read_text()
        except OSError:
            continue
        candidates = text.splitlines() + re.findall(r"""['"](/[^'"]+)['"]""", text)
        sources += [c for c in candidates if c.startswith("/") and Path(c).is_dir()]
    return list(dict.fromkeys(sources))


# ---------------------------------------------------------------------------
# Raw protocol client
# ---------------------------------------------------------------------------

# The flags `postmap -q` sends with a lookup: UTF8_REQUEST | LOCK | DUP_WARN.
POSTMAP_LOOKUP_FLAGS = 0x80000 | 0x40 | 0x1


class ProxymapClient:
    """A blocking proxymap protocol client (attribute-0 encoding), one connection.

    Replies are dicts of attribute name -> bytes value. ``instance_flags`` given means a
    3.11+ (G2) request; None means the 3.7 (G1) form.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.announcement = self.read_reply()

    def __enter__(self) -> ProxymapClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _read_string(self) -> bytes:
        while b"\0" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buffer += chunk
        text, _, self.buffer = self.buffer.partition(b"\0")
        return text

    def read_reply(self) -> dict[str, bytes]:
        reply: dict[str, bytes] = {}
        while name := self._read_string():
            reply[name.decode("ascii", "replace")] = self._read_string()
        return reply

    def send(self, *attributes: tuple[str, str | bytes | int]) -> None:
        frame = b""
        for name, value in attributes:
            if isinstance(value, int):
                value = str(value)
            if isinstance(value, str):
                value = value.encode("utf-8", "surrogateescape")
            frame += name.encode() + b"\0" + value + b"\0"
        self.sock.sendall(frame + b"\0")

    def request(self, *attributes: tuple[str, str | bytes | int]) -> dict[str, bytes]:
        self.send(*attributes)
        return self.read_reply()

    @staticmethod
    def _head(op: str, table: str, instance_flags: int | None) -> list[tuple[str, str | int]]:
        head: list[tuple[str, str | int]] = [("request", op), ("table", table)]
        if instance_flags is not None:
            head.append(("instance_flags", instance_flags))
        return head

    def open(self, table: str, flags: int = 0, instance_flags: int | None = None) -> dict:
        if instance_flags is not None:
            return self.request(*self._head("open", table, instance_flags))
        return self.request(("request", "open"), ("table", table), ("flags", flags))

    def lookup(
        self,
        table: str,
        key: str | bytes,
        flags: int = POSTMAP_LOOKUP_FLAGS,
        instance_flags: int | None = None,
    ) -> dict[str, bytes]:
        return self.request(
            *self._head("lookup", table, instance_flags), ("flags", flags), ("key", key)
        )

    def update(
        self,
        table: str,
        key: str | bytes,
        value: str | bytes,
        flags: int = 0x40,
        instance_flags: int | None = None,
    ) -> dict[str, bytes]:
        return self.request(
            *self._head("update", table, instance_flags),
            ("flags", flags),
            ("key", key),
            ("value", value),
        )

    def delete(
        self, table: str, key: str | bytes, flags: int = 0x40, instance_flags: int | None = None
    ) -> dict[str, bytes]:
        return self.request(
            *self._head("delete", table, instance_flags), ("flags", flags), ("key", key)
        )

    def sequence(
        self, table: str, function: int, flags: int = 0x40, instance_flags: int | None = None
    ) -> dict[str, bytes]:
        return self.request(
            *self._head("sequence", table, instance_flags),
            ("flags", flags),
            ("function", function),
        )
