"""Switch a Postfix installation's proxymap services to pyproxymap, and back.

NAME
    dropin -- ``proxymap-master [-c DIR] dropin enable|disable|status``

SYNOPSIS
    proxymap-master dropin enable [-c /etc/postfix] [--command pyproxymap] [--force]
    proxymap-master dropin disable [-c /etc/postfix]
    proxymap-master dropin status [-c /etc/postfix]

DESCRIPTION
    The real Postfix master keeps running; only the program behind the ``proxymap``
    and ``proxywrite`` services of master.cf changes. Everything is read and changed
    with Postfix's own tools: ``postconf`` for parameters and master.cf (``-M``,
    ``-F``; master.cf is never edited as text) and ``postfix reload``.

    enable
        1. Writes the worker's wrapper, ``$daemon_directory/pyproxymap``: a small
           Python script run by this installation's interpreter (the one running
           proxymap-master, i.e. its venv) that starts the proxymap worker. A
           regular root-owned file, mode 0755: ``postfix check`` has nothing to
           say about it (a symlink "leaves directory"). What was there under that
           name before is kept in the state file.
        2. Pre-checks each service as ``mail_owner``: the wrapper runs the worker's
           self-check (``-S -V -n check-SERVICE`` with the service's master.cf
           arguments), so mail_owner must be able to run the interpreter, import
           the table types and open the approved tables. A table that our worker
           cannot open but Postfix's ``postmap -q`` (as mail_owner) can, refuses the
           switch (``--force`` goes ahead); a table neither can open is a warning.
        3. Saves master.cf and what it is about to change in
           ``$config_directory/pyproxymap-dropin.json``, then sets the command of
           both services to the wrapper's name, their arguments kept
           (``postconf -F proxymap/unix/command=...``). The master then passes
           ``-n proxymap`` / ``-n proxywrite`` itself.
        4. ``postfix reload`` if that Postfix instance runs, then one lookup through
           ``proxy:`` of a table that passed the pre-check (``postmap -q``); if it
           fails, the switch is undone at once.
    disable
        Restores master.cf: byte for byte from the saved copy when nothing else
        changed it since ``enable``; otherwise (an administrator edited it
        meanwhile) with ``postconf -F`` the saved command of each service, keeping
        the other edits. Then ``postfix reload``, and the wrapper is removed (or
        what was there before is put back); last, the state file.
    status
        What master.cf runs for both services, the wrapper, the state file and
        whether Postfix runs. Exit status 0 when enabled, 3 when not.

    enable and disable must run as root. ``-c`` names the Postfix configuration
    directory, as for ``postfix -c``; a private instance (its own config directory
    and daemon_directory) is switched the same way, which is how the tests do it.

EXIT STATUS
    0 done (status: enabled); 1 failure; 3 (status) not enabled; 78 refused by the
    pre-check.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from master.mainconf import MainConfig, MainConfigError
from master.masterconf import MasterConfigError, ServiceEntry, child_environment, read_master_cf
from master.selfcheck import become, postmap_probe, self_check

SERVICES = ("proxymap", "proxywrite")
C_COMMAND = "proxymap"
DEFAULT_COMMAND = "pyproxymap"
STATE_FILE = "pyproxymap-dropin.json"
WRAPPER_MARK = "# pyproxymap drop-in worker"
EX_REFUSED = 78
NOT_ENABLED = 3
VERIFY_TIMEOUT = 20.0
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

Say = Callable[[str], None]


class DropinError(Exception):
    """Ends the command; the message says why, ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Postfix's tools
# ---------------------------------------------------------------------------


def _tool(name: str) -> str:
    return (
        shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")
        or f"/usr/sbin/{name}"
    )


def postconf(config_dir: str, *args: str) -> str:
    """postconf -c DIR ARGS; its stdout, or DropinError with what it said."""
    done = subprocess.run(
        [_tool("postconf"), "-c", config_dir, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise DropinError(f"postconf {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def postfix_runs(config_dir: str) -> bool:
    done = subprocess.run(
        [_tool("postfix"), "-c", config_dir, "status"], capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0


def postfix_reload(config_dir: str, say: Say) -> None:
    """``postfix reload`` when that instance runs (else the switch waits for its start)."""
    if not postfix_runs(config_dir):
        say(f"Postfix ({config_dir}) is not running: the change takes effect when it starts")
        return
    done = subprocess.run(
        [_tool("postfix"), "-c", config_dir, "reload"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise DropinError(f"postfix reload: {done.stderr.strip() or done.returncode}")
    say(f"Postfix ({config_dir}) reloaded")


# ---------------------------------------------------------------------------
# The installation
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Installation:
    """What postconf says about one Postfix configuration directory."""

    config_dir: str
    daemon_directory: str
    mail_owner: str
    commands: dict[str, str]  # service -> master.cf command field, arguments included

    @property
    def state_path(self) -> str:
        return os.path.join(self.config_dir, STATE_FILE)

    @property
    def master_cf(self) -> str:
        return os.path.join(self.config_dir, "master.cf")

    def wrapper_path(self, command: str) -> str:
        return os.path.join(self.daemon_directory, command)

    def state(self) -> dict | None:
        try:
            with open(self.state_path) as stream:
                return json.load(stream)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise DropinError(f"{self.state_path}: {err}") from None


def inspect(config_dir: str) -> Installation:
    config_dir = os.path.abspath(config_dir)
    if not os.path.isfile(os.path.join(config_dir, "main.cf")):
        raise DropinError(f"{config_dir}: no main.cf: not a Postfix configuration directory")
    daemon_directory, mail_owner = postconf(
        config_dir, "-xh", "daemon_directory", "mail_owner"
    ).splitlines()
    commands = {}
    for service in SERVICES:
        command = postconf(config_dir, "-Fh", f"{service}/unix/command").strip()
        if command:
            commands[service] = command
    if "proxymap" not in commands:
        raise DropinError(f"{config_dir}/master.cf has no proxymap/unix service")
    return Installation(config_dir, daemon_directory, mail_owner, commands)


def with_command(field: str, command: str) -> str:
    """The master.cf command field with its program replaced, arguments kept."""
    program, blank, arguments = field.partition(" ")
    return command + blank + arguments


def program_of(field: str) -> str:
    return field.partition(" ")[0]


# ---------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------


def wrapper_text(python: str, config_dir: str) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return (
        f"#!{python}\n"
        f"{WRAPPER_MARK} for Postfix, installed {stamp} by\n"
        f"#   proxymap-master -c {config_dir} dropin enable\n"
        "# The Postfix master runs it for the proxymap and proxywrite services (their\n"
        "# master.cf command); it runs the pyproxymap worker of the installation above.\n"
        f"# Undo with: proxymap-master -c {config_dir} dropin disable\n"
        "import sys\n\n"
        "from proxymap.server import main\n\n"
        "sys.exit(main())\n"
    )


def describe_existing(path: str) -> dict | None:
    """What is at path now (to put back on disable): None, a symlink or a file."""
    if os.path.islink(path):
        return {"symlink": os.readlink(path)}
    if not os.path.exists(path):
        return None
    with open(path, "rb") as stream:
        data = stream.read()
    if data.startswith(b"#!") and WRAPPER_MARK.encode() in data:
        return None  # our own wrapper from an earlier enable: nothing to put back
    return {"file": base64.b64encode(data).decode(), "mode": os.stat(path).st_mode & 0o7777}


def write_file(path: str, data: bytes, mode: int, like: str | None = None) -> None:
    """Atomically (rename), owned like ``like`` (or root), with mode."""
    temporary = f"{path}.pyproxymap-tmp"
    with open(temporary, "wb") as stream:
        stream.write(data)
    if like is not None and os.path.exists(like):
        info = os.stat(like)
        os.chown(temporary, info.st_uid, info.st_gid)
        mode = info.st_mode & 0o7777
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def put_back(path: str, before: dict | None) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    if before is None:
        return
    if "symlink" in before:
        os.symlink(before["symlink"], path)
    else:
        write_file(path, base64.b64decode(before["file"]), before["mode"])


# ---------------------------------------------------------------------------
# Pre-check
# ---------------------------------------------------------------------------


def service_entries(config_dir: str) -> tuple[MainConfig, dict[str, ServiceEntry]]:
    try:
        main_cf = MainConfig.load(config_dir)
        entries = read_master_cf(config_dir, main_cf)
    except (MainConfigError, MasterConfigError) as err:
        raise DropinError(str(err)) from None
    return main_cf, {e.name: e for e in entries if e.name in SERVICES and e.transport == "unix"}


def precheck(inst: Installation, wrapper: str, say: Say, *, force: bool) -> list[str]:
    """Run the wrapper's self-check as the services run; the tables that passed."""
    main_cf, entries = service_entries(inst.config_dir)
    env = child_environment(main_cf, 1, inst.config_dir)
    passed: list[str] = []
    refusals = []
    for service, entry in entries.items():
        # As the user the service runs as, from exec on: the interpreter, its library
        # and every table module must be readable by mail_owner, not just by root.
        user = inst.mail_owner if entry.unprivileged and os.geteuid() == 0 else None
        preexec = become(user) if user else None
        plain = dataclasses.replace(entry, unprivileged=False, chroot=False)
        results, cause = self_check(wrapper, plain, env, preexec)
        who = f"as {user}" if user else "as root"
        if results is None:
            raise DropinError(f"{service}: {wrapper} cannot run {who}: {cause}", EX_REFUSED)
        say(f"{service}: {wrapper} runs {who}; {len(results)} approved table(s)")
        for table, outcome in results:
            if outcome == "ok":
                passed.append(table)
                continue
            theirs = postmap_probe(table, inst.config_dir, user)
            if theirs.startswith("error"):
                say(f"  warning: {table}: {outcome} (postmap -q fails too: {theirs[7:]})")
            else:
                say(f"  {table}: {outcome} (postmap -q opens it)")
                refusals.append(table)
    if refusals and not force:
        raise DropinError(
            f"{len(refusals)} table(s) that Postfix's proxymap opens would fail "
            "with pyproxymap; nothing changed (--force switches anyway)",
            EX_REFUSED,
        )
    return passed


def verify(inst: Installation, table: str) -> str | None:
    """One lookup through proxy:TABLE by postmap; None when it answered, else why not."""
    env = {"MAIL_CONFIG": inst.config_dir, "LANG": "C", "PATH": SYSTEM_PATH}
    argv = [
        _tool("postmap"),
        "-c",
        inst.config_dir,
        "-q",
        "pyproxymap-check-probe",
        f"proxy:{table}",
    ]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return f"postmap -q ... proxy:{table}: no answer within {VERIFY_TIMEOUT:.0f}s"
    if done.returncode in (0, 1) and "fatal" not in done.stderr:
        return None
    return done.stderr.strip() or f"postmap exit status {done.returncode}"


# ---------------------------------------------------------------------------
# enable / disable / status
# ---------------------------------------------------------------------------


def enable(
    config_dir: str,
    say: Say,
    *,
    command: str = DEFAULT_COMMAND,
    force: bool = False,
    python: str | None = None,
) -> None:
    _need_root()
    inst = inspect(config_dir)
    if inst.state() is not None:
        if all(program_of(field) == command for field in inst.commands.values()):
            say(f"already enabled in {inst.config_dir} (proxymap-master dropin status)")
            return
        raise DropinError(
            f"{inst.state_path} exists but master.cf does not run {command}: "
            "run dropin disable first"
        )
    for service, field in inst.commands.items():
        if program_of(field) != C_COMMAND:
            raise DropinError(
                f"{inst.master_cf}: {service}/unix runs {program_of(field)!r}, "
                f"not {C_COMMAND!r}: not touching it"
            )
    wrapper = inst.wrapper_path(command)
    before_wrapper = describe_existing(wrapper)
    write_file(wrapper, wrapper_text(python or sys.executable, inst.config_dir).encode(), 0o755)
    try:
        passed = precheck(inst, wrapper, say, force=force)
    except BaseException:
        put_back(wrapper, before_wrapper)
        raise
    say(f"wrote {wrapper}")
    with open(inst.master_cf, "rb") as stream:
        master_cf_before = stream.read()
    state = {
        "version": 1,
        "command": command,
        "wrapper": wrapper,
        "wrapper_before": before_wrapper,
        "python": python or sys.executable,
        "services": inst.commands,
        "master_cf_before": base64.b64encode(master_cf_before).decode(),
    }
    # Written before master.cf changes: an interrupted enable can still be undone.
    write_file(inst.state_path, json.dumps(state, indent=1).encode() + b"\n", 0o644)
    changes = [
        f"{service}/unix/command={with_command(field, command)}"
        for service, field in inst.commands.items()
    ]
    postconf(inst.config_dir, "-F", *changes)
    with open(inst.master_cf, "rb") as stream:
        state["master_cf_after_sha256"] = hashlib.sha256(stream.read()).hexdigest()
    write_file(inst.state_path, json.dumps(state, indent=1).encode() + b"\n", 0o644)
    for change in changes:
        say(f"master.cf: {change}")
    try:
        postfix_reload(inst.config_dir, say)
    except DropinError:
        _undo(inst, state, say)
        raise
    if passed and postfix_runs(inst.config_dir):
        problem = verify(inst, passed[0])
        if problem is not None:
            say(f"lookup through proxy:{passed[0]} failed: {problem}; switching back")
            disable(inst.config_dir, say)
            raise DropinError("enable undone: the first lookup through pyproxymap failed")
        say(f"proxy:{passed[0]} answers through {command}")
    say(f"enabled: {inst.config_dir} runs {wrapper} for {', '.join(inst.commands)}")


def _undo(inst: Installation, state: dict, say: Say) -> None:
    """Put master.cf, the wrapper and the state file back, without a reload."""
    _restore_master_cf(inst, state, say)
    put_back(state["wrapper"], state.get("wrapper_before"))
    os.unlink(inst.state_path)
    say("nothing changed: master.cf and daemon_directory are as they were")


def _restore_master_cf(inst: Installation, state: dict, say: Say) -> None:
    """Byte for byte when nothing else changed master.cf; else field by field."""
    with open(inst.master_cf, "rb") as stream:
        current = stream.read()
    if hashlib.sha256(current).hexdigest() == state.get("master_cf_after_sha256"):
        write_file(
            inst.master_cf, base64.b64decode(state["master_cf_before"]), 0o644, like=inst.master_cf
        )
        say(f"master.cf: restored as it was before enable ({inst.master_cf})")
        return
    changes = [f"{service}/unix/command={field}" for service, field in state["services"].items()]
    postconf(inst.config_dir, "-F", *changes)
    for change in changes:
        say(f"master.cf changed since enable: {change} (postconf -F; other edits kept)")


def disable(config_dir: str, say: Say) -> None:
    _need_root()
    inst = inspect(config_dir)
    state = inst.state()
    if state is None:
        if all(program_of(field) == C_COMMAND for field in inst.commands.values()):
            say(f"not enabled in {inst.config_dir}: nothing to do")
            return
        raise DropinError(f"no {inst.state_path}: master.cf was not changed by dropin enable")
    _restore_master_cf(inst, state, say)
    postfix_reload(inst.config_dir, say)
    put_back(state["wrapper"], state.get("wrapper_before"))
    say(
        f"removed {state['wrapper']}"
        if state.get("wrapper_before") is None
        else f"put back what was {state['wrapper']} before"
    )
    os.unlink(inst.state_path)
    say(f"disabled: {inst.config_dir} runs {C_COMMAND} again")


def status(config_dir: str, say: Say, out: Say) -> int:
    inst = inspect(config_dir)
    state = inst.state()
    command = (state or {}).get("command", DEFAULT_COMMAND)
    wrapper = inst.wrapper_path(command)
    enabled = all(program_of(field) == command for field in inst.commands.values())
    out(f"pyproxymap drop-in: {'enabled' if enabled else 'disabled'} in {inst.config_dir}")
    for service, field in inst.commands.items():
        out(f"  {service}/unix: {field}")
    if os.path.islink(wrapper):
        out(
            f"  {wrapper}: symlink to {os.readlink(wrapper)} (postfix check warns; "
            "dropin enable replaces it with a wrapper)"
        )
    elif os.path.exists(wrapper):
        with open(wrapper, errors="replace") as stream:
            interpreter = stream.readline().removeprefix("#!").strip()
        out(f"  {wrapper}: wrapper run by {interpreter}")
    else:
        out(f"  {wrapper}: absent")
    out(f"  {inst.state_path}: {'present' if state else 'absent'}")
    out(f"  Postfix: {'running' if postfix_runs(inst.config_dir) else 'not running'}")
    if state is not None and not enabled:
        say(f"warning: {inst.state_path} exists but master.cf does not run {command}")
    return 0 if enabled else NOT_ENABLED


def _need_root() -> None:
    if os.geteuid() != 0:
        raise DropinError("must be run as root (it writes daemon_directory and master.cf)")
