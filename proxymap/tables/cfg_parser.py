"""Parameters of a database-table configuration (Postfix's ``cfg_parser``).

NAME
    cfg_parser -- read ``mysql:``/``pgsql:``/``sqlite:``/``ldap:``/``memcache:`` settings

SYNOPSIS
    cfg = CfgParser("/etc/postfix/sql.cf", ctx.params)    # a file of name = value lines
    cfg = CfgParser("ldapsource", ctx.params)             # main.cf: ldapsource_<param>
    query = cfg.get_optional("query")                     # None when missing or empty
    limit = cfg.get_int("expansion_limit", 0)
    tls = cfg.get_bool("start_tls", False)

DESCRIPTION
    A table name that starts with ``/`` or ``.`` names a configuration file; any
    other name is a prefix, and parameter ``p`` is the main.cf parameter
    ``<name>_p`` (``$name`` expansion applied by the ``params`` mapping).

    A configuration file is read once, when the parser is made, with the logical-line
    rules of every Postfix text file (``master.readlline``: comments, blank lines,
    continuation lines). Each logical line is ``name = value``: the name ends at the
    first blank or ``=``; blanks around ``=`` and at the end of the value do not count;
    the value may itself contain ``=``. Names are case-sensitive. A later line for the
    same name replaces the earlier one (with a warning when the value differs). There
    is no ``$`` expansion in these files.

    Typed access mirrors Postfix:

    * ``get_str``: the value, else the default; ``min_len``/``max_len`` (0 = no
      limit) bound its length in bytes.
    * ``get_optional``: like ``get_str`` with no default, but ``None`` for a missing
      *or empty* value (what Postfix's drivers use for optional settings and for
      ``query``, whose absence selects the legacy query form).
    * ``get_int``: decimal, optional sign, nothing else (``0x10``, ``1e3`` and an
      empty value are errors); must fit a C ``int``; ``min_val``/``max_val``
      (0 = unchecked) bound it.
    * ``get_bool``: ``yes`` or ``no``, any case.

DIAGNOSTICS
    ``DictOpenError`` (the table becomes unavailable: every lookup answers RETRY) for
    an unreadable file (``open <file>: <reason>``), a line without ``=`` or without a
    name, and a value that breaks its type or bounds. Postfix treats all but the first
    as fatal errors; the messages use Postfix's wording.

BUGS
    Postfix re-reads a file modified within the last second or two (it may still be
    being written) until it has settled; this reader reads it once.

SEE ALSO
    docs/TABLES.md sections 2.6 and 4.1; ``db_common`` (templates, domain).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping

from master.readlline import logical_lines
from proxymap.tables.base import DictOpenError

__all__ = ["CfgParser", "parse_config_text", "split_name_value"]

log = logging.getLogger("proxymap")

_BLANKS = " \t\n\v\f\r"
_DECIMAL = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def _text(data: bytes) -> str:
    """Configuration bytes as text; bytes that are not UTF-8 survive a round trip."""
    return data.decode("utf-8", "surrogateescape")


def split_name_value(line: str) -> tuple[str, str]:
    """Split ``name = value``; ``ValueError`` carries Postfix's reason on failure."""
    body = line.lstrip(_BLANKS)
    if not body or body[0] == "=":
        raise ValueError("missing attribute name")
    end = 0
    while end < len(body) and body[end] not in _BLANKS and body[end] != "=":
        end += 1
    rest = body[end:].lstrip(_BLANKS)
    if not rest.startswith("="):
        raise ValueError("missing '=' after attribute name")
    return body[:end], rest[1:].strip(_BLANKS)


def parse_config_text(data: bytes, origin: str) -> dict[str, str]:
    """The parameters of a configuration file's contents; later lines win."""
    values: dict[str, str] = {}
    for number, raw in logical_lines(data, origin):
        line = _text(raw)
        try:
            name, value = split_name_value(line)
        except ValueError as exc:
            raise DictOpenError(f'{origin}, line {number}: {exc}: "{line}"') from None
        old = values.get(name)
        if old is not None and old != value:
            log.warning("%s, line %d: overriding earlier entry: %s=%s", origin, number, name, old)
        values[name] = value
    return values


def _parse_int(text: str) -> int | None:
    """C ``strtol`` base 10 over the whole text, limited to ``int``; None if invalid."""
    if not _DECIMAL.fullmatch(text):
        return None
    number = int(text.lstrip(_BLANKS))
    return number if _INT_MIN <= number <= _INT_MAX else None


class CfgParser:
    """A .cf file (name starting with '/' or '.') or a main.cf parameter prefix."""

    def __init__(self, name: str, params: Mapping[str, str]) -> None:
        if not name:
            raise DictOpenError("cfg_parser_alloc: null parser name")
        self.name = name
        self.is_file = name[0] in "/."
        self._params = params
        # Owner of the file (provenance of its settings); None for main.cf settings.
        self.owner_uid: int | None = None
        self._values: dict[str, str] = self._load() if self.is_file else {}

    def _load(self) -> dict[str, str]:
        path = self.name.encode("utf-8", "surrogateescape")
        try:
            with open(path, "rb") as source:
                self.owner_uid = os.fstat(source.fileno()).st_uid
                data = source.read()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise DictOpenError(f"open {self.name}: {reason}") from None
        return parse_config_text(data, self.name)

    # --- raw access --------------------------------------------------------------------
    def _full_name(self, param: str) -> str:
        return param if self.is_file else f"{self.name}_{param}"

    def _raw(self, param: str) -> str | None:
        if self.is_file:
            return self._values.get(param)
        return self._params.get(self._full_name(param))

    def _default(self, text: str) -> str:
        """main.cf defaults are ``$``-expanded too (file settings never are)."""
        expand: Callable[[str], str] | None = getattr(self._params, "expand", None)
        if self.is_file or expand is None or "$" not in text:
            return text
        return expand(text)

    def _error(self, message: str) -> DictOpenError:
        """A configuration error, worded as Postfix words it for files and for main.cf."""
        return DictOpenError(f"{self.name}: {message}" if self.is_file else message)

    def has(self, param: str) -> bool:
        return self._raw(param) is not None

    # --- typed access ------------------------------------------------------------------
    def get_str(self, param: str, default: str, min_len: int = 0, max_len: int = 0) -> str:
        value = self._raw(param)
        if value is None:
            value = self._default(default)
        self._check_length(param, value, min_len, max_len)
        return value

    def get_optional(self, param: str, min_len: int = 0, max_len: int = 0) -> str | None:
        """The value, or ``None`` when it is missing or empty (bounds checked first)."""
        return self.get_str(param, "", min_len, max_len) or None

    def _check_length(self, param: str, value: str, min_len: int, max_len: int) -> None:
        length = len(value.encode("utf-8", "surrogateescape"))
        full = self._full_name(param)
        if min_len and length < min_len:
            raise self._error(f"bad string length {length} < {min_len}: {full} = {value}")
        if max_len and length > max_len:
            raise self._error(f"bad string length {length} > {max_len}: {full} = {value}")

    def get_int(self, param: str, default: int, min_val: int = 0, max_val: int = 0) -> int:
        full = self._full_name(param)
        text = self._raw(param)
        if text is None:
            number = default
        else:
            parsed = _parse_int(text)
            if parsed is None:
                raise self._error(f"bad numerical configuration: {full} = {text}")
            number = parsed
        if min_val and number < min_val:
            raise self._error(f"invalid {full} parameter value {number} < {min_val}")
        if max_val and number > max_val:
            raise self._error(f"invalid {full} parameter value {number} > {max_val}")
        return number

    def get_bool(self, param: str, default: bool) -> bool:
        text = self._raw(param)
        if text is None:
            return default
        if text.isascii() and text.lower() == "yes":
            return True
        if text.isascii() and text.lower() == "no":
            return False
        raise self._error(f"bad boolean configuration: {self._full_name(param)} = {text}")

    def __repr__(self) -> str:
        return f"CfgParser({self.name!r})"
