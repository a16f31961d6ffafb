"""master.cf reader: service entries, child argv and child environment.

NAME
    masterconf -- parse master.cf the way Postfix master(8) does, and build what a child gets

SYNOPSIS
    entries = read_master_cf(path, main)          # -> list[ServiceEntry], duplicates resolved
    argv = child_argv(entry, foreground=True, verbose=0)
    env = child_environment(main, generation)

DESCRIPTION
    Logical lines: an entry starts with non-blank text, lines starting with blanks continue
    it, blank lines and lines whose first non-blank character is ``#`` are skipped anywhere
    (also between continuation lines). Fields: ``service type private unpriv chroot wakeup
    maxproc command [args...]``; ``-`` selects the default; ``{ ... }`` groups one argument
    containing blanks (outer braces and surrounding blanks removed). A later entry with the
    same identity (endpoint, type) replaces an earlier one, with a warning.

    ``child_argv`` follows docs/PROTOCOL.md section 4.1 item by item; ``child_environment``
    section 4.2. Both are pure functions so that tests compare them with what the real
    master was observed to pass.

    ``-o pyproxymap_prefork=N`` in an entry's arguments is this project's per-service
    pre-fork override; it is passed on to the child like any ``-o`` (harmless there).

DIAGNOSTICS
    ``MasterConfigError("<file>: line <n>: <problem>")`` for anything Postfix would refuse.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from master.postfix_defaults import DEFAULTS
from master.readlline import logical_lines

log = logging.getLogger("master")

TRANSPORTS = ("inet", "unix", "unix-dgram", "fifo", "pass")
#: what this master can actually run (the others parse, then are refused by ``check``)
SUPPORTED_TRANSPORTS = ("inet", "unix", "unix-dgram")
PREFORK_PARAMETER = "pyproxymap_prefork"

# Postfix 3.7 default, used when the main.cf reader has no value for it.
DEFAULT_IMPORT_ENVIRONMENT = (
    "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY LANG=C "
    "POSTLOG_SERVICE POSTLOG_HOSTNAME"
)


class MasterConfigError(ValueError):
    """A master.cf entry that cannot be used; the message names file and line."""


@dataclass(frozen=True)
class ServiceEntry:
    """One master.cf service, defaults applied."""

    name: str  # column 1 as written: socket name, or [host:]port for inet
    transport: str
    private: bool
    unprivileged: bool
    chroot: bool
    wakeup: int
    wakeup_after_use: bool
    maxproc: int  # 0 = unlimited
    command: str
    args: tuple[str, ...] = ()
    filename: str = "master.cf"
    lineno: int = 0
    prefork_override: int | None = field(default=None, compare=False)

    @property
    def identity(self) -> tuple[str, str]:
        """What makes two entries the same service (Postfix: endpoint and type)."""
        if self.transport == "inet":
            return (canonical_inet_endpoint(self.name), self.transport)
        return (f"{'private' if self.private else 'public'}/{self.name}", self.transport)

    @property
    def where(self) -> str:
        return f"{self.filename}: line {self.lineno}"

    def socket_path(self, queue_directory: str) -> str:
        """Path of a unix-domain endpoint under the queue directory."""
        return os.path.join(queue_directory, "private" if self.private else "public", self.name)

    def executable(self, daemon_directory: str) -> str:
        """Postfix concatenates: the command must live in daemon_directory."""
        return f"{daemon_directory}/{self.command}"

    def prefork(self, default: int) -> int:
        """Workers to keep running; never above maxproc (0 = unlimited)."""
        wanted = self.prefork_override if self.prefork_override is not None else default
        wanted = max(wanted, 0)
        return min(wanted, self.maxproc) if self.maxproc > 0 else wanted


# ---------------------------------------------------------------------------
# Lexical layer
# ---------------------------------------------------------------------------


def split_fields(text: str, where: str) -> list[str]:
    """Split on blanks; a field opening with ``{`` runs to its matching ``}`` and is unwrapped."""
    fields: list[str] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n":
            pos += 1
        if pos >= end:
            return fields
        if text[pos] == "{":
            depth, scan = 0, pos
            while scan < end:
                if text[scan] == "{":
                    depth += 1
                elif text[scan] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                scan += 1
            if depth != 0:
                raise MasterConfigError(f"{where}: missing '}}' in {text[pos:]!r}")
            fields.append(text[pos + 1 : scan].strip())
            pos = scan + 1
            if pos < end and text[pos] not in " \t\r\n":
                raise MasterConfigError(f"{where}: text after '}}' in {text[pos - 1 :]!r}")
        else:
            scan = pos
            while scan < end and text[scan] not in " \t\r\n":
                scan += 1
            fields.append(text[pos:scan])
            pos = scan


# ---------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------


def _yes_no(value: str, default: bool, column: str, where: str) -> bool:
    if value == "-":
        return default
    if value in ("y", "n"):
        return value == "y"
    raise MasterConfigError(f"{where}: bad {column} field value {value!r}: expected y, n or -")


def _maxproc(value: str, default_limit: int, where: str) -> int:
    if value == "-":
        return default_limit
    if not value.isdigit():
        raise MasterConfigError(f"{where}: bad maxproc field value {value!r}")
    return int(value)


def _wakeup(value: str, where: str) -> tuple[int, bool]:
    if value == "-":
        return 0, False
    after_use = value.endswith("?")
    digits = value[:-1] if after_use else value
    if not digits.isdigit():
        raise MasterConfigError(f"{where}: bad wakeup field value {value!r}")
    return int(digits), after_use


def _prefork_override(args: tuple[str, ...], where: str) -> int | None:
    """The value of ``-o pyproxymap_prefork=N`` (last one wins, as for any -o)."""
    found = None
    for index, arg in enumerate(args):
        setting = None
        if arg == "-o" and index + 1 < len(args):
            setting = args[index + 1]
        elif arg.startswith("-o") and len(arg) > 2:
            setting = arg[2:]
        if setting is None or "=" not in setting:
            continue
        name, _, value = setting.partition("=")
        if name.strip() == PREFORK_PARAMETER:
            value = value.strip()
            if not value.isdigit():
                raise MasterConfigError(f"{where}: bad {PREFORK_PARAMETER} value {value!r}")
            found = int(value)
    return found


def parse_entry(
    fields: list[str], where: str, filename: str, lineno: int, default_process_limit: int
) -> ServiceEntry:
    """One logical line's fields -> ServiceEntry (defaults applied, values checked)."""
    if len(fields) < 8:
        missing = (
            "service",
            "type",
            "private",
            "unpriv",
            "chroot",
            "wakeup",
            "maxproc",
            "command",
        )[len(fields)]
        raise MasterConfigError(f'{where}: field "{missing}" is missing')
    name, transport = fields[0], fields[1]
    if transport not in TRANSPORTS:
        raise MasterConfigError(f"{where}: bad transport type {transport!r}")
    private = _yes_no(fields[2], transport != "inet", "private", where)
    if transport == "inet" and private:
        raise MasterConfigError(f"{where}: inet service cannot be private")
    if transport != "inet" and ("/" in name or not name):
        raise MasterConfigError(f"{where}: bad service name {name!r}")
    wakeup, after_use = _wakeup(fields[5], where)
    args = tuple(fields[8:])
    return ServiceEntry(
        name=name,
        transport=transport,
        private=private,
        unprivileged=_yes_no(fields[3], True, "unpriv", where),
        chroot=_yes_no(fields[4], False, "chroot", where),
        wakeup=wakeup,
        wakeup_after_use=after_use,
        maxproc=_maxproc(fields[6], default_process_limit, where),
        command=fields[7],
        args=args,
        filename=filename,
        lineno=lineno,
        prefork_override=_prefork_override(args, where),
    )


def parse_master_cf(
    text: str, filename: str = "master.cf", default_process_limit: int = 100
) -> list[ServiceEntry]:
    """All entries of a master.cf text, in file order, duplicates resolved (last wins)."""
    by_identity: dict[tuple[str, str], ServiceEntry] = {}
    data = text.encode("utf-8", "surrogateescape")
    for lineno, raw in logical_lines(data, filename):
        line = raw.decode("utf-8", "surrogateescape")
        where = f"{filename}: line {lineno}"
        entry = parse_entry(
            split_fields(line, where), where, filename, lineno, default_process_limit
        )
        earlier = by_identity.pop(entry.identity, None)
        if earlier is not None:
            log.warning(
                "%s: duplicate service %s/%s (previous definition at line %d)"
                " -- using the later one",
                where,
                entry.name,
                entry.transport,
                earlier.lineno,
            )
        by_identity[entry.identity] = entry
    return list(by_identity.values())


def read_master_cf(config_dir: str | os.PathLike, main: Mapping[str, str]) -> list[ServiceEntry]:
    """Read ``<config_dir>/master.cf`` with ``default_process_limit`` from main.cf."""
    path = Path(config_dir) / "master.cf"
    try:
        text = path.read_text()
    except OSError as err:
        raise MasterConfigError(f"open {path}: {err.strerror}") from None
    limit = main.get("default_process_limit") or "100"
    if not limit.isdigit():
        raise MasterConfigError(f"bad default_process_limit value: {limit!r}")
    return parse_master_cf(text, str(path), int(limit))


def canonical_inet_endpoint(name: str) -> str:
    """``[host:]port`` with the host part normalised (``*`` and empty mean all)."""
    host, port = split_inet_endpoint(name)
    return f"{host or '*'}:{port}"


def split_inet_endpoint(name: str) -> tuple[str, str]:
    """``[host:]port`` -> (host, port); ``[v6]:port`` keeps the address without brackets."""
    if ":" not in name:
        return "", name
    host, _, port = name.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return ("" if host == "*" else host), port


# ---------------------------------------------------------------------------
# What a child gets: argv and environment (docs/PROTOCOL.md 4.1, 4.2)
# ---------------------------------------------------------------------------


def _loopback_only(entry: ServiceEntry) -> bool:
    host, _ = split_inet_endpoint(entry.name)
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def child_argv(
    entry: ServiceEntry, *, foreground: bool, verbose: int = 0, listen_fd_count: int = 1
) -> list[str]:
    """The command line exactly as the Postfix master builds it, in its order."""
    argv = [entry.command]
    if entry.maxproc == 1:
        argv.append("-l")
    if entry.maxproc == 0:
        argv.append("-z")
    if os.path.basename(entry.command) != entry.name:
        argv += ["-n", entry.name]
    argv += ["-t", entry.transport]
    if foreground:
        argv.append("-d")
    argv += ["-v"] * verbose
    if entry.unprivileged:
        argv.append("-u")
    if entry.chroot:
        argv.append("-c")
    if entry.transport == "inet" and entry.maxproc > 1 and not _loopback_only(entry):
        argv += ["-o", "stress="]
    if listen_fd_count > 1:
        argv += ["-s", str(listen_fd_count)]
    argv += entry.args
    return argv


def import_environment(setting: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Keep the names listed in import_environment; ``NAME=value`` forces a value."""
    kept: dict[str, str] = {}
    for item in setting.replace(",", " ").split():
        name, equals, value = item.partition("=")
        if equals:
            kept[name] = value
        elif name in environ:
            kept[name] = environ[name]
    return kept


def child_environment(
    main: Mapping[str, str],
    generation: int,
    config_dir: str,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What every child inherits: the imported names plus GENERATION (octal)."""
    base = dict(os.environ if environ is None else environ)
    # The master exports these itself, so they survive the import filter.
    base["MAIL_CONFIG"] = config_dir
    base["MAIL_LOGTAG"] = main.get("syslog_name") or "postfix"
    if main.get("maillog_file"):
        queue = main.get("queue_directory") or DEFAULTS["queue_directory"]
        service = main.get("postlog_service_name") or "postlog"
        base["POSTLOG_SERVICE"] = f"{queue}/public/{service}"
        hostname = main.get("myhostname") or socket.gethostname()
        base["POSTLOG_HOSTNAME"] = hostname.split(".")[0]
    else:
        base.pop("POSTLOG_SERVICE", None)
        base.pop("POSTLOG_HOSTNAME", None)
    setting = main.get("import_environment") or DEFAULT_IMPORT_ENVIRONMENT
    env = import_environment(setting, base)
    env["GENERATION"] = format(generation, "o")
    return env
