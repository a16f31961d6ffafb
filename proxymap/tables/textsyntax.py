"""Text syntax shared by texthash, regexp, pcre, cidr, *.cf files and brace-style names.

NAME
    textsyntax -- logical lines, postmap "key value" lines, and ``{ ... }`` names

DESCRIPTION
    ``logical_lines`` (from ``master.readlline``) joins continuation lines the way every
    Postfix text table reader does (``docs/TABLES.md`` section 2.6).

    ``split_postmap_line`` splits one logical line into key and value as postmap(1)
    does: the key ends at the first blank that is neither inside double quotes nor
    escaped by a backslash; quotes and backslashes stay part of the key.

    ``split_braced`` and ``strip_braces`` implement the ``{ ... }`` grammar of table
    names such as ``inline:{a=1, {b = 2}}`` and ``pipemap:{t1:n1, t2:n2}`` (section 2.7):
    separators are blanks and commas, text inside braces (nesting counted) is never
    split, quotes do not protect separators.
"""

from __future__ import annotations

import logging

from master.readlline import logical_lines

__all__ = [
    "BraceError",
    "braced_elements",
    "logical_lines",
    "split_braced",
    "split_postmap_line",
    "strip_braces",
]

log = logging.getLogger("proxymap")

_BLANKS = b" \t\r\n\v\f"
_NAME_SEPARATORS = " \t\r\n,"


class BraceError(ValueError):
    """A ``{ ... }`` syntax error; the message reads like Postfix's."""


def split_postmap_line(line: bytes) -> tuple[bytes, bytes] | None:
    """Split ``key whitespace value``; ``None`` when the line has no usable key or value.

    Trailing blanks of the line are ignored; leading and trailing blanks of the value are
    removed, inner blanks kept.
    """
    in_quotes = False
    escaped = False
    end = len(line)
    for index, byte in enumerate(line):
        if escaped:
            escaped = False
        elif byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # double quote
            in_quotes = not in_quotes
        elif not in_quotes and byte in _BLANKS:
            end = index
            break
    if in_quotes:
        return None
    key = line[:end]
    value = line[end:].strip(_BLANKS)
    if not key or not value:
        return None
    return key, value


def split_braced(text: str) -> list[str]:
    """Split on blanks and commas, keeping ``{ ... }`` groups (nesting counted) whole."""
    tokens: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if depth == 0 and char in _NAME_SEPARATORS:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise BraceError(f"syntax error after '}}' in \"{text}\"")
        current.append(char)
    if depth > 0:
        raise BraceError(f"missing '}}' in \"{text}\"")
    if current:
        tokens.append("".join(current))
    return tokens


def strip_braces(text: str) -> str:
    """``{ text }`` -> ``text`` (blanks just inside the braces removed).

    The text must start with ``{`` and its matching ``}`` must be the last character.
    """
    if not text.startswith("{"):
        raise BraceError(f"no '{{' at start of text in \"{text}\"")
    depth = 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                if text[index + 1 :].strip(" \t\r\n"):
                    raise BraceError(f"syntax error after '}}' in \"{text}\"")
                return text[1:index].strip(" \t\r\n")
    raise BraceError(f"missing '}}' in \"{text}\"")


def braced_elements(name: str) -> list[str]:
    """The elements of a whole braced table name ``{e1, e2, {e 3}}``, unstripped."""
    return split_braced(strip_braces(name))
