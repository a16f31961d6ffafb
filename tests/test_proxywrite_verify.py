"""proxywrite end to end and crash-safe: real verify(8) probes through our worker.

A private Postfix runs the real master, verify, cleanup, qmgr, trivial-rewrite and the
discard and error delivery agents; proxymap and proxywrite are our worker. With
``address_verify_map = proxy:TYPE:$data_directory/verify_cache`` an address query makes
verify send a real probe; the delivery agent's verdict comes back to verify, which
writes it through proxywrite; later queries and ``postmap -q proxy:...`` read it back,
and ``postmap -s`` lists the file. Then the writer is killed with SIGKILL again and
again while several clients update the cache directly: every acknowledged update must
be in the file afterwards, and the file must open cleanly. Then proxywrite with a
process limit of 4: the file locks serialise the writers, nothing is lost or damaged.
Last, postscreen(8) with ``postscreen_cache_map = proxy:TYPE:...``: a client that
passed is written (PASS NEW) and found on its next connection (PASS OLD).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.postfix import (
    PrivatePostfix,
    ProxymapClient,
    ensure_postfix,
    proc_cmdline,
)

pytestmark = pytest.mark.postfix

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
MAIL_SERVICES = [
    "verify    unix  -  -  n  -  1  verify",
    "cleanup   unix  n  -  n  -  0  cleanup",
    "qmgr      unix  n  -  n  300  1  qmgr",
    "rewrite   unix  -  -  n  -  -  trivial-rewrite",
    "bounce    unix  -  -  n  -  0  bounce",
    "defer     unix  -  -  n  -  0  bounce",
    "trace     unix  -  -  n  -  0  bounce",
    "discard   unix  -  -  n  -  -  discard",
    "error     unix  -  -  n  -  -  error",
    "retry     unix  -  -  n  -  -  error",
]
QUEUES = (
    "incoming",
    "active",
    "deferred",
    "bounce",
    "defer",
    "trace",
    "flush",
    "hold",
    "corrupt",
    "maildrop",
    "saved",
)
SUFFIX = {"btree": ".db", "lmdb": ".lmdb"}
# verify's recipient_status values (DEL_RCPT_STAT_*).
DELIVERABLE, UNDELIVERABLE, IN_PROGRESS = b"0", b"2", b"3"


def verify_instance(kind: str, name: str, proxywrite_maxproc: str = "1") -> PrivatePostfix:
    ensure_postfix()
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP,
        name=name,
        extra_services=MAIL_SERVICES,
        proxywrite_maxproc=proxywrite_maxproc,
    )
    _CREATED.append(instance)
    cache = f"{kind}:{instance.data_dir}/verify_cache"
    instance.cache = cache
    instance.cache_file = Path(f"{instance.data_dir}/verify_cache{SUFFIX[kind]}")
    instance.proxy_write_maps = f"proxy:{cache}"
    instance.proxy_read_maps = f"proxy:{cache}"
    instance.extra_main_cf.update(
        {
            "address_verify_map": f"proxy:{cache}",
            "mydestination": "",
            "transport_maps": "inline:{{good.example=discard:accepted},"
            "{bad.example=error:5.1.1 no such user}}",
            # A writer killed before it served anyone must not stop the service for 60 s.
            "service_throttle_time": "1s",
        }
    )
    uid = pwd.getpwnam("postfix").pw_uid
    for queue in QUEUES:
        path = instance.queue_dir / queue
        path.mkdir(mode=0o700)
        os.chown(path, uid, uid)
    return instance


@contextlib.contextmanager
def stopped_at_end(instance: PrivatePostfix):
    """Run the instance; stop it (the tree stays for the checks that follow)."""
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


_CREATED: list[PrivatePostfix] = []


@pytest.fixture(autouse=True)
def _remove_trees():
    yield
    while _CREATED:
        instance = _CREATED.pop()
        instance.stop()
        instance.cleanup()


def wait_for(condition, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def query(instance: PrivatePostfix, address: str) -> dict[str, bytes]:
    with ProxymapClient(instance.socket_path("verify"), timeout=10) as client:
        return client.request(("request", "query"), ("address", address))


def listed(instance: PrivatePostfix) -> dict[str, str]:
    """``postmap -s`` of the cache file (direct, as root): key -> value; fails loudly."""
    result = instance.postmap(["-s", instance.cache], timeout=60)
    assert result.exit == 0, result.stderr
    entries = {}
    for line in result.stdout.split("\n") if result.stdout else []:
        key, _, value = line.partition("\t")
        entries[key] = value
    return entries


@pytest.mark.parametrize("kind", ["btree", "lmdb"])
def test_verify_probes_are_written_and_read_back(kind):
    instance = verify_instance(kind, f"verify-{kind}")
    with instance:
        wait_for(lambda: instance.socket_path("verify").exists())
        for address in ("alice@good.example", "bob@bad.example"):
            assert query(instance, address)[("recipient_status")] == IN_PROGRESS
        good = wait_for(
            lambda: (
                (r := query(instance, "alice@good.example"))["recipient_status"] != IN_PROGRESS
                and r
            )
        )
        bad = wait_for(
            lambda: (
                (r := query(instance, "bob@bad.example"))["recipient_status"] != IN_PROGRESS and r
            )
        )
        assert (good["recipient_status"], good["reason"]) == (DELIVERABLE, b"accepted")
        assert (bad["recipient_status"], bad["reason"]) == (UNDELIVERABLE, b"no such user")
        # The writer that stored them is our worker.
        writers = instance.worker_pids("proxywrite")
        assert writers and all("proxymap" in " ".join(proc_cmdline(pid)) for pid in writers)
        assert all(Path(f"/proc/{pid}/exe").resolve().name.startswith("python") for pid in writers)
        # Read back through the read-only service, and straight from the file.
        status, value = instance.postmap_q("alice@good.example", "proxy:" + instance.cache)
        assert status == 0 and value.startswith("0:") and value.endswith(":accepted")
        entries = listed(instance)
        assert entries["alice@good.example"].endswith(":accepted")
        assert entries["bob@bad.example"].startswith("2:")
        assert "_LAST_CACHE_CLEANUP_COMPLETED_" in entries
        log = instance.maillog()
        assert "status=deliverable (accepted)" in log
        assert "status=undeliverable (no such user)" in log
        assert "proxymap" not in "".join(
            line for line in log.splitlines() if "fatal" in line or "panic" in line
        )


class Updater(threading.Thread):
    """One client of proxywrite: ``count`` updates, each retried until acknowledged.

    A connection broken by the writer's death is reopened (the master starts a new
    writer); an update counts as acknowledged only when its reply says status 0.
    """

    def __init__(
        self,
        instance: PrivatePostfix,
        name: str,
        count: int,
        stop: threading.Event,
        reconnect_every: int = 0,
    ):
        super().__init__(daemon=True)
        self.instance, self.prefix, self.count, self.stop = instance, name, count, stop
        self.reconnect_every = reconnect_every  # new connections let the master add writers
        self.acknowledged: dict[str, str] = {}
        self.broken = 0
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - kept for the test to report
            self.error = exc

    def _run(self) -> None:
        client = None
        for index in range(self.count):
            key, value = f"{self.prefix}-{index}@example.com", f"0:0:{index}:ok {self.prefix}"
            while not self.stop.is_set():
                try:
                    if client is None:
                        client = ProxymapClient(self.instance.socket_path("proxywrite"), timeout=10)
                    reply = client.update(self.instance.cache, key, value)
                except (OSError, EOFError):
                    self.broken += 1
                    if client is not None:
                        client.close()
                    client = None
                    time.sleep(0.02)
                    continue
                if reply.get("status") == b"0":
                    self.acknowledged[key] = value
                    if self.reconnect_every and index % self.reconnect_every == 0:
                        client.close()
                        client = None
                    break
                self.retries += 1
                time.sleep(0.01)
        if client is not None:
            client.close()

    @property
    def done(self) -> int:
        return len(self.acknowledged)


def run_updates(
    instance: PrivatePostfix,
    clients: int,
    per_client: int,
    kills: int,
    timeout: float = 240.0,
    reconnect_every: int = 0,
) -> tuple[list[Updater], list[int]]:
    """Updates from ``clients`` threads; SIGKILL the writer ``kills`` times meanwhile."""
    stop = threading.Event()
    updaters = [
        Updater(instance, f"c{n}", per_client, stop, reconnect_every) for n in range(clients)
    ]
    for updater in updaters:
        updater.start()
    total = clients * per_client
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    for round_ in range(kills):
        # Spread the kills over the run; each lands on a writer that has served.
        target = total * (round_ + 1) // (kills + 1)
        while sum(u.done for u in updaters) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        for pid in instance.worker_pids("proxywrite"):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    for updater in updaters:
        updater.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for updater in updaters:
        assert updater.error is None, repr(updater.error)
        assert not updater.is_alive(), "updates did not finish in time"
    return updaters, killed


@pytest.mark.parametrize("kind", ["btree", "lmdb"])
def test_kill_9_of_the_writer_loses_no_acknowledged_update(kind):
    instance = verify_instance(kind, f"kill9-{kind}")
    with stopped_at_end(instance):
        wait_for(lambda: instance.socket_path("proxywrite").exists())
        started = time.monotonic()
        updaters, killed = run_updates(instance, clients=4, per_client=2500, kills=8)
        elapsed = time.monotonic() - started
        acknowledged = {k: v for u in updaters for k, v in u.acknowledged.items()}
        assert len(acknowledged) == 10_000
        assert len(killed) >= 8
        assert sum(u.broken for u in updaters) >= 1  # the kills did cut connections
        # Read back through proxywrite itself (a fresh writer), then from the file.
        with ProxymapClient(instance.socket_path("proxywrite"), timeout=10) as client:
            for key in list(acknowledged)[::97]:
                reply = client.lookup(instance.cache, key)
                assert reply == {"status": b"0", "value": acknowledged[key].encode()}
    entries = listed(instance)  # the master is stopped: nobody holds the file
    missing = [key for key, value in acknowledged.items() if entries.get(key) != value]
    assert missing == [], f"{len(missing)} acknowledged updates lost, e.g. {missing[:5]}"
    print(
        f"{kind}: 10000 acknowledged updates, {len(killed)} SIGKILLs, "
        f"{sum(u.broken for u in updaters)} broken connections, {elapsed:.1f} s"
    )


def hold_lock(instance: PrivatePostfix, kind: str, stop: threading.Event) -> None:
    """Take the cache file's exclusive lock for 0.3 s every 0.5 s (flock for Berkeley
    DB, fcntl for LMDB: the locks our writers and postmap use)."""
    import fcntl

    wait_for(lambda: instance.cache_file.exists())
    fd = os.open(instance.cache_file, os.O_RDWR)
    lock = fcntl.flock if kind == "btree" else fcntl.lockf
    try:
        for _ in range(6):
            if stop.is_set():
                break
            lock(fd, fcntl.LOCK_EX)
            time.sleep(0.3)
            lock(fd, fcntl.LOCK_UN)
            time.sleep(0.2)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["btree", "lmdb"])
def test_process_limit_above_one_serialises_writers(kind):
    instance = verify_instance(kind, f"multi-{kind}", proxywrite_maxproc="4")
    seen_writers: set[int] = set()
    with stopped_at_end(instance):
        wait_for(lambda: instance.socket_path("proxywrite").exists())
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen_writers.update(instance.worker_pids("proxywrite"))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # A writer waiting for a lock stays busy, so the master starts more writers for
        # the eight clients: hold the file's lock now and then, as postmap would.
        holder = threading.Thread(target=hold_lock, args=(instance, kind, stop), daemon=True)
        holder.start()
        updaters, _ = run_updates(instance, clients=8, per_client=500, kills=0, reconnect_every=25)
        stop.set()
        watcher.join()
        holder.join()
        acknowledged = {k: v for u in updaters for k, v in u.acknowledged.items()}
        assert len(acknowledged) == 4000
        log = instance.maillog()
    assert len(seen_writers) >= 2, "only one writer ever ran"
    print(f"{kind}: 4000 acknowledged updates by {len(seen_writers)} writers")
    entries = listed(instance)
    assert all(entries.get(k) == v for k, v in acknowledged.items())
    if kind == "btree":  # the library's own structure check
        from berkeleydb import db

        db.DB().verify(str(instance.cache_file))
    assert "damaged" not in log and "panic" not in log


def smtp_session(port: int) -> bytes:
    """Connect, wait out the greeting, EHLO, QUIT; the server's last reply."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        reader = conn.makefile("rb")
        line = reader.readline()
        while line.startswith(b"220-"):  # postscreen's pregreet test, then smtpd's 220
            line = reader.readline()
        conn.sendall(b"EHLO client.example\r\n")
        while (line := reader.readline())[3:4] == b"-":
            pass
        conn.sendall(b"QUIT\r\n")
        return reader.readline()


@pytest.mark.parametrize("kind", ["btree", "lmdb"])
def test_postscreen_cache_is_written_and_read_back(kind):
    """postscreen(8) records a client that passed its tests through our proxywrite
    (PASS NEW), finds it there on the next connection (PASS OLD)."""
    from tests.support.servers import free_port

    ensure_postfix()
    port = free_port()
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP,
        name=f"postscreen-{kind}",
        extra_services=[
            f"127.0.0.1:{port} inet  n  -  n  -  1  postscreen",
            "smtpd     pass  -  -  n  -  -  smtpd",
            "rewrite   unix  -  -  n  -  -  trivial-rewrite",
            "anvil     unix  -  -  n  -  1  anvil",
        ],
    )
    _CREATED.append(instance)
    cache = instance.cache = f"{kind}:{instance.data_dir}/postscreen_cache"
    instance.proxy_write_maps = instance.proxy_read_maps = f"proxy:{cache}"
    instance.extra_main_cf.update(
        {
            "postscreen_cache_map": f"proxy:{cache}",
            "postscreen_greet_wait": "1s",
            "postscreen_greet_action": "enforce",
            "inet_interfaces": "127.0.0.1",
            "mynetworks": "",
            "mydestination": "",
            "local_recipient_maps": "",
        }
    )
    with stopped_at_end(instance):
        wait_for(lambda: b"221" in smtp_session(port), timeout=20, interval=0.5)
        wait_for(lambda: "PASS NEW [127.0.0.1]" in instance.maillog())
        assert smtp_session(port).startswith(b"221")
        wait_for(lambda: "PASS OLD [127.0.0.1]" in instance.maillog())
        status, value = instance.postmap_q("127.0.0.1", "proxy:" + cache)
        assert status == 0 and value.count(";") == 4
    entries = listed(instance)
    assert "127.0.0.1" in entries and "_LAST_CACHE_CLEANUP_COMPLETED_" in entries
