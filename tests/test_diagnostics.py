"""Diagnostics that reach the operator (issue 12, point 3).

``start`` refuses a main.cf that every child would die of, naming file and line, instead
of starting a master whose workers crash-loop into "bad command startup". ``check`` asks
each worker to open its approved tables itself (``proxymap -S -n check-proxymap``), with
the privileges it serves with, and prints the real cause of each failure -- never "?"
or "try again". Real processes throughout: our master, our worker, Postfix's postmap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_arbiter import Instance, instance_factory, wait_until  # noqa: F401

WORKER = Path(sys.executable).parent / "proxymap"
OUR_SERVICES = "proxymap unix - - n - - pyproxymap\nproxywrite unix - - n - 1 pyproxymap\n"


def ours(instance_factory, main_cf: str = "", master_cf: str = OUR_SERVICES) -> Instance:  # noqa: F811
    pf = instance_factory(master_cf, "pyproxymap_prefork = 1\n" + main_cf)
    (pf.daemon / "pyproxymap").symlink_to(WORKER)
    return pf


def test_start_refuses_a_macro_that_does_not_expand(instance_factory):  # noqa: F811
    pf = ours(instance_factory, "max_idle = ${unclosed\n")
    done = subprocess.run(
        [*pf_command(pf), "start"], capture_output=True, text=True, timeout=30, check=False
    )
    main_cf = pf.conf / "main.cf"
    line = main_cf.read_text().splitlines().index("max_idle = ${unclosed") + 1
    assert done.returncode == 78, done.stderr
    assert (
        f"fatal: {main_cf}, line {line}: max_idle = ${{unclosed: truncated macro "
        f'reference: "${{unclosed"'
    ) in done.stderr
    # Nothing was started: no socket, no pid lock, no throttling.
    assert not (pf.queue / "private" / "proxymap").exists()
    assert "throttling" not in done.stderr


def test_start_refuses_a_bad_override_in_master_cf(instance_factory):  # noqa: F811
    pf = ours(instance_factory, master_cf="proxymap unix - - n - - pyproxymap -o max_idle=5x\n")
    done = pf.cli("start")
    assert done.returncode == 78
    assert (
        f"{pf.conf}/master.cf: line 1: service proxymap: -o max_idle: parameter "
        "max_idle: bad time value or unit: 5x"
    ) in done.stderr


def test_reload_refuses_what_start_refuses_and_keeps_serving(instance_factory):  # noqa: F811
    pf = ours(instance_factory)
    pf.start()
    assert pf.postmap("alice").outcome() == ("0", "alice@example.com")
    # A parameter Postfix's own postmap does not read: it still works as the client.
    pf.write_main_cf("pyproxymap_prefork = 1\nsite_note = ${nope\n")
    assert pf.cli("reload").returncode == 0
    wait_until(lambda: "reload failed, keeping the running configuration" in pf.log())
    assert "site_note = ${nope: truncated macro reference" in pf.log()
    assert pf.postmap("bob").outcome() == ("0", "bob@example.com")
    assert "bad command startup" not in pf.log()


def test_check_reports_the_cause_of_each_table(instance_factory):  # noqa: F811
    pf = ours(instance_factory)
    secret = pf.tables / "root-only"
    secret.write_text("k v\n")
    secret.chmod(0o600)
    Instance.backdate(secret)
    tables = [
        pf.table,
        "inline:{a=b,c=d}",
        "foo:bar",
        f"texthash:{pf.tables}/absent",
        f"texthash:{secret}",
    ]
    pf.write_main_cf("proxy_read_maps = " + " ".join(f"proxy:{t}" for t in tables) + "\n")
    done = pf.cli("check")
    assert done.returncode == 78, done.stdout + done.stderr
    out = done.stdout
    assert f"approved: {pf.table}: ok" in out
    assert "approved: inline:{a=b,c=d}: ok" in out  # one table, not split at the comma
    assert "approved: foo:bar: error: unsupported dictionary type: foo" in out
    assert (
        f"approved: texthash:{pf.tables}/absent: error: open database "
        f"{pf.tables}/absent: No such file or directory"
    ) in out
    # proxymap runs unprivileged (master.cf "-"): it opens tables as postfix, so does check.
    assert f"approved: texthash:{secret}: error: open database {secret}: Permission denied" in out
    assert "try again" not in out and "?" not in out
    assert "4 problem(s)" not in done.stderr and "3 problem(s)" in done.stderr


def test_check_shows_why_a_worker_cannot_run(instance_factory):  # noqa: F811
    pf = ours(instance_factory, master_cf="proxymap unix - - n - - pyproxymap stray\n")
    done = pf.cli("check")
    assert done.returncode == 78
    assert "fatal: unexpected command-line argument: stray" in done.stderr
    assert "?" not in done.stdout + done.stderr


def test_worker_self_check_mode(tmp_path):
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}\n"
        f"proxy_read_maps = proxy:inline:{{a=b,c=d}} proxy:foo:bar, proxy:static:x\n"
    )
    env = {"MAIL_CONFIG": str(tmp_path), "PATH": os.environ.get("PATH", "")}
    done = subprocess.run(
        [str(WORKER), "-S", "-V", "-n", "check-proxymap"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.splitlines() == [
        "foo:bar\terror: unsupported dictionary type: foo",
        "inline:{a=b,c=d}\tok",
        "static:x\tok",
    ]
    assert done.returncode == 1  # a table failed
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}\nproxy_read_maps = proxy:static:x\n"
    )
    done = subprocess.run(
        [str(WORKER), "-S", "-n", "check-proxymap"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "static:x\tok\n")


def pf_command(pf: Instance) -> list[str]:
    from tests.test_arbiter import MASTER_COMMAND

    return [MASTER_COMMAND, "-c", str(pf.conf)]
