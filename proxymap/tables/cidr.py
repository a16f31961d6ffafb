"""cidr_table(5): network address tables.

NAME
    cidr -- ``cidr:/file`` and ``cidr:{ {rule}, ... }`` lookup tables

DESCRIPTION
    Each rule is ``[!]network value`` or ``IF [!]network`` ... ``ENDIF``
    (``docs/TABLES.md`` section 3.13). A network is an address, optionally
    ``/length``, optionally in brackets (``[addr]``, ``[addr/len]``, ``[addr]/len``);
    it is IPv6 when its text contains ``:``. Addresses are parsed by the C library's
    inet_pton (``socket.inet_pton``), so the same strings are accepted as by Postfix
    (no leading zeros in IPv4, embedded IPv4 in IPv6). A network with host bits set is
    not fixed up but skipped with a warning naming the proper network.

    Lookup: the first matching rule in file order wins (not the longest prefix). A rule
    only ever matches keys of its own address family: IPv4 rules never see an
    IPv4-mapped IPv6 key. A key that does not parse is simply not found.

    Speed: a run of consecutive non-negated rules is indexed per family and prefix
    length as {network: index of its first rule}. A lookup masks the key once per
    length present and takes the smallest index found, which is the rule a scan in
    file order would stop at.
"""

from __future__ import annotations

import socket

from proxymap import flags as F
from proxymap.tables.base import OpenContext, SyncTable
from proxymap.tables.patternfile import (
    C_SPACE,
    ENDIF,
    IF,
    MATCH,
    Rule,
    RuleError,
    RuleList,
    index_runs,
    keyword_at,
    require_read_only,
    rule_lines,
    rule_source,
    skip_space,
    take_negations,
    warn,
)

_BITS: dict[int, int] = {socket.AF_INET: 32, socket.AF_INET6: 128}
# Byte values, not one-byte strings: `b":" in text` first tries (and fails) to read
# its left side as an integer, which costs a formatted exception per test.
_COLON = ord(":")


def parse_address(text: bytes) -> tuple[int, int] | None:
    """(family, address as an integer), or None when inet_pton rejects the text."""
    family = socket.AF_INET6 if _COLON in text else socket.AF_INET
    try:
        packed = socket.inet_pton(family, text.decode("latin-1"))
    except (OSError, ValueError):
        return None
    return family, int.from_bytes(packed, "big")


def _mask(family: int, length: int) -> int:
    bits = _BITS[family]
    return ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)


def parse_network(pattern: bytes) -> tuple[int, int, int]:
    """(family, network, mask) of a rule's pattern; RuleError explains a bad one."""
    if not pattern:
        raise RuleError("no address pattern")
    if pattern.startswith(b"["):
        inside, bracket, after = pattern[1:].partition(b"]")
        if not bracket:
            raise RuleError(f"missing ']' character after \"{_show(pattern)}\"")
        if after and not after.startswith(b"/"):
            raise RuleError(f'garbage after "{_show(pattern)}"')
        address, slash, length = (inside, b"/", after[1:]) if after else inside.partition(b"/")
    else:
        address, slash, length = pattern.partition(b"/")
    family = socket.AF_INET6 if _COLON in address else socket.AF_INET
    bits = _BITS[family]
    if slash and (not length.isdigit() or int(length) > bits):
        raise RuleError(f'bad mask value in "{_show(address)}/{_show(length)}"')
    parsed = parse_address(address)
    if parsed is None or parsed[0] != family:
        raise RuleError(f'bad address pattern: "{_show(address)}"')
    prefix = int(length) if slash else bits
    mask = _mask(family, prefix)
    network = parsed[1]
    if network & ~mask:
        proper = socket.inet_ntop(family, (network & mask).to_bytes(bits // 8, "big"))
        raise RuleError(
            f'non-null host address bits in "{_show(address)}/{_show(length)}", '
            f'perhaps you should use "{proper}/{prefix}" instead'
        )
    return family, network, mask


class CidrTable(SyncTable):
    dict_type = "cidr"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None):
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN, ctx)
        require_read_only(self.dict_type, name, open_mode)
        source = rule_source(self.dict_type, name)
        rules = RuleList(self.dict_type, name)
        for lineno, line in rule_lines(source, name):
            try:
                rules.add(self._parse_rule(line, lineno, rules.nesting))
            except RuleError as exc:
                warn(self.dict_type, name, lineno, f"{exc}: skipping this rule")
        self._rules = rules.finish()
        self._runs = _index_runs(self._rules)

    @staticmethod
    def _parse_rule(line: bytes, lineno: int, nesting: int) -> Rule:
        if keyword_at(line, b"IF"):
            positive, pos = take_negations(line, skip_space(line, 2))
            rule = Rule(IF, lineno, positive)
            rule.matcher = parse_network(line[pos:])
            return rule
        if keyword_at(line, b"ENDIF"):
            if line[skip_space(line, 5) :]:
                raise RuleError("garbage after ENDIF")
            if nesting == 0:
                raise RuleError("ENDIF without IF")
            return Rule(ENDIF, lineno)
        positive, pos = take_negations(line, 0)
        end = pos
        while end < len(line) and line[end] not in C_SPACE:
            end += 1
        pattern, value = line[pos:end], line[end:].strip(C_SPACE)
        if not pattern:
            raise RuleError("no address pattern")
        if not value:
            raise RuleError("no lookup result")
        rule = Rule(MATCH, lineno, positive, parse_network(pattern))
        rule.value = value
        return rule

    def lookup(self, key: bytes) -> bytes | None:
        if 0 in key:
            key = key.split(b"\0", 1)[0]
        parsed = parse_address(key)
        if parsed is None:
            return None
        family, address = parsed
        rules = self._rules
        runs = self._runs
        index, count = 0, len(rules)
        while index < count:
            run = runs[index]
            if run is not None:
                first = run.first_match(family, address)
                if first is not None:
                    return rules[first].value
                index = run.end
                continue
            rule = rules[index]
            index += 1
            kind = rule.kind
            if kind == ENDIF:
                continue
            rule_family, network, mask = rule.matcher
            holds = rule_family == family and ((address & mask) == network) == rule.positive
            if kind == MATCH:
                if holds:
                    return rule.value
            elif not holds:
                if rule.endif < 0:
                    return None
                index = rule.endif + 1
        return None


class NetworkRun:
    """Consecutive non-negated match rules, as {network: first rule} per family and mask."""

    __slots__ = ("end", "by_family")

    def __init__(self, rules: list[Rule], start: int, end: int) -> None:
        self.end = end
        tables: dict[int, dict[int, dict[int, int]]] = {}
        for index in range(start, end):
            family, network, mask = rules[index].matcher
            tables.setdefault(family, {}).setdefault(mask, {}).setdefault(network, index)
        self.by_family = {family: tuple(by_mask.items()) for family, by_mask in tables.items()}

    def first_match(self, family: int, address: int) -> int | None:
        """Index of the first rule of the run that matches, or None."""
        first = None
        for mask, networks in self.by_family.get(family, ()):
            index = networks.get(address & mask)
            if index is not None and (first is None or index < first):
                first = index
        return first


def _index_runs(rules: list[Rule]) -> list[NetworkRun | None]:
    """Entry i is the index of the run of plain match rules that starts at rule i."""
    return index_runs(
        len(rules),
        lambda index: rules[index].kind == MATCH and rules[index].positive,
        lambda start, end: NetworkRun(rules, start, end),
    )


def _show(text: bytes) -> str:
    return text.decode("utf-8", "replace")
