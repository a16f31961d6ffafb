"""``proxymap-master``: start, stop, reload, inspect and check the pre-forking master.

NAME
    proxymap-master -- command-line front end of ``master.arbiter``

SYNOPSIS
    proxymap-master [-c DIR] [-v] start [--daemon]
    proxymap-master [-c DIR] stop [--fast] [--timeout SECONDS]
    proxymap-master [-c DIR] reload
    proxymap-master [-c DIR] status [--json] [--watch [SECONDS]]
    proxymap-master [-c DIR] metrics [--once]
    proxymap-master [-c DIR] check
    proxymap-master [-c DIR] dropin enable|disable|status [-c POSTFIX_DIR]

DESCRIPTION
    ``-c DIR`` is the configuration directory with main.cf and master.cf (default
    ``$MAIL_CONFIG``, else ``/etc/postfix``); it becomes ``$config_directory`` and the
    children's ``MAIL_CONFIG``, so a main.cf may place everything relative to itself
    (``queue_directory = $config_directory/../run/queue``) and still hand absolute paths
    to every reader, the real ``postmap`` included.

    start     check the configuration (``master.preflight``: every main.cf value must
              expand, the numbers every daemon reads must parse; an error stops the
              start with file and line), then run the master in the foreground (logs on
              stderr; children get ``-d``), or detached with ``--daemon`` (python-daemon;
              the pid file stays locked and the listen and status descriptors are
              preserved across the fork). Everything the master process writes carries
              one tag, ``<syslog_name>/master``.
    stop      SIGTERM (graceful: wait for the children) or, with ``--fast``, SIGQUIT;
              waits until the pid-file lock is released.
    reload    SIGHUP: re-read both files, new generation, old workers exit (a
              configuration that start would refuse is refused, the running one kept).
    status    the live state from the master's control socket
              (``$queue_directory/pid/master.ctl``): services, workers, generations,
              idle/busy, use counts; then the workers' live statistics (``master.stats``:
              per table lookups, hit rate, RETRY/CONFIG/DENY, latency percentiles,
              backend connections; per worker clients, uses, idle time). ``--json`` for
              machines, ``--watch [SECONDS]`` refreshes until interrupted.
    metrics   the live statistics as a Prometheus text endpoint on the loopback
              address or UNIX socket named by main.cf ``pyproxymap_metrics_listen``
              (empty, the default: off); ``--once`` prints them (``master.prometheus``).
    check     the checks of start, plus: create missing queue directories (as
              ``postfix check`` does), check every command exists in daemon_directory,
              and have each proxymap/proxywrite worker open its approved tables itself
              (``<command> -S -V -n check-<service>``, with the service's privileges,
              chroot and ``-o`` overrides): ``ok`` or the cause of the failure. A worker
              without that mode (Postfix's proxymap) gets its tables from its export mode
              (3.11+) or ours, each opened by Postfix's ``postmap -q`` as the service's
              user; the answer is ``ok``, ``no such key`` or postmap's error.
    dropin    switch a Postfix installation's proxymap services to our worker and back
              (``master.dropin``); here ``-c`` names that Postfix's configuration.

    Every command takes ``-h``.

EXIT STATUS
    0 success; 1 failure; 3 (status) no master running, (dropin status) not enabled;
    75 another master runs; 78 configuration error (dropin enable: refused by the
    pre-check).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import NoReturn

import click

from master import dropin
from master import log as postfix_log
from master.arbiter import EX_CONFIG, Arbiter, ArbiterError, load_configuration
from master.control import control_path, query
from master.listen import owner_ids, prepare_queue_directory
from master.mainconf import MainConfig, MainConfigError
from master.masterconf import ServiceEntry, child_environment
from master.pidfile import running_pid
from master.prometheus import LISTEN_PARAMETER, Exporter, MetricsError, parse_listen, serve
from master.selfcheck import NO_CHECK_MODE, export_tables, postmap_probe, self_check
from master.stats import collect, format_statistics

log = logging.getLogger("master")

PROGRAM = "proxymap-master"
# The master's tag is <syslog_name>/master, as for Postfix's master: log watchers know it.
PROCESS_NAME = "master"
NOT_RUNNING = 3
EXPORT_TIMEOUT = 30.0  # for the connections- report of status
HELP = {"help_option_names": ["-h", "--help"]}

# Every line this process writes starts with this tag: "proxymap-master" for the
# commands, "<syslog_name>/master" once ``start`` has read main.cf (records, hints and
# fatal errors alike: one process, one name).
_tag = PROGRAM


def say(text: str) -> None:
    """One line for the operator, on stderr, under this process's tag."""
    click.echo(f"{_tag}: {text}", err=True)


def fail(message: str, status: int = 1) -> NoReturn:
    """``<tag>: fatal: ...`` and exit; each line of a longer message is an error first."""
    lines = message.splitlines() or [message]
    if _tag == PROGRAM:
        for line in lines[:-1]:
            say(f"error: {line}")
        say(f"fatal: {lines[-1]}")
    else:  # the master: logged (syslog or maillog_file, and stderr), under its tag
        for line in lines[:-1]:
            log.error("%s", line)
        log.critical("%s", lines[-1])
    sys.exit(status)


def _syslog_name(config_dir: str) -> str:
    """syslog_name from main.cf, read quietly (its warnings are logged again later,
    under the right tag); $MAIL_LOGTAG or "postfix" when main.cf cannot be read."""
    logging.disable(logging.CRITICAL)
    try:
        name = MainConfig.load(config_dir).get("syslog_name")
    except MainConfigError:
        name = None
    finally:
        logging.disable(logging.NOTSET)
    return name or os.environ.get("MAIL_LOGTAG") or "postfix"


def _stderr_is_journal() -> bool:
    """systemd connected stderr to the journal ($JOURNAL_STREAM names that stream)."""
    try:
        device, inode = os.environ["JOURNAL_STREAM"].split(":")
        info = os.fstat(2)
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (KeyError, ValueError, OSError):
        return False


def setup_logging(config: Mapping[str, str], verbose: int, *, to_stderr: bool) -> None:
    """Postfix-style records (``master.log``): syslog or postlog, plus stderr in front,
    all tagged ``<syslog_name>/master``."""
    global _tag
    _tag = postfix_log.make_tag(config.get("syslog_name") or "postfix", PROCESS_NAME)
    postfix_log.setup(PROCESS_NAME, config, stderr=to_stderr, verbose=verbose)


@click.group(context_settings=HELP)
@click.option(
    "-c",
    "config_dir",
    envvar="MAIL_CONFIG",
    default="/etc/postfix",
    show_default=True,
    type=click.Path(file_okay=False),
    help="configuration directory (main.cf, master.cf)",
)
@click.option("-v", "verbose", count=True, help="more logging; children get -v too")
@click.pass_context
def main(ctx: click.Context, config_dir: str, verbose: int) -> None:
    """A pre-forking Postfix master(8) for proxymap."""
    ctx.obj = {"config_dir": os.path.abspath(config_dir), "verbose": verbose}
    postfix_log.setup_early(PROGRAM, stderr=True, verbose=verbose)


def _load_or_fail(config_dir: str) -> tuple[MainConfig, list[ServiceEntry]]:
    """main.cf and master.cf, with every problem a child would die of, or exit 78."""
    try:
        return load_configuration(config_dir)
    except ArbiterError as err:
        fail(str(err), err.exit_status)


def _queue_directory(config_dir: str) -> str:
    """Only main.cf: stop/reload/status must work while master.cf is being edited."""
    try:
        main_cf = MainConfig.load(config_dir)
        return main_cf["queue_directory"]
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
            lines.append(
                f"{service.entry.name}: {where} ({service.prefork} pre-forked,"
                f" maxproc {service.entry.maxproc})"
            )
    table = next(
        (
            t
            for t in _words(arbiter.main.get("proxy_read_maps", ""))
            if t.startswith("proxy:texthash:")
        ),
        None,
    )
    if table:
        key = _first_key(table.removeprefix("proxy:texthash:")) or "KEY"
        lines.append(f"try: postmap -c {arbiter.config_dir} -q {key} {table}")
        query_tool = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "proxymap-query")
        if os.path.exists(query_tool):
            lines.append(f"  or: {query_tool} -c {arbiter.config_dir} {key} {table}")
    return lines


def _words(value: str) -> Iterator[str]:
    """Split on commas and blanks, never inside ``{ }`` (``inline:{a=b,c=d}`` is one)."""
    word, depth = "", 0
    for char in value + " ":
        depth += (char == "{") - (char == "}" and depth > 0)
        if depth == 0 and char in ", \t\r\n":
            if word:
                yield word
            word = ""
        else:
            word += char


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
    """Run the master (foreground unless --daemon).

    The configuration is checked first (every main.cf value must expand, the numbers
    every daemon reads must parse): an error stops the start with its file and line.
    """
    try:
        _start(ctx.obj["config_dir"], ctx.obj["verbose"], daemon)
    except KeyboardInterrupt:
        # Ctrl-C before the master's own handler is in place: nothing runs yet.
        log.info("terminating on signal %d", signal.SIGINT)
        sys.exit(0)


def _start(config_dir: str, verbose: int, daemon: bool) -> NoReturn:
    # Under systemd stderr is the journal, which gets the syslog records too: once is enough.
    to_stderr = not _stderr_is_journal()
    setup_logging({"syslog_name": _syslog_name(config_dir)}, verbose, to_stderr=to_stderr)
    arbiter = Arbiter(config_dir, foreground=not daemon, verbose=verbose)
    try:
        arbiter.setup()
    except ArbiterError as err:
        fail(str(err), err.exit_status)
    setup_logging(arbiter.main, verbose, to_stderr=to_stderr and not daemon)
    for line in _usage_hint(arbiter):
        say(line)
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
        throttle = (
            f"  THROTTLED {service['throttled_for']:.0f}s" if service["throttled_for"] else ""
        )
        maxproc = service["maxproc"] or "unlimited"
        lines.append(
            f"{service['service']} ({service['type']}, {service['command']}): "
            f"{service['total']} procs, {service['avail']} idle, prefork {service['prefork']}, "
            f"maxproc {maxproc}, spawned {service['spawned']}{throttle}"
        )
        if service["workers"]:
            lines.append(f"    {'PID':>8} {'GEN':>4} {'STATE':<9} {'USES':>5} {'AGE':>8}")
        for worker in service["workers"]:
            lines.append(
                f"    {worker['pid']:>8} {worker['generation']:>4} "
                f"{worker['state']:<9} {worker['uses']:>5} "
                f"{_duration(worker['age']):>8}"
            )
        lines += _format_bounds(service)
    return "\n".join(lines)


def _format_bounds(service: dict) -> list[str]:
    bounds = service.get("connection_bounds")
    if not bounds:
        return []
    per_worker = sum(bound["per_worker"] for bound in bounds)
    maxproc = service["maxproc"]
    most = f"{maxproc} x {per_worker} = {maxproc * per_worker}" if maxproc else "unlimited"
    lines = [
        f"    backend connections: at most {per_worker} per worker, {most} in all; "
        f"now at most {service['total']} x {per_worker} = {service['total'] * per_worker}"
    ]
    lines += [f"      {bound['per_worker']:>4}  {bound['table']}" for bound in bounds]
    return lines


def _connection_bounds(path: str, service: str, config_dir: str) -> list[dict]:
    """What one worker of the service may open per table (its ``connections-`` report).

    The worker knows its table types; the master only prints what it says. A program
    without that report (the C proxymap) gives none.
    """
    env = {"MAIL_CONFIG": config_dir, "LANG": "C"}
    try:
        done = subprocess.run(
            [path, "-S", "-n", f"connections-{service}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=EXPORT_TIMEOUT,
            check=False,
        )
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
@click.option(
    "--watch",
    type=float,
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="refresh every SECONDS (default 2) until Ctrl-C",
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: float | None) -> None:
    """Services, workers, generations, idle/busy and use counts; live statistics.

    \b
    STATE  idle, busy, or retiring (a worker of an older generation on its
           way out after a reload)
    USES   busy periods the worker has finished: one each time it told the
           master "busy" (TAKEN) and then "idle" (AVAIL) again, counted as
           Postfix's master counts them. Postfix's proxymap reports that
           around every request; ours from the start of a request until its
           event loop finds no more work, so a client that waits for each
           reply makes one use per request, and clients that keep a worker
           busy make one long one. Not the count of connections that max_use
           limits: only the worker knows that one.
    AGE    time since the worker was started

    Under each proxymap service: the most backend (database) connections its
    workers may open, from the workers' own report (-S -n connections-SERVICE).

    \b
    Then the workers' live statistics (master.stats; pyproxymap_statistics),
    per service: each table summed over the workers --
    LOOKUPS HIT% MISS  lookups answered, found (%), not found
    RETRY CONFIG DENY  answers of those kinds (any request)
    P50ms P99ms MAXms  lookup latency over the last minute
    BACKEND CONNECTS   backend connections open/limit (summed over the
                       workers), and opened since the workers started
    down:              a backend server in back-off and why
    failovers: cache:  connects that moved to another server; the result
                       cache's figures (pyproxymap_cache_maps)
    -- and each worker: clients now, requests in progress (BUSY),
    connections served/max_use (SERVED), time since its last request (IDLE).
    """
    config_dir = ctx.obj["config_dir"]
    queue_directory = _queue_directory(config_dir)
    _running_master(config_dir)
    if watch is None:
        click.echo(_status_once(queue_directory, as_json))
        return
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            click.echo(clear + _status_once(queue_directory, as_json) + ("" if clear else "\n"))
            time.sleep(max(0.2, watch))
    except KeyboardInterrupt:
        return


def _status_once(queue_directory: str, as_json: bool) -> str:
    try:
        state = query(control_path(queue_directory))
    except (OSError, ValueError) as err:
        fail(f"no answer on {control_path(queue_directory)}: {err}")
    _add_connection_bounds(state)
    figures = collect(queue_directory)
    if as_json:
        state["statistics"] = figures
        return json.dumps(state, indent=2)
    return format_status(state) + "\n" + format_statistics(figures)


@main.command()
@click.option("--once", is_flag=True, help="print the text once (textfile collector) and exit")
@click.pass_context
def metrics(ctx: click.Context, once: bool) -> None:
    """The live statistics as a Prometheus endpoint (master.prometheus).

    Serves GET /metrics on the loopback address:port or unix:/path named by
    main.cf pyproxymap_metrics_listen (empty, the default: off). Needs no
    master: it reads the workers' snapshot files, under either master.
    """
    config_dir = ctx.obj["config_dir"]
    queue_directory = _queue_directory(config_dir)
    if once:
        click.echo(Exporter(queue_directory).render(), nl=False)
        return
    try:
        listen = MainConfig.load(config_dir).get(LISTEN_PARAMETER) or ""
    except MainConfigError as err:
        fail(str(err), EX_CONFIG)
    if not listen.strip():
        fail(f"{LISTEN_PARAMETER} is empty in {config_dir}/main.cf: the endpoint is off", EX_CONFIG)
    try:
        parse_listen(listen)
    except MetricsError as err:
        fail(str(err), EX_CONFIG)
    say(f"serving /metrics on {listen.strip()}")
    try:
        serve(listen, queue_directory)
    except OSError as err:
        fail(f"{listen.strip()}: {err}")
    except KeyboardInterrupt:
        return


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------


def _check_tables(
    path: str, entry: ServiceEntry, config_dir: str, main_cf: MainConfig
) -> list[tuple[str, str]] | None:
    """(table, outcome) for each table the service approves; None: could not tell."""
    env = child_environment(main_cf, 1, config_dir)
    results, cause = self_check(path, entry, env)
    if results is not None:
        return results
    if NO_CHECK_MODE not in cause:
        click.echo(f"  {path}: {cause}", err=True)
        return None
    # A Postfix proxymap: no self-check. Its tables (from its export mode, 3.11+, else
    # ours, which follows the same rules), each opened by Postfix's own postmap.
    tables = export_tables(path, entry, env)
    if tables is None:
        ours = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "proxymap")
        tables = export_tables(ours, entry, env) if os.access(ours, os.X_OK) else None
    if tables is None:
        click.echo(f"  {path}: cannot list its approved tables", err=True)
        return None
    click.echo(f"  ({path} has no self-check mode: each table is opened by postmap -q)")
    user = main_cf.get("mail_owner") or "postfix"
    as_user = user if os.geteuid() == 0 and entry.unprivileged else None
    return [(table, postmap_probe(table, config_dir, as_user)) for table in tables]


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate main.cf, master.cf, commands and approved tables.

    Every value in main.cf must expand and the numbers every daemon reads must parse
    (the errors name file and line). Each proxymap/proxywrite worker opens its approved
    tables itself (``-S -n check-SERVICE``, with the privileges it serves with) and
    reports each as ``ok`` or with the cause of its failure.
    """
    config_dir = ctx.obj["config_dir"]
    main_cf, entries = _load_or_fail(config_dir)
    problems = 0
    # Like `postfix check`, create what is missing: workers chdir to queue_directory.
    try:
        queue_directory = main_cf["queue_directory"]
        owner = owner_ids(main_cf.get("mail_owner") or "postfix")
        prepare_queue_directory(queue_directory, owner, main_cf.get("data_directory"))
    except OSError as err:
        fail(f"queue directory: {err}")
    daemon_directory = main_cf.get("daemon_directory") or "/usr/lib/postfix/sbin"
    for entry in entries:
        path = entry.executable(daemon_directory)
        if not os.access(path, os.X_OK):
            click.echo(f"{entry.where}: service {entry.name}: {path}: not an executable", err=True)
            problems += 1
            continue
        click.echo(f"{entry.where}: {entry.name}/{entry.transport}: {path} ok")
        if entry.name not in ("proxymap", "proxywrite"):
            continue
        results = _check_tables(path, entry, config_dir, main_cf)
        if results is None:
            problems += 1
            continue
        for table, outcome in results:
            click.echo(f"  approved: {table}: {outcome}")
            if outcome.startswith("error"):
                problems += 1
    if problems:
        fail(f"{problems} problem(s) in {config_dir}", EX_CONFIG)
    click.echo(f"{PROGRAM}: {config_dir}: configuration ok")


# ---------------------------------------------------------------------------
# dropin
# ---------------------------------------------------------------------------

DROPIN_CONFIG = click.option(
    "-c",
    "config_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Postfix configuration directory (default: proxymap-master's -c)",
)


def _dropin(action, ctx: click.Context, config_dir: str | None, **options) -> None:
    try:
        status = action(os.path.abspath(config_dir or ctx.obj["config_dir"]), say, **options)
    except dropin.DropinError as err:
        fail(str(err), err.status)
    sys.exit(status or 0)


@main.group(name="dropin")
def dropin_group() -> None:
    """Switch Postfix's proxymap services to pyproxymap and back.

    With Postfix's own tools (postconf -M/-F, postfix reload): a wrapper in
    daemon_directory, a pre-check as mail_owner, a byte-identical undo.
    """


@dropin_group.command(name="enable")
@DROPIN_CONFIG
@click.option(
    "--command",
    default=dropin.DEFAULT_COMMAND,
    show_default=True,
    help="name of the wrapper in daemon_directory (the master.cf command)",
)
@click.option(
    "--force", is_flag=True, help="switch even if a table that Postfix opens fails with pyproxymap"
)
@click.option(
    "--python",
    metavar="PATH",
    default=None,
    help="interpreter of the wrapper (default: the one running this command)",
)
@click.pass_context
def dropin_enable(
    ctx: click.Context, config_dir: str | None, command: str, force: bool, python: str | None
) -> None:
    """Install the wrapper, pre-check, switch master.cf, postfix reload."""
    _dropin(dropin.enable, ctx, config_dir, command=command, force=force, python=python)


@dropin_group.command(name="disable")
@DROPIN_CONFIG
@click.pass_context
def dropin_disable(ctx: click.Context, config_dir: str | None) -> None:
    """Restore master.cf as it was, postfix reload, remove the wrapper."""
    _dropin(dropin.disable, ctx, config_dir)


@dropin_group.command(name="status")
@DROPIN_CONFIG
@click.pass_context
def dropin_status(ctx: click.Context, config_dir: str | None) -> None:
    """What master.cf runs now (exit 0 enabled, 3 disabled)."""
    _dropin(dropin.status, ctx, config_dir, out=click.echo)


if __name__ == "__main__":
    main()
