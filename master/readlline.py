"""Logical lines of Postfix configuration and table text (Postfix's ``readllines``).

NAME
    readlline -- join continuation lines, skip comments and blank lines

DESCRIPTION
    Shared by main.cf, master.cf and every text-based lookup table: a line whose first
    non-blank byte is ``#`` is a comment, blank lines are ignored, a line that starts with
    whitespace continues the previous logical line (newline dropped, its leading whitespace
    kept), and comments or blank lines between a line and its continuation do not end it.
    It lives in ``master/`` because the supervisor reads its own files with it;
    ``proxymap`` re-uses it (``master`` never imports ``proxymap``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

log = logging.getLogger("master")

_BLANKS = b" \t\r\n\v\f"


def logical_lines(data: bytes, origin: str = "") -> Iterator[tuple[int, bytes]]:
    """Yield (line number of the first physical line, logical line) pairs.

    A continuation line at the top of the input has nothing to continue: it is dropped
    with a warning naming ``origin``.
    """
    current: list[bytes] = []
    start = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        stripped = raw.lstrip(_BLANKS)
        if not stripped or stripped.startswith(b"#"):
            continue
        if raw[:1] in (b" ", b"\t", b"\r", b"\v", b"\f"):
            if current:
                current.append(raw)
            else:
                log.warning(
                    '%s, line %d: logical line must not start with whitespace: "%s"',
                    origin,
                    number,
                    raw.decode("utf-8", "replace"),
                )
            continue
        if current:
            yield start, b"".join(current)
        current = [raw]
        start = number
    if current:
        yield start, b"".join(current)
