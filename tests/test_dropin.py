"""Our worker as a drop-in: the real Postfix master spawns it, real clients query it.

The private instance's daemon/proxymap points at the venv's ``proxymap`` console script;
everything else (master, postlogd, postmap) is the installed Postfix 3.7. Every answer
through ``proxy:`` must equal what the same client gets by opening the table itself.
"""

from __future__ import annotations

import os
import pwd
import sys
import time
from pathlib import Path

import pytest

from tests.support.postfix import PrivatePostfix, ensure_postfix, proc_cmdline, settle_files

pytestmark = pytest.mark.postfix

# The venv's console script; PYPROXYMAP_WORKER points elsewhere (e.g. the C proxymap,
# to check this test file itself).
OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
ALIASES = "alice alice@example.com\nBob bob@example.com\nmulti  first,\n  second\n"
# The master passes only import_environment to its children; name=value forces a value.
PROBE_VARIABLE = "pyproxymap_probe"
IMPORT_ENVIRONMENT = (
    "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME "
    f"{PROBE_VARIABLE}=seen-by-the-worker"
)


@pytest.fixture(scope="module")
def ours():
    ensure_postfix()
    assert OUR_PROXYMAP.exists(), f"our worker is not installed: {OUR_PROXYMAP}"
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP,
        name="harness-dropin",
        main_cf={"import_environment": IMPORT_ENVIRONMENT},
    )
    texthash = instance.tables / "aliases"
    texthash.write_text(ALIASES)
    texthash.chmod(0o644)
    (instance.tables / "unapproved").write_text(ALIASES)
    settle_files(instance.tables)
    instance.table_map = {
        name: spec.format(tables=instance.tables) for name, spec in TABLES.items()
    }
    instance.proxy_read_maps = " ".join(
        "proxy:" + spec for name, spec in instance.table_map.items() if name != "unapproved"
    )
    with instance:
        instance.wait_until_serving("alice", instance.table_map["texthash"])
        yield instance


TABLES = {
    "texthash": "texthash:{tables}/aliases",
    "inline": 'inline:{{alice=A1, {{"two words" = spaced value}}, bob=B1}}',
    "static": "static:{{a static value}}",
    "fail": "fail:dropin-test",
    "environ": "environ:ignored",
    "passwd": "unix:passwd.byname",
    "group": "unix:group.byname",
    "unapproved": "texthash:{tables}/unapproved",
}


def passwd_line(name: str) -> str:
    entry = pwd.getpwnam(name)
    fields = (
        entry.pw_name,
        entry.pw_passwd,
        entry.pw_uid,
        entry.pw_gid,
        entry.pw_gecos,
        entry.pw_dir,
        entry.pw_shell,
    )
    return ":".join(map(str, fields))


# (table, key, expected outcome in vectors notation, or None = whatever direct says)
LOOKUPS = [
    ("texthash", "alice", ("0", "alice@example.com")),
    ("texthash", "bob", ("0", "bob@example.com")),
    ("texthash", "multi", ("0", "first,  second")),
    ("texthash", "nobody", ("1", "")),
    ("inline", "alice", ("0", "A1")),
    ("inline", '"two words"', ("0", "spaced value")),
    ("inline", "carol", ("1", "")),
    ("static", "anything", ("0", "a static value")),
    ("fail", "anything", ("E", "")),
    ("environ", "HOME", ("1", "")),
    ("passwd", "root", ("0", passwd_line("root"))),
    ("passwd", "postfix", ("0", passwd_line("postfix"))),
    ("passwd", "no-such-user-here", ("1", "")),
    ("group", "root", None),
    ("group", "no-such-group-here", ("1", "")),
]


@pytest.mark.parametrize(
    ("table", "key", "expected"), LOOKUPS, ids=[f"{t}-{k}" for t, k, _ in LOOKUPS]
)
def test_lookup_through_our_proxymap(ours, table, key, expected):
    spec = ours.table_map[table]
    direct = ours.lookup(key, spec).outcome()
    proxied = ours.lookup(key, "proxy:" + spec)
    assert proxied.outcome() == direct, proxied.stderr + ours.log_tail()
    if expected is not None:
        assert proxied.outcome() == expected


def test_worker_sees_the_environment_the_master_gives(ours):
    result = ours.lookup(PROBE_VARIABLE, "proxy:" + ours.table_map["environ"])
    assert result.outcome() == ("0", "seen-by-the-worker"), result.stderr


def test_unapproved_table_is_denied(ours):
    table = ours.table_map["unapproved"]
    result = ours.lookup("alice", "proxy:" + table)
    assert result.outcome() == ("E", "")
    assert f'proxymap service is not configured for table "{table}"' in result.stderr


def test_worker_title_and_identity(ours):
    ours.lookup("alice", "proxy:" + ours.table_map["texthash"])
    workers = ours.wait_for_workers()
    assert workers, "no proxymap worker under our master"
    postfix_uid = pwd.getpwnam("postfix").pw_uid
    for pid in workers:
        assert " ".join(proc_cmdline(pid)) == "proxymap -t unix -d -u"
        # Ours, not the C daemon: the process image is the Python interpreter.
        assert "python" in os.path.basename(os.path.realpath(f"/proc/{pid}/exe"))
        assert os.stat(f"/proc/{pid}").st_uid == postfix_uid


def test_worker_runs_uvloop_after_the_privilege_drop(ours):
    """uvloop is chosen (imported) while still root: mail_owner may not read the venv."""
    pytest.importorskip("uvloop")
    ours.lookup("alice", "proxy:" + ours.table_map["texthash"])
    workers = ours.wait_for_workers()
    assert workers
    for pid in workers:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "/uvloop/loop." in maps, f"worker {pid} does not run uvloop"


def test_proxywrite_worker_title(ours):
    with ours.client("proxywrite") as client:
        assert client.announcement == {"protocol": b"proxymap_protocol"}
    workers = ours.wait_for_workers("proxywrite")
    assert workers
    assert [" ".join(proc_cmdline(pid)) for pid in workers] == [
        "proxymap -l -n proxywrite -t unix -d -u"
    ]


def test_reload_then_stop_leave_no_stray_worker():
    ensure_postfix()
    instance = PrivatePostfix(proxymap_program=OUR_PROXYMAP, name="harness-dropin-life")
    table = f"texthash:{instance.tables}/aliases"
    (instance.tables / "aliases").write_text(ALIASES)
    settle_files(instance.tables)
    instance.proxy_read_maps = "proxy:" + table
    try:
        instance.start()
        assert instance.postmap_q("alice", "proxy:" + table) == (0, "alice@example.com")
        before = instance.wait_for_workers()
        assert before

        instance.reload()
        deadline = time.monotonic() + 10
        while set(before) & set(instance.instance_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(before) & set(instance.instance_pids()), "old worker survived reload"
        assert instance.postmap_q("alice", "proxy:" + table) == (0, "alice@example.com")

        assert instance.stop() == []
        assert instance.instance_pids() == []
    finally:
        instance.stop()
        instance.cleanup()


def test_documented_dropin_under_another_command_name():
    """docs/DROPIN.md: master.cf runs `pyproxymap`; the master adds -n proxymap."""
    ensure_postfix()
    instance = PrivatePostfix(
        proxymap_program=OUR_PROXYMAP, proxymap_command="pyproxymap", name="harness-dropin-name"
    )
    table = f"texthash:{instance.tables}/aliases"
    (instance.tables / "aliases").write_text(ALIASES)
    settle_files(instance.tables)
    instance.proxy_read_maps = "proxy:" + table
    with instance:
        assert instance.postmap_q("Bob", "proxy:" + table) == (0, "bob@example.com")
        workers = instance.wait_for_workers()
        assert [" ".join(proc_cmdline(pid)) for pid in workers] == [
            "pyproxymap -n proxymap -t unix -d -u"
        ]
