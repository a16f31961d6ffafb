"""Ask a proxymap worker about its tables, the way the master would run it.

NAME
    selfcheck -- run a worker's one-shot modes; open tables with Postfix's postmap

SYNOPSIS
    results, cause = self_check(path, entry, env)          # [(table, "ok"|"error: ...")]
    tables = export_tables(path, entry, env)               # approved names, or None
    outcome = postmap_probe("texthash:/x", "/etc/postfix", "postfix")

DESCRIPTION
    ``self_check`` runs ``path -S -V -n check-SERVICE -t TYPE [-u] [-c] ARGS`` (the
    worker's self-check mode, see ``proxymap.server``): as the master would run the
    service (its privileges, chroot and master.cf arguments, ``-o`` included), with
    ``-V`` so that a fatal error reaches stderr and is reported instead of a bare
    exit status. A worker without that mode -- Postfix's proxymap -- dies with
    "service name must be ..." (``NO_CHECK_MODE``): callers then fall back to
    ``export_tables`` (Postfix 3.11+ and ours) and ``postmap_probe``, a direct
    ``postmap -q`` as the service's user: Postfix's own words about the table.

    ``master`` never imports ``proxymap``: this module only runs programs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Callable

from master.masterconf import ServiceEntry

WORKER_TIMEOUT = 30.0
# Exit status of the self-check when a table failed (its lines say which).
TABLE_FAILED = 1
# What a Postfix proxymap without our check mode says about ``-n check-proxymap``.
NO_CHECK_MODE = "service name must be"
# postmap -q looks this key up: a key no table is expected to have.
PROBE_KEY = "pyproxymap-check-probe"
POSTMAP_ENV_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

Preexec = Callable[[], None] | None


def worker_argv(path: str, entry: ServiceEntry, mode: str, *, privileged: bool) -> list[str]:
    """The worker's command line for a one-shot mode: -S -V -n MODE-SERVICE, and the
    master's -u/-c when privileged (root, dropping privileges as the service would)."""
    argv = [path, "-S", "-V", "-n", f"{mode}-{entry.name}", "-t", entry.transport]
    if privileged:
        argv += ["-u"] * entry.unprivileged + ["-c"] * entry.chroot
    return argv + list(entry.args)


def run_program(
    argv: list[str], env: dict[str, str], preexec: Preexec = None
) -> subprocess.CompletedProcess | str:
    """The finished process, or why it could not run (a string)."""
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=WORKER_TIMEOUT,
            check=False,
            preexec_fn=preexec,
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run {argv[0]}: {err}"


def last_words(done: subprocess.CompletedProcess) -> str:
    """The program's last line on stderr (with -V a worker's fatal message goes there)."""
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}, nothing on stderr"


def self_check(
    path: str,
    entry: ServiceEntry,
    env: dict[str, str],
    preexec: Preexec = None,
) -> tuple[list[tuple[str, str]] | None, str]:
    """([(table, outcome)], "") when the worker could check; (None, cause) when it
    could not run or has no self-check mode (then the cause contains NO_CHECK_MODE).

    With ``preexec`` the caller already runs the worker as the service's user (it
    must then not be asked to drop privileges itself); else, as root, it gets -u/-c.
    """
    privileged = preexec is None and os.geteuid() == 0
    done = run_program(worker_argv(path, entry, "check", privileged=privileged), env, preexec)
    if isinstance(done, str):
        return None, done
    results = []
    for line in done.stdout.decode(errors="replace").splitlines():
        table, tab, outcome = line.rpartition("\t")
        if tab:
            results.append((table, outcome))
    if done.returncode == 0 or (results and done.returncode == TABLE_FAILED):
        return results, ""
    return None, last_words(done)


def export_tables(path: str, entry: ServiceEntry, env: dict[str, str]) -> list[str] | None:
    """The approved tables, by the worker's export mode (Postfix 3.11+ and ours)."""
    argv = worker_argv(path, entry, "export-proxy", privileged=os.geteuid() == 0)
    done = run_program(argv, env)
    if isinstance(done, str) or done.returncode != 0:
        return None
    return done.stdout.decode(errors="replace").splitlines()


def postmap_probe(table: str, config_dir: str, user: str | None) -> str:
    """``ok``, ``no such key`` or ``error: <postmap's words>`` for a direct
    ``postmap -q`` of table (as user, when given): how Postfix itself opens it."""
    postmap = shutil.which("postmap") or "/usr/sbin/postmap"
    env = {"MAIL_CONFIG": config_dir, "LANG": "C", "PATH": POSTMAP_ENV_PATH}
    preexec = become(user) if user else None
    done = run_program([postmap, "-c", config_dir, "-q", PROBE_KEY, table], env, preexec)
    if isinstance(done, str):
        return f"error: {done}"
    # "postmap: fatal: <cause>", after warnings about the table that say more (and
    # warnings about other things, main.cf for one, that do not concern it).
    causes = []
    for line in done.stderr.decode(errors="replace").splitlines():
        level, _, text = line.partition(": ")[2].partition(": ")
        if level in ("fatal", "error") or (level == "warning" and text.startswith(table)):
            causes.append(text)
    if causes:
        return "error: " + "; ".join(causes)
    return "ok" if done.returncode == 0 else "no such key"


def become(user: str) -> Callable[[], None]:
    """A preexec function that drops to user and its groups, as a worker's -u does."""
    entry = pwd.getpwnam(user)
    groups = os.getgrouplist(user, entry.pw_gid)

    def drop() -> None:
        os.setgroups(groups)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    return drop
