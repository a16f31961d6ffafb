"""Our master (proxymap-master) running real children: the C proxymap and a tiny test child.

Every test starts the real ``proxymap-master`` command on a private tree under /tmp and
looks at it from outside: ``postmap`` through the sockets, ``/proc``, the control socket
(``status --json``), the log on stderr. Nothing of the master is mocked.

The test child ``holder`` speaks the master protocol in a few lines: it takes the
inherited listen socket (fd 6), reports TAKEN on fd 5 when it accepts a connection and
AVAIL when that client leaves, echoes what it gets, and exits 0 when fd 5 becomes
readable (master gone or reloaded). ``holder crash`` exits 1 at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from master.control import control_path, query
from tests.support.postfix import (
    C_PROXYMAP,
    PostmapResult,
    ensure_postfix,
    postmap_path,
    run_postmap,
)

VENV_BIN = Path(sys.executable).parent
MASTER_COMMAND = str(VENV_BIN / "proxymap-master")

HOLDER = f"""#!{sys.executable}
import os, select, signal, socket, struct, sys
if sys.argv[-1] == "crash":
    sys.exit(1)
if sys.argv[-1] == "stubborn":  # ignores SIGTERM and the master's going away
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mine, kept = socket.socketpair()  # fd 5 becomes a socket that never ends
    os.dup2(mine.fileno(), 5)
generation = int(os.environ["GENERATION"], 8)
listener = socket.socket(fileno=6)

def report(avail):
    try:
        os.write(5, struct.pack("=iIi", os.getpid(), generation, avail))
    except OSError:
        sys.exit(0)

while True:
    ready, _, _ = select.select([5, 6], [], [])
    if 5 in ready:
        sys.exit(0)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        continue
    conn.setblocking(True)
    report(0)
    while True:
        ready, _, _ = select.select([conn, 5], [], [])
        if 5 in ready:
            sys.exit(0)
        data = conn.recv(4096)
        if not data:
            break
        conn.sendall(data)
    conn.close()
    report(1)
"""

ALIASES = "alice alice@example.com\nbob bob@example.com\n"


def require_root_and_postfix() -> None:
    if os.geteuid() != 0:
        pytest.skip("the master tests run children as mail_owner: need root")
    ensure_postfix()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Instance:
    """A private tree and our master running on it (foreground, own session)."""

    def __init__(self, master_cf: str, main_cf: str = "", env: dict | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="arbiter-", dir="/tmp"))
        self.root.chmod(0o755)
        self.conf = self.root / "conf"
        self.daemon = self.root / "daemon"
        self.tables = self.root / "tables"
        for directory in (self.conf, self.daemon, self.tables):
            directory.mkdir()
        (self.daemon / "proxymap").symlink_to(C_PROXYMAP)
        holder = self.daemon / "holder"
        holder.write_text(HOLDER)
        holder.chmod(0o755)
        (self.tables / "aliases").write_text(ALIASES)
        self.backdate(self.tables / "aliases")
        self.table = f"texthash:{self.tables}/aliases"
        self.write_main_cf(main_cf)
        self.write_master_cf(master_cf)
        self.log_path = self.root / "master.log"
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def daemon_path(self) -> str:
        """$daemon_directory as the master expands it (and prints it in warnings)."""
        return f"{self.conf}/../daemon"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @staticmethod
    def backdate(path: Path) -> None:
        """Postfix waits for files modified in the last seconds to settle: age them."""
        then = time.time() - 60
        os.utime(path, (then, then))

    def write_main_cf(self, extra: str) -> None:
        self._write_main_cf(extra)
        self.backdate(self.conf / "main.cf")

    def _write_main_cf(self, extra: str) -> None:
        (self.conf / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            "queue_directory = $config_directory/../queue\n"
            "daemon_directory = $config_directory/../daemon\n"
            f"proxy_read_maps = proxy:{self.table}\n"
            "max_idle = 600s\n" + extra
        )

    def write_master_cf(self, text: str) -> None:
        (self.conf / "master.cf").write_text(text)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MASTER_COMMAND, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *extra: str) -> None:
        env = dict(os.environ, **(self.env or {}))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [MASTER_COMMAND, "-c", str(self.conf), "start", *extra],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        wait_until(lambda: self._answers(), 15)

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"master exited {self.process.returncode}:\n{self.log()}")
        try:
            self.status()
        except OSError:
            return False
        return True

    def status(self) -> dict:
        return query(control_path(str(self.conf / ".." / "queue")))

    def service(self, name: str) -> dict:
        return next(s for s in self.status()["services"] if s["service"] == name)

    def workers(self, name: str) -> list[dict]:
        return self.service(name)["workers"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def postmap(self, key: str):
        return run_postmap(["-q", key, f"proxy:{self.table}"], conf_dir=self.conf)

    def master_pid(self) -> int:
        return self.status()["pid"]

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if os.environ.get("PYPROXYMAP_KEEP_TREES") != "1":
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def instance_factory():
    require_root_and_postfix()
    made: list[Instance] = []

    def make(master_cf: str, main_cf: str = "", env: dict | None = None) -> Instance:
        instance = Instance(master_cf, main_cf, env)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.cleanup()


def proc_cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]


def proc_environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")[:-1]
    return dict(item.decode().split("=", 1) for item in items)


def open_fds(pid: int) -> dict[int, str]:
    """The process's descriptors; one closed while they are listed is left out."""
    fds = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds[int(fd.name)] = os.readlink(fd)
        except FileNotFoundError:
            continue
    return fds


# ---------------------------------------------------------------------------
# 1. The C proxymap under our master: proof that we speak Postfix's protocol
# ---------------------------------------------------------------------------


def test_c_proxymap_serves_postmap_through_our_master(instance_factory):
    pf = instance_factory(
        "proxymap unix - - n - - proxymap\nproxywrite unix - - n - 1 proxymap\n",
        "pyproxymap_prefork = 2\n",
    )
    pf.start()
    readers = wait_until(lambda: len(pf.workers("proxymap")) == 2 and pf.workers("proxymap"))
    # What a C daemon gets from us is what the real master gives it.
    reader_pid = readers[0]["pid"]
    for worker in readers + pf.workers("proxywrite"):  # exec may still be under way
        wait_until(lambda w=worker: proc_cmdline(w["pid"])[:1] == [b"proxymap"])
    assert proc_cmdline(reader_pid) == [b"proxymap", b"-t", b"unix", b"-d", b"-u"], pf.log()
    writer_pid = pf.workers("proxywrite")[0]["pid"]
    assert proc_cmdline(writer_pid) == [
        b"proxymap",
        b"-l",
        b"-n",
        b"proxywrite",
        b"-t",
        b"unix",
        b"-d",
        b"-u",
    ]
    env = proc_environ(reader_pid)
    assert env["GENERATION"] == "1" and env["MAIL_CONFIG"] == str(pf.conf)
    assert env["LANG"] == "C" and "PATH" not in env
    fds = open_fds(reader_pid)
    assert fds[0] == fds[1] == fds[2] == "/dev/null" or fds[2] != "/dev/null"
    assert fds[3] == fds[4] and fds[3].startswith("pipe:")
    assert fds[5].startswith("socket:") and fds[6].startswith("socket:")
    assert open_fds(pf.workers("proxymap")[1]["pid"])[5] == fds[5]  # one status socket
    assert open_fds(writer_pid)[5] != fds[5]  # per service
    socket_file = pf.queue / "private" / "proxymap"
    assert socket_file.is_socket() and socket_file.stat().st_mode & 0o777 == 0o666
    assert (pf.queue / "private").stat().st_mode & 0o777 == 0o700

    assert pf.postmap("alice").outcome() == ("0", "alice@example.com")
    assert pf.postmap("bob").outcome() == ("0", "bob@example.com")
    assert pf.postmap("nobody").outcome() == ("1", "")
    # Each postmap -q makes two requests (open, lookup): six uses reported over fd 5.
    # AVAIL is written after the reply, so it may trail postmap's exit a little.
    wait_until(lambda: sum(w["uses"] for w in pf.workers("proxymap")) == 6)
    assert all(w["state"] == "idle" for w in pf.workers("proxymap"))
    assert "warning" not in pf.log()


# ---------------------------------------------------------------------------
# 2. Pre-forking and on-demand spawning
# ---------------------------------------------------------------------------


def test_prefork_count_and_per_service_override(instance_factory):
    pf = instance_factory(
        "proxymap unix - - n - 10 proxymap\n"
        "holder unix - n n - 5 holder -o pyproxymap_prefork=4\n"
        "single unix - n n - 1 holder\n"
        "capped unix - n n - 2 holder\n",
        "pyproxymap_prefork = 3\n",
    )
    pf.start()
    wanted = {"proxymap": 3, "holder": 4, "single": 1, "capped": 2}
    wait_until(lambda: {s["service"]: s["total"] for s in pf.status()["services"]} == wanted)
    time.sleep(0.5)  # and no more than that appear
    state = pf.status()["services"]
    assert {s["service"]: s["total"] for s in state} == wanted
    assert {s["service"]: s["avail"] for s in state} == wanted
    assert {s["service"]: s["prefork"] for s in state} == wanted


def connect(pf: Instance, name: str) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(str(pf.queue / "private" / name))
    return client


def echo(client: socket.socket, data: bytes = b"ping") -> bytes:
    client.sendall(data)
    return client.recv(100)


def test_on_demand_spawn_up_to_maxproc(instance_factory):
    pf = instance_factory("holder unix - n n - 4 holder\n", "pyproxymap_prefork = 1\n")
    pf.start()
    wait_until(lambda: pf.service("holder")["total"] == 1)
    clients = []
    for number in range(4):
        clients.append(connect(pf, "holder"))
        assert echo(clients[-1]) == b"ping"  # served: someone accepted it
        wait_until(lambda n=number: pf.service("holder")["total"] == n + 1)
    service = pf.service("holder")
    assert service["avail"] == 0 and all(w["state"] == "busy" for w in service["workers"])
    # Beyond maxproc clients wait in the backlog; the master does not spawn a fifth.
    waiting = [connect(pf, "holder") for _ in range(2)]
    time.sleep(0.5)
    assert pf.service("holder")["total"] == 4
    # A worker that becomes available takes the next waiting client.
    clients.pop(0).close()
    assert echo(waiting[0], b"late") == b"late"
    assert pf.service("holder")["total"] == 4
    for client in clients + waiting:
        client.close()
    wait_until(lambda: pf.service("holder")["avail"] == 4)
    service = pf.service("holder")
    # six connections, one use each (which worker served the last two is up to the race)
    assert sum(w["uses"] for w in service["workers"]) == 6


def postmap_as_daemon_client(pf: Instance, key: str) -> PostmapResult:
    """postmap -q with SIGPIPE ignored, as in every Postfix daemon that uses proxymap.

    postmap(1) itself keeps SIGPIPE at its default, so a server killed between accept
    and reply kills postmap (exit -13) -- with the real master just the same. Daemon
    clients (smtpd, cleanup, ...) ignore SIGPIPE, get EPIPE, reconnect and retry; this
    is the behaviour the test holds the master to.
    """
    command = [postmap_path(), "-c", str(pf.conf), "-q", key, f"proxy:{pf.table}"]
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
        preexec_fn=lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN),
    )
    return PostmapResult(done.returncode, done.stdout.rstrip("\n"), done.stderr)


def test_respawn_after_kill_9_without_failed_lookups(instance_factory):
    pf = instance_factory("proxymap unix - - n - 10 proxymap\n", "pyproxymap_prefork = 2\n")
    pf.start()
    wait_until(lambda: pf.service("proxymap")["total"] == 2)
    results: list = []
    failures: list = []
    stop = threading.Event()

    def lookups() -> None:
        while not stop.is_set():
            result = postmap_as_daemon_client(pf, "alice")
            results.append(result.outcome())
            if result.outcome() != ("0", "alice@example.com"):
                failures.append(result)

    threads = [threading.Thread(target=lookups) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        killed = []
        for _ in range(2):
            victim = wait_until(
                lambda: next(
                    (w for w in pf.workers("proxymap") if w["uses"] > 0 and w["pid"] not in killed),
                    None,
                )
            )
            os.kill(victim["pid"], signal.SIGKILL)
            killed.append(victim["pid"])
            wait_until(lambda v=victim: all(w["pid"] != v["pid"] for w in pf.workers("proxymap")))
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert len(results) >= 6
    assert not failures, failures
    service = wait_until(lambda: (s := pf.service("proxymap"))["total"] >= 2 and s)
    assert not set(killed) & {w["pid"] for w in service["workers"]}
    assert service["throttled_for"] == 0
    log = pf.log()
    for pid in killed:
        assert f"warning: process {pf.daemon_path}/proxymap pid {pid} killed by signal 9" in log
    assert "throttling" not in log


def test_crashing_service_is_throttled(instance_factory):
    pf = instance_factory(
        "crashy unix - n n - - holder crash\nholder unix - n n - 2 holder\n",
        "pyproxymap_prefork = 2\nservice_throttle_time = 2s\n",
    )
    pf.start()
    path = f"{pf.daemon_path}/holder"
    wait_until(lambda: "bad command startup -- throttling" in pf.log())
    service = wait_until(lambda: (s := pf.service("crashy"))["total"] == 0 and s)
    assert service["throttled_for"] > 0
    spawned = service["spawned"]
    assert spawned <= 2
    log = pf.log()
    assert f"warning: process {path} pid " in log and " exit status 1" in log
    assert f"warning: {path}: bad command startup -- throttling" in log
    # While throttled a waiting client starts nothing.
    client = connect(pf, "crashy")
    time.sleep(0.8)
    assert pf.service("crashy")["spawned"] == spawned
    # After service_throttle_time the master tries again (and throttles again).
    wait_until(lambda: pf.log().count("bad command startup -- throttling") >= 2, 6)
    assert pf.service("crashy")["spawned"] <= 2 * spawned
    client.close()
    # The healthy service next to it is unaffected.
    assert echo(connect(pf, "holder")) == b"ping"


# ---------------------------------------------------------------------------
# 3. Reload and stop
# ---------------------------------------------------------------------------


def test_reload_new_generation_old_workers_exit_no_fd_leak(instance_factory):
    both = "proxymap unix - - n - - proxymap\nproxywrite unix - - n - 1 proxymap\n"
    pf = instance_factory(both, "pyproxymap_prefork = 2\n")
    pf.start()
    wait_until(lambda: pf.service("proxymap")["total"] == 2)
    master_pid = pf.master_pid()
    fds_at_start = len(open_fds(master_pid))
    old_readers = [w["pid"] for w in pf.workers("proxymap")]
    old_writer = pf.workers("proxywrite")[0]["pid"]
    assert pf.postmap("alice").outcome() == ("0", "alice@example.com")

    pf.write_master_cf("proxymap unix - - n - - proxymap -o pyproxymap_prefork=3\n")
    assert pf.cli("reload").returncode == 0
    state = wait_until(lambda: (s := pf.status())["generation"] == 2 and s)
    assert [s["service"] for s in state["services"]] == ["proxymap"]
    wait_until(lambda: not any(alive(pid) for pid in [*old_readers, old_writer]))
    readers = wait_until(lambda: len(w := pf.workers("proxymap")) == 3 and w)
    assert {w["generation"] for w in readers} == {2}
    assert proc_environ(readers[0]["pid"])["GENERATION"] == "2"
    assert proc_cmdline(readers[0]["pid"])[-2:] == [b"-o", b"pyproxymap_prefork=3"]
    assert pf.postmap("bob").outcome() == ("0", "bob@example.com")
    # Old workers left because fd 5 went away (exit 0, silent); only the removed
    # writer was signalled, and that is not an error either.
    assert "warning" not in pf.log()
    # Like Postfix, the removed service's socket file stays.
    assert (pf.queue / "private" / "proxywrite").is_socket()

    pf.write_master_cf(both)
    assert pf.cli("reload").returncode == 0
    wait_until(lambda: pf.status()["generation"] == 3 and pf.service("proxywrite")["total"] == 1)
    wait_until(lambda: len(pf.workers("proxymap")) == 2)
    assert len(open_fds(master_pid)) == fds_at_start
    assert pf.postmap("alice").outcome() == ("0", "alice@example.com")


def test_bad_config_on_reload_keeps_running_config(instance_factory):
    pf = instance_factory("holder unix - n n - 3 holder\n", "pyproxymap_prefork = 1\n")
    pf.start()
    pf.write_master_cf("holder unix - n n - lots holder\n")
    assert pf.cli("reload").returncode == 0
    wait_until(lambda: "reload failed, keeping the running configuration" in pf.log())
    assert "master.cf: line 1: bad maxproc field value" in pf.log()
    assert pf.status()["generation"] == 1
    assert echo(connect(pf, "holder")) == b"ping"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_graceful_stop_with_systemd_notify(instance_factory):
    notify_path = tempfile.mktemp(prefix="arbiter-notify-", dir="/tmp")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(10)
    try:
        pf = instance_factory(
            "proxymap unix - - n - - proxymap\nholder unix - n n - 3 holder\n",
            "pyproxymap_prefork = 2\n",
            env={"NOTIFY_SOCKET": notify_path},
        )
        pf.start()
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={pf.master_pid()}" in ready.replace(
            f"MAINPID={pf.process.pid}", f"MAINPID={pf.master_pid()}"
        )
        wait_until(lambda: pf.service("proxymap")["total"] == 2)
        master_pid = pf.master_pid()
        workers = children_of(master_pid)
        assert len(workers) == 4
        busy = connect(pf, "holder")  # a connected client does not delay the stop
        assert echo(busy) == b"ping"

        done = pf.cli("stop")
        assert done.returncode == 0, done.stderr
        assert pf.process.wait(5) == 0
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert not [pid for pid in workers if alive(pid)]
        assert "warning" not in pf.log()
        # Postfix leaves the socket files and the pid file; the lock is what counts.
        assert (pf.queue / "private" / "proxymap").is_socket()
        assert (pf.queue / "pid" / "master.pid").exists()
        assert not (pf.queue / "pid" / "master.ctl").exists()
        assert pf.cli("status").returncode == 3
        # A new master replaces the stale socket files and serves again.
        pf.start()
        assert pf.postmap("alice").outcome() == ("0", "alice@example.com")
    finally:
        notify.close()
        os.unlink(notify_path)


def test_second_master_refused_and_daemon_mode(instance_factory):
    pf = instance_factory("holder unix - n n - 3 holder\n", "pyproxymap_prefork = 1\n")
    started = pf.cli("start", "--daemon")
    assert started.returncode == 0, started.stderr
    state = wait_until(lambda: pf._answers() and pf.status())
    master_pid = state["pid"]
    assert int((pf.queue / "pid" / "master.pid").read_text()) == master_pid
    second = pf.cli("start")
    assert second.returncode == 75 and "already running" in second.stderr
    shown = pf.cli("status")
    assert shown.returncode == 0 and f"master pid {master_pid}" in shown.stdout
    assert json.loads(pf.cli("status", "--json").stdout)["services"][0]["service"] == "holder"
    assert echo(connect(pf, "holder")) == b"ping"
    assert pf.cli("stop").returncode == 0
    assert not alive(master_pid)


def test_check_opens_every_approved_table_through_the_worker(instance_factory):
    """`check` with the C 3.7 proxymap (no export or self-check mode): the tables it
    approves, each opened by Postfix's postmap -q, with the cause of a failure."""
    pf = instance_factory("proxymap unix - - n - - proxymap\n")
    good = pf.cli("check")
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"approved: {pf.table}: no such key" in good.stdout
    pf.write_main_cf(f"proxy_read_maps = proxy:{pf.table} proxy:texthash:{pf.tables}/absent\n")
    bad = pf.cli("check")
    assert bad.returncode == 78
    assert f"approved: {pf.table}: no such key" in bad.stdout
    assert (
        f"approved: texthash:{pf.tables}/absent: error: open database "
        f"{pf.tables}/absent: No such file or directory"
    ) in bad.stdout


# ---------------------------------------------------------------------------
# 4. Differential: what a child gets from the real master and from ours
# ---------------------------------------------------------------------------

RECORDER_C = r"""
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv) {
    char dir[PATH_MAX], path[PATH_MAX + 32], byte;
    ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 16);
    dir[n] = 0;
    strcpy(strrchr(dir, '/'), "/records");
    snprintf(path, sizeof path, "%s/%d", dir, (int) getpid());
    FILE *out = fopen(path, "w");
    for (int i = 0; i < argc; i++) fprintf(out, "argv %s\n", argv[i]);
    for (char **e = environ; *e; e++) fprintf(out, "env %s\n", *e);
    for (int fd = 0; fd < 12; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0) fprintf(out, "fd %d %o\n", fd, (unsigned) (st.st_mode & S_IFMT));
    }
    fclose(out);
    (void) read(5, &byte, 1);   /* until the master goes away or reloads */
    return 0;
}
"""

DIFFERENTIAL_MASTER_CF = """\
proxymap   unix  -  -  n  -  -  recorder
proxywrite unix  -  -  n  -  1  recorder
pubsvc     unix  n  n  y  -  0  recorder -o { name = two words } plain
lim        unix  -  n  n  -  3  recorder -v
{inet}     inet  n  n  n  -  2  recorder
"""


def prepare_for_real_master(pf: Instance) -> None:
    """The directories the real master expects to find (docs/PROTOCOL.md section 5.4)."""
    for name in ("queue/private", "queue/public", "queue/pid", "data"):
        (pf.root / name).mkdir(parents=True, exist_ok=True)
    for name in ("queue/private", "queue/public", "data"):
        shutil.chown(pf.root / name, "postfix")
    (pf.root / "queue" / "private").chmod(0o700)
    with open(pf.conf / "main.cf", "a") as main_cf:
        main_cf.write(f"data_directory = {pf.root}/data\nmail_owner = postfix\n")
    pf.backdate(pf.conf / "main.cf")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_records(directory: Path) -> dict[str, dict]:
    """One record per service, keyed by the -n value (or argv[0])."""
    records = {}
    for path in directory.iterdir():
        lines = path.read_text().splitlines()
        argv = [line[5:] for line in lines if line.startswith("argv ")]
        env = dict(line[4:].split("=", 1) for line in lines if line.startswith("env "))
        fds = dict(line[3:].split() for line in lines if line.startswith("fd "))
        name = argv[argv.index("-n") + 1] if "-n" in argv else argv[0]
        records[name] = {"argv": argv, "env": env, "fds": fds}
    return records


def poke_every_service(root: Path, port: int) -> None:
    """A waiting client makes the real master spawn (it never pre-forks)."""
    for path in (root / "queue" / "private").iterdir():
        with contextlib.suppress(OSError):
            socket.socket(socket.AF_UNIX).connect(str(path))
    for path in (root / "queue" / "public").iterdir():
        with contextlib.suppress(OSError):
            socket.socket(socket.AF_UNIX).connect(str(path))
    with contextlib.suppress(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_children_get_the_same_argv_env_and_fds_as_from_the_real_master(instance_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the recorder child")
    port = free_port()
    master_cf = DIFFERENTIAL_MASTER_CF.replace("{inet}", f"127.0.0.1:{port}")
    pf = instance_factory(master_cf, "pyproxymap_prefork = 1\n")
    source = pf.root / "recorder.c"
    source.write_text(RECORDER_C)
    subprocess.run([compiler, "-o", str(pf.daemon / "recorder"), str(source)], check=True)
    (pf.daemon / "records").mkdir()
    prepare_for_real_master(pf)

    # The real Postfix master, foreground, own session.
    real = subprocess.Popen(
        ["/usr/lib/postfix/sbin/master", "-c", str(pf.conf), "-d"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: (pf.queue / "private" / "lim").exists(), 10)
        poke_every_service(pf.root, port)
        wait_until(lambda: len(list((pf.daemon / "records").iterdir())) == 5, 10)
        time.sleep(0.2)
        theirs = read_records(pf.daemon / "records")
    finally:
        real.send_signal(signal.SIGTERM)
        real.wait(10)
    wait_until(
        lambda: (
            not (pf.daemon / "records").exists()
            or all(not alive(int(p.name)) for p in (pf.daemon / "records").iterdir())
        ),
        10,
    )
    shutil.rmtree(pf.daemon / "records")
    (pf.daemon / "records").mkdir()

    pf.start()
    wait_until(lambda: len(list((pf.daemon / "records").iterdir())) == 5, 10)
    time.sleep(0.2)
    ours = read_records(pf.daemon / "records")

    assert (
        sorted(ours)
        == sorted(theirs)
        == sorted(["proxymap", "proxywrite", "pubsvc", "lim", f"127.0.0.1:{port}"])
    )
    for name in theirs:
        assert ours[name]["argv"] == theirs[name]["argv"], name
        their_env = dict(theirs[name]["env"])
        our_env = dict(ours[name]["env"])
        # The generation counter is each master's own; both are octal digits.
        assert their_env.pop("GENERATION").isdigit() and our_env.pop("GENERATION").isdigit()
        assert our_env == their_env, name
        # 3, 4: the flow pipe (FIFO), 5: status socket, 6: listen socket
        for fd in ("3", "4", "5", "6"):
            assert ours[name]["fds"][fd] == theirs[name]["fds"][fd], (name, fd)
        # Nothing else leaks in (the recorder's own output file is the next fd in both).
        assert len(ours[name]["fds"]) == len(theirs[name]["fds"]), (ours, theirs)


def test_maillog_file_through_postlogd_run_by_our_master(instance_factory):
    """unix-dgram service: the C postlogd, fed by our master and by the C proxymap."""
    pf = instance_factory(
        "proxymap unix - - n - - proxymap\npostlog unix-dgram n - n - 1 postlogd\n",
        "pyproxymap_prefork = 1\nmaillog_file_prefixes = /tmp\n",
    )
    (pf.daemon / "postlogd").symlink_to(C_PROXYMAP.parent / "postlogd")
    maillog = pf.root / "maillog"
    with open(pf.conf / "main.cf", "a") as main_cf:
        main_cf.write(f"maillog_file = {maillog}\n")
    pf.backdate(pf.conf / "main.cf")
    pf.start()
    wait_until(lambda: pf.service("postlog")["total"] == 1)
    assert (pf.queue / "public" / "postlog").is_socket()
    reader = pf.workers("proxymap")[0]["pid"]
    wait_until(lambda: proc_cmdline(reader)[:1] == [b"proxymap"])
    env = proc_environ(reader)
    assert env["POSTLOG_SERVICE"] == f"{pf.conf}/../queue/public/postlog"
    unapproved = run_postmap(["-q", "alice", f"proxy:texthash:{pf.tables}/nope"], conf_dir=pf.conf)
    assert unapproved.exit != 0
    text = wait_until(
        lambda: (
            maillog.exists() and "unapproved table" in maillog.read_text() and maillog.read_text()
        )
    )
    assert f"postfix/proxymap[{reader}]: warning: request for unapproved table" in text
    assert "postfix/master[" in text and "daemon started" in text
    assert pf.postmap("alice").outcome() == ("0", "alice@example.com")


def test_workers_leaving_at_max_use_are_replaced_up_to_prefork(instance_factory):
    """max_use exits are normal (exit 0, no warning); the pre-fork minimum comes back."""
    pf = instance_factory(
        "proxymap unix - - n - - proxymap -o max_use=1\n", "pyproxymap_prefork = 2\n"
    )
    pf.start()
    wait_until(lambda: pf.service("proxymap")["total"] == 2)
    first = {w["pid"] for w in pf.workers("proxymap")}
    for key in ("alice", "bob", "alice"):
        assert pf.postmap(key).outcome()[0] == "0"
    service = wait_until(
        lambda: (s := pf.service("proxymap"))["spawned"] >= 5 and s["total"] == 2 and s
    )
    assert len(first - {w["pid"] for w in service["workers"]}) >= 1
    assert service["avail"] == 2 and service["throttled_for"] == 0
    assert "warning" not in pf.log()


def test_our_worker_under_our_master(instance_factory):
    """The Python proxymap (the console script) as the command: make run, in small."""
    worker = VENV_BIN / "proxymap"
    if not worker.exists():
        pytest.skip("the proxymap console script is not installed in this venv")
    pf = instance_factory(
        "proxymap unix - - n - - pyproxymap\nproxywrite unix - n n - 1 pyproxymap\n",
        "pyproxymap_prefork = 2\n",
    )
    (pf.daemon / "pyproxymap").symlink_to(worker)
    pf.start()
    readers = wait_until(lambda: len(w := pf.workers("proxymap")) == 2 and w)
    assert pf.postmap("alice").outcome() == ("0", "alice@example.com")
    assert pf.postmap("nobody").outcome() == ("1", "")
    # Our worker reports busy periods, not single requests (README, "TAKEN/AVAIL"): two
    # postmap runs of two requests each are at least two uses, at most four.
    wait_until(lambda: 2 <= sum(w["uses"] for w in pf.workers("proxymap")) <= 4)
    assert pf.cli("reload").returncode == 0
    wait_until(lambda: not any(alive(w["pid"]) for w in readers))
    wait_until(
        lambda: (
            {w["generation"] for w in pf.workers("proxymap")} == {2}
            and len(pf.workers("proxymap")) == 2
        )
    )
    assert pf.postmap("bob").outcome() == ("0", "bob@example.com")
    assert "warning" not in pf.log(), pf.log()


def test_status_prints_the_backend_connection_bound(instance_factory):
    """The most database connections the site can open: workers x the per-table limit."""
    worker = VENV_BIN / "proxymap"
    pf = instance_factory(
        "proxymap unix - - n - 5 pyproxymap\n",
        "pyproxymap_prefork = 1\npyproxymap_mysql_connections = 3\n",
    )
    pf.write_main_cf(
        "pyproxymap_prefork = 1\npyproxymap_mysql_connections = 3\n"
        f"proxy_read_maps = proxy:{pf.table} proxy:mysql:/etc/none.cf"
        " proxy:pgsql:/etc/none.cf\n"
    )
    (pf.daemon / "pyproxymap").symlink_to(worker)
    pf.start()
    wait_until(lambda: len(pf.workers("proxymap")) == 1)
    shown = pf.cli("status").stdout
    assert "backend connections: at most 11 per worker, 5 x 11 = 55 in all" in shown, shown
    assert "   3  mysql:/etc/none.cf" in shown and "   8  pgsql:/etc/none.cf" in shown
    bounds = json.loads(pf.cli("status", "--json").stdout)["services"][0]["connection_bounds"]
    assert bounds == [
        {"table": "mysql:/etc/none.cf", "per_worker": 3},
        {"table": "pgsql:/etc/none.cf", "per_worker": 8},
    ]


def test_pid_file_lock_excludes_the_real_master_both_ways(instance_factory):
    """Same lock as Postfix on pid/master.pid: never two masters on one queue directory."""
    pf = instance_factory("proxymap unix - - n - - proxymap\n", "pyproxymap_prefork = 1\n")
    prepare_for_real_master(pf)
    real_command = ["/usr/lib/postfix/sbin/master", "-c", str(pf.conf), "-d"]
    real = subprocess.Popen(
        real_command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_until(lambda: (pf.queue / "private" / "proxymap").exists(), 10)
        refused = pf.cli("start")
        assert refused.returncode == 75 and f"already running (pid {real.pid})" in refused.stderr
    finally:
        real.send_signal(signal.SIGTERM)
        real.wait(10)
    pf.start()
    second = subprocess.run(
        real_command,
        capture_output=True,
        text=True,
        timeout=10,
        start_new_session=True,
        check=False,
    )
    # Postfix says "the Postfix mail system is already running" (to syslog) and exits 1.
    assert second.returncode == 1
    assert pf.process.poll() is None
    assert pf.postmap("alice").outcome() == ("0", "alice@example.com")


@pytest.mark.parametrize("signum", [signal.SIGQUIT, signal.SIGINT])
def test_fast_stop_leaves_no_children(instance_factory, signum):
    pf = instance_factory("holder unix - n n - 3 holder\n", "pyproxymap_prefork = 3\n")
    pf.start()
    wait_until(lambda: pf.service("holder")["total"] == 3)
    workers = children_of(pf.master_pid())
    busy = connect(pf, "holder")
    assert echo(busy) == b"ping"
    pf.process.send_signal(signum)
    assert pf.process.wait(5) == 0
    wait_until(lambda: not any(alive(pid) for pid in workers), 5)
    assert busy.recv(10) == b""  # the client sees the connection close
    assert pf.cli("status").returncode == 3


def test_a_second_signal_during_a_graceful_stop_makes_it_fast(instance_factory):
    """SIGTERM waits for the children (here up to 60 s: they ignore SIGTERM and stay
    busy); a second signal, as an impatient operator sends, kills them at once."""
    pf = instance_factory(
        "holder unix - n n - 2 holder stubborn\n",
        "pyproxymap_prefork = 2\npyproxymap_stop_timeout = 60s\n",
    )
    pf.start()
    wait_until(lambda: pf.service("holder")["total"] == 2)
    workers = children_of(pf.master_pid())
    busy = connect(pf, "holder")
    assert echo(busy) == b"ping"
    pf.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert pf.process.poll() is None  # still waiting for its stubborn children
    started = time.monotonic()
    pf.process.send_signal(signal.SIGINT)
    assert pf.process.wait(5) == 0
    assert time.monotonic() - started < 3
    wait_until(lambda: not any(alive(pid) for pid in workers), 5)
    assert "after a second stop signal -- killing them" in pf.log()
