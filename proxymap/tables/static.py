"""static: every key maps to the same constant (Postfix's dict_static).

NAME
    static -- constant-result table

DESCRIPTION
    ``static:text`` answers ``text`` verbatim (blanks included) for every key, the
    empty key too; ``static:{ text }`` answers the text between the braces with the
    blanks just inside them removed (``static:{}`` answers the empty string). A
    braced name with text after the closing brace, or unbalanced braces, makes the
    table unavailable. Only lookups are supported; the open mode is not checked.

SEE ALSO
    docs/TABLES.md sections 2.7 and 3.6.
"""

from __future__ import annotations

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, OpenContext, SyncTable
from proxymap.tables.textsyntax import BraceError, strip_braces


class StaticTable(SyncTable):
    dict_type = "static"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        text = name
        if name.startswith("{"):
            try:
                text = strip_braces(name)
            except BraceError as exc:
                raise DictOpenError(f"bad static:name syntax: {exc}")
        self.value = text.encode("utf-8", "surrogateescape")

    def lookup(self, _key: bytes) -> bytes | None:  # any key: the one value
        return self.value
