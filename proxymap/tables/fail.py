"""fail: a table whose every operation is a temporary failure (Postfix's dict_fail).

NAME
    fail -- always-failing table

DESCRIPTION
    ``fail:name`` opens in any mode as a pattern table; lookup, update, delete and
    sequence all fail with a temporary error (proxymap status RETRY). The name only
    appears in messages. Useful to make a lookup path defer on purpose.
"""

from __future__ import annotations

from proxymap import flags as F
from proxymap.tables.base import DictRetry, FailingTable, OpenContext


class FailTable(FailingTable):
    dict_type = "fail"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags | F.PATTERN, ctx)

    def _fail(self) -> DictRetry:
        return DictRetry(f"{self.spec}: table lookup failed on purpose")
