"""Rule files shared by regexp, pcre and cidr tables.

NAME
    patternfile -- rule sources, IF/ENDIF blocks, /pattern/flags syntax, $n replacements

DESCRIPTION
    ``rule_source`` reads a table's rules from its file, or from the name itself for the
    inline form ``type:{ {rule}, {rule} }`` (each element is one line; braces and the
    blanks just inside them removed; an element without braces makes the table
    unavailable, as in Postfix). ``rule_lines`` yields the logical lines
    (``textsyntax.logical_lines``) with trailing blanks trimmed. A missing file is an
    open error (the table becomes unavailable); a bad rule is only a warning with the
    file name and line number, and the rule is dropped.

    ``take_pattern`` parses ``[!...]DpatternD[flags]``: each ``!`` (blanks allowed
    around them) inverts the sense; D is any byte; a backslash escapes the next byte
    (both stay in the pattern). The two table types differ in two details the caller
    selects: regexp flags stop at ``!`` (the two-pattern form), and a backslash that is
    the last byte of a regexp line ends the pattern instead of being an error.

    ``parse_replacement`` implements the ``$`` syntax of a result: ``$$`` is a dollar,
    ``$name``/``${name}``/``$(name)`` must name a group number 1..N (``$1x`` names
    ``1x`` and is an error, ``$10`` is group ten), anything malformed drops the rule.
    Unset or empty groups expand to nothing.

    ``RuleList`` links each IF to its ENDIF while rules are added, so that a lookup
    whose IF condition fails jumps over the block (and ends, not found, when the IF has
    no ENDIF). An ENDIF without an open IF is ignored with a warning.

    ``index_runs`` finds the long runs of consecutive rules a table indexes (match
    rules: ``ruleindex.RunIndex`` for pcre and regexp, ``cidr.NetworkRun``); a lookup
    asks a run's index for candidates instead of trying each of its rules.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from proxymap.tables.base import DictOpenError
from proxymap.tables.textsyntax import BraceError, braced_elements, logical_lines, strip_braces

log = logging.getLogger("proxymap")

C_SPACE = b" \t\n\v\f\r"  # isspace() in the C locale
MIN_RUN = 4  # shorter runs of rules are scanned: an index would not pay for itself
RunT = TypeVar("RunT")
_BACKSLASH = 0x5C
_BANG = 0x21

MATCH, IF, ENDIF = 0, 1, 2


class RuleError(ValueError):
    """A rule cannot be used; the message says why (logged, then the rule is skipped)."""


# ---------------------------------------------------------------------------------------
# Sources and lines
# ---------------------------------------------------------------------------------------


def rule_source(dict_type: str, name: str) -> bytes:
    """The rule text of ``type:name``: the file's bytes, or the inline rules one per line."""
    if name.startswith("{"):
        try:
            # Every element must itself be braced: "{/a/ b}", never "/a/ b".
            lines = [strip_braces(element) for element in braced_elements(name)]
        except BraceError as exc:
            raise DictOpenError(f"{dict_type} map: {exc}") from None
        return "\n".join(lines).encode("utf-8", "surrogateescape")
    try:
        with open(name, "rb") as source:
            return source.read()
    except OSError as exc:
        raise DictOpenError(f"open {name}: {exc.strerror or exc}") from None


def rule_lines(data: bytes, origin: str) -> list[tuple[int, bytes]]:
    """(line number, logical line) with trailing blanks removed; empty lines dropped.

    C string handling ends a line at a NUL byte, so we do too.
    """
    lines = []
    for number, line in logical_lines(data, origin):
        if b"\0" in line:
            line = line.split(b"\0", 1)[0]
        line = line.rstrip(C_SPACE)
        if line:
            lines.append((number, line))
    return lines


def warn(dict_type: str, origin: str, lineno: int, message: str) -> None:
    log.warning("%s map %s, line %d: %s", dict_type, origin, lineno, message)


def keyword_at(line: bytes, word: bytes) -> bool:
    """True if the line starts with WORD (any case) not followed by a letter or digit."""
    size = len(word)
    return line[:size].upper() == word and not line[size : size + 1].isalnum()


def skip_space(line: bytes, pos: int) -> int:
    while pos < len(line) and line[pos] in C_SPACE:
        pos += 1
    return pos


# ---------------------------------------------------------------------------------------
# /pattern/flags
# ---------------------------------------------------------------------------------------


def take_negations(line: bytes, pos: int) -> tuple[bool, int]:
    """Consume ``!`` and blanks; returns (positive sense?, position of the next byte)."""
    positive = True
    while pos < len(line):
        byte = line[pos]
        if byte == _BANG:
            positive = not positive
        elif byte not in C_SPACE:
            break
        pos += 1
    return positive, pos


def take_pattern(line: bytes, pos: int, *, regexp_syntax: bool) -> tuple[bool, bytes, bytes, int]:
    """Parse ``[!...]DpatternD[flags]`` at ``pos``.

    Returns (positive, pattern, flag letters, position after the flags). Flags end at a
    blank (and, for regexp syntax, at ``!``).
    """
    positive, pos = take_negations(line, pos)
    end = len(line)
    if pos >= end:
        raise RuleError("no regexp: skipping this rule")
    delimiter = line[pos]
    pos += 1
    start = pos
    terminated = False
    while pos < end:
        byte = line[pos]
        if byte == _BACKSLASH:
            if pos + 1 < end:
                pos += 1
            else:
                # regexp: a final backslash ends the pattern as if it were the delimiter
                terminated = regexp_syntax
                break
        elif byte == delimiter:
            terminated = True
            break
        pos += 1
    if not terminated:
        raise RuleError(f'no closing regexp delimiter "{chr(delimiter)}": skipping this rule')
    pattern = line[start:pos]
    pos += 1
    flags_start = pos
    while pos < end and line[pos] not in C_SPACE and not (regexp_syntax and line[pos] == _BANG):
        pos += 1
    return positive, pattern, line[flags_start:pos], pos


# ---------------------------------------------------------------------------------------
# $n replacements
# ---------------------------------------------------------------------------------------


class Replacement:
    """A rule's result: constant text, or literal pieces and group numbers."""

    __slots__ = ("literal", "parts", "max_sub")

    def __init__(self, literal: bytes | None, parts: tuple[bytes | int, ...], max_sub: int):
        self.literal = literal
        self.parts = parts
        self.max_sub = max_sub

    def expand(self, key: bytes, spans) -> bytes:
        """Fill in groups from ``spans`` (indexable by group: (start, end), start < 0 = unset)."""
        out = []
        for part in self.parts:
            if isinstance(part, int):
                start, end = spans[part]
                if 0 <= start < end:
                    out.append(key[start:end])
            else:
                out.append(part)
        return b"".join(out)


def _macro_tokens(text: bytes) -> list[tuple[bool, bytes]]:
    """Split like Postfix's macro parser: (is_name, text) pieces; RuleError when malformed."""
    tokens: list[tuple[bool, bytes]] = []
    literal = bytearray()
    pos, end = 0, len(text)
    while pos < end:
        byte = text[pos]
        if byte != 0x24:  # $
            literal.append(byte)
            pos += 1
            continue
        if pos + 1 < end and text[pos + 1] == 0x24:
            literal.append(0x24)
            pos += 2
            continue
        if literal:
            tokens.append((False, bytes(literal)))
            literal.clear()
        pos += 1
        if pos < end and text[pos] in b"({":
            opener = text[pos]
            closer = 0x29 if opener == 0x28 else 0x7D
            level = 1
            pos += 1
            start = pos
            while level > 0:
                if pos >= end:
                    raise RuleError(f'truncated macro reference: "{_show(text)}"')
                if text[pos] == opener:
                    level += 1
                elif text[pos] == closer:
                    level -= 1
                pos += 1
            name = text[start : pos - 1]
        else:
            start = pos
            while pos < end and (text[pos : pos + 1].isalnum() or text[pos] == 0x5F):
                pos += 1
            name = text[start:pos]
        if not name:
            raise RuleError(f'empty macro name: "{_show(text)}"')
        tokens.append((True, name))
    if literal:
        tokens.append((False, bytes(literal)))
    return tokens


def parse_replacement(text: bytes) -> Replacement:
    """Check and pre-digest a result text; RuleError (rule skipped) on any problem."""
    parts: list[bytes | int] = []
    max_sub = 0
    for is_name, value in _macro_tokens(text):
        if not is_name:
            parts.append(value)
            continue
        if not value.isdigit() or not value.isascii():
            raise RuleError(f'non-numeric replacement index "{_show(value)}"')
        number = int(value)
        if number < 1:
            raise RuleError(f'out-of-range replacement index "{_show(value)}"')
        max_sub = max(max_sub, number)
        parts.append(number)
    if max_sub == 0:
        return Replacement(b"".join(p for p in parts if isinstance(p, bytes)), (), 0)
    return Replacement(None, tuple(parts), max_sub)


def _show(text: bytes) -> str:
    return text.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# Rule lists with IF/ENDIF blocks
# ---------------------------------------------------------------------------------------


class Rule:
    """One compiled rule. ``kind`` is MATCH, IF or ENDIF; the table fills the rest."""

    __slots__ = (
        "kind",
        "lineno",
        "positive",
        "matcher",
        "second",
        "second_positive",
        "replacement",
        "endif",
        "value",
        "prefix",
        "caseless",
        "suffix",
    )

    def __init__(self, kind: int, lineno: int, positive: bool = True, matcher: Any = None) -> None:
        self.kind = kind
        self.lineno = lineno
        self.positive = positive
        # The driver's compiled patterns (PcrePattern, PosixRegex): one type per table.
        self.matcher = matcher
        self.second: Any = None
        self.second_positive = True
        self.replacement: Replacement | None = None  # set on every MATCH rule
        self.endif = -1  # IF: index of its ENDIF, -1 when it has none
        self.value = b""
        self.prefix = b""  # literal text every match starts with (ruleindex), if known
        self.caseless = False  # the prefix compares without regard to ASCII case
        self.suffix = b""  # literal text every match ends with (ruleindex), if known


class RuleList:
    """Rules in file order, with each IF linked to its ENDIF."""

    def __init__(self, dict_type: str, origin: str) -> None:
        self.dict_type = dict_type
        self.origin = origin
        self.rules: list[Rule] = []
        self._open_ifs: list[int] = []

    @property
    def nesting(self) -> int:
        return len(self._open_ifs)

    def add(self, rule: Rule) -> None:
        if rule.kind == IF:
            self._open_ifs.append(len(self.rules))
        elif rule.kind == ENDIF:
            self.rules[self._open_ifs.pop()].endif = len(self.rules)
        self.rules.append(rule)

    def finish(self) -> list[Rule]:
        for index in reversed(self._open_ifs):
            rule = self.rules[index]
            warn(self.dict_type, self.origin, rule.lineno, "IF has no matching ENDIF")
        self._open_ifs.clear()
        return self.rules


def index_runs(
    count: int, in_run: Callable[[int], bool], build: Callable[[int, int], RunT]
) -> list[RunT | None]:
    """Entry i is ``build(i, end)`` for the run of rules i..end-1 that ``in_run`` accepts,
    when it has at least MIN_RUN rules and no accepted rule just before it; else None."""
    runs: list[RunT | None] = [None] * count
    start = 0
    while start < count:
        end = start
        while end < count and in_run(end):
            end += 1
        if end - start >= MIN_RUN:
            runs[start] = build(start, end)
        start = max(end, start + 1)
    return runs


def require_read_only(dict_type: str, name: str, open_mode: int) -> None:
    if open_mode != os.O_RDONLY:
        raise DictOpenError(f"{dict_type}:{name} map requires O_RDONLY access mode")
