"""Configuration errors that would kill every child at start, found before it starts.

NAME
    preflight -- check main.cf and the master.cf overrides the way a starting daemon reads them

SYNOPSIS
    problems = configuration_problems(main, entries)   # [] when the children can start

DESCRIPTION
    A Postfix daemon reads main.cf when it starts, and a value it cannot use (a macro
    that does not expand, a bad number or time) makes it exit with a fatal error
    before it serves anyone. The master sees "bad command startup", throttles the
    service and tries again later, for ever; the cause went to a log the operator who
    typed ``start`` may not have. So the master looks first, with the daemon's own
    reader, and refuses to start (or to reload) with messages that name file and line:

    * every value written in main.cf expands (``max_idle = ${unclosed`` does not);
    * the parameters every daemon of the skeleton reads as numbers (``max_use``,
      ``max_idle``, ``ipc_timeout``, ``daemon_timeout``) parse, from main.cf and, per
      service, with its master.cf ``-o``/``-i``/``-m`` overrides (parsed as the
      skeleton parses them, ``parse_child_args``).

    What only a service knows (its own parameters, its tables) is checked by the
    service itself: ``proxymap-master check`` runs the worker's self-check mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from master.args import ChildArgsError, parse_child_args
from master.mainconf import MainConfig, MainConfigError
from master.masterconf import ServiceEntry

# What master.multi_server reads as numbers before it serves: a bad value is fatal there.
DAEMON_INT_PARAMETERS = ("max_use",)
DAEMON_TIME_PARAMETERS = ("max_idle", "ipc_timeout", "daemon_timeout")


def configuration_problems(main: MainConfig, entries: Iterable[ServiceEntry]) -> list[str]:
    """One message per problem, main.cf first, then per service in master.cf order."""
    problems = main.expansion_errors()
    problems += _number_errors(main, DAEMON_INT_PARAMETERS + DAEMON_TIME_PARAMETERS)
    for entry in entries:
        problems += [
            f"{entry.where}: service {entry.name}: {problem}"
            for problem in _service_problems(main, entry)
        ]
    return problems


def _service_problems(main: MainConfig, entry: ServiceEntry) -> list[str]:
    # Only the overrides matter here: the transport is given as one the parser knows,
    # and a command line it rejects is left to the daemon (a C one may accept it).
    try:
        options = parse_child_args([entry.command, "-t", "unix", *entry.args])
    except ChildArgsError:
        return []
    if not options.overrides:
        return []
    config = main.with_overrides(
        options.overrides, process_name=os.path.basename(entry.command), service_name=entry.name
    )
    overridden = list(options.overrides)
    wanted = [
        name for name in DAEMON_INT_PARAMETERS + DAEMON_TIME_PARAMETERS if name in options.overrides
    ]
    return config.expansion_errors(overridden) + _number_errors(config, wanted)


def _number_errors(config: MainConfig, names: Iterable[str]) -> list[str]:
    """Bad numbers and times; a value that does not expand is reported once, elsewhere."""
    errors = []
    for name in names:
        try:
            if name in DAEMON_INT_PARAMETERS:
                config.get_int(name)
            else:
                config.get_time(name)
        except MainConfigError as error:
            if config.expansion_errors([name]):
                continue
            errors.append(f"{config.where(name)}: {error}")
    return errors
