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

    Where the lookups run: when every source nsswitch.conf(5) lists for the database is
    local (files, compat, db, systemd, altfiles) a lookup takes microseconds and runs
    inline, like any file table. With any other source (ldap, sss, nis, winbind, ...)
    getpwnam(3) may wait on the network, so the table is asynchronous: each lookup runs
    in an executor thread and the worker's other clients are served meanwhile (the C
    proxymap stops serving everyone until the name service answers).
"""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Callable

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, DictRetry, OpenContext, SyncTable, Table
from proxymap.tables.blocking import BlockingTable, configure
from proxymap.tables.texthash import require_read_only


def _passwd_entry(name: str) -> str:
    pw = pwd.getpwnam(name)
    return ":".join(
        (
            pw.pw_name,
            pw.pw_passwd,
            str(pw.pw_uid),
            str(pw.pw_gid),
            pw.pw_gecos,
            pw.pw_dir,
            pw.pw_shell,
        )
    )


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


NSSWITCH_CONF = "/etc/nsswitch.conf"

# Name-service sources that answer from local files or a local daemon without the
# network: lookups through them are fast enough to run inline.
LOCAL_SOURCES = frozenset({"files", "compat", "db", "systemd", "altfiles"})

_ACTION = re.compile(r"\[[^\]]*\]")  # "[NOTFOUND=return]" items between sources


def nss_sources(database: str, path: str | None = None) -> list[str]:
    """The sources nsswitch.conf lists for ``database`` (glibc's default: files)."""
    try:
        with open(path or NSSWITCH_CONF, encoding="utf-8", errors="replace") as conf:
            lines = conf.read().splitlines()
    except OSError:
        return ["files"]
    for line in lines:
        name, colon, rest = line.split("#", 1)[0].partition(":")
        if colon and name.strip() == database:
            return _ACTION.sub(" ", rest).split() or ["files"]
    return ["files"]


class UnixResolver:
    """The lookup itself, shared by the inline and the executor variant."""

    spec: str
    fold: Callable[..., bytes]

    def _setup(self, name: str) -> None:
        self._entry, self._root = _MAPS[name]

    def _lookup(self, key: bytes, flags: int) -> bytes | None:
        return self._resolve(self.fold(key, flags).decode("utf-8", "surrogateescape"))

    def _resolve(self, name: str) -> bytes | None:
        try:
            return self._entry(name).encode("utf-8", "surrogateescape")
        except (KeyError, ValueError):
            pass
        if self._root not in _SANE:
            try:
                self._root()
            except (KeyError, OSError):
                raise DictRetry(
                    f"{self.spec}: cannot look up id 0 either: the name service seems unavailable"
                )
            _SANE.add(self._root)
        return None


class UnixTable(UnixResolver, SyncTable):
    """Local name-service sources: answered inline."""

    dict_type = "unix"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        self._setup(name)

    def lookup(self, key: bytes) -> bytes | None:
        return self._lookup(key, self.flags)


class RemoteUnixTable(UnixResolver, BlockingTable):
    """A name service that may wait on the network: each lookup in an executor thread."""

    dict_type = "unix"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        self._setup(name)

    def blocking_lookup(self, key: bytes, flags: int) -> bytes | None:
        return self._lookup(key, flags)


def open_unix(name: str, open_mode: int, flags: int, ctx: OpenContext) -> Table:
    require_read_only("unix", name, open_mode)
    if name not in _MAPS:
        raise DictOpenError(f"unknown table: unix:{name}")
    database = name.split(".", 1)[0]  # passwd or group
    if set(nss_sources(database)) <= LOCAL_SOURCES:
        return UnixTable(name, open_mode, flags, ctx)
    configure(ctx.params)
    return RemoteUnixTable(name, open_mode, flags, ctx)
