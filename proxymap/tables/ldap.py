"""ldap_table(5) client: ``ldap:/etc/postfix/ldap-aliases.cf`` (or a main.cf prefix).

NAME
    ldap -- LDAP directory lookups, many searches at once on few connections

SYNOPSIS
    ldap:/etc/postfix/ldap-aliases.cf        # a file of name = value lines
    ldap:ldapsource                          # main.cf: ldapsource_server_host = ...

DESCRIPTION
    Every parameter of ldap_table(5) (Postfix 3.7) is read with Postfix's types,
    defaults and checks: ``server_host`` (hosts, ``host:port`` or LDAP URLs, also
    ``ldapi://`` and ``ldaps://``; blanks or commas between them), ``server_port``
    (389), ``timeout`` (10), ``search_base`` (empty; ``%`` expansions quoted per
    RFC 2253), ``query_filter`` (``(mailacceptinggeneralid=%s)``; expansions quoted
    per RFC 2254: ``*``, ``(``, ``)`` and ``\\`` become ``\\2A``, ``\\28``, ``\\29``,
    ``\\5C``), ``result_format`` (empty means unset; then ``result_filter``, default
    ``%s``), ``domain``, ``result_attribute`` (``maildrop``),
    ``special_result_attribute``, ``terminal_result_attribute``,
    ``leaf_result_attribute``, ``scope`` (sub, base, one), ``bind`` (yes/simple,
    no/none, sasl), ``bind_dn``, ``bind_pw``, ``recursion_limit`` (1000),
    ``expansion_limit`` (0), ``size_limit`` (= expansion_limit), ``dereference``
    (0-3), ``chase_referrals``, ``version`` (3, as Debian's Postfix; upstream says 2,
    which slapd 2.5 refuses to bind with), ``debuglevel``, ``sasl_mechs``,
    ``sasl_realm``, ``sasl_authz_id``, ``sasl_minssf``, ``start_tls``,
    ``tls_ca_cert_file``, ``tls_ca_cert_dir``, ``tls_cert``, ``tls_key``,
    ``tls_require_cert``, ``tls_random_file``, ``tls_cipher_suite``. ``cache``,
    ``cache_expiry`` and ``cache_size`` are read and ignored with a warning.

    A lookup: a key that is not UTF-8 is not found (unless the UTF-8 layer already
    checked it); the key is lower-cased (ASCII) with FOLD_FIX; a key outside
    ``domain`` is not found. A connection is then taken (none to be had: RETRY,
    even for a key the templates would skip, as in Postfix), the search base and
    filter are expanded (a key lacking a part they use: not found) and the search
    runs. Results: for each entry in server order, for each attribute present (in
    server order) that is one of the result attributes (or a subtype, ``attr;opt``),
    every value (up to a NUL byte) goes through ``result_format``; the answer joins
    them with ``,``. An entry with a value of a terminal attribute is *terminal*:
    only its terminal attributes count and nothing is followed. Leaf attributes count
    only for entries without special-attribute values. Values of special attributes
    are followed, depth first, in place: an LDAP URL is searched with its base, scope
    and filter and the URL's attributes that are also result attributes (none in
    common: skipped); anything else is a DN, read with a base search
    ``objectclass=*``. A referenced entry that does not exist is skipped with a
    warning.

    Like Postfix, whether an entry is terminal (and whether it is a leaf) carries over
    to the next entry of the same result when that entry has none of the terminal
    (special) attributes at all: after a terminal entry, such an entry contributes
    nothing. This is Postfix 3.7's behaviour, kept on purpose.

    Errors (all RETRY, never "not found"): no connection, a search error, no answer
    within ``timeout`` seconds (the search is abandoned), more entries than
    ``size_limit`` in one search, a reference chain deeper than ``recursion_limit``,
    more values than ``expansion_limit``, a malformed URL value. "No such object"
    for the search base is "not found" when the base has ``%`` expansions (it names
    the key) and RETRY for a fixed base.

    Concurrency: libldap (OpenLDAP's, through python-ldap: the library Postfix uses,
    so URLs, ``ldapi``, TLS and SASL behave alike) is asked for each search with
    ``search_ext`` and answers are read on the worker's event loop when the socket is
    readable, without waiting: one connection carries up to 64 lookups at once, and
    a table opens at most ``pyproxymap_ldap_connections`` (main.cf, default 2)
    connections per worker (``pool.ConnectionPool``; the ``server_host`` URLs are its
    endpoints, tried in the order listed). Connecting, STARTTLS and binding block and
    run in the blocking-driver executor. Open connections stay open and are read
    even while idle, so a server that closes one is noticed at once. A connection
    that fails in use is dropped and the lookup is tried once more on a new
    connection; one that times out takes no new lookups and is closed once its last
    search ends. A server that was down is tried again at most 2 s after it failed.
    Lookups that find every connection full wait in line, at most ``timeout``.

BUGS
    Postfix shares one connection among all LDAP tables with the same connection
    settings; here each table has its own few connections. A bind that fails on one
    server moves on to the next URL (Postfix's library fails over only when a
    connect fails). A lookup that loses its connection halfway, also while following
    references, is run again from the start once; Postfix retries only the first
    search. ``timeout`` bounds each connect, bind and search, as in Postfix, not the
    lookup as a whole. Postfix closes its connection after any search error; here
    only a lost or timed-out connection is replaced.

    With ``bind = no`` the connection is opened by a base search of the root DSE
    that is abandoned at once (Postfix connects on its first search).
    ``debuglevel`` output goes to the worker's standard error, not to syslog.
    Referrals followed with ``chase_referrals = yes`` are read on the worker's
    event loop at least every 0.1 s; libldap opens their connections asynchronously,
    but reads on them may wait for a message that arrives in pieces.

SECURITY
    ``bind_pw`` is a secret: keep the file mode 640, owner root, group postfix.

SEE ALSO
    ldap_table(5); docs/TABLES.md section 4.6; db_common, cfg_parser, pool.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fcntl
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ldap
import ldap.sasl

from proxymap import flags as F
from proxymap.tables.base import AsyncTable, DictOpenError, DictRetry, OpenContext
from proxymap.tables.blocking import run_blocking
from proxymap.tables.cfg_parser import CfgParser
from proxymap.tables.db_common import DomainFilter, QueryContext, ResultJoiner, Template
from proxymap.tables.pool import (
    ConnectionPool,
    Lease,
    OutageLog,
    connection_limit,
)
from proxymap.tables.utf8 import is_valid_utf8

log = logging.getLogger("proxymap")

LDAP_PORT = 389
# Debian builds Postfix with 3 as the default (upstream: 2) and as the fallback for
# an unknown version; the installed Postfix is the reference here.
DEFAULT_VERSION = 3
DEFAULT_FILTER = "(mailacceptinggeneralid=%s)"
DEFAULT_CONNECTIONS = 2
LOOKUPS_PER_CONNECTION = 64
DRAIN_BATCH = 256  # messages read per wake-up before yielding to other clients
TICK = 0.1  # while searches are out: also read (pending writes, referral connections)

BIND_NONE, BIND_SIMPLE, BIND_SASL = 0, 1, 2
_BIND_NAMES = {
    "no": BIND_NONE,
    "none": BIND_NONE,
    "yes": BIND_SIMPLE,
    "simple": BIND_SIMPLE,
    "sasl": BIND_SASL,
}
_SCOPES = {"one": ldap.SCOPE_ONELEVEL, "base": ldap.SCOPE_BASE, "sub": ldap.SCOPE_SUBTREE}
_LIST_SEPARATORS = ", \t\r\n"
_DN_FILTER = "objectclass=*"  # what Postfix reads a referenced DN with
_ALL_OBJECTS = "(objectclass=*)"  # libldap's filter when a URL has none
_RFC2253_SPECIALS = frozenset(b' \t"#+,;<>\\')
_RFC2254_SPECIALS = frozenset(b"*()\\")


# ---------------------------------------------------------------------------------------
# Quoting of key parts in the search base (RFC 2253) and the filter (RFC 2254)
# ---------------------------------------------------------------------------------------


def _hex_table(specials: frozenset[int]) -> list[bytes]:
    return [b"\\%02X" % b if b in specials else bytes([b]) for b in range(256)]


_DN_QUOTED = _hex_table(_RFC2253_SPECIALS)
_FILTER_QUOTED = _hex_table(_RFC2254_SPECIALS)


def quote_dn_value(piece: bytes) -> bytes:
    """RFC 2253 quoting as Postfix does it: blanks, ``#`` and specials anywhere."""
    return b"".join([_DN_QUOTED[b] for b in piece])


def quote_filter_value(piece: bytes) -> bytes:
    """RFC 2254 quoting of ``*()\\`` (a key never holds a NUL byte)."""
    return b"".join([_FILTER_QUOTED[b] for b in piece])


def split_list(text: str) -> list[str]:
    """Postfix's split on blanks and commas (empty words dropped)."""
    words: list[str] = []
    word: list[str] = []
    for char in text:
        if char in _LIST_SEPARATORS:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    return words


def attrdesc_subtype(a1: str, a2: str) -> int:
    """1: ``a2`` is ``a1`` or a subtype of it (``a1;option``); -1: ``a1`` is a subtype
    of ``a2``; 0: unrelated. ASCII case-insensitive, as attribute names are."""
    b1 = a1.encode("utf-8", "surrogateescape").lower()
    b2 = a2.encode("utf-8", "surrogateescape").lower()
    n = 0
    while n < len(b1) and n < len(b2) and b1[n] == b2[n]:
        n += 1
    if n == len(b1):
        return 1 if n == len(b2) or b2[n] == ord(";") else 0
    if n == len(b2) and b1[n] == ord(";"):
        return -1
    return 0


def c_string(value: bytes) -> bytes:
    """A value as Postfix sees it: a C string, cut at the first NUL byte."""
    nul = value.find(b"\0")
    return value if nul < 0 else value[:nul]


# ---------------------------------------------------------------------------------------
# LDAP URLs, parsed by libldap itself (the parser Postfix uses)
# ---------------------------------------------------------------------------------------


class _UrlDesc(ctypes.Structure):
    pass


_UrlDesc._fields_ = [
    ("lud_next", ctypes.POINTER(_UrlDesc)),
    ("lud_scheme", ctypes.c_char_p),
    ("lud_host", ctypes.c_char_p),
    ("lud_port", ctypes.c_int),
    ("lud_dn", ctypes.c_char_p),
    ("lud_attrs", ctypes.POINTER(ctypes.c_char_p)),
    ("lud_scope", ctypes.c_int),
    ("lud_filter", ctypes.c_char_p),
    ("lud_exts", ctypes.POINTER(ctypes.c_char_p)),
    ("lud_crit_exts", ctypes.c_int),
]


@dataclass(frozen=True, slots=True)
class LdapUrl:
    """The parts of an LDAP URL that a search uses (``None``: not in the URL)."""

    scheme: str
    dn: str | None
    attrs: tuple[str, ...]
    scope: int
    filter: str | None


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "surrogateescape")


class _LibLdap:
    """``ldap_is_ldap_url`` and ``ldap_url_parse`` from the libldap python-ldap uses."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(_libldap_path())
        lib.ldap_is_ldap_url.argtypes = [ctypes.c_char_p]
        lib.ldap_is_ldap_url.restype = ctypes.c_int
        lib.ldap_url_parse.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.POINTER(_UrlDesc))]
        lib.ldap_url_parse.restype = ctypes.c_int
        lib.ldap_free_urldesc.argtypes = [ctypes.POINTER(_UrlDesc)]
        lib.ldap_free_urldesc.restype = None
        self.lib = lib

    def is_url(self, text: bytes) -> bool:
        return bool(self.lib.ldap_is_ldap_url(c_string(text)))

    def parse_url(self, text: bytes) -> LdapUrl | int:
        """The URL's parts, or libldap's error code."""
        desc = ctypes.POINTER(_UrlDesc)()
        rc = self.lib.ldap_url_parse(c_string(text), ctypes.byref(desc))
        if rc != 0:
            return rc
        try:
            url = desc.contents
            attrs: list[str] = []
            if url.lud_attrs:
                index = 0
                while (attr := url.lud_attrs[index]) is not None:
                    attrs.append(_text(attr) or "")
                    index += 1
            return LdapUrl(
                _text(url.lud_scheme) or "",
                _text(url.lud_dn),
                tuple(attrs),
                url.lud_scope,
                _text(url.lud_filter),
            )
        finally:
            self.lib.ldap_free_urldesc(desc)


def _libldap_path() -> str:
    """The libldap already loaded by python-ldap (so both agree), else the system's."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and "/libldap" in "/" + path:
                    return "/" + path
    except OSError:
        pass
    found = ctypes.util.find_library("ldap")
    if found is None:
        raise DictOpenError("libldap not found")
    return found


_libldap: _LibLdap | None = None


def libldap() -> _LibLdap:
    global _libldap
    if _libldap is None:
        _libldap = _LibLdap()
    return _libldap


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class LdapSettings:
    """A table's ldap_table(5) parameters, as Postfix reads and checks them."""

    urls: list[str]
    version: int
    ldap_ssl: bool
    scope: int
    timeout: int
    search_base: Template
    query: Template
    result_format: Template
    terminal: list[str]
    leaf: list[str]
    regular: list[str]
    special: list[str]
    bind: int
    bind_dn: str
    bind_pw: str
    recursion_limit: int
    expansion_limit: int
    size_limit: int
    dereference: int
    chase_referrals: bool
    debuglevel: int
    sasl_mechs: str = ""
    sasl_realm: str = ""
    sasl_authz_id: str = ""
    sasl_minssf: int = 0
    start_tls: bool = False
    tls_require_cert: bool = False
    tls_files: dict[str, str] = field(default_factory=dict)

    @property
    def attributes(self) -> list[str]:
        """Every attribute asked for: terminal, leaf, regular, then special."""
        return self.terminal + self.leaf + self.regular + self.special

    @property
    def tls(self) -> bool:
        return self.start_tls or self.ldap_ssl


def _server_urls(cfg: CfgParser, port: int, version: int) -> tuple[list[str], int, bool]:
    """``server_host`` as LDAP URLs; the version (non-``ldap`` schemes need 3); ldaps?"""
    urls: list[str] = []
    ldap_ssl = False
    for host in split_list(cfg.get_str("server_host", "localhost", 1)):
        raw = host.encode("utf-8", "surrogateescape")
        if not libldap().is_url(raw):
            urls.append(f"ldap://{host}" if ":" in host else f"ldap://{host}:{port}")
            continue
        parsed = libldap().parse_url(raw)
        if isinstance(parsed, int):
            log.error(
                "dict_ldap_open: error parsing URL %s: %d: %s; skipping",
                host,
                parsed,
                _url_error(parsed),
            )
            continue
        scheme = parsed.scheme.lower()
        if scheme != "ldap" and version != 3:
            log.warning("dict_ldap_open: URL scheme %s requires protocol version 3", parsed.scheme)
            version = 3
        ldap_ssl = ldap_ssl or scheme == "ldaps"
        urls.append(host)
    # No usable host at all: libldap's default server (ldap.conf, else localhost).
    return urls or [""], version, ldap_ssl


def _url_error(code: int) -> str:
    names = {
        1: "can't allocate memory space",
        2: "parameter is bad",
        3: 'URL doesn\'t begin with "ldap[si]://"',
        4: 'URL is missing trailing ">"',
        5: "URL is bad",
        6: "URL scheme is bad",
        7: "bad or missing port",
        8: "bad or missing scope",
        9: "bad or missing DN",
    }
    return names.get(code, "unknown URL error")


def _version(cfg: CfgParser) -> int:
    version = cfg.get_int("version", DEFAULT_VERSION, 2)
    if version not in (2, 3):
        log.warning(
            "dict_ldap_open: %s Unknown version %d, using %d.", cfg.name, version, DEFAULT_VERSION
        )
        version = DEFAULT_VERSION
    return version


def _scope(cfg: CfgParser) -> int:
    text = cfg.get_str("scope", "sub", 1)
    scope = _SCOPES.get(text.lower()) if text.isascii() else None
    if scope is None:
        log.warning(
            "dict_ldap_open: %s: Unrecognized value %s specified for scope; using sub",
            cfg.name,
            text,
        )
        scope = ldap.SCOPE_SUBTREE
    return scope


def _bind(cfg: CfgParser) -> int:
    text = cfg.get_str("bind", "yes", 1)
    bind = _BIND_NAMES.get(text.lower()) if text.isascii() else None
    if bind is None or (bind == BIND_SASL and not ldap.SASL_AVAIL):
        raise DictOpenError(f"{cfg.name}: unsupported parameter value: bind = {text}")
    return bind


def _templates(cfg: CfgParser) -> tuple[Template, Template, Template]:
    base = Template.parse(cfg.get_str("search_base", ""), "search_base", table=cfg.name)
    query = Template.parse(
        cfg.get_str("query_filter", DEFAULT_FILTER), "query_filter", table=cfg.name
    )
    if not query.dynamic:
        log.warning(
            "dict_ldap_open: %s: Fixed query_filter %s is probably useless",
            cfg.name,
            query.text.decode("utf-8", "backslashreplace"),
        )
    # An empty result_format counts as unset, as in Postfix (its default is NULL).
    result_text = cfg.get_optional("result_format") or cfg.get_str("result_filter", "%s", 1)
    return base, query, Template.parse(result_text, "result_format", table=cfg.name)


def _ignored_cache_settings(cfg: CfgParser) -> None:
    if cfg.get_bool("cache", False):
        log.warning("dict_ldap_open: %s ignoring cache", cfg.name)
    for name in ("cache_expiry", "cache_size"):
        if cfg.get_int(name, -1) >= 0:
            log.warning("dict_ldap_open: %s ignoring %s", cfg.name, name)


def _dereference(cfg: CfgParser) -> int:
    value = cfg.get_int("dereference", 0)
    if not 0 <= value <= 3:
        log.warning(
            "dict_ldap_open: %s Unrecognized value %d specified for dereference; using 0",
            cfg.name,
            value,
        )
        value = 0
    return value


_TLS_FILES = (
    "tls_ca_cert_file",
    "tls_ca_cert_dir",
    "tls_cert",
    "tls_key",
    "tls_random_file",
    "tls_cipher_suite",
)


def read_settings(cfg: CfgParser) -> LdapSettings:
    """All parameters, in Postfix's order (its first complaint is ours)."""
    port = cfg.get_int("server_port", LDAP_PORT)
    urls, version, ldap_ssl = _server_urls(cfg, port, _version(cfg))
    scope = _scope(cfg)
    timeout = cfg.get_int("timeout", 10)
    search_base, query, result_format = _templates(cfg)
    terminal, leaf, regular, special = (
        split_list(cfg.get_str(name, default))
        for name, default in (
            ("terminal_result_attribute", ""),
            ("leaf_result_attribute", ""),
            ("result_attribute", "maildrop"),
            ("special_result_attribute", ""),
        )
    )
    bind = _bind(cfg)
    bind_dn, bind_pw = cfg.get_str("bind_dn", ""), cfg.get_str("bind_pw", "")
    _ignored_cache_settings(cfg)
    recursion_limit = cfg.get_int("recursion_limit", 1000, 1)
    expansion_limit = cfg.get_int("expansion_limit", 0)
    settings = LdapSettings(
        urls,
        version,
        ldap_ssl,
        scope,
        timeout,
        search_base,
        query,
        result_format,
        terminal,
        leaf,
        regular,
        special,
        bind,
        bind_dn,
        bind_pw,
        recursion_limit,
        expansion_limit,
        cfg.get_int("size_limit", expansion_limit),
        _dereference(cfg),
        cfg.get_bool("chase_referrals", False),
        0,
    )
    if bind == BIND_SASL:
        settings.sasl_mechs = cfg.get_str("sasl_mechs", "")
        settings.sasl_realm = cfg.get_str("sasl_realm", "")
        settings.sasl_authz_id = cfg.get_str("sasl_authz_id", "")
        settings.sasl_minssf = cfg.get_int("sasl_minssf", 0, 0, 4096)
    settings.start_tls = cfg.get_bool("start_tls", False)
    if settings.start_tls and settings.version < 3:
        log.warning("dict_ldap_open: %s start_tls requires protocol version 3", cfg.name)
        settings.version = 3
    settings.tls_require_cert = cfg.get_bool("tls_require_cert", False)
    settings.tls_files = {name: cfg.get_str(name, "") for name in _TLS_FILES}
    settings.debuglevel = cfg.get_int("debuglevel", 0)
    return settings


# ---------------------------------------------------------------------------------------
# Connections (blocking part: in the executor)
# ---------------------------------------------------------------------------------------

_TLS_OPTIONS = {
    "tls_random_file": ldap.OPT_X_TLS_RANDOM_FILE,
    "tls_ca_cert_file": ldap.OPT_X_TLS_CACERTFILE,
    "tls_ca_cert_dir": ldap.OPT_X_TLS_CACERTDIR,
    "tls_cert": ldap.OPT_X_TLS_CERTFILE,
    "tls_key": ldap.OPT_X_TLS_KEYFILE,
    "tls_cipher_suite": ldap.OPT_X_TLS_CIPHER_SUITE,
}


@dataclass(eq=False)
class Link:
    """An open, bound LDAP connection: the pool's connection object."""

    conn: Any  # ldap.ldapobject.LDAPObject
    fd: int
    url: str

    def close(self) -> None:
        try:
            self.conn.unbind_ext()
        except Exception:  # noqa: BLE001 - a lost connection may fail to say goodbye
            pass


class Connector:
    """Opens a ``Link`` to one URL with a table's settings (blocking: executor only)."""

    def __init__(self, settings: LdapSettings, spec: str) -> None:
        self.settings = settings
        self.spec = spec

    def open(self, url: str) -> Link:
        s = self.settings
        if s.debuglevel > 0:
            ldap.set_option(ldap.OPT_DEBUG_LEVEL, s.debuglevel)
        conn = ldap.initialize(url)
        try:
            self._set_options(conn)
            if s.start_tls:
                conn.start_tls_s()
            self._bind(conn, url)
            fd = conn.fileno()
            # Reads on the event loop must never wait for the rest of a message.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            # Connections libldap opens later (referrals) must not block either.
            conn.set_option(ldap.OPT_CONNECT_ASYNC, ldap.OPT_ON)
        except BaseException:
            Link(conn, -1, url).close()
            raise
        return Link(conn, fd, url)

    def _set_options(self, conn: Any) -> None:
        s = self.settings
        if s.timeout > 0:
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, s.timeout)
            conn.set_option(ldap.OPT_TIMEOUT, s.timeout)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, s.version)
        if s.size_limit:
            conn.set_option(ldap.OPT_SIZELIMIT, s.size_limit)
        conn.set_option(ldap.OPT_DEREF, s.dereference)
        conn.set_option(ldap.OPT_REFERRALS, ldap.OPT_ON if s.chase_referrals else ldap.OPT_OFF)
        if s.tls:
            for name, option in _TLS_OPTIONS.items():
                if s.tls_files[name]:
                    conn.set_option(option, s.tls_files[name])
            conn.set_option(
                ldap.OPT_X_TLS_REQUIRE_CERT,
                ldap.OPT_X_TLS_DEMAND if s.tls_require_cert else ldap.OPT_X_TLS_NEVER,
            )
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)

    def _bind(self, conn: Any, url: str) -> None:
        s = self.settings
        try:
            if s.bind == BIND_SIMPLE:
                msgid = conn.simple_bind(s.bind_dn, s.bind_pw)
                conn.result3(msgid, 1, s.timeout if s.timeout > 0 else -1)
            elif s.bind == BIND_SASL:
                conn.set_option(ldap.OPT_X_SASL_SECPROPS, f"minssf={s.sasl_minssf}")
                auth = ldap.sasl.sasl(
                    {
                        ldap.sasl.CB_AUTHNAME: s.bind_dn,
                        ldap.sasl.CB_PASS: s.bind_pw,
                        ldap.sasl.CB_GETREALM: s.sasl_realm,
                        ldap.sasl.CB_USER: s.sasl_authz_id,
                    },
                    s.sasl_mechs,
                )
                conn.sasl_interactive_bind_s("", auth)
            else:
                # No bind: make libldap connect now, not on the event loop later.
                conn.abandon_ext(conn.search_ext("", ldap.SCOPE_BASE, _ALL_OBJECTS, ["1.1"]))
        except ldap.LDAPError as exc:
            dn = s.bind_dn or "empty or implicit"
            raise ConnectionError(
                f"unable to bind to server {url} with dn {dn}: {_describe(exc)}"
            ) from None


def _info(exc: BaseException) -> dict[str, Any]:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], dict) else {}


def _describe(exc: BaseException) -> str:
    info = _info(exc)
    text = info.get("desc") or str(exc) or exc.__class__.__name__
    extra = info.get("info")
    code = info.get("result")
    head = f"{code} ({text})" if code is not None else str(text)
    return f"{head}: {extra}" if extra else head


# ---------------------------------------------------------------------------------------
# Many searches on one connection (event-loop part)
# ---------------------------------------------------------------------------------------

Entry = tuple[str, dict[str, list[bytes]]]


class ConnectionLost(Exception):
    """The connection failed under the search; the lookup may be tried once more."""


class SearchTimeout(Exception):
    """No answer within the timeout; the search was abandoned."""


class SearchFailed(Exception):
    """The server (or libldap) answered the search with an error code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[list[Entry]]
    entries: list[Entry] = field(default_factory=list)


def _expire(pending: _Pending, timeout: int) -> None:
    if not pending.future.done():
        pending.future.set_exception(SearchTimeout(f"no answer within {timeout}s"))


_CONNECTION_ERRORS = (ldap.SERVER_DOWN, ldap.CONNECT_ERROR)
OPEN, RETIRED, CLOSED = "open", "retired", "closed"


class Channel:
    """One leased connection carrying many searches, read on the event loop."""

    def __init__(self, owner: Channels, lease: Lease[Link, str]) -> None:
        self.owner = owner
        self.lease = lease
        self.link = lease.connection
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, _Pending] = {}
        self.users = 0
        self.state = OPEN
        self._tick: asyncio.TimerHandle | None = None
        self.loop.add_reader(self.link.fd, self._drain)

    @property
    def usable(self) -> bool:
        return self.state == OPEN and self.users < self.owner.per_connection

    async def search(
        self, base: str, scope: int, filterstr: str, attrs: list[str], sizelimit: int, timeout: int
    ) -> list[Entry]:
        """The entries found; SearchFailed, SearchTimeout or ConnectionLost."""
        if self.state == CLOSED:
            raise ConnectionLost(f"connection to {self.link.url} already lost")
        limit = timeout if timeout >= 0 else -1  # 0 is refused by libldap, as in Postfix
        try:
            msgid = self.link.conn.search_ext(
                base, scope, filterstr, attrs, 0, None, None, limit, sizelimit
            )
        except _CONNECTION_ERRORS as exc:
            self.lose(exc)
            raise ConnectionLost(_describe(exc)) from None
        except ldap.LDAPError as exc:
            raise SearchFailed(_info(exc).get("result", -1), _describe(exc)) from None
        pending = self.pending[msgid] = _Pending(self.loop.create_future())
        # The pool's sweeper: no timer per search (uvloop's cost ~3 us each).
        sweeper = self.owner.pool.sweeper
        if timeout > 0:
            sweeper.watch(
                pending.future, self.loop.time() + timeout, lambda: _expire(pending, timeout)
            )
        self._start_ticking()
        try:
            return await pending.future
        except SearchTimeout:
            self._abandon(msgid)
            self.retire()
            raise
        except asyncio.CancelledError:
            self._abandon(msgid)
            raise
        finally:
            if timeout > 0:
                sweeper.unwatch(pending.future)
            self.pending.pop(msgid, None)

    # --- reading ------------------------------------------------------------------------
    def _drain(self) -> None:
        """Read every message libldap has ready, without waiting for more."""
        for _ in range(DRAIN_BATCH):
            if self.state == CLOSED:
                return
            try:
                kind, data, msgid, _ = self.link.conn.result3(ldap.RES_ANY, 0, 0)
            except ldap.LDAPError as exc:
                if not self._failed(exc):
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - a reply python-ldap cannot decode
                self.lose(exc)
                return
            if kind is None:
                return
            pending = self.pending.get(msgid)
            if pending is None or pending.future.done():
                continue  # abandoned after its timeout, or unsolicited
            if kind == ldap.RES_SEARCH_ENTRY:
                pending.entries.extend(data)
            elif kind == ldap.RES_SEARCH_RESULT:
                pending.future.set_result(pending.entries)
        # More may be waiting inside libldap (TLS buffers): continue after the others.
        self.loop.call_soon(self._drain)

    def _failed(self, exc: ldap.LDAPError) -> bool:
        """An error result for one search (True: keep reading) or a dead connection."""
        msgid = _info(exc).get("msgid")
        pending = self.pending.get(msgid) if msgid else None
        if pending is None:
            if msgid and not isinstance(exc, _CONNECTION_ERRORS):
                return True  # an error for a search we abandoned
            self.lose(exc)
            return False
        if not pending.future.done():
            pending.future.set_exception(SearchFailed(_info(exc).get("result", -1), _describe(exc)))
        return True

    def _start_ticking(self) -> None:
        if self._tick is None and self.state != CLOSED:
            self._tick = self.loop.call_later(TICK, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        if self.pending and self.state != CLOSED:
            self._drain()
            self._start_ticking()

    def _abandon(self, msgid: int) -> None:
        if self.state != CLOSED:
            try:
                self.link.conn.abandon_ext(msgid)
            except ldap.LDAPError:
                pass

    # --- life cycle ---------------------------------------------------------------------
    def retire(self) -> None:
        """Take no new lookups (it timed out); closed when its last lookup leaves."""
        if self.state == OPEN:
            self.state = RETIRED
            self.owner.pool.suspect(self.lease)

    def lose(self, exc: BaseException) -> None:
        """The connection is dead: fail its searches, close it, drop its siblings."""
        if self.state == CLOSED:
            return
        error = ConnectionLost(f"connection to {self.link.url} lost: {_describe(exc)}")
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self.owner.pool.suspect(self.lease)
        self.close(reusable=False)

    def close(self, reusable: bool) -> None:
        """Stop reading; give the connection back to the pool (``reusable``) or close it."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self.loop.remove_reader(self.link.fd)
        self.owner.forget(self, reusable)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Use:
    """``Channels.use``: a class, cheaper than a generator-based context manager."""

    __slots__ = ("channels", "timeout", "channel")

    def __init__(self, channels: Channels, timeout: float | None) -> None:
        self.channels = channels
        self.timeout = timeout
        self.channel: Channel | None = None

    async def __aenter__(self) -> Channel:
        self.channel = await self.channels._take(self.timeout)
        return self.channel

    async def __aexit__(self, *exc_info: object) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            self.channels.done_with(channel)


class Channels:
    """A table's connections: lookups share them, up to ``per_connection`` each.

    A connection stays open while it works (an idle one is still read, so a server
    that closes it is noticed at once); one that timed out is closed when its last
    lookup leaves, one that failed at once. Lookups that find every connection full
    and no room for another wait in line, woken one per freed place.
    """

    def __init__(
        self, pool: ConnectionPool[Link, str], per_connection: int = LOOKUPS_PER_CONNECTION
    ) -> None:
        self.pool = pool
        self.per_connection = per_connection
        self.active: list[Channel] = []
        self.connecting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()

    def use(self, timeout: float | None) -> _Use:
        """``async with``: a connection for one lookup (PoolUnavailable when none can
        be had)."""
        return _Use(self, timeout)

    def done_with(self, channel: Channel) -> None:
        channel.users -= 1
        if channel.users == 0 and channel.state == RETIRED:
            channel.close(reusable=False)
        self._wake(1)

    def _least_used(self) -> Channel | None:
        best = None
        for channel in self.active:
            if channel.usable and (best is None or channel.users < best.users):
                best = channel
        return best

    async def _take(self, timeout: float | None) -> Channel:
        loop = self._bind()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            channel = self._least_used()
            if channel is not None:
                channel.users += 1
                return channel
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            if not self.connecting and len(self.active) < self.pool.size:
                return await self._open(remaining)
            await self._wait(remaining)

    async def _open(self, timeout: float | None) -> Channel:
        self.connecting = True
        try:
            lease = await self.pool.acquire(timeout)
        except BaseException:
            self.connecting = False
            self._wake(1)  # the next in line tries (and fails fast if all are down)
            raise
        self.connecting = False
        try:
            channel = Channel(self, lease)
        except BaseException:
            self.pool.release(lease, reusable=False)
            self._wake(1)
            raise
        self.active.append(channel)
        channel.users += 1
        self._wake(self.per_connection - 1)
        return channel

    async def _wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        sweeper = self.pool.sweeper  # no task per wait (wait_for's), no timer of its own
        if timeout is not None:
            sweeper.watch(waiter, loop.time() + timeout, lambda: _time_out(waiter))
        try:
            await waiter
        except TimeoutError:
            raise self.pool.busy_for(timeout) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake(1)  # woken, but gone: pass the place on
            raise
        finally:
            if timeout is not None:
                sweeper.unwatch(waiter)
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self, count: int) -> None:
        while count > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def forget(self, channel: Channel, reusable: bool) -> None:
        if channel in self.active:
            self.active.remove(channel)
        self.pool.release(channel.lease, reusable)
        self._wake(1)

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Channels of a finished event loop (tests run one per test): close them.
            for channel in self.active:
                channel.state = CLOSED
                channel.link.close()
            self.active, self._waiters, self.connecting = [], deque(), False
            self._loop = loop
        return loop

    def close(self) -> None:
        for channel in list(self.active):
            if channel.loop.is_closed():
                channel.state = CLOSED
                channel.link.close()
            else:
                channel.lose(ConnectionError("table closed"))
        self.active = []
        self.pool.discard_idle()


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


class LdapTable(AsyncTable):
    dict_type = "ldap"

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        if open_mode != os.O_RDONLY:
            raise DictOpenError(f"{self.spec} map requires O_RDONLY access mode")
        ctx = ctx or OpenContext()
        cfg = CfgParser(name, ctx.params)
        self.settings = s = read_settings(cfg)
        self.qc = QueryContext(
            cfg,
            s.query,
            s.result_format,
            s.expansion_limit,
            DomainFilter.from_config(cfg, ctx),
            table=self.spec,
            extra=(s.search_base,),
        )
        self.attributes = s.attributes
        self.num_terminal = len(s.terminal)
        self.num_leaf = len(s.leaf)
        self.num_attributes = len(s.terminal) + len(s.leaf) + len(s.regular)
        self._kinds: dict[str, int] = {}
        self.timeout = s.timeout
        self.wait = float(s.timeout) if s.timeout > 0 else None
        self.outage = OutageLog(self.spec)
        connector = Connector(s, self.spec)

        async def connect(url: str) -> Link:
            return await run_blocking(connector.open, url)

        size = connection_limit(self.dict_type, ctx.params) or DEFAULT_CONNECTIONS
        self.pool: ConnectionPool[Link, str] = ConnectionPool(
            self.spec,
            s.urls,
            connect,
            Link.close,
            size=size,
            connect_timeout=2.0 * (s.timeout if s.timeout > 0 else 10) + 1.0,
            label=lambda url: url or "(libldap default)",
        )
        self.channels = Channels(self.pool)

    # --- the lookup ---------------------------------------------------------------------
    async def alookup(self, key: bytes) -> bytes | None:
        flags = self.flags  # before any await: concurrent requests share the word
        if not flags & F.UTF8_ACTIVE and not is_valid_utf8(key):
            return None
        if flags & F.FOLD_FIX:
            key = key.lower()
        qc = self.qc
        if qc.domain is not None and not (
            await qc.acheck_domain(key) if qc.domain_asynchronous else qc.check_domain(key)
        ):
            return None
        try:
            value = await self._lookup(key)
        except (SearchTimeout, ConnectionLost) as exc:
            self.outage.failed(str(exc))
            raise DictRetry(f"{self.spec}: {exc}") from None
        self.outage.ok()
        return value

    async def _lookup(self, key: bytes) -> bytes | None:
        """One lookup; run again on a new connection when the first one is lost."""
        for attempt in range(2):
            try:
                async with self.channels.use(self.wait) as channel:
                    return await self._lookup_on(channel, key)
            except ConnectionLost:
                if attempt:
                    raise
        raise AssertionError("not reached")

    async def _lookup_on(self, channel: Channel, key: bytes) -> bytes | None:
        s = self.settings
        base = self.qc.expand_query(s.search_base, key, quote_dn_value)
        if base is None:
            return None
        query = self.qc.expand_query(s.query, key, quote_filter_value)
        if query is None:
            return None
        base_text = base.decode("utf-8", "surrogateescape")
        try:
            entries = await channel.search(
                base_text,
                s.scope,
                query.decode("utf-8", "surrogateescape"),
                self.attributes,
                s.size_limit,
                self.timeout,
            )
        except SearchFailed as exc:
            if exc.code == ldap.NO_SUCH_OBJECT.errnum and s.search_base.dynamic:
                return None  # the base names the key: no such key
            if exc.code == ldap.NO_SUCH_OBJECT.errnum:
                log.warning("%s: Search base '%s' not found: %s", self.spec, base_text, exc)
            elif exc.code == ldap.SIZELIMIT_EXCEEDED.errnum:
                log.warning("%s: Search error %s", self.spec, exc)  # this key's, not an outage
            else:
                self.outage.failed(f"search error: {exc}")
            raise DictRetry(f"{self.spec}: search error: {exc}") from None
        except UnicodeError:
            raise DictRetry(f"{self.spec}: search base or filter is not UTF-8") from None
        joiner = self.qc.results(key)
        await _Walk(self, channel, joiner).entries(entries, 1)
        return joiner.value()

    # --- attributes ---------------------------------------------------------------------
    def kind(self, name: str) -> int:
        """Index of the first result attribute that ``name`` is (or is a subtype of);
        ``len(attributes)`` when none."""
        index = self._kinds.get(name)
        if index is None:
            index = next(
                (i for i, attr in enumerate(self.attributes) if attrdesc_subtype(attr, name) > 0),
                len(self.attributes),
            )
            if len(self._kinds) < 1024:
                self._kinds[name] = index
        return index

    def url_attributes(self, wanted: tuple[str, ...]) -> list[str]:
        """What to ask a URL for: our attributes, or those the URL also names."""
        if not wanted:
            return list(self.attributes)
        chosen = []
        for a1 in wanted:
            for a2 in self.attributes:
                relation = attrdesc_subtype(a1, a2)
                if relation > 0:
                    chosen.append(a2)
                elif relation < 0:
                    chosen.append(a1)
        return chosen

    def close(self) -> None:
        self.channels.close()


def _present(attrs: dict[str, list[bytes]], names: list[str]) -> list[list[bytes] | None]:
    """The values of each named attribute (exact name, any case); None when absent."""
    if not names:
        return []
    folded = {name.lower(): values for name, values in reversed(list(attrs.items()))}
    return [folded.get(name.lower()) for name in names]


class _Walk:
    """The results of one lookup: entries, their attributes, references followed."""

    def __init__(self, table: LdapTable, channel: Channel, joiner: ResultJoiner) -> None:
        self.table = table
        self.settings = table.settings
        self.channel = channel
        self.joiner = joiner

    async def entries(self, entries: list[Entry], depth: int) -> None:
        t = self.table
        size_limit = self.settings.size_limit
        # Postfix keeps both verdicts from one entry to the next when an entry has
        # none of the attributes that decide them.
        is_leaf, is_terminal = True, False
        for count, (_dn, attrs) in enumerate(entries, 1):
            if size_limit and count > size_limit:
                log.warning("%s: Query size limit (%d) exceeded", t.spec, size_limit)
                raise DictRetry(f"{t.spec}: size limit exceeded")
            for values in _present(attrs, self.settings.terminal):
                if values is not None:
                    is_terminal = len(values) > 0
                    if is_terminal:
                        break
            if not is_terminal and t.num_leaf:
                for values in _present(attrs, self.settings.special):
                    if values is not None:
                        is_leaf = not values
                        if not is_leaf:
                            break
            for name, values in attrs.items():
                if values:
                    await self._attribute(name, values, depth, is_leaf, is_terminal)

    async def _attribute(
        self, name: str, values: list[bytes], depth: int, is_leaf: bool, is_terminal: bool
    ) -> None:
        t = self.table
        index = t.kind(name)
        if index < t.num_attributes or is_terminal:
            leaf_only = t.num_terminal <= index < t.num_terminal + t.num_leaf
            if (is_terminal and index >= t.num_terminal) or (not is_leaf and leaf_only):
                return
            for value in values:
                self.joiner.add(c_string(value))
        elif index < len(t.attributes):
            if depth >= self.settings.recursion_limit:
                shown = c_string(values[0]).decode("utf-8", "backslashreplace")
                log.warning(
                    "%s: Recursion limit exceeded for special attribute %s=%s", t.spec, name, shown
                )
                raise DictRetry(f"{t.spec}: recursion limit exceeded")
            for value in values:
                await self._follow(c_string(value), depth)

    async def _follow(self, value: bytes, depth: int) -> None:
        """Search what a special attribute value names: an LDAP URL or a DN."""
        t = self.table
        shown = value.decode("utf-8", "backslashreplace")
        lib = libldap()
        if lib.is_url(value):
            url = lib.parse_url(value)
            if isinstance(url, int):
                log.warning("%s: malformed URL %s: %s(%d)", t.spec, shown, _url_error(url), url)
                raise DictRetry(f"{t.spec}: malformed URL {shown}")
            attrs = t.url_attributes(url.attrs)
            if not attrs:
                return  # no attribute of interest
            base = url.dn if url.dn is not None else self._default_base()
            scope, filterstr = url.scope, url.filter or _ALL_OBJECTS
        else:
            base = value.decode("utf-8", "surrogateescape")
            scope, filterstr, attrs = ldap.SCOPE_BASE, _DN_FILTER, list(t.attributes)
        try:
            found = await self.channel.search(
                base, scope, filterstr, attrs, self.settings.size_limit, t.timeout
            )
        except SearchFailed as exc:
            if exc.code == ldap.NO_SUCH_OBJECT.errnum:
                log.warning("%s: DN %s not found, skipping", t.spec, shown)
                return
            log.warning("%s: search error %s", t.spec, exc)
            raise DictRetry(f"{t.spec}: search error: {exc}") from None
        except UnicodeError:
            raise DictRetry(f"{t.spec}: reference {shown} is not UTF-8") from None
        await self.entries(found, depth + 1)

    def _default_base(self) -> str:
        """libldap's default base (ldap.conf BASE) for a URL without a DN."""
        try:
            return self.channel.link.conn.get_option(ldap.OPT_DEFBASE) or ""
        except ldap.LDAPError:
            return ""
