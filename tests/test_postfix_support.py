"""The private-Postfix fixture itself, proven against the installed C proxymap.

If these fail, a failure of the drop-in or differential tests says nothing about our
worker: the harness is broken.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from proxymap import flags
from tests.support.postfix import (
    C_PROXYMAP,
    PrivatePostfix,
    ensure_postfix,
    missing_postfix_parts,
    paths_unreadable_by_postfix,
    proc_cmdline,
    run_postmap,
    service_name_of,
    settle_files,
)

pytestmark = pytest.mark.postfix

ALIASES = "alice alice@example.com\nBob bob@example.com\n"


def write_tables(directory) -> dict[str, str]:
    source = directory / "aliases"
    source.write_text(ALIASES)
    source.chmod(0o644)
    (directory / "unapproved").write_text(ALIASES)
    assert run_postmap([f"hash:{source}"]).exit == 0
    os.chmod(f"{source}.db", 0o644)
    settle_files(directory)
    return {
        "texthash": f"texthash:{source}",
        "hash": f"hash:{source}",
        "unapproved": f"texthash:{directory / 'unapproved'}",
    }


@pytest.fixture(scope="module")
def c_postfix():
    ensure_postfix()
    instance = PrivatePostfix(name="harness-c")
    tables = write_tables(instance.tables)
    instance.proxy_read_maps = f"proxy:{tables['texthash']} proxy:{tables['hash']}"
    instance.tables_by_type = tables
    with instance:
        yield instance


def test_postfix_is_complete():
    ensure_postfix()
    assert missing_postfix_parts() == []


def test_daemon_directory_swaps_only_proxymap(c_postfix):
    assert os.readlink(c_postfix.daemon_dir / "proxymap") == str(C_PROXYMAP)
    assert os.readlink(c_postfix.daemon_dir / "postlogd") == "/usr/lib/postfix/sbin/postlogd"
    assert c_postfix.socket_path("proxymap").is_socket()
    assert c_postfix.socket_path("proxywrite").is_socket()


@pytest.mark.parametrize("table_type", ["texthash", "hash"])
def test_postmap_through_proxy(c_postfix, table_type):
    table = "proxy:" + c_postfix.tables_by_type[table_type]
    assert c_postfix.postmap_q("alice", table) == (0, "alice@example.com")
    # postmap folds the key to lower case; the hash file was built folded, texthash not.
    expected_bob = (0, "bob@example.com") if table_type == "hash" else (1, "")
    assert c_postfix.postmap_q("Bob", table) == expected_bob
    assert c_postfix.postmap_q("nobody", table) == (1, "")


def test_postmap_q_many(c_postfix):
    exit_status, found = c_postfix.postmap_q_many(
        ["alice", "nobody", "bob"], "proxy:" + c_postfix.tables_by_type["hash"]
    )
    assert exit_status == 0
    assert found == {"alice": "alice@example.com", "bob": "bob@example.com"}


def test_unapproved_table_is_denied(c_postfix):
    table = c_postfix.tables_by_type["unapproved"]
    result = c_postfix.lookup("alice", "proxy:" + table)
    assert result.outcome() == ("E", "")
    assert f'proxymap service is not configured for table "{table}"' in result.stderr
    assert f'request for unapproved table: "{table}"' in c_postfix.maillog()


def test_raw_client_sees_the_wire_protocol(c_postfix):
    with c_postfix.client() as client:
        assert client.announcement == {"protocol": b"proxymap_protocol"}
        reply = client.open(c_postfix.tables_by_type["hash"])
        assert reply["status"] == b"0"
        assert int(reply["flags"]) & flags.IMPL_MASK == flags.FIXED
        reply = client.lookup(c_postfix.tables_by_type["hash"], "alice")
        assert reply == {"status": b"0", "value": b"alice@example.com"}
        unapproved = client.open(c_postfix.tables_by_type["unapproved"])
        assert unapproved == {"status": b"4", "flags": b"0"}


def test_worker_is_the_c_proxymap_spawned_by_our_master(c_postfix):
    c_postfix.postmap_q("alice", "proxy:" + c_postfix.tables_by_type["hash"])
    workers = c_postfix.wait_for_workers()
    assert workers
    for pid in workers:
        assert proc_cmdline(pid) == ["proxymap", "-t", "unix", "-d", "-u"]
        assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(C_PROXYMAP)
        assert os.stat(f"/proc/{pid}").st_uid == c_postfix_uid()


def c_postfix_uid() -> int:
    import pwd

    return pwd.getpwnam("postfix").pw_uid


def test_service_names_from_argv():
    assert service_name_of(["proxymap", "-l", "-n", "proxywrite", "-t", "unix"]) == "proxywrite"
    assert service_name_of(["proxymap", "-t", "unix", "-d", "-u"]) == "proxymap"
    assert service_name_of(["/usr/bin/python3", "/x/daemon/proxymap", "-t", "unix"]) == "proxymap"


def test_permission_check_sees_what_postfix_sees():
    ensure_postfix()
    # Not tmp_path: pytest's base directory is private to root, which is the point here.
    top = Path(tempfile.mkdtemp(prefix="harness-perm-"))
    top.chmod(0o755)
    closed = top / "closed"
    closed.mkdir(mode=0o700)
    (closed / "table").write_text("k v\n")
    assert paths_unreadable_by_postfix([closed, closed / "table"]) == [
        str(closed),
        str(closed / "table"),
    ]
    closed.chmod(0o755)
    (closed / "table").chmod(0o644)
    assert paths_unreadable_by_postfix([closed, closed / "table"]) == []
    shutil.rmtree(top)


def test_reload_and_stop_leave_no_stray_process():
    ensure_postfix()
    instance = PrivatePostfix(name="harness-life")
    tables = write_tables(instance.tables)
    instance.proxy_read_maps = f"proxy:{tables['hash']}"
    try:
        instance.start()
        assert instance.time_to_first_answer("alice", tables["hash"]) < 10
        before = instance.wait_for_workers()
        assert before

        instance.reload()
        deadline = time.monotonic() + 10
        while set(before) & set(instance.worker_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(before) & set(instance.worker_pids()), "old worker survived reload"
        assert instance.postmap_q("alice", "proxy:" + tables["hash"]) == (0, "alice@example.com")
        assert "reload" in instance.maillog()

        everything = instance.instance_pids()
        assert instance.master_pid in everything
        assert instance.stop() == []
        assert instance.instance_pids() == []
    finally:
        instance.stop()
        instance.cleanup()
