"""inline: a table written in its own name, ``inline:{ key=value, ... }`` (dict_inline).

NAME
    inline -- in-memory table parsed from a braced table name

DESCRIPTION
    The name must be one ``{ ... }`` group; its elements are separated by blanks or
    commas, and an element in braces may contain both (``{ key = value, more }``).
    An element is ``key=value``: the key ends at the first ``=`` or blank that is
    neither quoted nor backslash-escaped (quotes and backslashes stay in the key),
    blanks may surround the ``=``, and the value is trimmed. Empty keys and empty
    values are allowed; duplicates keep the last value.

    Any element that does not parse, an empty table, or (under UTF-8 rules) a name
    that is not valid UTF-8 makes the whole table unavailable. Keys are folded at
    load time like texthash keys when the open carries FOLD_FIX. Read-only.

SEE ALSO
    docs/TABLES.md sections 2.7 and 3.5.
"""

from __future__ import annotations

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, OpenContext, SyncTable
from proxymap.tables.texthash import SequenceCursor, require_read_only
from proxymap.tables.textsyntax import BraceError, braced_elements, strip_braces
from proxymap.tables.utf8 import fold_key, is_valid_utf8, utf8_wanted

_BLANKS = " \t\r\n\v\f"


def split_inline_element(element: str) -> tuple[str, str] | None:
    """``key = value`` -> (key, value), or ``None`` when the element has no usable ``=``."""
    in_quotes = False
    escaped = False
    end = len(element)
    for index, char in enumerate(element):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif not in_quotes and (char == "=" or char in _BLANKS):
            end = index
            break
    if in_quotes:
        return None
    rest = element[end:].lstrip(_BLANKS)
    if not rest.startswith("="):
        return None
    return element[:end], rest[1:].strip(_BLANKS)


def _syntax_error(problem: str, name: str) -> DictOpenError:
    # Worded like postmap's message for the same mistake.
    return DictOpenError(f'{problem}: "inline:{name}"; need "inline:{{name=value...}}"')


def parse_inline(name: str) -> list[tuple[str, str]]:
    """All (key, value) pairs of an inline name; ``DictOpenError`` on any syntax error."""
    try:
        elements = braced_elements(name)
    except BraceError:
        raise _syntax_error("bad syntax", name)
    if not elements:
        raise _syntax_error("bad syntax", name)
    pairs = []
    for element in elements:
        text = element
        if element.startswith("{"):
            try:
                text = strip_braces(element)
            except BraceError:
                raise _syntax_error("bad syntax", name)
        pair = split_inline_element(text)
        if pair is None:
            unbalanced = text.count('"') % 2
            raise _syntax_error(
                "unbalanced '\"'" if unbalanced else "missing '=' after attribute name", name
            )
        pairs.append(pair)
    return pairs


class InlineTable(SyncTable):
    dict_type = "inline"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        require_read_only(self.dict_type, name, open_mode)
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        utf8 = utf8_wanted(flags, ctx.utf8_enabled)
        if utf8 and not is_valid_utf8(name.encode("utf-8", "surrogateescape")):
            raise _syntax_error("bad UTF-8 syntax", name)
        fold = bool(flags & F.FOLD_FIX)
        self.entries: dict[bytes, bytes] = {}
        for key_text, value_text in parse_inline(name):
            key = key_text.encode("utf-8", "surrogateescape")
            if fold:
                key = fold_key(key, utf8)
            self.entries[key] = value_text.encode("utf-8", "surrogateescape")
        self._cursor = SequenceCursor()

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(self.fold(key))

    def sequence(self, function: int) -> tuple[bytes, bytes] | None:
        return self._cursor.step(function, self.entries)
