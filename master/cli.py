"""``proxymap-master``: start, stop, reload, inspect and check the pre-forking master.

NAME
    proxymap-master -- command-line front end of ``master.arbiter``

SYNOPSIS
    proxymap-master [-c DIR] [-v] start [--daemon]
    proxymap-master [-c DIR] stop [--fast] [--timeout SECONDS]
    proxymap-master [-c DIR] reload
    proxymap-master [-c DIR] status [--json]
    proxymap-master [-c DIR] check

DESCRIPTION
    ``-c DIR`` is the configuration directory with main.cf and master.cf (default
    ``$MAIL_CONFIG``, else ``/etc/postfix``); it becomes ``$config_directory`` and the
    children's ``MAIL_CONFIG``, so a main.cf may place everything relative to itself
    (``queue_directory = $config_directory/../run/queue``) and still hand absolute paths
    to every reader, the real ``postmap`` included.

    start     run the master in the foreground (logs on stderr; children get ``-d``), or
              detached with ``--daemon`` (python-daemon; the pid file stays locked and the
              listen and status descriptors are preserved across the fork).
    stop      SIGTERM (graceful: wait for the children) or, with ``--fast``, SIGQUIT;
              waits until the pid-file lock is released.
    reload    SIGHUP: re-read both files, new generation, old workers exit.
    status    the live state from the master's control socket
              (``$queue_directory/pid/master.ctl``): services, workers, generations,
              idle/busy, use counts.
    check     parse main.cf and master.cf (errors name file and line), create missing
              queue directories (as ``postfix check`` does), check every command exists
              in daemon_directory, ask each proxymap/proxywrite worker for its approved
              tables (``<command> -S -n export-proxy-<service>``; without export mode,
              as in Postfix 3.7, the proxy: entries of main.cf) and have the worker open
              each one (a lookup in stand-alone mode, ``-S``).

EXIT STATUS
    0 success; 1 failure; 3 (status) no master running; 75 another master runs;
    78 configuration error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import click

from master import log as postfix_log
from master.arbiter import EX_CONFIG, Arbiter, ArbiterError, load_configuration
from master.control import control_path, query
from master.listen import owner_ids, prepare_queue_directory
from master.mainconf import MainConfig, MainConfigError
from master.pidfile import running_pid

log = logging.getLogger("master")

PROGRAM = "proxymap-master"
# The tag is <syslog_name>/master, as for Postfix's master: log watchers know it.
PROCESS_NAME = "master"
NOT_RUNNING = 3
EXPORT_TIMEOUT = 30.0


def setup_logging(config: MainConfig | None, verbose: int, *, to_stderr: bool) -> None:
    """Postfix-style records (``master.log``): syslog or postlog, plus stderr in front."""
    if config is None:
        postfix_log.setup_early(PROCESS_NAME, stderr=to_stderr, verbose=verbose,
                                tag_with_logtag=True)
    else:
        postfix_log.setup(PROCESS_NAME, config, stderr=to_stderr, verbose=verbose)


def fail(message: str, status: int = 1) -> None:
    click.echo(f"{PROGRAM}: fatal: {message}", err=True)
    sys.exit(status)


@click.group()
@click.option("-c", "config_dir", envvar="MAIL_CONFIG", default="/etc/postfix",
              show_default=True, type=click.Path(file_okay=False),
              help="configuration directory (main.cf, master.cf)")
@click.option("-v", "verbose", count=True, help="more logging; children get -v too")
@click.pass_context
def main(ctx: click.Context, config_dir: str, verbose: int) -> None:
    """A pre-forking Postfix master(8) for proxymap."""
    ctx.obj = {"config_dir": os.path.abspath(config_dir), "verbose": verbose}


def _queue_directory(config_dir: str) -> str:
    """Only main.cf: stop/reload/status must work while master.cf is being edited."""
    try:
        main_cf = MainConfig.load(config_dir)
        return main_cf.get("queue_directory") or "/var/spool/postfix"
    except MainConfigError as err:
        fail(str(err), EX_CONFIG)


def _pid_path(config_dir: str) -> str:
    return os.path.join(_queue_directory(config_dir), "pid", "master.pid")


# ---------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------


def _usage_hint(arbiter: Arbiter) -> list[str]:
    """Where the sockets are and one postmap command that should answer."""
    lines = []
    for service in arbiter.services.values():
        if service.entry.transport == "unix":
            where = service.entry.socket_path(arbiter.queue_directory)
            lines.append(f"{service.entry.name}: {where} ({service.prefork} pre-forked,"
                         f" maxproc {service.entry.maxproc})")
    table = next((t for t in arbiter.main.get("proxy_read_maps", "").replace(",", " ").split()
                  if t.startswith("proxy:texthash:")), None)
    if table:
        key = _first_key(table.removeprefix("proxy:texthash:")) or "KEY"
        lines.append(f"try: postmap -c {arbiter.config_dir} -q {key} {table}")
        query_tool = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "proxymap-query")
        if os.path.exists(query_tool):
            lines.append(f"  or: {query_tool} -c {arbiter.config_dir} {key} {table}")
    return lines


def _first_key(path: str) -> str | None:
    try:
        with open(path) as table:
            for line in table:
                if line.strip() and not line.lstrip().startswith("#") and line[0] not in " \t":
                    return line.split()[0]
    except OSError:
        return None
    return None


@main.command()
@click.option("--daemon", is_flag=True, help="detach (python-daemon) instead of foreground")
@click.pass_context
def start(ctx: click.Context, daemon: bool) -> None:
    """Run the master (foreground unless --daemon)."""
    config_dir, verbose = ctx.obj["config_dir"], ctx.obj["verbose"]
    setup_logging(None, verbose, to_stderr=True)
    arbiter = Arbiter(config_dir, foreground=not daemon, verbose=verbose)
    try:
        arbiter.setup()
    except ArbiterError as err:
        fail(str(err), err.exit_status)
    setup_logging(arbiter.main, verbose, to_stderr=not daemon)
    for line in _usage_hint(arbiter):
        click.echo(f"{PROGRAM}: {line}", err=True)
    if not daemon:
        sys.exit(arbiter.run())
    import daemon as python_daemon

    context = python_daemon.DaemonContext(
        files_preserve=arbiter.preserved_fds(),
        pidfile=arbiter.pidfile,
        signal_map={},  # the arbiter installs its own, after the fork
        umask=0o022,
        working_directory="/",
    )
    with context:
        setup_logging(arbiter.main, verbose, to_stderr=False)
        sys.exit(arbiter.run())


# ---------------------------------------------------------------------------
# stop / reload
# ---------------------------------------------------------------------------


def _running_master(config_dir: str) -> int:
    pid = running_pid(_pid_path(config_dir))
    if pid is None:
        fail(f"the master is not running (configuration {config_dir})", NOT_RUNNING)
    return pid


@main.command()
@click.option("--fast", is_flag=True, help="SIGQUIT: do not wait for the children")
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait")
@click.pass_context
def stop(ctx: click.Context, fast: bool, timeout: float) -> None:
    """Stop the master and its children."""
    pid_path = _pid_path(ctx.obj["config_dir"])
    pid = _running_master(ctx.obj["config_dir"])
    os.kill(pid, signal.SIGQUIT if fast else signal.SIGTERM)
    deadline = time.time() + timeout
    while running_pid(pid_path) is not None or _process_exists(pid):
        if time.time() > deadline:
            fail(f"master pid {pid} still running after {timeout:.0f}s")
        time.sleep(0.05)
    click.echo(f"{PROGRAM}: stopped master pid {pid}")


def _process_exists(pid: int) -> bool:
    """True while pid runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read main.cf and master.cf (SIGHUP)."""
    pid = _running_master(ctx.obj["config_dir"])
    os.kill(pid, signal.SIGHUP)
    click.echo(f"{PROGRAM}: reload signal sent to master pid {pid}")


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------


def format_status(state: dict) -> str:
    lines = [
        f"master pid {state['pid']}  generation {state['generation']}  "
        f"up {_duration(state['uptime'])}  config {state['config_directory']}",
    ]
    for service in state["services"] + state.get("leaving", []):
        throttle = (f"  THROTTLED {service['throttled_for']:.0f}s"
                    if service["throttled_for"] else "")
        maxproc = service["maxproc"] or "unlimited"
        lines.append(
            f"{service['service']} ({service['type']}, {service['command']}): "
            f"{service['total']} procs, {service['avail']} idle, prefork {service['prefork']}, "
            f"maxproc {maxproc}, spawned {service['spawned']}{throttle}")
        if service["workers"]:
            lines.append(f"    {'PID':>8} {'GEN':>4} {'STATE':<9} {'USES':>5} {'AGE':>8}")
        for worker in service["workers"]:
            lines.append(f"    {worker['pid']:>8} {worker['generation']:>4} "
                         f"{worker['state']:<9} {worker['uses']:>5} "
                         f"{_duration(worker['age']):>8}")
        lines += _format_bounds(service)
    return "\n".join(lines)


def _format_bounds(service: dict) -> list[str]:
    bounds = service.get("connection_bounds")
    if not bounds:
        return []
    per_worker = sum(bound["per_worker"] for bound in bounds)
    maxproc = service["maxproc"]
    most = f"{maxproc} x {per_worker} = {maxproc * per_worker}" if maxproc else "unlimited"
    lines = [f"    backend connections: at most {per_worker} per worker, {most} in all; "
             f"now at most {service['total']} x {per_worker} = {service['total'] * per_worker}"]
    lines += [f"      {bound['per_worker']:>4}  {bound['table']}" for bound in bounds]
    return lines


def _connection_bounds(path: str, service: str, config_dir: str) -> list[dict]:
    """What one worker of the service may open per table (its ``connections-`` report).

    The worker knows its table types; the master only prints what it says. A program
    without that report (the C proxymap) gives none.
    """
    env = {"MAIL_CONFIG": config_dir, "LANG": "C"}
    try:
        done = subprocess.run([path, "-S", "-n", f"connections-{service}"],
                              stdin=subprocess.DEVNULL, capture_output=True, env=env,
                              timeout=EXPORT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    bounds = []
    for line in done.stdout.decode(errors="replace").splitlines():
        table, _, limit = line.rpartition("\t")
        if table and limit.isdigit():
            bounds.append({"table": table, "per_worker": int(limit)})
    return bounds


def _add_connection_bounds(state: dict) -> None:
    config_dir = state["config_directory"]
    try:
        main_cf, entries = load_configuration(config_dir)
    except ArbiterError:
        return
    daemon_directory = main_cf.get("daemon_directory") or "/usr/lib/postfix/sbin"
    paths = {entry.name: entry.executable(daemon_directory) for entry in entries}
    for service in state["services"]:
        name = service["service"]
        if name in ("proxymap", "proxywrite") and name in paths:
            service["connection_bounds"] = _connection_bounds(paths[name], name, config_dir)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="the raw state document")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Services, workers, generations, idle/busy and use counts."""
    queue_directory = _queue_directory(ctx.obj["config_dir"])
    _running_master(ctx.obj["config_dir"])
    try:
        state = query(control_path(queue_directory))
    except (OSError, ValueError) as err:
        fail(f"no answer on {control_path(queue_directory)}: {err}")
    _add_connection_bounds(state)
    click.echo(json.dumps(state, indent=2) if as_json else format_status(state))


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------


def _export_tables(path: str, service: str, config_dir: str) -> tuple[bool, str]:
    """Ask a worker which tables it would serve (3.12-style export mode)."""
    env = {"MAIL_CONFIG": config_dir, "LANG": "C"}
    try:
        done = subprocess.run([path, "-S", "-n", f"export-proxy-{service}"],
                              stdin=subprocess.DEVNULL, capture_output=True, env=env,
                              timeout=EXPORT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, str(err)
    if done.returncode != 0:
        return False, (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
    return True, done.stdout.decode(errors="replace")


# proxymap reply status codes (PROTOCOLS.md 2.4), for readable check output.
_STATUS_NAMES = {"0": "ok", "1": "no such key", "2": "try again", "3": "bad request",
                 "4": "not approved", "5": "table configuration error"}


# What postmap -q sends as lookup flags: UTF8_REQUEST | LOCK | DUP_WARN.
_LOOKUP_FLAGS = b"524353"
_PROBE_KEY = b"pyproxymap-check-probe"


def _open_table(path: str, service: str, table: str, config_dir: str) -> str:
    """One lookup by the worker in stand-alone mode (-S); the status, in words.

    A lookup rather than an ``open``: Postfix opens a broken table as a surrogate that
    fails only when used. The request is the null-terminated attribute list of a 3.7
    client (``request lookup table <name> flags <f> key <probe>``); the first reply
    attribute is the status; "ok" or "no such key" both mean the table works.
    """
    request = b"".join(part + b"\0" for part in (
        b"request", b"lookup", b"table", table.encode(), b"flags", _LOOKUP_FLAGS,
        b"key", _PROBE_KEY)) + b"\0"
    env = {"MAIL_CONFIG": config_dir, "LANG": "C"}
    try:
        done = subprocess.run([path, "-S", "-n", service], input=request, capture_output=True,
                              env=env, timeout=EXPORT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cannot run {path}: {err}"
    fields = done.stdout.split(b"\0")
    if len(fields) >= 2 and fields[0] == b"status":
        code = fields[1].decode(errors="replace").strip()
        return _STATUS_NAMES.get(code, f"status {code}")
    return f"no reply (exit {done.returncode})"


def _approved_from_main_cf(main_cf: MainConfig, service: str) -> list[str]:
    """The proxy:-prefixed elements of proxy_read_maps/proxy_write_maps, prefix removed."""
    parameter = "proxy_write_maps" if service == "proxywrite" else "proxy_read_maps"
    tables = []
    for element in main_cf.get(parameter, "").replace(",", " ").split():
        if element.startswith("proxy:"):
            while element.startswith("proxy:"):
                element = element[len("proxy:"):]
            tables.append(element)
    return sorted(set(tables))


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate main.cf, master.cf, commands and approved tables."""
    config_dir = ctx.obj["config_dir"]
    setup_logging(None, 0, to_stderr=True)
    try:
        main_cf, entries = load_configuration(config_dir)
    except ArbiterError as err:
        fail(str(err), err.exit_status)
    problems = 0
    # Like `postfix check`, create what is missing: workers chdir to queue_directory.
    try:
        queue_directory = main_cf.get("queue_directory") or "/var/spool/postfix"
        owner = owner_ids(main_cf.get("mail_owner") or "postfix")
        prepare_queue_directory(queue_directory, owner, main_cf.get("data_directory"))
    except OSError as err:
        fail(f"queue directory: {err}")
    daemon_directory = main_cf.get("daemon_directory") or "/usr/lib/postfix/sbin"
    for entry in entries:
        path = entry.executable(daemon_directory)
        if not os.access(path, os.X_OK):
            click.echo(f"{entry.where}: service {entry.name}: {path}: not an executable",
                       err=True)
            problems += 1
            continue
        click.echo(f"{entry.where}: {entry.name}/{entry.transport}: {path} ok")
        if entry.name not in ("proxymap", "proxywrite"):
            continue
        exported, text = _export_tables(path, entry.name, config_dir)
        if exported:
            tables = text.splitlines()
        else:
            # e.g. a Postfix 3.7 proxymap: no export mode; approximate from main.cf
            click.echo(f"  (worker cannot list its approved tables: {text};"
                       " using the proxy: entries of main.cf)")
            tables = _approved_from_main_cf(main_cf, entry.name)
        for table in tables:
            outcome = _open_table(path, entry.name, table, config_dir)
            click.echo(f"  approved: {table}: {outcome}")
            if outcome not in ("ok", "no such key"):
                problems += 1
    if problems:
        fail(f"{problems} problem(s) in {config_dir}", EX_CONFIG)
    click.echo(f"{PROGRAM}: {config_dir}: configuration ok")


if __name__ == "__main__":
    main()
