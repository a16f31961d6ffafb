"""unix: the system password and group databases (Postfix's dict_unix).

NAME
    unix -- ``unix:passwd.byname`` and ``unix:group.byname``

DESCRIPTION
    ``passwd.byname`` answers ``name:passwd:uid:gid:gecos:dir:shell`` for a user
    name, ``group.byname`` answers ``name:passwd:gid:member,member`` for a group
    name (members joined by commas; no members leaves the trailing colon). Any
    other table name is unavailable. FOLD_FIX lower-cases the key (ASCII).

    An unknown name is "not found". Because a broken name service also looks like
    "unknown", the first miss in a process checks that uid/gid 0 resolves; if even
    that fails, the lookup is a temporary failure instead. Read-only, fixed table.

BUGS
    getpwnam(3) may block on a remote name service; it runs on the event loop
    thread like the C implementation runs in its single thread.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Callable

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, DictRetry, OpenContext, Table
from proxymap.tables.texthash import require_read_only


def _passwd_entry(name: str) -> str:
    pw = pwd.getpwnam(name)
    return ":".join((pw.pw_name, pw.pw_passwd, str(pw.pw_uid), str(pw.pw_gid),
                     pw.pw_gecos, pw.pw_dir, pw.pw_shell))


def _group_entry(name: str) -> str:
    gr = grp.getgrnam(name)
    return f"{gr.gr_name}:{gr.gr_passwd}:{gr.gr_gid}:{','.join(gr.gr_mem)}"


def _root_passwd() -> object:
    return pwd.getpwuid(0)


def _root_group() -> object:
    return grp.getgrgid(0)


# Databases whose id 0 resolved once in this process: a miss there is a real miss.
_SANE: set[Callable[[], object]] = set()

_MAPS: dict[str, tuple[Callable[[str], str], Callable[[], object]]] = {
    "passwd.byname": (_passwd_entry, _root_passwd),
    "group.byname": (_group_entry, _root_group),
}


class UnixTable(Table):
    dict_type = "unix"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        require_read_only(self.dict_type, name, open_mode)
        if name not in _MAPS:
            raise DictOpenError(f"unknown table: unix:{name}")
        super().__init__(name, open_mode, flags | F.FIXED)
        self._entry, self._root = _MAPS[name]

    def lookup(self, key: bytes) -> bytes | None:
        name = self.fold(key).decode("utf-8", "surrogateescape")
        try:
            return self._entry(name).encode("utf-8", "surrogateescape")
        except (KeyError, ValueError):
            pass
        if self._root not in _SANE:
            try:
                self._root()
            except (KeyError, OSError):
                raise DictRetry(f"unix:{self.name}: cannot look up id 0 either: "
                                "the name service seems unavailable")
            _SANE.add(self._root)
        return None
