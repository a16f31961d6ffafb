"""randmap:{v1, v2, ...}: a random choice among constant results.

NAME
    randmap -- answer every lookup with one value picked uniformly at random

DESCRIPTION
    Values are split with the brace rules of table names; a value containing blanks or
    commas is written in braces, which stay part of the value (observed with Postfix
    3.7: ``randmap:{{a b}}`` answers ``{a b}``). Repeating a value weights it. An
    empty list makes the table unavailable. Any key is "found"
    (``docs/TABLES.md`` section 3.16).
"""

from __future__ import annotations

import os
import random

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, OpenContext, SyncTable
from proxymap.tables.textsyntax import BraceError, braced_elements


class RandmapTable(SyncTable):
    dict_type = "randmap"

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN, ctx)
        if open_mode != os.O_RDONLY:
            raise DictOpenError(f"{self.spec} map requires O_RDONLY access mode")
        try:
            values = braced_elements(name)
        except BraceError as exc:
            raise DictOpenError(f'bad syntax: "{self.spec}"; {exc}') from None
        if not values:
            raise DictOpenError(f'bad syntax: "{self.spec}"; empty table')
        self.values = [v.encode("utf-8", "surrogateescape") for v in values]

    def lookup(self, _key: bytes) -> bytes | None:  # any key: a random value
        return random.choice(self.values)
