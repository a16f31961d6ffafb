"""main.cf reader with Postfix's ``$name`` expansion.

NAME
    mainconf -- Postfix main.cf parameters as a read-only mapping of expanded values

SYNOPSIS
    config = MainConfig.load()                       # $MAIL_CONFIG or /etc/postfix
    config = MainConfig.load("/tmp/x", {"max_use": "3"})
    config["proxy_read_maps"]      # fully expanded, like `postconf -xh proxy_read_maps`
    config.raw("proxy_read_maps")  # as written (or the built-in default)
    config.get_time("max_idle")    # 100 (seconds)

DESCRIPTION
    A parameter's raw value comes from, in order of precedence: ``-o name=value``
    overrides, main.cf, run-time defaults computed on this host (``myhostname``,
    ``mydomain``, ``mynetworks``, ``process_id``, ``process_name``, ``service_name``,
    ``config_directory``)
    and the built-in defaults of Postfix 3.7.11 (``master.postfix_defaults``).

    main.cf is read in logical lines (``docs/PROTOCOL.md`` section 5.2): a
    line that starts with whitespace continues the previous one, ``#`` starts a comment
    only as the first non-blank character, each logical line is ``name = value``.

    Values are expanded on access, recursively, with the whole Postfix syntax:
    ``$name ${name} $(name) $$ ${name?text} ${name?{text}} ${name:text}
    ${name?{t1}:{t2}} ${name?{t1}:t2} ${{a} op {b} ? {t1} : {t2}}`` where op is one of
    ``== != < <= >= >`` (numeric when both sides are all digits) or the same followed
    by ``level`` (compatibility-level comparison, e.g. ``3.6 <level 3.10``). An
    undefined parameter expands to the empty string. ``?`` and ``:`` test the *raw*
    value of the parameter (``x = $undefined`` counts as set), as Postfix does.

DIAGNOSTICS
    Syntax errors in main.cf or in a value raise ``MainConfigError`` whose text reads
    like the Postfix message; the caller decides whether that is fatal.

BUGS
    ``postconf -h`` strips leading and trailing blanks from what it prints; daemons do
    not, and neither does this module.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

from master.postfix_defaults import DEFAULTS
from master.readlline import logical_lines

log = logging.getLogger("master")

DEFAULT_CONFIG_DIR = "/etc/postfix"
MAIN_CF = "main.cf"

# Postfix gives up after this many nested expansions ("unreasonable macro call nesting").
MAX_EXPANSION_DEPTH = 100

_BLANKS = " \t\r\n\v\f"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]*")
# What the relational operators compare: compatibility levels, numbers or strings.
_Ordered = TypeVar("_Ordered", tuple[int, int, int], int, bytes)
_ALL_DIGITS = re.compile(r"[0-9]+")
_COMPAT_LEVEL = re.compile(r"([0-9]+)(?:\.([0-9]+)(?:\.([0-9]+))?)?")
# Longest operators first, so that "<=" is not read as "<" followed by "=".
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")

_BOOLEAN_VALUES = {"yes": True, "true": True, "no": False, "false": False}
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class MainConfigError(ValueError):
    """A main.cf or parameter-value error; the text reads like Postfix's."""


# ---------------------------------------------------------------------------
# main.cf and -o syntax
# ---------------------------------------------------------------------------


def split_name_value(text: str) -> tuple[str, str]:
    """``name = value`` -> (name, value); blanks around ``=`` and at the end removed.

    Raises MainConfigError with Postfix's wording for a missing name or ``=``.
    """
    text = text.strip(_BLANKS)
    end = 0
    while end < len(text) and text[end] not in _BLANKS and text[end] != "=":
        end += 1
    name = text[:end]
    rest = text[end:].lstrip(_BLANKS)
    if not name:
        raise MainConfigError("missing attribute name")
    if not rest.startswith("="):
        raise MainConfigError("missing '=' after attribute name")
    return name, rest[1:].strip(_BLANKS)


def parse_main_cf(data: bytes, origin: str) -> dict[str, str]:
    """The ``name = value`` pairs of a main.cf text; later definitions win (with a warning)."""
    return parse_main_cf_lines(data, origin)[0]


def parse_main_cf_lines(data: bytes, origin: str) -> tuple[dict[str, str], dict[str, int]]:
    """``parse_main_cf`` plus the line each surviving definition starts on."""
    params: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in logical_lines(data, origin):
        text = line.decode("utf-8", "surrogateescape")
        try:
            name, value = split_name_value(text)
        except MainConfigError as error:
            raise MainConfigError(f'{origin}, line {number}: {error}: "{text}"') from None
        if name in params:
            log.warning(
                "%s, line %d: overriding earlier entry: %s=%s", origin, number, name, params[name]
            )
        params[name] = value
        lines[name] = number
    return params, lines


def read_main_cf(config_dir: str) -> dict[str, str]:
    """Read ``config_dir/main.cf``; an unreadable file is an error, as for a daemon."""
    return read_main_cf_lines(config_dir)[0]


def read_main_cf_lines(config_dir: str) -> tuple[dict[str, str], dict[str, int]]:
    """``read_main_cf`` plus the line of each definition (for messages that name it)."""
    path = os.path.join(config_dir, MAIN_CF)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise MainConfigError(f"open {path}: {error.strerror}") from None
    return parse_main_cf_lines(data, path)


def parse_override(text: str) -> tuple[str, str]:
    """One ``-o name=value`` argument -> (name, value)."""
    try:
        return split_name_value(text)
    except MainConfigError as error:
        raise MainConfigError(f'invalid "-o {text}" option value: {error}') from None


# ---------------------------------------------------------------------------
# Value conversions (Postfix's get_mail_conf_bool/int/time)
# ---------------------------------------------------------------------------


def to_bool(name: str, value: str) -> bool:
    try:
        return _BOOLEAN_VALUES[value.lower()]
    except KeyError:
        raise MainConfigError(f"bad boolean configuration: {name} = {value}") from None


def to_int(name: str, value: str) -> int:
    if not re.fullmatch(r"[-+]?[0-9]+", value.strip(_BLANKS)):
        raise MainConfigError(f"bad numerical configuration: {name} = {value}")
    return int(value)


def to_seconds(name: str, value: str, default_unit: str = "s") -> int:
    """``10``/``10s``/``5m``/``1h``/``2d``/``1w`` -> seconds."""
    match = re.fullmatch(r"([0-9]+)([a-zA-Z]?)", value.strip(_BLANKS))
    unit = (match.group(2) or default_unit).lower() if match else ""
    if not match or unit not in _TIME_UNITS:
        raise MainConfigError(f"parameter {name}: bad time value or unit: {value}")
    return int(match.group(1)) * _TIME_UNITS[unit]


# ---------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------


def _split_braced(text: str, where: str) -> tuple[str, str]:
    """``{inner}rest`` -> (inner, rest); braces nest. text starts with ``{``."""
    depth = 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[1:index], text[index + 1 :]
    raise MainConfigError(f"missing '}}' at: \"{where}\"")


def _compat_level(text: str) -> tuple[int, int, int]:
    match = _COMPAT_LEVEL.fullmatch(text)
    if not match:
        raise MainConfigError(f'malformed compatibility level syntax: "{text}"')
    major, minor, patch = (int(part) if part else 0 for part in match.groups())
    return major, minor, patch


def _name_at(text: str, index: int) -> str:
    """The (possibly empty) run of parameter-name characters at ``index``."""
    found = _NAME_CHARS.match(text, index)
    return found.group() if found else ""


def _compare(left: str, operator: str, right: str) -> bool:
    """Postfix relational operators; ``<level`` etc. compare compatibility levels."""
    if operator.endswith("level"):
        return _relation(operator[: -len("level")], _compat_level(left), _compat_level(right))
    if _ALL_DIGITS.fullmatch(left) and _ALL_DIGITS.fullmatch(right):
        return _relation(operator, int(left), int(right))
    # strcmp() order: compare the UTF-8 bytes.
    return _relation(
        operator, left.encode("utf-8", "surrogateescape"), right.encode("utf-8", "surrogateescape")
    )


def _relation(operator: str, a: _Ordered, b: _Ordered) -> bool:
    return {
        "==": a == b,
        "!=": a != b,
        "<": a < b,
        "<=": a <= b,
        ">": a > b,
        ">=": a >= b,
    }[operator]


class Expander:
    """Postfix's macro expansion over a name -> raw value lookup."""

    def __init__(self, lookup) -> None:
        self.lookup = lookup

    def expand(self, text: str, depth: int = 0) -> str:
        if depth > MAX_EXPANSION_DEPTH:
            raise MainConfigError(f'unreasonable macro call nesting: "{text}"')
        out: list[str] = []
        index = 0
        while index < len(text):
            dollar = text.find("$", index)
            if dollar < 0:
                out.append(text[index:])
                break
            out.append(text[index:dollar])
            index = dollar + 1
            opener = text[index : index + 1]
            if opener == "$":
                out.append("$")
                index += 1
                continue
            if opener in ("{", "("):
                reference, index = self._parenthesized(text, index)
            else:
                name = _name_at(text, index)
                reference, index = name, index + len(name)
            if not reference:
                raise MainConfigError(f'empty macro name: "{text}"')
            out.append(self._evaluate(reference, depth))
        return "".join(out)

    @staticmethod
    def _parenthesized(text: str, start: int) -> tuple[str, int]:
        """The text inside ``${...}``/``$(...)`` at start (only the same kind nests)."""
        opener = text[start]
        closer = "}" if opener == "{" else ")"
        depth = 0
        for index in range(start, len(text)):
            if text[index] == opener:
                depth += 1
            elif text[index] == closer:
                depth -= 1
                if depth == 0:
                    return text[start + 1 : index], index + 1
        raise MainConfigError(f'truncated macro reference: "{text}"')

    def _evaluate(self, reference: str, depth: int) -> str:
        body = reference.lstrip(_BLANKS)
        if body.startswith("{"):
            return self._relational(body, depth)
        name = _name_at(body, 0)
        rest = body[len(name) :].lstrip(_BLANKS)
        if not name or (rest and rest[0] not in "?:"):
            raise MainConfigError(f'attribute name syntax error at: "...{name}>>>{rest}"')
        raw = self.lookup(name)
        if not rest:
            return self.expand(raw, depth + 1) if raw else ""
        is_set = bool(raw)
        if rest[0] == "?":
            chosen = self._choose(rest[1:], is_set, allow_else=True)
        else:
            chosen = self._choose(rest[1:], not is_set, allow_else=False)
        return self.expand(chosen, depth + 1) if chosen else ""

    @staticmethod
    def _choose(text: str, condition: bool, allow_else: bool) -> str:
        """The text of ``?text``, ``?{t1}``, ``?{t1}:{t2}``, ``?{t1}:t2`` to expand."""
        stripped = text.lstrip(_BLANKS)
        if not stripped.startswith("{"):
            return text if condition else ""
        when_true, rest = _split_braced(stripped, text)
        rest = rest.lstrip(_BLANKS)
        when_false = ""
        if rest:
            if not allow_else:
                raise MainConfigError(f'unexpected input at: "...}}>>>{rest}"')
            if rest[0] != ":":
                raise MainConfigError(f'":" expected at: "...}}>>>{rest}"')
            when_false = rest[1:]
            if when_false.lstrip(_BLANKS).startswith("{"):
                when_false, after = _split_braced(when_false.lstrip(_BLANKS), text)
                if after.strip(_BLANKS):
                    raise MainConfigError(f'unexpected input at: "...}}>>>{after.strip()}"')
        return when_true if condition else when_false

    def _relational(self, body: str, depth: int) -> str:
        """``{a} op {b} [? {t1} [: {t2}]]``; without ``?`` the result is "true" or ""."""
        left, rest = _split_braced(body, body)
        rest = rest.lstrip(_BLANKS)
        operator = next((op for op in _OPERATORS if rest.startswith(op)), None)
        if operator is None:
            raise MainConfigError(
                f'"==" or "!="" or "<"" or "<="" or ">="" or ">" expected at: "...}}>>>{rest}"'
            )
        rest = rest[len(operator) :]
        if rest.startswith("level"):
            operator += "level"
            rest = rest[len("level") :]
        rest = rest.lstrip(_BLANKS)
        if not rest.startswith("{"):
            raise MainConfigError(f'"{{expression}}" expected at: "...{operator}>>>{rest}"')
        right, rest = _split_braced(rest, body)
        rest = rest.lstrip(_BLANKS)
        outcome = _compare(self.expand(left, depth + 1), operator, self.expand(right, depth + 1))
        if not rest:
            return "true" if outcome else ""
        if rest[0] != "?":
            raise MainConfigError(f'unexpected input at: "...}}>>>{rest}"')
        chosen = self._choose(rest[1:], outcome, allow_else=True)
        return self.expand(chosen, depth + 1) if chosen else ""


# ---------------------------------------------------------------------------
# Defaults computed on this host
# ---------------------------------------------------------------------------


def _hostname_default(params: Mapping[str, str]) -> str:
    name = socket.gethostname()
    if "." not in name:
        # Postfix completes a bare host name with $mydomain (raw), else "localdomain".
        name = f"{name}.{params.get('mydomain') or 'localdomain'}"
    return name


def _domain_default(myhostname: str) -> str:
    _, dot, domain = myhostname.partition(".")
    return domain if dot and domain else "localdomain"


def _wanted_families(inet_protocols: str) -> set[int]:
    words = set(re.split(r"[\s,]+", inet_protocols.strip().lower()))
    if "all" in words:
        return {4, 6} if socket.has_ipv6 else {4}
    return {4 for w in words if w == "ipv4"} | {6 for w in words if w == "ipv6"}


def _listen_interfaces(inet_interfaces: str, interfaces: list) -> list:
    """The interfaces that inet_interfaces selects (``all``, ``loopback-only``, addresses)."""
    words = [w for w in re.split(r"[\s,]+", inet_interfaces.strip().lower()) if w]
    if not words or "all" in words:
        return interfaces
    if "loopback-only" in words:
        return [i for i in interfaces if i.ip.is_loopback]
    wanted = set()
    for word in words:
        try:
            wanted.add(ipaddress.ip_address(word.strip("[]")))
        except ValueError:
            continue
    return [i for i in interfaces if i.ip in wanted]


def mynetworks_default(style: str, inet_interfaces: str, inet_protocols: str) -> str:
    """The networks Postfix trusts by default: one entry per local address, by style."""
    families = _wanted_families(inet_protocols)
    from master.ifaddrs import local_interfaces  # ctypes costs memory; only needed here

    selected = _listen_interfaces(inet_interfaces, local_interfaces())
    entries: list[str] = []
    for interface in selected:
        if interface.version not in families:
            continue
        if style == "host":
            network = ipaddress.ip_network(interface.ip)
        elif style == "class" and interface.version == 4:
            network = _classful_network(interface.ip)
        else:
            network = interface.network
        entry = (
            str(network)
            if network.version == 4
            else f"[{network.network_address}]/{network.prefixlen}"
        )
        if entry not in entries:
            entries.append(entry)
    return " ".join(entries)


def _classful_network(address: ipaddress.IPv4Address) -> ipaddress.IPv4Network:
    first = int(address) >> 24
    prefix = 8 if first < 128 else 16 if first < 192 else 24 if first < 224 else 32
    return ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)


# ---------------------------------------------------------------------------
# The mapping
# ---------------------------------------------------------------------------


class MainConfig(Mapping[str, str]):
    """main.cf parameters; ``config[name]`` is the fully expanded value.

    A name that is defined nowhere (not in -o, main.cf or the defaults) raises KeyError
    for ``config[name]`` (use ``config.get(name, "")``); inside a value it expands to "".
    """

    def __init__(
        self,
        params: Mapping[str, str] | None = None,
        *,
        config_dir: str = DEFAULT_CONFIG_DIR,
        overrides: Mapping[str, str] | None = None,
        process_name: str | None = None,
        service_name: str | None = None,
        defaults: Mapping[str, str] = DEFAULTS,
    ) -> None:
        self.config_dir = config_dir
        self.main_cf: dict[str, str] = dict(params or {})
        #: main.cf line of each definition, when read from a file (see ``where``).
        self.main_cf_lines: dict[str, int] = {}
        self.overrides: dict[str, str] = dict(overrides or {})
        self._defaults = defaults
        self._process_name = process_name
        self._service_name = service_name
        self._runtime: dict[str, str] = {}
        self._expanded: dict[str, str] = {}
        self._expander = Expander(self._raw_or_empty)

    @classmethod
    def load(
        cls,
        config_dir: str | None = None,
        overrides: Mapping[str, str] | None = None,
        *,
        process_name: str | None = None,
        service_name: str | None = None,
    ) -> MainConfig:
        """Read ``config_dir/main.cf`` (default $MAIL_CONFIG, else /etc/postfix)."""
        if config_dir is None:
            config_dir = os.environ.get("MAIL_CONFIG") or DEFAULT_CONFIG_DIR
        params, lines = read_main_cf_lines(config_dir)
        config = cls(
            params,
            config_dir=config_dir,
            overrides=overrides,
            process_name=process_name,
            service_name=service_name,
        )
        config.main_cf_lines = lines
        return config

    def with_overrides(
        self,
        overrides: Mapping[str, str],
        *,
        process_name: str | None = None,
        service_name: str | None = None,
    ) -> MainConfig:
        """The same main.cf seen by a process with these ``-o`` overrides (no re-read)."""
        config = MainConfig(
            self.main_cf,
            config_dir=self.config_dir,
            overrides=overrides,
            process_name=process_name,
            service_name=service_name,
            defaults=self._defaults,
        )
        config.main_cf_lines = self.main_cf_lines
        return config

    def where(self, name: str) -> str:
        """Where a value comes from, for messages: ``-o name``, ``<main.cf>, line N``."""
        if name in self.overrides:
            return f"-o {name}"
        if name in self.main_cf:
            path = os.path.join(self.config_dir, MAIN_CF)
            line = self.main_cf_lines.get(name)
            return f"{path}, line {line}" if line else path
        return "default"

    def expansion_errors(self, names: Iterable[str] | None = None) -> list[str]:
        """A message for each value that does not expand, naming its line (default: every
        value written in main.cf or given with ``-o``). A daemon finds such an error only
        when it reads that parameter, and then dies: callers check before starting one."""
        if names is None:
            names = dict.fromkeys([*self.main_cf, *self.overrides])
        errors = []
        for name in names:
            try:
                self[name]
            except KeyError:
                continue
            except MainConfigError as error:
                errors.append(f"{self.where(name)}: {name} = {self.raw(name)}: {error}")
        return errors

    # -- raw values ----------------------------------------------------------

    def raw(self, name: str) -> str | None:
        """The unexpanded value (override, main.cf, run-time default, default), or None."""
        for source in (self.overrides, self.main_cf):
            if name in source:
                return source[name]
        runtime = self._runtime_default(name)
        if runtime is not None:
            return runtime
        return self._defaults.get(name)

    def _raw_or_empty(self, name: str) -> str:
        return self.raw(name) or ""

    def _runtime_default(self, name: str) -> str | None:
        if name == "config_directory":
            return self.config_dir
        if name == "process_id":
            return str(os.getpid())
        if name == "process_name":
            return self._process_name or _default_process_name()
        if name == "service_name" and self._service_name is not None:
            return self._service_name
        if name not in ("myhostname", "mydomain", "mynetworks"):
            return None
        if name not in self._runtime:
            self._runtime[name] = self._compute_host_default(name)
        return self._runtime[name]

    def _compute_host_default(self, name: str) -> str:
        if name == "myhostname":
            return _hostname_default({**self.main_cf, **self.overrides})
        if name == "mydomain":
            return _domain_default(self["myhostname"])
        return mynetworks_default(
            self["mynetworks_style"], self["inet_interfaces"], self["inet_protocols"]
        )

    # -- expanded values -----------------------------------------------------

    def expand(self, text: str) -> str:
        """Expand ``$`` references in any text against this configuration."""
        return self._expander.expand(text)

    def __getitem__(self, name: str) -> str:
        if name in self._expanded:
            return self._expanded[name]
        raw = self.raw(name)
        if raw is None:
            raise KeyError(name)
        value = self._expander.expand(raw)
        self._expanded[name] = value
        return value

    def __iter__(self) -> Iterator[str]:
        names = dict.fromkeys(self._defaults)
        names.update(
            dict.fromkeys(
                (
                    "myhostname",
                    "mydomain",
                    "mynetworks",
                    "process_id",
                    "process_name",
                    "config_directory",
                )
            )
        )
        names.update(dict.fromkeys(self.main_cf))
        names.update(dict.fromkeys(self.overrides))
        return iter(names)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.raw(name) is not None

    # -- typed values --------------------------------------------------------

    def _required(self, name: str) -> str:
        try:
            return self[name]
        except KeyError:
            raise MainConfigError(f"parameter {name} has no value") from None

    def get_bool(self, name: str) -> bool:
        return to_bool(name, self._required(name))

    def get_int(self, name: str) -> int:
        return to_int(name, self._required(name))

    def get_time(self, name: str, default_unit: str = "s") -> int:
        """A time parameter in seconds (``max_idle``, ``ipc_timeout``, ...)."""
        return to_seconds(name, self._required(name), default_unit)


def _default_process_name() -> str:
    import sys

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
