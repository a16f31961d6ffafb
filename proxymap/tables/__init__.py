"""Table-type registry: ``type:name`` -> an open ``Table`` (Postfix's dict_open).

Each type lives in its own small module, imported only when first used, so a missing
optional binding (Berkeley DB, LMDB, PCRE2, a database driver) affects only its own
type: such a table becomes an unavailable (surrogate) table answering RETRY.

An entry names a table class, constructed as ``cls(name, open_mode, flags, ctx)``, or
an opening function with the same arguments for types whose class depends on what
they open (composites: synchronous or asynchronous as their members). Either raises
``DictOpenError`` when the table cannot be opened.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

from proxymap.tables.base import (
    DictOpenError,
    OpenContext,
    SurrogateTable,
    Table,
)

log = logging.getLogger("proxymap")

# type -> "module:Class". Modules are imported lazily.
TABLE_TYPES: dict[str, str] = {
    "texthash": "proxymap.tables.texthash:TexthashTable",
    "inline": "proxymap.tables.inline:InlineTable",
    "static": "proxymap.tables.static:StaticTable",
    "fail": "proxymap.tables.fail:FailTable",
    "environ": "proxymap.tables.environ:EnvironTable",
    "internal": "proxymap.tables.internal:InternalTable",
    "unix": "proxymap.tables.unix:open_unix",
    "hash": "proxymap.tables.bdb:HashTable",
    "btree": "proxymap.tables.bdb:BtreeTable",
    "lmdb": "proxymap.tables.lmdb:LmdbTable",
    "cdb": "proxymap.tables.cdb:CdbTable",
    "regexp": "proxymap.tables.regexp:RegexpTable",
    "pcre": "proxymap.tables.pcre:PcreTable",
    "cidr": "proxymap.tables.cidr:CidrTable",
    "pipemap": "proxymap.tables.pipemap:open_pipemap",
    "unionmap": "proxymap.tables.unionmap:open_unionmap",
    "randmap": "proxymap.tables.randmap:RandmapTable",
    "tcp": "proxymap.tables.tcp:TcpTable",
    "socketmap": "proxymap.tables.socketmap:SocketmapTable",
    "mysql": "proxymap.tables.mysql:MysqlTable",
    "pgsql": "proxymap.tables.pgsql:PgsqlTable",
    "sqlite": "proxymap.tables.sqlite:SqliteTable",
    "ldap": "proxymap.tables.ldap:LdapTable",
    "memcache": "proxymap.tables.memcache:MemcacheTable",
}


TableOpener = Callable[[str, int, int, OpenContext], Table]


def table_class(dict_type: str) -> TableOpener:
    """The class (or opening function) for a type; ``DictOpenError`` if unknown or its
    module cannot load."""
    target = TABLE_TYPES.get(dict_type)
    if target is None:
        raise DictOpenError(f"unsupported dictionary type: {dict_type}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DictOpenError(f"unsupported dictionary type: {dict_type}: {exc}") from exc
    return getattr(module, class_name)


def open_table(spec: str, open_mode: int, flags: int, ctx: OpenContext) -> Table:
    """Open ``type:name``; never raises: an unopenable table becomes a surrogate.

    A leading ``proxy:`` is stripped (repeatedly): inside the server a nested proxied
    table is opened directly.
    """
    while spec.startswith("proxy:"):
        spec = spec[len("proxy:") :]
    dict_type, sep, name = spec.partition(":")
    try:
        if not sep:
            raise DictOpenError(f'need dictionary_type:dictionary_name format instead of "{spec}"')
        cls = table_class(dict_type)
        return cls(name, open_mode, flags, ctx)
    except DictOpenError as exc:
        log.error("%s", exc)
        return SurrogateTable(dict_type, name, open_mode, flags, str(exc))
    except OSError as exc:  # a driver that forgot to translate: still never fatal
        reason = f"open {name}: {os.strerror(exc.errno) if exc.errno else exc}"
        log.error("%s", reason)
        return SurrogateTable(dict_type, name, open_mode, flags, reason)
