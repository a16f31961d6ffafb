"""Command line of a child process started by master(8).

NAME
    args -- parse ``proxymap -t unix -u -o name=value ...`` exactly like a Postfix daemon

SYNOPSIS
    options = parse_child_args(["proxymap", "-l", "-n", "proxywrite", "-t", "unix", "-u"])

DESCRIPTION
    Options (``getopt`` with ``+``: parsing stops at the first non-option argument)
    follow ``docs/PROTOCOL.md`` section 4.1, option string
    ``cdDi:lm:n:o:s:St:uvVz``. ``-i`` and ``-m`` are main.cf overrides of
    ``max_idle`` and ``max_use``; they and every ``-o name=value`` are collected, in
    command-line order, into ``ChildOptions.overrides``.

DIAGNOSTICS
    ``ChildArgsError`` carries the Postfix fatal message text, e.g.
    ``invalid option: x``, ``invalid socket_count: 0``,
    ``invalid "-o bad" option value: missing '=' after attribute name``,
    ``no transport type specified``, ``unsupported transport type: foo``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from master.mainconf import MainConfigError, parse_override

OPTION_STRING = "cdDi:lm:n:o:s:St:uvVz"

# Transports this skeleton can serve (Postfix's multi-server also knows "pass").
SUPPORTED_TRANSPORTS = ("unix", "inet")


class ChildArgsError(ValueError):
    """A command-line error; str() is the text after ``fatal: ``."""

    options: ChildOptions | None = None


@dataclass
class ChildOptions:
    """What the child's command line asks for."""

    argv0: str
    chroot: bool = False  # -c
    foreground: bool = False  # -d (may run with a terminal on stdin)
    debug: bool = False  # -D (debugger_command: accepted, not run)
    solitary: bool = False  # -l
    unlimited: bool = False  # -z
    service_name: str | None = None  # -n
    overrides: dict[str, str] = field(default_factory=dict)  # -o, -i, -m
    socket_count: int = 1  # -s
    standalone: bool = False  # -S
    transport: str | None = None  # -t
    drop_privileges: bool = False  # -u
    verbose: int = 0  # -v (repeatable)
    log_to_stderr: bool = False  # -V
    arguments: list[str] = field(default_factory=list)  # after the options

    @property
    def process_name(self) -> str:
        return process_name_of(self.argv0)


def process_name_of(argv0: str) -> str:
    """basename(argv[0]); a Python script run by path loses its ``.py``."""
    name = os.path.basename(argv0) or "python"
    return name[:-3] if name.endswith(".py") and len(name) > 3 else name


def parse_child_args(argv: list[str]) -> ChildOptions:
    """Parse a full argv (argv[0] included). Raises ChildArgsError.

    Options take effect in order, as with getopt(3) in a loop: the error carries the
    options seen before it (``error.options``), e.g. whether ``-V`` came first.
    """
    options = ChildOptions(argv0=argv[0] if argv else "")
    try:
        for letter, value in _getopt(argv[1:], options):
            _apply(options, letter, value)
        if not options.standalone:
            if options.transport is None:
                raise ChildArgsError("no transport type specified")
            if options.transport not in SUPPORTED_TRANSPORTS:
                raise ChildArgsError(f"unsupported transport type: {options.transport}")
    except ChildArgsError as error:
        error.options = options
        raise
    return options


def _getopt(args: list[str], options: ChildOptions):
    """Yield (letter, value) like POSIX getopt with a leading "+" in the option string:
    stop at the first non-option or after "--"; leave the rest in options.arguments."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            index += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        position = 1
        while position < len(arg):
            letter = arg[position]
            spec = OPTION_STRING.find(letter)
            if spec < 0 or letter == ":":
                raise ChildArgsError(f"invalid option: {letter}")
            if OPTION_STRING[spec + 1 : spec + 2] != ":":
                yield letter, ""
                position += 1
                continue
            if position + 1 < len(arg):
                value = arg[position + 1 :]
            elif index + 1 < len(args):
                index += 1
                value = args[index]
            else:
                raise ChildArgsError(f"invalid option: {letter}")
            yield letter, value
            break
        index += 1
    options.arguments = args[index:]


_FLAGS = {
    "c": "chroot",
    "d": "foreground",
    "D": "debug",
    "l": "solitary",
    "z": "unlimited",
    "S": "standalone",
    "u": "drop_privileges",
    "V": "log_to_stderr",
}


def _apply(options: ChildOptions, letter: str, value: str) -> None:
    if letter in _FLAGS:
        setattr(options, _FLAGS[letter], True)
    elif letter == "v":
        options.verbose += 1
    elif letter == "i":
        options.overrides["max_idle"] = value
    elif letter == "m":
        options.overrides["max_use"] = value
    elif letter == "n":
        options.service_name = value
    elif letter == "t":
        options.transport = value
    elif letter == "s":
        if not value.isdigit() or int(value) <= 0:
            raise ChildArgsError(f"invalid socket_count: {value}")
        options.socket_count = int(value)
    elif letter == "o":
        try:
            name, setting = parse_override(value)
        except MainConfigError as error:
            raise ChildArgsError(str(error)) from None
        options.overrides[name] = setting
