"""What the SQL, LDAP and memcache clients share (Postfix's ``db_common``).

NAME
    db_common -- ``%`` templates, the ``domain`` filter, result joining, legacy SQL query

SYNOPSIS
    cfg = CfgParser(name, ctx.params)
    qc = QueryContext.for_sql(cfg, ctx, "sqlite", table=f"sqlite:{name}")
    query = qc.query_for(key, sqlite_quote)       # None: "not found", do not ask the DB
    if query is not None:
        joined = qc.results(key)
        for row in rows(query):
            joined.add(row[0])                    # DictRetry past expansion_limit
        return joined.value()                     # None: "not found"

DESCRIPTION
    Templates. ``Template.parse`` checks a query template (SQL ``query``, LDAP
    ``query_filter`` and ``search_base``, memcache ``key_format``) or a result
    template (``result_format``) once, at open. ``%`` sequences:

    ``%%``      a percent sign
    ``%s``      the whole input (query: the key; result: the value)
    ``%u %d``   the part before / after the *last* ``@`` of the input (``%u`` is the
                whole input when it has no ``@``)
    ``%S %U %D`` the same parts of the lookup key (in a query: the same as lower case)
    ``%1``-``%9`` a label of the key's domain counted from the right (``%1`` = TLD);
                empty labels do not count (``a..b`` has the labels ``a`` and ``b``)

    Anything else after ``%`` (also a ``%`` at the very end) is an error.

    Suppression. An input that cannot fill a template is skipped: a query is not
    made ("not found") and a result value is left out. A key fails when the templates
    use its domain (``%d`` in a query, ``%D``, ``%1``-``%9``) and it has no ``@`` or
    nothing after the last ``@``; when they use its local part (``%u`` in a query,
    ``%U``) and the last ``@`` is its first byte; or when its domain has fewer labels
    than the highest ``%n``. A result value fails likewise for ``%d``/``%u`` of a
    result template. As in Postfix the requirements of *all* templates of a table
    are pooled (``QueryContext.needs``): a ``%D`` in ``result_format`` keeps keys
    without a domain from being queried at all. NULL values are skipped silently,
    empty values and an empty key with a warning.

    Results. ``ResultJoiner`` expands each value through ``result_format`` and joins
    the expansions with ``,``. With ``expansion_limit`` > 0, one expansion more than
    the limit is an error (RETRY); skipped values do not count.

    Domain filter. ``domain`` is a list (blanks and commas separate, ``{...}`` groups)
    of domain names, ``/file/name`` (its lines are read as more of the list; lines
    starting with ``#`` are skipped) and ``type:table`` lookups; ``!`` negates an
    entry. Only keys ``local@domain`` with a non-empty local part qualify; the domain
    (after the last ``@``) is case-folded and compared exactly -- there is no
    parent-domain matching -- or looked up in each table, in list order, until an entry
    matches. A table lookup error is the lookup's error; a ``/file`` that cannot be
    opened is an entry whose every use fails with RETRY.

    ``legacy_query`` builds ``SELECT f FROM t WHERE w='%s' cond`` (pgsql also
    ``SELECT fn('%s')``) when a SQL table has no ``query``.

DIAGNOSTICS
    ``DictOpenError`` (table unavailable: every lookup RETRY) for an invalid template,
    missing legacy fields, a ``!`` without a pattern; Postfix treats them as fatal.
    Warnings go to the ``proxymap`` logger.

SEE ALSO
    docs/TABLES.md sections 4.1-4.7 and 5.1; ``cfg_parser``.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

from proxymap import flags as F
from proxymap.tables.base import (
    AsyncTable,
    DictError,
    DictOpenError,
    DictRetry,
    OpenContext,
    SurrogateTable,
    SyncTable,
    Table,
)
from proxymap.tables.cfg_parser import CfgParser
from proxymap.tables.utf8 import casefold_utf8, is_valid_utf8

__all__ = [
    "DomainFilter",
    "Escape",
    "Need",
    "Needs",
    "QueryContext",
    "ResultJoiner",
    "Skip",
    "Template",
    "expand",
    "expand_or_skip",
    "legacy_query",
    "list_tokens",
    "split_address",
]

log = logging.getLogger("proxymap")

Escape = Callable[[bytes], bytes]

_RESULT_KINDS = frozenset({"result", "result_format", "result_filter"})
_LABEL_CODES = frozenset(b"123456789")


# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------


class Need(enum.IntFlag):
    """What a template needs of its inputs (Postfix's DB_COMMON_* context bits)."""

    NONE = 0
    KEY_DOMAIN = 1
    KEY_USER = 2
    VALUE_DOMAIN = 4
    VALUE_USER = 8
    KEY_PARTIAL = 16  # the template uses part of the key (informational)


# The same bits as plain ints: enum arithmetic costs microseconds per lookup.
_KEY_DOMAIN = 1
_KEY_USER = 2
_VALUE_DOMAIN = 4
_VALUE_USER = 8
_KEY_PARTIAL = 16
_CHECKED = _KEY_DOMAIN | _KEY_USER | _VALUE_DOMAIN | _VALUE_USER


@dataclass(frozen=True, slots=True)
class Needs:
    """Requirements of one template, or pooled over the templates of a table.

    ``flags`` holds ``Need`` bits as a plain int.
    """

    flags: int = 0
    labels: int = 0  # highest %1..%9 used

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.flags | other.flags, max(self.labels, other.labels))

    @property
    def trivial(self) -> bool:
        """Nothing to check but a non-empty input."""
        return not (self.flags & _CHECKED or self.labels)


def _code_need(code: int, query: bool) -> int:
    """The requirement one ``%`` code adds; ``%%``, ``%s``, ``%S`` add none."""
    if code == ord("u"):
        return _KEY_USER | _KEY_PARTIAL if query else _VALUE_USER
    if code == ord("d"):
        return _KEY_DOMAIN | _KEY_PARTIAL if query else _VALUE_DOMAIN
    if code == ord("U"):
        return _KEY_USER | _KEY_PARTIAL
    if code == ord("D") or code in _LABEL_CODES:
        return _KEY_DOMAIN | _KEY_PARTIAL
    return 0


_VALID_CODES = frozenset(b"%sudSUD123456789")


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed query or result template; ``pieces`` alternate literal text and codes.

    A piece is ``bytes`` (literal text) or ``int`` (the byte after a ``%``).
    ``joints``: when every code is ``%s`` (or ``%%``, folded into the text), the
    literal runs around the ``%s``s, so that an expansion is one ``bytes.join``.
    """

    text: bytes
    what: str
    is_query: bool
    needs: Needs
    dynamic: bool  # uses some part of its input (Postfix: "data-dependent")
    pieces: tuple[bytes | int, ...]
    joints: tuple[bytes, ...] | None = None

    @classmethod
    def parse(cls, text: str | bytes, what: str, *, table: str = "") -> Template:
        """Check ``text``; ``what`` is "query" (or any query-side name) or "result".

        ``table`` names the table in the error message.
        """
        raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        is_query = what not in _RESULT_KINDS
        pieces, codes = _split_pieces(raw)
        if codes is None:
            kind = "query" if is_query else "result"
            shown = raw.decode("utf-8", "surrogateescape")
            raise DictOpenError(f"db_common_parse: {table}: Invalid {kind} template: {shown}")
        flags = 0
        for code in codes:
            flags |= _code_need(code, is_query)
        labels = max((code - ord("0") for code in codes if code in _LABEL_CODES), default=0)
        dynamic = any(code != ord("%") for code in codes)
        return cls(raw, what, is_query, Needs(flags, labels), dynamic, pieces, _joints(pieces))

    @property
    def uses_domain(self) -> bool:
        """Needs a domain part: the key's (query; %D %1-%9) or the value's (%d result)."""
        return bool(self.needs.flags & (_KEY_DOMAIN | _VALUE_DOMAIN))

    @property
    def uses_user(self) -> bool:
        """Needs a local part: the key's (%u query, %U) or the value's (%u result)."""
        return bool(self.needs.flags & (_KEY_USER | _VALUE_USER))

    @property
    def max_label(self) -> int:
        return self.needs.labels


def _joints(pieces: Sequence[bytes | int]) -> tuple[bytes, ...] | None:
    """The literal runs between ``%s`` codes; None when another code is used."""
    joints = [b""]
    for piece in pieces:
        if isinstance(piece, bytes):
            joints[-1] += piece
        elif piece == ord("s"):
            joints.append(b"")
        else:
            return None
    return tuple(joints)


def _split_pieces(raw: bytes) -> tuple[tuple[bytes | int, ...], list[int] | None]:
    """Literal runs and codes; ``None`` for the codes when a sequence is invalid."""
    pieces: list[bytes | int] = []
    codes: list[int] = []
    start = 0
    while (percent := raw.find(b"%", start)) >= 0:
        if percent + 1 >= len(raw) or raw[percent + 1] not in _VALID_CODES:
            return (), None
        if percent > start:
            pieces.append(raw[start:percent])
        code = raw[percent + 1]
        pieces.append(b"%" if code == ord("%") else code)
        codes.append(code)
        start = percent + 2
    if start < len(raw):
        pieces.append(raw[start:])
    return tuple(pieces), codes


# ---------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------


def split_address(text: bytes) -> tuple[bytes, bytes | None]:
    """(local part, domain) at the last ``@``; the domain is None without an ``@``."""
    at = text.rfind(b"@")
    return (text, None) if at < 0 else (text[:at], text[at + 1 :])


class Skip(enum.Enum):
    """Why an expansion produced nothing."""

    NULL = "no value"
    EMPTY = "empty input"
    VALUE = "value lacks a part the template uses"
    KEY = "key lacks a part the templates use"
    LABELS = "key domain has too few labels"


def _fits(local: bytes, domain: bytes | None, flags: int, need_domain: int, need_user: int) -> bool:
    if flags & need_domain and not domain:
        return False
    return not (flags & need_user and domain is not None and not local)


@dataclass(slots=True)
class _Inputs:
    """The parts a template may substitute."""

    value: bytes
    local: bytes
    domain: bytes | None
    key: bytes
    key_local: bytes
    key_domain: bytes | None
    labels: list[bytes]


def _inputs(value: bytes, key: bytes | None, needs: Needs) -> _Inputs | Skip:
    """Check the inputs against the requirements; the parts to substitute, or why not."""
    if not value:
        return Skip.EMPTY
    local, domain = split_address(value)
    if key is None:
        if not _fits(local, domain, needs.flags, _KEY_DOMAIN, _KEY_USER):
            return Skip.KEY
        key, key_local, key_domain = value, local, domain
    else:
        if not _fits(local, domain, needs.flags, _VALUE_DOMAIN, _VALUE_USER):
            return Skip.VALUE
        key_local, key_domain = split_address(key)
        if not _fits(key_local, key_domain, needs.flags, _KEY_DOMAIN, _KEY_USER):
            return Skip.KEY
    labels: list[bytes] = []
    if needs.labels:
        labels = [label for label in (key_domain or b"").split(b".") if label]
        if len(labels) < needs.labels:
            return Skip.LABELS
    return _Inputs(value, local, domain, key, key_local, key_domain, labels)


def _substitute(code: int, parts: _Inputs) -> bytes:
    """The text one code stands for (requirements already checked)."""
    if code == ord("s"):
        return parts.value
    if code == ord("u"):
        return parts.local
    if code == ord("d"):
        return parts.domain or b""
    if code == ord("S"):
        return parts.key
    if code == ord("U"):
        return parts.key_local
    if code == ord("D"):
        return parts.key_domain or b""
    return parts.labels[-(code - ord("0"))]


def expand_or_skip(
    template: Template,
    value: bytes | None,
    key: bytes | None,
    escape: Escape | None = None,
    needs: Needs | None = None,
) -> bytes | Skip:
    """Like ``expand``, but says why nothing was produced."""
    if value is None:
        return Skip.NULL
    if needs is None:
        needs = template.needs
    joints = template.joints
    if joints is not None and not (needs.flags & _CHECKED or needs.labels):
        # Only %s, and nothing to check but emptiness: one join.
        if not value:
            return Skip.EMPTY
        return (escape(value) if escape is not None else value).join(joints)
    if template.is_query:
        key = None  # a query-side template reads only its input, the key
    parts = _inputs(value, key, needs)
    if isinstance(parts, Skip):
        return parts
    out = bytearray()
    for piece in template.pieces:
        if isinstance(piece, bytes):
            out += piece
        else:
            text = _substitute(piece, parts)
            out += escape(text) if escape is not None else text
    return bytes(out)


def expand(
    template: Template,
    value: bytes | None,
    key: bytes | None,
    escape: Escape | None = None,
    needs: Needs | None = None,
) -> bytes | None:
    """Expand ``template``; None when the expansion is suppressed (see module doc).

    Query: ``value`` is the lookup key and ``key`` None (or the key again). Result:
    ``value`` is the result value and ``key`` the lookup key. ``escape`` quotes each
    substituted piece. ``needs`` (default: the template's own) are the pooled
    requirements of all templates of the table.
    """
    result = expand_or_skip(template, value, key, escape, needs)
    return None if isinstance(result, Skip) else result


# ---------------------------------------------------------------------------
# Statements with parameters
# ---------------------------------------------------------------------------

# A quote after these does not open a plain string literal (E'', U&'', B'', X'', N'').
_PREFIX_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_&")


@dataclass(frozen=True, slots=True)
class Statement:
    """A query template as a statement with parameters: every plain string literal
    that holds expansions (``'%s'``, ``'%u@%d'``) becomes a placeholder, with the
    literal's inside as the template of its value. The value is the text the
    literal would hold after unescaping, so the database compares the same string,
    and the statement text stays the same from key to key (parsed once)."""

    text: bytes
    values: tuple[Template, ...]

    def expand(self, key: bytes, needs: Needs) -> list[bytes]:
        """The parameters' values for KEY, unescaped (``needs``: the table's)."""
        out: list[bytes] = []
        for template in self.values:
            value = expand_or_skip(template, key, None, None, needs)
            assert not isinstance(value, Skip), "the caller checked that the key fills it"
            out.append(value)
        return out


def parameterized(
    template: Template, unsafe: re.Pattern[bytes], placeholder: Callable[[int], bytes]
) -> Statement | None:
    """The statement form of a query template, PLACEHOLDER(n) for the n-th parameter;
    None when it has none: an expansion outside a plain string literal, a doubled
    quote in a literal, or text that UNSAFE (the dialect's) finds, which this scanner
    does not follow (comments, other quotes, escapes, several statements)."""
    pieces = _merged(template.pieces)
    if any(isinstance(piece, bytes) and unsafe.search(piece) for piece in pieces):
        return None
    out = bytearray()
    values: list[Template] = []
    literal: list[bytes | int] | None = None  # the pieces inside an open quote
    for piece in pieces:
        if isinstance(piece, int):
            if literal is None:
                return None  # an expansion outside quotes: part of the SQL itself
            literal.append(piece)
            continue
        pos = 0
        while pos <= len(piece):
            quote = piece.find(b"'", pos)
            if literal is None:
                if quote < 0:
                    out += piece[pos:]
                    break
                out += piece[pos:quote]
                if out and out[-1] in _PREFIX_BYTES:
                    return None
                literal = []
            else:
                if quote < 0:
                    literal.append(piece[pos:])
                    break
                if piece[quote + 1 : quote + 2] == b"'":
                    return None  # a doubled quote inside the literal
                literal.append(piece[pos:quote])
                out += _close_literal(literal, values, placeholder)
                literal = None
            pos = quote + 1
    if literal is not None or not values:
        return None
    return Statement(bytes(out), tuple(values))


def _merged(pieces: tuple[bytes | int, ...]) -> list[bytes | int]:
    """Adjacent literal pieces as one (``%%`` is a piece of its own)."""
    merged: list[bytes | int] = []
    for piece in pieces:
        if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def _close_literal(
    literal: list[bytes | int], values: list[Template], placeholder: Callable[[int], bytes]
) -> bytes:
    """The SQL for a literal: itself, or a parameter when it holds an expansion."""
    if all(isinstance(piece, bytes) for piece in literal):
        return b"'" + b"".join(literal) + b"'"  # type: ignore[arg-type]
    raw = b"".join(
        piece.replace(b"%", b"%%") if isinstance(piece, bytes) else b"%" + bytes([piece])
        for piece in literal
    )
    values.append(Template.parse(raw, "query"))
    return placeholder(len(values))


# ---------------------------------------------------------------------------
# Domain filter
# ---------------------------------------------------------------------------

_LIST_SEPARATORS = ", \t\r\n"
_MAX_FILE_DEPTH = 32
_OPEN_FLAGS = F.LOCK | F.UTF8_REQUEST


def _casefold(data: bytes, utf8: bool) -> bytes:
    """Postfix's casefold(): full Unicode folding when UTF-8 is on and valid, else ASCII."""
    return casefold_utf8(data) if utf8 and is_valid_utf8(data) else data.lower()


def list_tokens(text: str) -> Iterator[tuple[str, str]]:
    """Split a match list: (token, text after it). ``{...}`` groups are not split."""
    position, end = 0, len(text)
    while True:
        while position < end and text[position] in _LIST_SEPARATORS:
            position += 1
        if position >= end:
            return
        start, level = position, 0
        while position < end:
            char = text[position]
            if char == "{":
                level += 1
            elif level and char == "}":
                level -= 1
            elif not level and char in _LIST_SEPARATORS:
                break
            position += 1
        token = text[start:position]
        position = min(position + 1, end)
        yield token, text[position:]


@dataclass(frozen=True, slots=True)
class _Entry:
    """One list entry: a folded name, or a table to look the domain up in."""

    match: bool  # False for a negated entry
    name: bytes = b""
    table: Table | None = None
    spec: str = ""


Opener = Callable[[str, int, int], Table]


class _ListParser:
    """Builds the entries of a ``domain`` list, Postfix's match_list rules."""

    def __init__(self, pname: str, ctx: OpenContext) -> None:
        self.pname = pname
        self.utf8 = ctx.utf8_enabled
        self.opener: Opener = ctx.open_table or _registry_opener(ctx)
        self.entries: list[_Entry] = []

    def parse(self, text: str, match: bool = True, depth: int = 0) -> None:
        for token, rest in list_tokens(text):
            if token.startswith("#"):
                log.warning(
                    "%s: comment at end of line is not supported: %s %s",
                    self.pname,
                    token,
                    rest.rstrip(),
                )
                return
            item = token.lstrip("!")
            polarity = match if (len(token) - len(item)) % 2 == 0 else not match
            if not item:
                raise DictOpenError(f"{self.pname}: no pattern after '!'")
            self._add(item, polarity, depth)

    def _add(self, item: str, match: bool, depth: int) -> None:
        if item.startswith("/"):
            self._include(item, match, depth)
        elif item[0] != "[" and ":" in item:
            table = self.opener(item, os.O_RDONLY, _OPEN_FLAGS)
            self.entries.append(_Entry(match, table=table, spec=item))
        else:
            name = _casefold(item.encode("utf-8", "surrogateescape"), self.utf8)
            self.entries.append(_Entry(match, name=name, spec=item))

    def _include(self, path: str, match: bool, depth: int) -> None:
        """A /file/name: its lines are more list text (lines starting with # skipped)."""
        if depth >= _MAX_FILE_DEPTH:
            raise DictOpenError(f"{self.pname}: /file inclusion too deep at {path}")
        try:
            with open(path.encode("utf-8", "surrogateescape"), "rb") as source:
                data = source.read()
        except IsADirectoryError as exc:
            raise DictOpenError(
                f"match_list_parse: read file {path}: {os.strerror(exc.errno or 0)}"
            ) from None
        except OSError as exc:
            reason = f"open file {path}: {os.strerror(exc.errno or 0)}"
            log.error("%s", reason)
            stand_in = SurrogateTable("nofile", path, os.O_RDONLY, _OPEN_FLAGS, reason)
            self.entries.append(_Entry(match, table=stand_in, spec=f"nofile:{path}"))
            return
        for line in data.decode("utf-8", "surrogateescape").splitlines(keepends=True):
            if not line.startswith("#"):
                self.parse(line, match, depth + 1)


def _registry_opener(ctx: OpenContext) -> Opener:
    from proxymap.tables import open_table

    def opener(spec: str, open_mode: int, flags: int) -> Table:
        return open_table(spec, open_mode, flags, ctx)

    return opener


# A match plan yields the table entries it needs looked up and receives whether the
# domain was found there; its return value is the verdict.
_Plan = Generator[_Entry, bool, bool]


class DomainFilter:
    """The ``domain`` parameter: which keys a table is asked about at all."""

    def __init__(self, entries: Sequence[_Entry], pname: str, utf8: bool) -> None:
        self.entries = tuple(entries)
        self.pname = pname
        self.utf8 = utf8

    @classmethod
    def from_config(cls, cfg: CfgParser, ctx: OpenContext) -> DomainFilter | None:
        """The filter of ``cfg``'s ``domain`` setting; None when it is empty or unset."""
        text = cfg.get_str("domain", "")
        return cls.parse(text, cfg.name, ctx) if text else None

    @classmethod
    def parse(cls, text: str, pname: str, ctx: OpenContext) -> DomainFilter:
        parser = _ListParser(pname, ctx)
        parser.parse(text)
        return cls(parser.entries, pname, ctx.utf8_enabled)

    @property
    def asynchronous(self) -> bool:
        """True when some entry is an asynchronous table: use ``aallows``."""
        return any(isinstance(e.table, AsyncTable) for e in self.entries)

    # --- matching ----------------------------------------------------------------------
    @staticmethod
    def domain_of(key: bytes) -> bytes | None:
        """The domain of ``local@domain`` with a non-empty local part, else None."""
        local, domain = split_address(key)
        return domain if domain is not None and local else None

    def _plan(self, subject: bytes) -> _Plan:
        for entry in self.entries:
            if entry.table is None:
                found = entry.name == subject
            else:
                found = yield entry
            if found:
                return entry.match
        return False

    def _failed(self, entry: _Entry, error: DictError) -> DictError:
        log.warning("%s: %s: table lookup problem", self.pname, entry.spec)
        return error

    def _lookup(self, entry: _Entry, subject: bytes) -> bool:
        table = entry.table
        if not isinstance(table, SyncTable):  # the plan yields only table entries
            raise DictRetry(
                f"{self.pname}: {entry.spec}: asynchronous table in a synchronous domain check"
            )
        try:
            return table.lookup(subject) is not None
        except DictError as error:
            raise self._failed(entry, error) from None

    async def _alookup(self, entry: _Entry, subject: bytes) -> bool:
        table = entry.table
        if not isinstance(table, AsyncTable):
            return self._lookup(entry, subject)
        try:
            return await table.alookup(subject) is not None
        except DictError as error:
            raise self._failed(entry, error) from None

    def matches(self, domain: bytes) -> bool:
        """Whether ``domain`` is on the list; a table error is raised (DictError)."""
        subject = _casefold(domain, self.utf8)
        plan = self._plan(subject)
        try:
            entry = next(plan)
            while True:
                entry = plan.send(self._lookup(entry, subject))
        except StopIteration as done:
            return done.value

    async def amatches(self, domain: bytes) -> bool:
        subject = _casefold(domain, self.utf8)
        plan = self._plan(subject)
        try:
            entry = next(plan)
            while True:
                entry = plan.send(await self._alookup(entry, subject))
        except StopIteration as done:
            return done.value

    def allows(self, key: bytes) -> bool:
        """Whether ``key`` may be looked up; a table lookup error is raised."""
        domain = self.domain_of(key)
        return domain is not None and self.matches(domain)

    async def aallows(self, key: bytes) -> bool:
        domain = self.domain_of(key)
        return domain is not None and await self.amatches(domain)


# ---------------------------------------------------------------------------
# One table's templates, filter and limit
# ---------------------------------------------------------------------------


class ResultJoiner:
    """Collects the values of one lookup: expanded, joined with ``,``, limited."""

    __slots__ = ("context", "key", "count", "_pieces", "_verbatim", "_limit")

    def __init__(self, context: QueryContext, key: bytes) -> None:
        self.context = context
        self.key = key
        self.count = 0
        self._pieces: list[bytes] = []
        self._verbatim = context.verbatim_results
        self._limit = context.expansion_limit

    def add(self, value: bytes | None) -> None:
        """One value from the database (None = SQL NULL, skipped silently)."""
        if value and self._verbatim:
            piece = value  # result_format "%s", nothing to check
        else:
            ctx = self.context
            expanded = expand_or_skip(ctx.result_format, value, self.key, None, ctx.needs)
            if isinstance(expanded, Skip):
                ctx.report_skip(expanded, self.key, query=False)
                return
            piece = expanded
        self._pieces.append(piece)
        self.count += 1
        if self._limit > 0 and self.count > self._limit:
            ctx = self.context
            shown = _shown(self.key)
            log.warning(
                "%s: expansion limit %d exceeded for key '%s'", ctx.table, self._limit, shown
            )
            raise DictRetry(f"{ctx.table}: expansion limit exceeded for key '{shown}'")

    def extend(self, values: Iterable[bytes | None]) -> None:
        for value in values:
            self.add(value)

    def value(self) -> bytes | None:
        """The joined answer; None ("not found") when nothing was added."""
        return b",".join(self._pieces) or None


def _shown(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "backslashreplace")


class QueryContext:
    """The templates, limit and domain filter of one table (Postfix's db_common ctx)."""

    def __init__(
        self,
        cfg: CfgParser,
        query: Template,
        result_format: Template,
        expansion_limit: int,
        domain: DomainFilter | None,
        *,
        table: str | None = None,
        extra: Sequence[Template] = (),
    ) -> None:
        """``table`` ("type:name") names the table in warnings; ``extra`` are further
        query-side templates expanded with ``expand_query`` (LDAP ``search_base``)."""
        self.cfg = cfg
        self.query = query
        self.result_format = result_format
        self.expansion_limit = expansion_limit
        self.domain = domain
        self.table = table or cfg.name
        self.needs = query.needs | result_format.needs
        for template in extra:
            self.needs = self.needs | template.needs
        # Precomputed for the hot path: a value passes through as it is, a key
        # needs no checks, the domain check needs no await.
        self.verbatim_results = result_format.text == b"%s" and self.needs.trivial
        # Any non-empty key fills the query (it holds only %s, nothing to check).
        self.any_key_fills = query.joints is not None and self.needs.trivial
        self.domain_asynchronous = domain is not None and domain.asynchronous

    @classmethod
    def for_sql(
        cls, cfg: CfgParser, ctx: OpenContext, dict_type: str, *, table: str | None = None
    ) -> QueryContext:
        """mysql/pgsql/sqlite: ``query`` (or the legacy fields), ``result_format``,
        ``expansion_limit``, ``domain``, read and checked as Postfix does."""
        query_text = cfg.get_optional("query") or legacy_query(cfg, dict_type)
        result_text = cfg.get_str("result_format", "%s", 1)
        limit = cfg.get_int("expansion_limit", 0)
        query = Template.parse(query_text, "query", table=cfg.name)
        result_format = Template.parse(result_text, "result", table=cfg.name)
        domain = DomainFilter.from_config(cfg, ctx)
        return cls(
            cfg, query, result_format, limit, domain, table=table or f"{dict_type}:{cfg.name}"
        )

    # --- diagnostics -------------------------------------------------------------------
    def report_skip(self, why: Skip, key: bytes, *, query: bool) -> None:
        """Log what Postfix logs for a skipped expansion (most are silent)."""
        if why is Skip.EMPTY and query:
            log.warning('table "%s": empty query string -- ignored', self.table)
        elif why is Skip.EMPTY:
            log.warning(
                'table "%s": empty lookup result for: "%s" -- ignored', self.table, _shown(key)
            )
        elif why is Skip.KEY and not query:
            log.warning("%s: lookup key '%s' skipped after the query", self.table, _shown(key))

    # --- the query side ----------------------------------------------------------------
    def check_domain(self, key: bytes) -> bool:
        return self.domain is None or self.domain.allows(key)

    async def acheck_domain(self, key: bytes) -> bool:
        return self.domain is None or await self.domain.aallows(key)

    def expand_query(self, template: Template, key: bytes, escape: Escape | None) -> bytes | None:
        """A query-side template for ``key`` with the table's pooled requirements."""
        text = expand_or_skip(template, key, None, escape, self.needs)
        if isinstance(text, Skip):
            self.report_skip(text, key, query=True)
            return None
        return text

    def query_for(self, key: bytes, escape: Escape | None) -> bytes | None:
        """The query for ``key``; None = "not found" without asking the database.

        With an asynchronous table in ``domain`` (``domain_asynchronous``) use
        ``aquery_for``."""
        if self.domain is not None and not self.domain.allows(key):
            return None
        return self.expand_query(self.query, key, escape)

    async def aquery_for(self, key: bytes, escape: Escape | None) -> bytes | None:
        if not await self.acheck_domain(key):
            return None
        return self.expand_query(self.query, key, escape)

    # --- the result side ---------------------------------------------------------------
    def results(self, key: bytes) -> ResultJoiner:
        return ResultJoiner(self, key)


# ---------------------------------------------------------------------------
# Legacy SQL query
# ---------------------------------------------------------------------------


def legacy_query(cfg: CfgParser, dict_type: str) -> str:
    """The query Postfix builds when ``query`` is unset or empty.

    pgsql with ``select_function``: ``SELECT fn('%s')``. Otherwise
    ``SELECT select_field FROM table WHERE where_field='%s' additional_conditions``
    (the space before the conditions is there even when they are empty); missing or
    empty ``table``, ``select_field`` or ``where_field`` is an error.
    """
    if dict_type == "pgsql":
        function = cfg.get_optional("select_function")
        if function is not None:
            return f"SELECT {function}('%s')"
    fields = {}
    for name in ("table", "select_field", "where_field"):
        value = cfg.get_optional(name, 1)
        if value is None:  # unreachable: a minimum length of 1 already refuses it
            raise DictOpenError(f"db_common_sql_build_query: '{name}' parameter not defined")
        fields[name] = value
    conditions = cfg.get_str("additional_conditions", "")
    return (
        f"SELECT {fields['select_field']} FROM {fields['table']} "
        f"WHERE {fields['where_field']}='%s' {conditions}"
    )
