"""texthash: a postmap(1) source file loaded into memory at open (Postfix's dict_thash).

NAME
    texthash -- in-memory table read from a "key whitespace value" text file

DESCRIPTION
    ``texthash:/path`` reads ``/path`` itself (no suffix) once, at open time, with the
    postmap line syntax (logical lines, quoted/escaped keys; see ``textsyntax``).
    Nothing watches the file afterwards: a change is seen by the next process.

    Open flags decide how the file is loaded:

    * FOLD_FIX folds every key: full Unicode case folding when the open carries
      UTF8_REQUEST and SMTPUTF8 is enabled, ASCII lower-casing otherwise. Folding
      happens before duplicate detection (``dup`` and ``DUP`` collide).
    * Duplicates: DUP_IGNORE or DUP_WARN keep the first value (DUP_WARN logs it),
      DUP_REPLACE keeps the last; with none of them the table cannot be opened and
      becomes an unavailable (surrogate) table, as Postfix does.
    * Under UTF-8 rules, lines that are not valid UTF-8 are skipped with a warning.

    Lookups fold the key per the request flags (ASCII; the UTF-8 layer does the rest).
    Sequence walks the entries in file order; "next" before "first" starts at the top.
    The table is read-only: any other open mode makes it unavailable.

SEE ALSO
    docs/TABLES.md sections 2.6 and 3.4.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, OpenContext, SyncTable
from proxymap.tables.textsyntax import logical_lines, split_postmap_line
from proxymap.tables.utf8 import fold_key, is_valid_utf8, utf8_wanted

log = logging.getLogger("proxymap")


def require_read_only(dict_type: str, name: str, open_mode: int) -> None:
    """Read-only table types refuse every other open mode (the table becomes unavailable)."""
    if open_mode & os.O_ACCMODE != os.O_RDONLY:
        raise DictOpenError(f"{dict_type}:{name} map requires O_RDONLY access mode")


class SequenceCursor:
    """A first/next walk over a snapshot of (key, value) pairs.

    "next" without a preceding "first" is answered as "first" (Postfix would read
    an undefined cursor; starting over is the useful answer).
    """

    def __init__(self) -> None:
        self._walk: Iterator[tuple[bytes, bytes]] | None = None

    def step(self, function: int, entries: dict[bytes, bytes]) -> tuple[bytes, bytes] | None:
        if function == 0 or self._walk is None:
            self._walk = iter(list(entries.items()))
        return next(self._walk, None)


class TexthashTable(SyncTable):
    dict_type = "texthash"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        require_read_only(self.dict_type, name, open_mode)
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        self._cursor = SequenceCursor()
        path = name.encode("utf-8", "surrogateescape")
        try:
            with open(path, "rb") as source:
                data = source.read()
        except OSError as exc:
            raise DictOpenError(f"open database {name}: {os.strerror(exc.errno or 0)}")
        self.entries = self._load(data, utf8_wanted(flags, ctx.utf8_enabled))

    def _load(self, data: bytes, utf8: bool) -> dict[bytes, bytes]:
        entries: dict[bytes, bytes] = {}
        fold = bool(self.flags & F.FOLD_FIX)
        for number, line in logical_lines(data, self.name):
            if utf8 and not is_valid_utf8(line):
                log.warning(
                    '%s, line %d: non-UTF-8 input "%s" -- ignoring this line',
                    self.name,
                    number,
                    line.decode("utf-8", "backslashreplace"),
                )
                continue
            pair = split_postmap_line(line)
            if pair is None:
                log.warning("%s, line %d: expected format: key whitespace value", self.name, number)
                continue
            key, value = pair
            if fold:
                key = fold_key(key, utf8)
            if key in entries:
                self._duplicate(entries, key, value, number)
            else:
                entries[key] = value
        return entries

    def _duplicate(
        self, entries: dict[bytes, bytes], key: bytes, value: bytes, number: int
    ) -> None:
        text = key.decode("utf-8", "backslashreplace")
        if self.flags & F.DUP_IGNORE:
            return
        if self.flags & F.DUP_REPLACE:
            entries[key] = value
        elif self.flags & F.DUP_WARN:
            log.warning('%s, line %d: duplicate entry: "%s"', self.name, number, text)
        else:
            raise DictOpenError(f'{self.name}, line {number}: duplicate entry: "{text}"')

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(self.fold(key))

    def sequence(self, function: int) -> tuple[bytes, bytes] | None:
        return self._cursor.step(function, self.entries)
