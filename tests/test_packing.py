"""Keeping clients packed on few workers (README, "Concurrency model").

Our master (proxymap-master) runs the echo service (tests/support/echo_service.py) with
one pre-forked worker and spawns on demand exactly as Postfix's master does: when a
client waits in the listen queue while no worker reports itself available; the last
test runs our proxymap under Postfix's own master. What a worker reports decides how
many processes a load gets:

* a steady load that one worker carries, with new clients connecting all the while,
  gets no second worker (a worker that still takes new clients promptly is available);
* a saturated worker makes the master spawn for the next client, and the new worker,
  not the saturated one, then takes the new clients.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.echo_service import ask
from tests.support.postfix import PrivatePostfix, ensure_postfix, settle_files
from tests.test_arbiter import Instance, require_root_and_postfix, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
ECHO_WRAPPER = f"""#!{sys.executable}
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from tests.support.echo_service import main
main()
"""


@pytest.fixture
def echo_instance():
    """Our master running the echo service, one pre-forked worker, process limit 10.
    No max_use: a worker that served 100 newcomers would leave with its last client
    and be replaced while a test reads the counts."""
    require_root_and_postfix()
    pf = Instance("echo unix - n n - 10 echo -o max_use=0\n", "pyproxymap_prefork = 1\n")
    wrapper = pf.daemon / "echo"
    wrapper.write_text(ECHO_WRAPPER)
    wrapper.chmod(0o755)
    try:
        pf.start()
        wait_until(lambda: pf.service("echo")["total"] == 1)
        yield pf
    finally:
        pf.cleanup()


def connect(pf: Instance) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(str(pf.queue / "private" / "echo"))
    return client


def keep_asking(pf: Instance, line: str, pause: float, stop: threading.Event, errors: list):
    """One client asking LINE, waiting for each reply and PAUSE seconds, until STOP."""
    try:
        with connect(pf) as client:
            while not stop.is_set():
                assert ask(client, line) == ANSWERS.get(line.split()[0], line)
                if pause:
                    time.sleep(pause)
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


ANSWERS = {"@work": "worked", "@wait": "waited", "@backend": "served"}


def start_clients(pf: Instance, count: int, line: str, pause: float, stop: threading.Event):
    errors: list = []
    threads = [
        threading.Thread(target=keep_asking, args=(pf, line, pause, stop, errors), daemon=True)
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads, errors


def paced(seconds: float, pause: float) -> Iterator[None]:
    """Yields for SECONDS, pausing PAUSE seconds after each round of the caller's."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        yield
        time.sleep(pause)


def stop_clients(stop: threading.Event, threads: list[threading.Thread]) -> None:
    stop.set()
    for thread in threads:
        thread.join(10)


def test_a_load_one_worker_carries_gets_no_second_worker(echo_instance):
    """Eight clients asking every 2 ms keep the worker busy in short spells for three
    seconds, while a new client connects every 20 ms: none of them makes the master
    spawn. (Before, a new client arriving during a spell -- every few -- did.)"""
    pf = echo_instance
    stop = threading.Event()
    threads, errors = start_clients(pf, 8, "steady", 0.002, stop)
    pids = Counter()
    try:
        for _ in paced(3, 0.02):  # a new client every 20 ms
            with connect(pf) as newcomer:
                pids[int(ask(newcomer, "@pid"))] += 1
    finally:
        stop_clients(stop, threads)
    assert not errors, errors
    service = pf.service("echo")
    assert (service["spawned"], service["total"]) == (1, 1), service
    assert len(pids) == 1 and sum(pids.values()) > 50


# The CPU time a saturated worker gets is what tells it saturated: alone on the machine,
# so that another test's load does not take it.
@pytest.mark.serial
@pytest.mark.parametrize("line, pause", [("@work 5", 0), ("@backend 5", 0.01)])
def test_a_saturated_worker_gets_a_sibling_that_takes_the_new_clients(echo_instance, line, pause):
    """Two clients asking for 5 ms of work back to back saturate the worker, as do two
    clients whose requests take turns on a backend that serves one at a time; the next
    client makes the master spawn, and from then on new clients go to the new worker
    instead of queueing behind the saturated one.

    The newcomers of the busy loop come at once; those of the backend come 10 ms apart.
    A saturated worker lets its siblings accept first (4 ms against at most 3), and a
    loop that is free, as when it waits for a backend, takes a share of a burst all the
    same: some 2 clients in 6 (a busy loop does not get to accept)."""
    pf = echo_instance
    (first,) = (w["pid"] for w in pf.workers("echo"))
    stop = threading.Event()
    threads, errors = start_clients(pf, 2, line, 0, stop)
    try:
        time.sleep(0.5)  # the load average passes the saturation mark
        with connect(pf) as newcomer:
            assert int(ask(newcomer, "@pid")) == first  # nobody else yet
        service = wait_until(lambda: (s := pf.service("echo"))["total"] == 2 and s)
        assert service["spawned"] == 2
        (second,) = {w["pid"] for w in service["workers"]} - {first}
        # Once the new worker listens (it starts in a fraction of a second), new clients
        # go to it: the saturated worker lets its siblings accept first.
        kept = []
        wait_until(lambda: int(ask(kept.append(connect(pf)) or kept[-1], "@pid")) == second)
        newcomers = []
        for _ in range(6):
            newcomers.append(connect(pf))
            time.sleep(pause)
        kept += newcomers
        taken = Counter(int(ask(client, "@pid")) for client in newcomers)
    finally:
        stop_clients(stop, threads)
    for client in kept:
        client.close()
    assert not errors, errors
    assert taken[second] >= 5, taken
    assert pf.service("echo")["total"] == 2


def test_a_worker_waiting_with_its_loop_free_gets_no_sibling(echo_instance):
    """Eight clients whose requests wait 5 ms each, back to back, for a backend that has
    room for all of them: the worker always has a request in progress, but its loop is
    free and no request waits for a turn, so a sibling would serve nobody sooner.
    Newcomers every 20 ms make the master spawn nothing."""
    pf = echo_instance
    (first,) = (w["pid"] for w in pf.workers("echo"))
    stop = threading.Event()
    threads, errors = start_clients(pf, 8, "@wait 5", 0, stop)
    pids = Counter()
    try:
        time.sleep(0.5)  # long past the mark a busy load average would pass
        for _ in paced(1, 0.02):
            with connect(pf) as newcomer:
                pids[int(ask(newcomer, "@pid"))] += 1
    finally:
        stop_clients(stop, threads)
    assert not errors, errors
    assert pids.keys() == {first} and sum(pids.values()) > 20, pids
    service = pf.service("echo")
    assert (service["spawned"], service["total"]) == (1, 1), service


def keep_looking_up(pf: PrivatePostfix, table: str, stop: threading.Event, errors: list):
    """A Postfix-like client: one lookup, its reply, 2 ms of something else, until STOP."""
    try:
        with pf.client(timeout=10) as client:
            while not stop.is_set():
                assert client.lookup(table, "alice").get("value") == b"alice@example.com"
                time.sleep(0.002)
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


@pytest.mark.postfix
def test_postfix_master_gives_a_carried_load_one_worker():
    """The same carried load under Postfix's master, our proxymap as its worker, with
    lookups: eight steady clients and a new client every 20 ms for three seconds are
    served by the one process the first client brought up."""
    ensure_postfix()
    assert OUR_PROXYMAP.exists(), f"our worker is not installed: {OUR_PROXYMAP}"
    pf = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP, name="packing", main_cf={"max_use": "1000000"}
    )
    (pf.tables / "aliases").write_text("alice alice@example.com\n")
    settle_files(pf.tables)
    table = f"texthash:{pf.tables}/aliases"
    pf.set_main(proxy_read_maps=f"proxy:{table}")
    with pf:
        pf.wait_until_serving("alice", table)
        stop = threading.Event()
        errors: list = []
        threads = [
            threading.Thread(target=keep_looking_up, args=(pf, table, stop, errors), daemon=True)
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        workers = set()
        try:
            for _ in paced(3, 0.02):
                with pf.client(timeout=10) as newcomer:
                    assert newcomer.lookup(table, "alice").get("status") == b"0"
                workers.update(pf.worker_pids("proxymap"))
        finally:
            stop_clients(stop, threads)
        assert not errors, errors
        assert len(workers) == 1, workers
