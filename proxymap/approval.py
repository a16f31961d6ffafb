"""Which tables a proxymap service may open: the approved set (Postfix 3.11+ rules).

NAME
    approval -- build the proxy_read_maps / proxy_write_maps allow-list

SYNOPSIS
    approved_tables(params, "proxymap")               # -> ["unix:passwd.byname", ...]
    approved_tables(params, "proxywrite")
    approved_tables(params, "proxymap", export_all=True)

DESCRIPTION
    The read-only service approves what ``proxy_read_maps`` (plus, in the read-only
    service only, the parameters named by ``smtpd_restriction_classes``) refers to
    with a ``proxy:`` prefix; the writer uses ``proxy_write_maps``. ``params`` holds
    $-expanded main.cf values with their defaults.

    A value is split on commas and blanks; a ``{ ... }`` group is never split.
    Each token is then taken as follows:

    * ``{ ... }``: the braces are removed and only the first token inside counts;
    * ``/file/name``: the file is read and each logical line (comments and
      continuation lines as in main.cf) is processed the same way, recursively;
      a file already being read is not read again (Postfix has no such guard);
    * tokens that do not start with a letter or digit, or have no ``:``, are skipped;
    * ``pipemap:{...}`` and ``unionmap:{...}``: the members are processed;
    * ``proxy:...``: every leading ``proxy:`` is removed and the rest is approved;
    * anything else is skipped, except in export-all mode, where every other table
      reference is listed too (``pipemap``/``unionmap`` lists themselves are not).

    The result keeps the order of first appearance, without duplicates. Brace
    errors log ``bad syntax in <origin> content: <reason>`` and skip the token.

SEE ALSO
    docs/PROTOCOL.md section 2.11.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping

from proxymap.tables.textsyntax import BraceError, logical_lines, strip_braces

log = logging.getLogger("proxymap")

_SEPARATORS = ", \t\r\n"
_PROXY = "proxy:"
_MEMBER_LISTS = ("pipemap:", "unionmap:")
# Deep enough for any sane configuration, shallow enough to stop runaway recursion.
_MAX_DEPTH = 100


def tokens(text: str) -> Iterator[str]:
    """Split on commas and blanks; ``{`` opens a group up to its matching ``}``.

    Like Postfix's tokenizer this is tolerant: a stray ``}`` is ordinary text and an
    unclosed ``{`` runs to the end of the text (later brace checks report it).
    """
    depth = 0
    start = None
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
        elif depth == 0 and char in _SEPARATORS:
            if start is not None:
                yield text[start:index]
                start = None
            continue
        if start is None:
            start = index
    if start is not None:
        yield text[start:]


def strip_proxy(name: str) -> str:
    while name.startswith(_PROXY):
        name = name[len(_PROXY) :]
    return name


class _Collector:
    def __init__(self, export_all: bool) -> None:
        self.export_all = export_all
        self.approved: dict[str, None] = {}  # insertion-ordered set
        self._reading: list[str] = []  # files being read, outermost first

    def scan(self, text: str, origin: str, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            log.warning("%s: table references nested too deeply, rest ignored", origin)
            return
        for token in tokens(text):
            self.take(token, origin, depth)

    def take(self, token: str, origin: str, depth: int) -> None:
        if token.startswith("{"):
            first = self._first_in_braces(token, origin)
            if first is None:
                return
            token = first
        if token.startswith("/"):
            self.read_file(token, depth)
            return
        if not (token[:1].isascii() and token[:1].isalnum()) or ":" not in token:
            return
        for prefix in _MEMBER_LISTS:
            if token.startswith(prefix):
                self._members(token, prefix, origin, depth)
                return
        if token.startswith(_PROXY):
            self.add(strip_proxy(token), origin)
        elif self.export_all:
            self.add(token, origin)

    def _first_in_braces(self, token: str, origin: str) -> str | None:
        try:
            inner = strip_braces(token)
        except BraceError as exc:
            log.warning("bad syntax in %s content: %s", origin, exc)
            return None
        return next(tokens(inner), None)

    def _members(self, token: str, prefix: str, origin: str, depth: int) -> None:
        rest = token[len(prefix) :]
        if not rest.startswith("{"):
            return
        try:
            inner = strip_braces(rest)
        except BraceError as exc:
            log.warning("bad syntax in %s content: %s", origin, exc)
            return
        self.scan(inner, origin, depth + 1)

    def read_file(self, path: str, depth: int) -> None:
        real = os.path.realpath(path)
        if real in self._reading:
            log.warning(
                "%s: file includes itself (via %s), not read again",
                path,
                " -> ".join(self._reading),
            )
            return
        try:
            with open(path.encode("utf-8", "surrogateescape"), "rb") as source:
                data = source.read()
        except OSError as exc:
            verb = "read" if exc.errno == getattr(os, "EISDIR", None) else "open"
            log.warning("%s %s: %s", verb, path, os.strerror(exc.errno or 0))
            return
        self._reading.append(real)
        try:
            for _, line in logical_lines(data, path):
                self.scan(line.decode("utf-8", "surrogateescape"), path, depth + 1)
        finally:
            self._reading.pop()

    def add(self, name: str, origin: str) -> None:
        if name not in self.approved:
            log.debug("allowlisting %s from %s", name, origin)
            self.approved[name] = None


def approved_tables(
    params: Mapping[str, str], service_name: str, export_all: bool = False
) -> list[str]:
    """The approved table names (``type:name``, no ``proxy:``) for a service."""
    writer = service_name == "proxywrite"
    parameter = "proxy_write_maps" if writer else "proxy_read_maps"
    collector = _Collector(export_all)
    collector.scan(params.get(parameter, "") or "", parameter)
    if not writer:
        for class_name in tokens(params.get("smtpd_restriction_classes", "") or ""):
            value = params.get(class_name)
            if value:
                collector.scan(value, "smtpd_restriction_classes")
    return list(collector.approved)
