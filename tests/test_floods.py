"""Connection floods (issue 15, point 3): a flooded worker still answers a new
client at once, and a burst of new clients still spreads over sibling workers.

The first tests flood a real proxymap worker (a texthash table, under the stand-in
master, with the master's listen backlog of 100) with 2 000 connections, then time a
new, well-behaved client from its connect() to the answer of its first lookup. The
last one starts two sibling echo workers on one listen socket and counts which of
them took each client of a burst.

Figures are printed (``pytest -s``) so that a run shows what was measured.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxymap.protocol import ANNOUNCEMENT
from tests.support.echo_service import ask
from tests.support.standin_master import REPO_ROOT, StandinMaster, python_module
from tests.test_server_worker import (
    ALICE_REPLY,
    lookup,
    proxymap_command,
    recv_exactly,
    worker_tree,
)

FLOOD = 2000
FLOODING_THREADS = 8
TRIALS = 7
# A new client's connect + announcement + first lookup, median over TRIALS floods. An
# idle worker answers in well under 1 ms; a worker that paused 1 ms before each
# accept, as it used to, took over 100 ms whatever the load (the 100 clients of the
# backlog ahead, 1 ms timer each). What is left is the setup (and, for asking
# flooders, the lookup) of the clients ahead: about 3-6 ms with uvloop here, 6-20 ms
# with asyncio, whose connection setup costs more and whose timers round a wait up
# to whole milliseconds (2 cores shared with other jobs: load 2-5). The issue asks for
# about 10 ms; uvloop's bound leaves half again for a machine busy with other work
# (a median of 10.1 ms was seen once, under a concurrent benchmark).
FIRST_ANSWER_BOUND = {"uvloop": 0.015, "asyncio": 0.030}
# The master's listen backlog: max(process limit, default_process_limit = 100).
BACKLOG = 100
# No exit on max_use while the trials open and close thousands of connections.
NO_USE_LIMIT = "max_use=1000000"


@pytest.fixture
def descriptors():
    """Room for the flood in this process and in the worker (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood(path: str, count: int, request: bytes | None) -> list[socket.socket]:
    """count clients connecting at once from several threads; each sends request
    (when given) and never reads. Returns once every connect() has returned."""
    clients: list[socket.socket] = []
    errors: list[OSError] = []

    def connect(number: int) -> None:
        try:
            for _ in range(number):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                # Blocking: connect() waits while the backlog is full (with a timeout
                # set, a full backlog would be EAGAIN at once).
                client.connect(path)
                if request is not None:
                    client.sendall(request)
                clients.append(client)
        except OSError as error:
            errors.append(error)

    threads = [
        threading.Thread(target=connect, args=(count // FLOODING_THREADS,))
        for _ in range(FLOODING_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(clients) == count, errors[:1]
    return clients


def first_answer(master: StandinMaster, table: str) -> float:
    """Seconds from connect() to the reply of the first lookup, as a Postfix client
    does it: wait for the announcement, then ask."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    started = time.perf_counter()
    client.connect(master.socket_path)  # blocking: waits while the backlog is full
    client.settimeout(30)
    assert recv_exactly(client, len(ANNOUNCEMENT)) == ANNOUNCEMENT
    client.sendall(lookup(table, b"alice"))
    assert recv_exactly(client, len(ALICE_REPLY)) == ALICE_REPLY
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("flooders", ["silent", "asking"])
def test_a_flood_does_not_delay_a_new_client(tmp_path, descriptors, event_loop, flooders):
    """2 000 clients connect at once (silent ones, or ones that each send a lookup
    and never read the answer); the next client's first answer comes within 15 ms
    (30 ms with asyncio), median of 7 floods."""
    if event_loop == "uvloop":
        pytest.importorskip("uvloop")
    table = f"texthash:{tmp_path / 'map'}"
    (tmp_path / "map").write_text("alice alice@example.com\n")
    conf = worker_tree(tmp_path, f"proxy:{table}")
    argv = [*proxymap_command(), "-t", "unix", "-V", "-o", NO_USE_LIMIT]
    request = lookup(table, b"alice") if flooders == "asking" else None
    with StandinMaster(
        argv,
        config_dir=conf,
        socket_path=tmp_path / "proxymap.sock",
        env={"PYPROXYMAP_EVENT_LOOP": event_loop},
        backlog=BACKLOG,
    ) as master:
        idle = [first_answer(master, table) for _ in range(TRIALS)]
        flooded = []
        for _ in range(TRIALS):
            clients = flood(master.socket_path, FLOOD, request)
            flooded.append(first_answer(master, table))
            for client in clients:
                client.close()
            time.sleep(0.2)  # the worker closes its ends meanwhile
        assert master.alive()
    median = statistics.median(flooded)
    print(
        f"\n{event_loop}, {flooders} flood of {FLOOD}: first answer "
        f"idle {statistics.median(idle) * 1000:.2f} ms, flooded median "
        f"{median * 1000:.2f} ms (trials: {', '.join(f'{t * 1000:.1f}' for t in flooded)})"
    )
    assert median < FIRST_ANSWER_BOUND[event_loop]


# --- fairness: a burst spreads over sibling workers -----------------------------------

ECHO = "tests.support.echo_service"
BURSTS = 5


def echo_conf(tmp_path: Path) -> Path:
    """main.cf for the echo workers: a private queue_directory."""
    conf = tmp_path / "conf"
    queue = tmp_path / "queue"
    conf.mkdir()
    queue.mkdir()
    (conf / "main.cf").write_text(f"queue_directory = {queue}\n")
    past = time.time() - 10  # not "modified in the last second" (a 1 s pause)
    os.utime(conf / "main.cf", (past, past))
    return conf


def both_listening(listener_path: str, pids: set[int], timeout: float = 20) -> None:
    """Wait until each sibling has answered a client: both poll the socket now."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while seen != pids:
        assert time.monotonic() < deadline, f"only {seen} of {pids} answered"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(listener_path)
            seen.add(int(ask(client, "@pid")))
        time.sleep(0.01)


@contextlib.contextmanager
def two_siblings(tmp_path: Path, event_loop: str) -> Iterator[tuple[str, int, int]]:
    """Two echo workers accepting on one listen socket: (its path, their pids)."""
    if event_loop == "uvloop":
        pytest.importorskip("uvloop")
    conf = echo_conf(tmp_path)
    path = str(tmp_path / "echo.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(BACKLOG)
    argv = python_module(ECHO, "-t", "unix", "-o", NO_USE_LIMIT)
    env = {"PYTHONPATH": str(REPO_ROOT), "PYPROXYMAP_EVENT_LOOP": event_loop}
    with (
        StandinMaster(argv, env=env, config_dir=conf, listener=listener) as first,
        StandinMaster(argv, env=env, config_dir=conf, listener=listener) as second,
    ):
        listener.close()  # the stand-ins hold their copies
        both_listening(path, {first.pid, second.pid})
        yield path, first.pid, second.pid


def split(clients: list[socket.socket], pids: tuple[int, int]) -> tuple[int, int]:
    """How many of the clients each worker took; closes them."""
    taken = Counter(int(ask(client, "@pid")) for client in clients)
    assert sum(taken[pid] for pid in pids) == len(clients)
    for client in clients:
        client.close()
    time.sleep(0.2)  # both workers back to no clients
    return taken[pids[0]], taken[pids[1]]


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("burst", [16, 64])
def test_a_burst_spreads_over_two_workers(tmp_path, event_loop, burst):
    """A burst of new clients against two idle sibling workers splits nearly evenly
    (the one that takes fewer takes at least 7/16 of them) in at least 4 of 5 bursts,
    so both CPUs work. (Both accepting as fast as they can, one of them usually took
    nearly all. With waits shorter than the loops' millisecond timers, a uvloop
    worker took up to ten of a burst of 16 at once: 11 to 5 was common.)"""
    with two_siblings(tmp_path, event_loop) as (path, *pids):
        splits = []
        for _ in range(BURSTS):
            clients = []
            for _ in range(burst):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.settimeout(30)
                client.connect(path)
                clients.append(client)
            splits.append(split(clients, (pids[0], pids[1])))
    print(f"\n{event_loop}: bursts of {burst} split {splits}")
    assert sum(min(pair) >= burst * 7 / 16 for pair in splits) >= BURSTS - 1, splits


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_a_flood_spreads_over_two_workers(tmp_path, descriptors, event_loop):
    """2 000 clients connecting at once to two sibling workers: each takes at least a
    quarter of them (the batches of a flooded worker do not let one take all)."""
    with two_siblings(tmp_path, event_loop) as (path, *pids):
        started = time.perf_counter()
        clients = flood(path, FLOOD, None)
        elapsed = time.perf_counter() - started
        for client in clients:
            client.settimeout(30)
        taken = split(clients, (pids[0], pids[1]))
    print(f"\n{event_loop}: flood of {FLOOD} split {taken}, connected in {elapsed:.3f} s")
    assert min(taken) >= FLOOD / 4
