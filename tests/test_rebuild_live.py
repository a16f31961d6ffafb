"""A hash/lmdb table rebuilt by the real postmap while our worker serves it.

Clients keep asking through the real Postfix master and our worker while ``postmap``
rebuilds the table again and again (in place, under its exclusive lock). Every answer
must be the old or the new value of that key -- never "not found", never a torn value.
Afterwards the worker that had the old file open exits before its next accept
(``table … has changed -- restarting``) and a new connection sees the new content.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.postfix import PrivatePostfix, ensure_postfix, run_postmap, settle_files

pytestmark = pytest.mark.postfix

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
KEYS = [f"key{i}" for i in range(500)]


def write_source(path: Path, version: str) -> None:
    path.write_text("".join(f"{key} {version}-{key}\n" for key in KEYS))
    path.chmod(0o644)


def build(table: str) -> None:
    done = run_postmap([table], timeout=60)
    assert done.exit == 0, done.stderr


def ask_all(instance: PrivatePostfix, table: str) -> dict[str, str]:
    done = run_postmap(
        ["-q", "-", f"proxy:{table}"],
        conf_dir=instance.conf_dir,
        stdin="".join(f"{key}\n" for key in KEYS).encode(),
        timeout=60,
    )
    assert "fatal" not in done.stderr, done.stderr
    return dict(line.split("\t", 1) for line in done.stdout.split("\n") if line)


@pytest.mark.parametrize("table_type", ["hash", "lmdb"])
def test_rebuild_while_serving(table_type):
    ensure_postfix()
    instance = PrivatePostfix(proxymap_program=OUR_PROXYMAP, name=f"rebuild-{table_type}")
    source = instance.tables / "users"
    table = f"{table_type}:{source}"
    instance.proxy_read_maps = f"proxy:{table}"
    write_source(source, "v1")
    build(table)
    settle_files(instance.tables)
    answers: list[dict[str, str]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            answers.append(ask_all(instance, table))

    with instance:
        instance.wait_until_serving(KEYS[0], table)
        first_workers = set(instance.worker_pids("proxymap"))
        reader = threading.Thread(target=keep_asking)
        reader.start()
        try:
            for round_number in range(6):
                write_source(source, "v2" if round_number % 2 == 0 else "v1")
                build(table)
                time.sleep(0.3)
            write_source(source, "v3")
            build(table)
            time.sleep(0.5)
        finally:
            stop.set()
            reader.join(120)
        assert len(answers) >= 3, f"only {len(answers)} client runs overlapped the rebuilds"
        for answer in answers:
            assert set(answer) == set(KEYS), "a key was missing during the rebuild"
            for key, value in answer.items():
                assert value in {f"v1-{key}", f"v2-{key}", f"v3-{key}"}, (key, value)
        final = ask_all(instance, table)
        assert final == {key: f"v3-{key}" for key in KEYS}
        if table_type == "hash":  # lmdb is multi-writer: rewritten in place, no restart
            assert f"table {table}: has changed -- restarting" in instance.maillog()
            assert not first_workers & set(instance.worker_pids("proxymap")), (
                "the worker that had the old file open is still serving"
            )


@pytest.mark.serial
def test_a_locked_table_does_not_hold_up_the_other_clients():
    """While a writer holds the hash file's exclusive lock (postmap rebuilding it), a
    lookup on it waits -- and so does that client's next request -- but the worker's
    other clients are answered. The C proxymap blocks in flock(), and with it every
    client of that process. One worker (maxproc 1), so that all clients share it."""
    import fcntl
    import select

    ensure_postfix()
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP, name="locked-hash", proxymap_maxproc="1"
    )
    source = instance.tables / "users"
    hashed, text = f"hash:{source}", f"texthash:{source}"
    instance.proxy_read_maps = f"proxy:{hashed} proxy:{text}"
    write_source(source, "v1")
    build(hashed)
    settle_files(instance.tables)
    with instance:
        instance.wait_until_serving(KEYS[0], hashed)
        with (
            instance.client() as waiting,
            instance.client() as other,
            open(f"{source}.db", "rb") as db_file,
        ):
            waiting.lookup(hashed, "key1")  # the table is open in the worker
            fcntl.flock(db_file, fcntl.LOCK_EX)  # what postmap holds while it rebuilds
            try:
                waiting.send(
                    ("request", "lookup"), ("table", hashed), ("flags", 0x80041), ("key", "key2")
                )
                started = time.monotonic()
                for n in range(20):
                    reply = other.lookup(text, f"key{n}")
                    assert reply["value"] == f"v1-key{n}".encode()
                assert time.monotonic() - started < 1.0
                readable, _, _ = select.select([waiting.sock], [], [], 0.3)
                assert not readable, "answered although the writer still holds the lock"
            finally:
                fcntl.flock(db_file, fcntl.LOCK_UN)
            reply = waiting.read_reply()
            assert (reply["status"], reply["value"]) == (b"0", b"v1-key2")
            assert waiting.lookup(hashed, "key3")["value"] == b"v1-key3"
        assert len(instance.worker_pids("proxymap")) == 1
