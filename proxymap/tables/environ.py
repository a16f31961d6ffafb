"""environ: the environment of this worker process as a table (Postfix's dict_env).

NAME
    environ -- look up (and set) environment variables

DESCRIPTION
    ``environ:anything`` (the name is ignored) answers the value of the environment
    variable named by the key, in the environment of the process that holds the
    table -- through proxymap, the worker's environment (filtered by
    ``import_environment``). FOLD_FIX lower-cases the key first, so ordinary
    clients never find upper-case variable names. Update sets the variable in this
    process only. Fixed table.
"""

from __future__ import annotations

import os

from proxymap import flags as F
from proxymap.tables.base import OpenContext, SyncTable


class EnvironTable(SyncTable):
    dict_type = "environ"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)

    def lookup(self, key: bytes) -> bytes | None:
        return os.environb.get(self.fold(key))

    def update(self, key: bytes, value: bytes) -> int:
        key = self.fold(key)
        if not key or b"=" in key:  # setenv(3) would refuse it
            return 1
        os.environb[key] = value
        return 0
