"""The multi-server skeleton, as a child of a stand-in master.

Each test starts ``tests.support.echo_service`` with the descriptors the real master
passes (fd 5 status socket, fd 6 listen socket) and checks the behaviour of
``docs/PROTOCOL.md`` sections 4.1-4.8 from the outside: status bytes,
exit conditions, timers, options, logging and the process title.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest

from master import log as postfix_log
from master import multi_server
from master.status import (
    STATUS_AVAIL,
    STATUS_SIZE,
    STATUS_TAKEN,
    StatusChannel,
    pack_status,
    parse_generation,
    unpack_status,
)
from tests.support.echo_service import ask
from tests.support.standin_master import REPO_ROOT, StandinMaster, python_module

ECHO = "tests.support.echo_service"
# The core behaviour is checked with both event loops the skeleton can use.
EVENT_LOOPS = pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])


@pytest.fixture
def conf(tmp_path) -> Path:
    """A config dir whose queue_directory is a private directory."""
    config_dir = tmp_path / "conf"
    queue_dir = tmp_path / "queue"
    config_dir.mkdir()
    queue_dir.mkdir()
    (config_dir / "main.cf").write_text(
        f"queue_directory = {queue_dir}\necho_from_main_cf = main.cf value\n"
    )
    # Postfix daemons re-read (after a 1 s pause) a main.cf modified within the last second.
    past = time.time() - 10
    os.utime(config_dir / "main.cf", (past, past))
    return config_dir


def echo(*args: str) -> list[str]:
    return python_module(ECHO, *args)


def child_env(**extra: str) -> dict[str, str]:
    # The child must find this repository; the real master passes no PATH either.
    return {"PYTHONPATH": str(REPO_ROOT), **extra}


def wait_gone(master: StandinMaster, timeout: float) -> float:
    """Seconds until the child exited (asserting exit status 0)."""
    started = time.monotonic()
    assert master.wait(timeout) == 0, master.output()
    return time.monotonic() - started


@EVENT_LOOPS
def test_status_messages_per_request(conf, event_loop):
    generation = 0o123
    with StandinMaster(
        echo("-t", "unix"),
        env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop),
        config_dir=conf,
        generation=generation,
    ) as m:
        client = m.connect()
        pid = m.pid
        expected = [
            struct.pack("<iIi", pid, 83, STATUS_TAKEN),
            struct.pack("<iIi", pid, 83, STATUS_AVAIL),
        ]
        # A request that finds the process idle: TAKEN, then AVAIL once it is idle again.
        for line in ("hello", "again"):
            assert ask(client, line) == line
            assert [struct.pack("=iIi", *m.read_status()) for _ in range(2)] == expected
        # Nothing at accept or at disconnect: status is per request only.
        m.connect().close()
        client.close()
        assert m.expect_no_status(0.3)


@EVENT_LOOPS
def test_busy_process_stays_taken_and_ends_avail(conf, event_loop):
    """Clients that keep the loop busy cost fewer messages than requests; once the
    work stops the master hears AVAIL (never left believing an idle process busy)."""
    with StandinMaster(
        echo("-t", "unix"), env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop), config_dir=conf
    ) as m:
        clients = [m.connect() for _ in range(8)]
        rounds = 200
        for _ in range(rounds):
            for client in clients:
                client.sendall(b"x\n")
            for client in clients:
                data = b""
                while not data.endswith(b"\n"):
                    data += client.recv(4096)
        messages = []
        while True:
            try:
                messages.append(m.read_status(timeout=0.5).avail)
            except TimeoutError:
                break
        assert messages and messages[-1] == STATUS_AVAIL
        assert messages == [STATUS_TAKEN, STATUS_AVAIL] * (len(messages) // 2)
        assert len(messages) < 2 * rounds * len(clients)
        for client in clients:
            client.close()


@EVENT_LOOPS
def test_worker_with_clients_still_accepts_alone(conf, event_loop):
    """A worker with clients lets idle siblings accept first, but without siblings
    every client of a burst is still accepted (after a few milliseconds at most)."""
    with StandinMaster(
        echo("-t", "unix"), env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop), config_dir=conf
    ) as m:
        started = time.monotonic()
        clients = [m.connect() for _ in range(40)]
        for number, client in enumerate(clients):
            assert ask(client, f"client {number}") == f"client {number}"
        assert time.monotonic() - started < 2
        for client in clients:
            client.close()


@EVENT_LOOPS
def test_max_use_counts_closed_connections(conf, event_loop):
    with StandinMaster(
        echo("-t", "unix", "-o", "max_use=3"),
        env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop),
        config_dir=conf,
    ) as m:
        for number in range(1, 4):
            client = m.connect()
            assert ask(client, f"a{number}") == f"a{number}"
            assert ask(client, f"b{number}") == f"b{number}"
            if number < 3:
                client.close()
                time.sleep(0.2)
                assert m.alive(), f"exited after connection {number}"
        # Still serving while the third connection is open ...
        time.sleep(0.2)
        assert m.alive()
        client.close()
        # ... and gone right after it closed.
        assert wait_gone(m, 5) < 1.0


def test_max_use_waits_for_open_connections(conf):
    with StandinMaster(echo("-t", "unix", "-m", "1"), env=child_env(), config_dir=conf) as m:
        first, second = m.connect(), m.connect()
        assert ask(first, "x") == "x" and ask(second, "y") == "y"
        first.close()
        time.sleep(0.3)
        assert m.alive(), "exited with a connection still open"
        second.close()
        wait_gone(m, 5)


def test_max_idle_without_clients(conf):
    started = time.monotonic()
    with StandinMaster(
        echo("-t", "unix", "-o", "max_idle=1"), env=child_env(), config_dir=conf
    ) as m:
        m.wait(10)
        elapsed = time.monotonic() - started
        assert m.child.returncode == 0
        # Start-up of the interpreter counts too; the timer itself is 1 s.
        assert 1.0 <= elapsed < 4.0


@EVENT_LOOPS
def test_max_idle_does_not_run_while_a_client_is_connected(conf, event_loop):
    with StandinMaster(
        echo("-t", "unix", "-i", "1"),
        env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop),
        config_dir=conf,
    ) as m:
        client = m.connect()
        assert ask(client, "ready") == "ready"
        time.sleep(2.0)
        assert m.alive(), "idle timer fired while a (silent) client was connected"
        client.close()
        assert 0.8 <= wait_gone(m, 5) < 2.0


@EVENT_LOOPS
def test_master_end_closed_exits_with_client_connected(conf, event_loop):
    with StandinMaster(
        echo("-t", "unix"), env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop), config_dir=conf
    ) as m:
        client = m.connect()
        assert ask(client, "hi") == "hi"
        m.close_status()
        assert wait_gone(m, 5) < 0.5
        assert client.recv(10) == b""


@EVENT_LOOPS
def test_pre_accept_exit_leaves_connection_in_backlog(conf, event_loop):
    argv = echo("-t", "unix", "-o", "echo_exit_before_accept=yes")
    with StandinMaster(argv, env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop), config_dir=conf) as m:
        time.sleep(0.5)  # let the child reach its event loop
        client = m.connect()
        client.sendall(b"pending\n")
        wait_gone(m, 5)
        pending = m.accept_pending()
        assert pending is not None, "the child accepted the connection"
        pending.settimeout(2)
        assert pending.recv(100) == b"pending\n"
        pending.close()


def test_post_accept_hook_and_overrides(conf):
    argv = echo(
        "-t",
        "unix",
        "-n",
        "renamed",
        "-o",
        "echo_greeting=hello $service_name",
        "-o",
        "max_use = 7",
        "-m",
        "9",
        "-o",
        "syslog_name=postfix/$service_name",
    )
    with StandinMaster(argv, env=child_env(), config_dir=conf) as m:
        client = m.connect()
        assert client.recv(100) == b"hello renamed\n"
        assert ask(client, "?max_use") == "9"
        assert ask(client, "?echo_from_main_cf") == "main.cf value"
        assert ask(client, "?syslog_name") == "postfix/renamed"
        assert ask(client, "?process_name") == "echo_service"
        assert ask(client, "?config_directory") == str(conf)
        assert ask(client, "@service") == "renamed"


def test_process_title(conf):
    argv = (
        echo("-t", "unix", "-u", "-o", "max_idle=50")
        if os.geteuid() == 0
        else echo("-t", "unix", "-o", "max_idle=50")
    )
    with StandinMaster(argv, env=child_env(), config_dir=conf) as m:
        client = m.connect()
        assert ask(client, "x") == "x"
        title = Path(f"/proc/{m.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert title == " ".join(["echo_service", *argv[3:]])


def test_without_status_fd(conf):
    with StandinMaster(
        echo("-t", "unix", "-o", "max_use=1"), env=child_env(), config_dir=conf, status_fd=False
    ) as m:
        client = m.connect()
        assert ask(client, "works") == "works"
        client.close()
        wait_gone(m, 5)


def test_uvloop_by_default_asyncio_on_request(conf):
    pytest.importorskip("uvloop")
    env = child_env(PYPROXYMAP_EVENT_LOOP="uvloop")
    with StandinMaster(echo("-t", "unix"), env=env, config_dir=conf) as m:
        assert ask(m.connect(), "@loop") == "uvloop"
    with StandinMaster(echo("-t", "unix"), env=child_env(), config_dir=conf) as m:
        assert ask(m.connect(), "@loop") == "uvloop"
    env = child_env(PYPROXYMAP_EVENT_LOOP="asyncio")
    with StandinMaster(echo("-t", "unix"), env=env, config_dir=conf) as m:
        assert ask(m.connect(), "@loop").startswith("asyncio")
    argv = echo("-t", "unix", "-o", "pyproxymap_event_loop=asyncio")
    with StandinMaster(argv, env=child_env(), config_dir=conf) as m:
        assert ask(m.connect(), "@loop").startswith("asyncio")


def run_echo(args: list[str], conf: Path, stdin: bytes = b"", **env: str):
    return subprocess.run(
        echo(*args),
        input=stdin,
        capture_output=True,
        timeout=20,
        env={"MAIL_CONFIG": str(conf), **child_env(**env)},
        cwd=REPO_ROOT,
    )


def test_standalone_mode(conf):
    done = run_echo(["-S", "-o", "echo_greeting=never sent"], conf, stdin=b"one\n?echo_greeting\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"one\nnever sent\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-V", "-x"], "fatal: invalid option: x"),
        (["-V", "-t"], "fatal: invalid option: t"),
        (["-V", "-t", "foo"], "fatal: unsupported transport type: foo"),
        (["-V"], "fatal: no transport type specified"),
        (["-V", "-s", "0", "-t", "unix"], "fatal: invalid socket_count: 0"),
        (
            ["-V", "-o", "bad", "-t", "unix"],
            "fatal: invalid \"-o bad\" option value: missing '=' after attribute name",
        ),
        (["-V", "-t", "unix", "-i", "5x"], "fatal: parameter max_idle: bad time value or unit: 5x"),
        (["-V", "-t", "unix", "-m", "x"], "fatal: bad numerical configuration: max_use = x"),
    ],
)
def test_command_line_errors(conf, args, message):
    done = run_echo(args, conf)
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [f"postfix/echo_service: {message}"]


def test_error_without_V_is_not_on_stderr(conf):
    done = run_echo(["-x"], conf)
    assert done.returncode == 1 and done.stderr == b""


def test_bad_generation(conf):
    done = run_echo(["-V", "-t", "unix"], conf, GENERATION="9x")
    assert done.returncode == 1
    assert done.stderr.decode().strip() == "postfix/echo_service: fatal: bad generation: 9x"
    assert parse_generation("31") == 25 and parse_generation(None) == 0


def test_refuses_a_terminal_on_stdin_unless_d(conf):
    terminal, peer = os.openpty()
    try:
        done = subprocess.run(
            echo("-V", "-t", "unix"),
            stdin=peer,
            capture_output=True,
            timeout=20,
            env={"MAIL_CONFIG": str(conf), **child_env()},
            cwd=REPO_ROOT,
        )
        assert done.returncode == 1
        assert b"fatal: do not run this command by hand" in done.stderr
        # With -d it gets past the check (and then needs a listen socket).
        done = subprocess.run(
            echo("-V", "-d", "-t", "unix"),
            stdin=peer,
            capture_output=True,
            timeout=20,
            env={"MAIL_CONFIG": str(conf), **child_env()},
            cwd=REPO_ROOT,
        )
        assert b"do not run this command by hand" not in done.stderr
        assert b"listen socket fd 6" in done.stderr
    finally:
        os.close(terminal)
        os.close(peer)


def test_logs_to_postlog_socket(conf, tmp_path):
    postlog = tmp_path / "postlog"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(postlog))
    receiver.settimeout(5)
    env = child_env(POSTLOG_SERVICE=str(postlog), POSTLOG_HOSTNAME="vm.example.org")
    argv = echo("-t", "unix", "-o", f"maillog_file={tmp_path}/maillog", "-o", "syslog_name=pm37")
    try:
        with StandinMaster(argv, env=env, config_dir=conf) as m:
            assert ask(m.connect(), "!request for unapproved table") == "logged"
            record = receiver.recv(4096).decode()
            pid = m.pid
    finally:
        receiver.close()
    pattern = (
        r"[A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d vm "
        rf"pm37/echo_service\[{pid}\]: warning: request for unapproved table"
    )
    assert re.fullmatch(pattern, record), record


def test_logs_to_stderr_with_V(conf):
    argv = echo("-V", "-t", "unix", "-o", "syslog_name=pm37")
    with StandinMaster(argv, env=child_env(), config_dir=conf) as m:
        assert ask(m.connect(), "!careful") == "logged"
        m.close_status()
        m.wait(5)
        assert m.output()[1].decode().splitlines() == ["pm37/echo_service: warning: careful"]


def _postfix_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("postfix")
    except KeyError:
        return None


@pytest.mark.parametrize("chroot", [False, True], ids=["-u", "-u -c"])
def test_privilege_drop(conf, tmp_path, chroot):
    if os.geteuid() != 0:
        pytest.skip("privilege drop needs root")
    user = _postfix_user()
    if user is None:
        from tests.support.postfix import ensure_postfix

        ensure_postfix()
        user = _postfix_user()
    queue_dir = tmp_path / "queue"
    os.chmod(tmp_path, 0o755)
    args = ["-t", "unix", "-u", "-o", "mail_owner=postfix"] + (["-c"] if chroot else [])
    with StandinMaster(echo(*args), env=child_env(), config_dir=conf) as m:
        client = m.connect()
        uid, gid, cwd = ask(client, "@ids").split()
        assert (int(uid), int(gid)) == (user.pw_uid, user.pw_gid)
        assert cwd == ("/" if chroot else str(queue_dir))
        assert os.readlink(f"/proc/{m.pid}/root") == (str(queue_dir) if chroot else "/")
        assert ask(client, "still serving") == "still serving"


def test_generation_is_octal_in_status(conf):
    with StandinMaster(echo("-t", "unix"), env=child_env(), config_dir=conf, generation=0o31) as m:
        assert ask(m.connect(), "x") == "x"
        message = m.read_status()
        assert (message.pid, message.generation, message.avail) == (m.pid, 25, STATUS_TAKEN)


if sys.platform != "linux":  # /proc, SO_PEERCRED-free UNIX sockets, setproctitle
    pytestmark = pytest.mark.skip("Linux only")


@pytest.mark.postfix
@pytest.mark.slow
def test_under_the_real_postfix_master():
    """Spawned by Postfix's own master(8): served, logged, replaced after a reload."""
    from tests.support.postfix import PrivatePostfix, ensure_postfix, proc_cmdline

    ensure_postfix()
    # Not below pytest's tmp_path: that is private to root, and the workers run as postfix.
    wrapper_dir = Path(tempfile.mkdtemp(prefix="skel-echo-"))
    wrapper_dir.chmod(0o755)
    wrapper = wrapper_dir / "echo_service"
    wrapper.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from tests.support.echo_service import main\nmain()\n"
    )
    wrapper.chmod(0o755)
    try:
        with warnings.catch_warnings():
            # About an unreadable interpreter: harmless, the echo imports all up front.
            warnings.simplefilter("ignore", UserWarning)
            with PrivatePostfix(proxymap_program=wrapper) as pf:
                worker, maillog = _serve_reload_and_serve(pf, proc_cmdline)
    finally:
        shutil.rmtree(wrapper_dir, ignore_errors=True)
    assert re.search(rf"postfix/proxymap\[{worker}\]: warning: from the child$", maillog, re.M)
    problems = [
        line for line in maillog.splitlines() if "postfix/master" in line and "warning" in line
    ]
    assert problems == []


def _serve_reload_and_serve(pf, proc_cmdline) -> tuple[int, str]:
    path = str(pf.socket_path("proxymap"))
    old = socket.socket(socket.AF_UNIX)
    old.settimeout(5)
    old.connect(path)
    assert ask(old, "@service") == "proxymap"
    assert ask(old, "!from the child") == "logged"
    [worker] = pf.worker_pids("proxymap")
    assert proc_cmdline(worker) == ["proxymap", "-t", "unix", "-d", "-u"]
    pf.reload()
    # The reload closes the old status socket: the old child exits, dropping its client.
    assert old.recv(10) == b""
    new = socket.socket(socket.AF_UNIX)
    new.settimeout(5)
    new.connect(path)
    assert ask(new, "after reload") == "after reload"
    assert worker not in pf.worker_pids("proxymap")
    time.sleep(0.3)  # let postlogd write the last records
    return worker, pf.maillog()


@EVENT_LOOPS
def test_ipc_timeout_drops_a_client_that_stops_reading(conf, event_loop):
    argv = echo("-t", "unix", "-o", "ipc_timeout=1", "-o", "max_use=1")
    env = child_env(PYPROXYMAP_EVENT_LOOP=event_loop)
    with StandinMaster(argv, env=env, config_dir=conf) as m:
        client = m.connect()
        assert ask(client, "ready") == "ready"
        # Far more answers than the socket buffers hold, and never read them.
        client.setblocking(False)
        payload = b"x" * 1000 + b"\n"
        deadline = time.monotonic() + 5
        sent = 0
        while sent < 8_000_000 and time.monotonic() < deadline:
            try:
                sent += client.send(payload)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        # The stalled connection is aborted after ipc_timeout; max_use=1 then ends it.
        assert m.wait(10) == 0
        client.close()


@EVENT_LOOPS
def test_ipc_timeout_drops_a_client_stalled_in_a_request(conf, event_loop):
    argv = echo("-t", "unix", "-o", "ipc_timeout=1", "-o", "max_use=1")
    env = child_env(PYPROXYMAP_EVENT_LOOP=event_loop)
    with StandinMaster(argv, env=env, config_dir=conf) as m:
        client = m.connect()
        client.sendall(b"no end of line")
        started = time.monotonic()
        assert m.wait(10) == 0
        assert 0.8 < time.monotonic() - started < 3.0
        assert client.recv(10) == b""


# -- logging, in process -------------------------------------------------------


@pytest.fixture
def datagram_receiver(tmp_path):
    path = tmp_path / "log-socket"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2)
    yield path, receiver
    receiver.close()


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("proxymap", level, __file__, 1, message, (), None)


def test_postlog_record_format_and_limit(datagram_receiver):
    path, receiver = datagram_receiver
    handler = postfix_log.PostlogHandler(str(path), "pm37/proxymap", "vm.example.org")
    handler.setFormatter(postfix_log.PostfixFormatter())
    try:
        for level, text in [
            (logging.INFO, "table x has changed -- restarting"),
            (logging.WARNING, "w"),
            (logging.ERROR, "e"),
            (postfix_log.FATAL, "f"),
            (postfix_log.PANIC, "p"),
            (logging.WARNING, "y" * 3000),
        ]:
            handler.emit(_record(level, text))
        records = [receiver.recv(8192).decode() for _ in range(6)]
    finally:
        handler.close()
    head = rf"[A-Z][a-z]{{2}} \d\d \d\d:\d\d:\d\d vm pm37/proxymap\[{os.getpid()}\]: "
    tails = [
        "table x has changed -- restarting",
        "warning: w",
        "error: e",
        "fatal: f",
        "panic: p",
        "warning: " + "y" * (2000 - len("warning: ")),
    ]
    for record, tail in zip(records, tails, strict=True):
        assert re.fullmatch(head + re.escape(tail), record), record


def test_syslog_record_format(datagram_receiver):
    path, receiver = datagram_receiver
    handler = postfix_log.SyslogHandler("postfix/proxymap", facility=2, path=str(path))
    handler.setFormatter(postfix_log.PostfixFormatter())
    try:
        handler.emit(_record(logging.WARNING, "careful"))
        handler.emit(_record(logging.INFO, "fyi"))
        warning, info = receiver.recv(4096).decode(), receiver.recv(4096).decode()
    finally:
        handler.close()
    stamp = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"
    assert re.fullmatch(
        rf"<20>{stamp} postfix/proxymap\[{os.getpid()}\]: warning: careful", warning
    ), warning
    assert re.fullmatch(rf"<22>{stamp} postfix/proxymap\[{os.getpid()}\]: fyi", info), info


def test_postlog_socket_missing_then_appearing(tmp_path):
    path = tmp_path / "late"
    handler = postfix_log.PostlogHandler(str(path), "postfix/x", "h")
    handler.setFormatter(postfix_log.PostfixFormatter())
    handler.emit(_record(logging.WARNING, "dropped"))  # nobody listens: no error
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2)
    try:
        handler.emit(_record(logging.WARNING, "delivered"))
        assert receiver.recv(4096).endswith(b"postfix/x[%d]: warning: delivered" % os.getpid())
    finally:
        handler.close()
        receiver.close()


# -- status channel ---------------------------------------------------------------


@EVENT_LOOPS
def test_status_fd_stays_blocking(conf, event_loop):
    env = child_env(PYPROXYMAP_EVENT_LOOP=event_loop)
    with StandinMaster(echo("-t", "unix"), env=env, config_dir=conf) as m:
        assert ask(m.connect(), "x") == "x"
        flags = Path(f"/proc/{m.pid}/fdinfo/5").read_text().split("flags:")[1].split()[0]
        assert int(flags, 8) & os.O_NONBLOCK == 0


def test_status_write_waits_for_a_slow_master():
    master_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child_end.setblocking(False)
        channel = StatusChannel(child_end.fileno(), 7)
        sent = 0
        while True:  # fill the socket buffer, as a master that stopped reading would
            try:
                os.write(child_end.fileno(), pack_status(1, 7, STATUS_TAKEN))
                sent += 1
            except BlockingIOError:
                break
        drained: list[bytes] = []

        def drain_later() -> None:
            time.sleep(0.2)
            while len(b"".join(drained)) < (sent + 1) * STATUS_SIZE:
                drained.append(master_end.recv(65536))

        reader = threading.Thread(target=drain_later)
        reader.start()
        assert channel.available() is True
        reader.join(5)
        data = b"".join(drained)
        assert unpack_status(data[-STATUS_SIZE:]) == (os.getpid(), 7, STATUS_AVAIL)
        master_end.close()
        assert channel.available() is False  # master gone: the caller exits 0
    finally:
        child_end.close()
        master_end.close()


# -- the stand-in master with the real Postfix daemon ----------------------------------

C_PROXYMAP = Path("/usr/lib/postfix/sbin/proxymap")
# A G1 (3.7) lookup for a table nobody approved: answered at once with a status.
UNAPPROVED_LOOKUP = b"request\0lookup\0table\0hash:/nowhere/x\0flags\0524353\0key\0alice\0\0"


def _c_proxymap() -> str:
    if not C_PROXYMAP.exists():
        from tests.support.postfix import ensure_postfix

        ensure_postfix()
    return str(C_PROXYMAP)


def _read_reply(client: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\0\0"):
        chunk = client.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.postfix
def test_standin_master_drives_the_c_proxymap_like_the_echo(conf):
    """The same life cycle from Postfix's own multi_server: the stand-in is faithful."""
    program = _c_proxymap()
    with StandinMaster([program, "-t", "unix"], config_dir=conf, generation=0o31) as m:
        client = m.connect()
        announcement = _read_reply(client)
        assert announcement.startswith(b"protocol\0")
        client.sendall(UNAPPROVED_LOOKUP)
        assert _read_reply(client).startswith(b"status\0")
        assert [tuple(m.read_status()) for _ in range(2)] == [
            (m.pid, 25, STATUS_TAKEN),
            (m.pid, 25, STATUS_AVAIL),
        ]
        m.close_status()
        assert wait_gone(m, 5) < 0.5
    with StandinMaster([program, "-t", "unix", "-o", "max_idle=1"], config_dir=conf) as m:
        client = m.connect()
        _read_reply(client)
        time.sleep(1.5)
        assert m.alive(), "the C daemon ran its idle timer with a client connected"
        client.close()
        assert 0.8 <= wait_gone(m, 5) < 2.0
    with StandinMaster([program, "-t", "unix", "-o", "max_use=2"], config_dir=conf) as m:
        for _ in range(2):
            client = m.connect()
            _read_reply(client)
            client.close()
        wait_gone(m, 5)


def test_a_status_message_cut_short_is_finished_not_resent(monkeypatch):
    """A write that sends part of a message and then finds the descriptor full must send
    only the rest: resending it whole would make the master read a pid as a generation."""
    import master.status as status_module

    read_end, write_end = os.pipe()
    calls = []
    real_write = os.write

    def first_part_then_full(fd, data):
        calls.append(bytes(data))
        if len(calls) == 1:
            return real_write(fd, data[:5])  # a partial write...
        if len(calls) == 2:
            raise BlockingIOError  # ...then the descriptor is full
        return real_write(fd, data)

    monkeypatch.setattr(status_module.os, "write", first_part_then_full)
    channel = StatusChannel(write_end, 0o17)
    try:
        assert channel.taken()
        received = os.read(read_end, 100)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert received == status_module.pack_status(os.getpid(), 0o17, 0)
    assert len(received) == 12


def test_a_use_is_taken_and_avail_in_one_write():
    """Work the master need not act on: both messages arrive together, in Postfix's
    order, so a master never reads TAKEN alone; a master gone reads as False."""
    master_end, child_end = socket.socketpair()
    channel = StatusChannel(child_end.fileno(), 0o17)
    try:
        assert channel.used()
        received = master_end.recv(100)
        master_end.close()
        assert not channel.used()
    finally:
        child_end.close()
    assert [unpack_status(received[i : i + STATUS_SIZE]) for i in (0, STATUS_SIZE)] == [
        (os.getpid(), 0o17, STATUS_TAKEN),
        (os.getpid(), 0o17, STATUS_AVAIL),
    ]


def _switches_and_cpu(pid: int) -> tuple[int, float]:
    """Voluntary context switches (times the process slept) and CPU seconds so far."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    with open(f"/proc/{pid}/stat") as stat:
        ticks = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
    return int(fields["voluntary_ctxt_switches"]), cpu


def _sleeps_per_request(m: StandinMaster, client: socket.socket, requests: int) -> float:
    """A client that thinks 1 ms before each request (the worker's loop is idle)."""
    before, _ = _switches_and_cpu(m.pid)
    for _ in range(requests):
        time.sleep(0.001)
        assert ask(client, "x") == "x"
    after, _ = _switches_and_cpu(m.pid)
    return (after - before) / requests


@EVENT_LOOPS
@pytest.mark.parametrize("window_us", [0, 200_000])
def test_an_idle_loop_polls_for_a_client_that_asks_again_soon(conf, event_loop, window_us):
    """With a poll window (here 0.2 s, robust on a loaded host) a worker whose client
    asks again soon never sleeps between requests; without one it sleeps before each.
    And a worker left without requests stops polling after one window."""
    with (conf / "main.cf").open("a") as main_cf:
        main_cf.write(f"pyproxymap_poll_window = {window_us}\n")
    past = time.time() - 10
    os.utime(conf / "main.cf", (past, past))
    with StandinMaster(
        echo("-t", "unix"), env=child_env(PYPROXYMAP_EVENT_LOOP=event_loop), config_dir=conf
    ) as m:
        client = m.connect()
        ask(client, "warm-up")
        sleeps = _sleeps_per_request(m, client, 300)
        if window_us:
            assert sleeps < 0.2
        else:
            assert sleeps > 0.6
        time.sleep(0.3)  # past the window: polling has stopped
        _, cpu_before = _switches_and_cpu(m.pid)
        time.sleep(1.0)
        _, cpu_after = _switches_and_cpu(m.pid)
        assert cpu_after - cpu_before < 0.05  # asleep, not polling
        client.close()


class Clocks:
    """Stands in for the time module in master.multi_server: wall and CPU time as set."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.cpu = 5.0

    def monotonic(self) -> float:
        return self.now

    def thread_time(self) -> float:
        return self.cpu

    def spend(self, seconds: float, cpu_share: float) -> None:
        self.now += seconds
        self.cpu += seconds * cpu_share


class Backends:
    name = "echo"
    waiting = False

    def waiting_for_backends(self, _server) -> bool:
        return self.waiting


@pytest.mark.parametrize(
    "cpu_share, backends_waiting, saturated",
    [
        (1.0, False, True),  # the loop works all the time: a sibling helps
        (0.95, False, True),
        (0.5, False, False),  # half of it waiting for backends with room
        (0.5, True, True),  # ... that are at their bound
        (0.0, True, True),
    ],
)
def test_saturation_is_cpu_time_or_a_backend_at_its_bound(
    monkeypatch, cpu_share, backends_waiting, saturated
):
    """The rule of _saturated, on clocks the test sets: after an idle second, 0.3 s
    of one busy spell (its moving average past 0.9) in which the loop's thread got
    CPU_SHARE of the time, with or without a lookup waiting for a backend at its
    bound. The idle second, without CPU time, does not dilute the share."""
    clocks = Clocks()
    monkeypatch.setattr(multi_server, "time", clocks)
    service = Backends()
    server = multi_server.MultiServer(service, ["echo"])  # type: ignore[arg-type]
    assert not server._saturated()  # idle
    clocks.spend(1.0, 0.0)
    server.request_started()
    clocks.spend(0.3, cpu_share)
    service.waiting = backends_waiting
    assert server._saturated() is saturated
    if not backends_waiting:  # a young spell is never saturated by the CPU alone
        young = multi_server.MultiServer(service, ["echo"])  # type: ignore[arg-type]
        young.request_started()
        clocks.spend(0.02, 1.0)
        assert not young._saturated()
