"""Exact candidate indexes for long runs of pattern rules (pcre, regexp).

NAME
    ruleindex -- literal prefixes/suffixes of anchored patterns, and the run index on them

DESCRIPTION
    A table of a thousand rules like ``/^user42@example\\.com$/`` spends its time calling
    the regex library once per rule. Most rules of such a file cannot match a given key
    for a reason visible without the library: the pattern is anchored at the start and
    begins with literal text the key does not start with.

    ``pcre_literal_prefix`` and ``ere_literal_prefix`` extract that text, but only when
    it is certain: the pattern must start with ``^`` (or, pcre, be compiled ANCHORED),
    ``^`` must not match after newlines (no multiline flag), the syntax must be the
    plain one (no pcre ``x``; regexp only in extended syntax), and there must be no
    alternation at the top level. The prefix is the run of literal atoms (plain
    characters and backslash-escaped punctuation) up to the first metacharacter; an
    atom followed by a quantifier (``? * + {``) is dropped, since it may be optional.
    Anything unusual gives no prefix, which only costs speed.

    ``pcre_literal_suffix`` and ``ere_literal_suffix`` do the same for the literal
    atoms before a final unescaped ``$`` (no multiline; pcre: no inline option group,
    no ``(*`` verb, only two-byte escapes, since a backward reading would take the end
    of ``\\x41`` for literal text). pcre's ``$`` also matches before a final newline.

    ``RunIndex`` holds one run of consecutive match rules. Rules with a prefix are
    filed under its first 1, 2, 4, 8 or 16 bytes (the largest that fits), lowercased
    when the rule is caseless (the libraries fold ASCII only, in the C locale / without
    UTF, as ``bytes.lower`` does); suffixes likewise under their last bytes, always
    lowercased. ``candidates`` returns, in file order, every rule of the run that is
    not ruled out: the unindexed ones, and the indexed ones whose filed bytes start
    (end) the key. Skipping a rule that cannot match changes no answer,
    and the candidates are tried in file order, so the first match is still the first.
    Negated rules are never filed: they fire precisely when their pattern fails.
    pcre also offers the byte PCRE2 says a match requires; each rule is filed once,
    under whichever of its prefix, suffix and byte the fewest rules of the run share.
"""

from __future__ import annotations

from collections.abc import Sequence

_BACKSLASH = 0x5C
_PUNCTUATION = frozenset(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ")
_QUANTIFIERS = frozenset(b"?*+{")
_PCRE_META = frozenset(b"\\^$.[|()?*+{}]")
# glibc gives \< \> \` \' (and \w etc., letters anyway) special meanings.
_ERE_SPECIAL_ESCAPES = frozenset(b"<>`'")
_BUCKETS = (16, 8, 4, 2, 1)
_SUFFIX = "$"  # marks a suffix slot among the filing choices of a rule
_SHORT_PCRE_ESCAPES = frozenset(b"dDwWsSbBhHvVRXAzZGK")


def _literal_run(body: bytes, meta: frozenset[int], special_escapes: frozenset[int]) -> bytes:
    """The literal atoms at the start of ``body``, minus one that a quantifier follows."""
    prefix = bytearray()
    pos, end = 0, len(body)
    while pos < end:
        byte = body[pos]
        if byte == _BACKSLASH:
            if pos + 1 >= end:
                break
            escaped = body[pos + 1]
            if escaped not in _PUNCTUATION or escaped in special_escapes:
                break
            atom, size = escaped, 2
        elif 0x20 <= byte < 0x7F and byte not in meta:
            atom, size = byte, 1
        else:
            break
        if pos + size < end and body[pos + size] in _QUANTIFIERS:
            break  # this atom may repeat zero times
        prefix.append(atom)
        pos += size
    return bytes(prefix)


def _top_level_alternation(pattern: bytes, give_up_on: tuple[bytes, ...]) -> bool:
    """True if ``|`` may separate top-level alternatives (or we cannot tell)."""
    if b"|" not in pattern:
        return False
    if any(marker in pattern for marker in give_up_on):
        return True  # classes, quoting, comments, verb names can hide ( ) |
    depth = 0
    pos, end = 0, len(pattern)
    while pos < end:
        byte = pattern[pos]
        if byte == _BACKSLASH:
            pos += 2
            continue
        if byte == 0x28:  # (
            depth += 1
        elif byte == 0x29:  # )
            depth -= 1
            if depth < 0:
                return True
        elif byte == 0x7C and depth == 0:  # |
            return True
        pos += 1
    return False


def pcre_literal_prefix(pattern: bytes, anchored: bool, multiline: bool, extended: bool) -> bytes:
    """Bytes every subject matching this PCRE2 pattern starts with (b"" = none known).

    ``anchored`` is the ANCHORED compile option (flag ``A``), not PCRE2's own
    auto-anchoring: a caller should also require PCRE2_INFO_ALLOPTIONS to say anchored.
    """
    pattern = pattern.split(b"\0", 1)[0]
    if extended:
        return b""
    if pattern[:1] == b"^" and not multiline:
        body = pattern[1:]
    elif anchored:
        body = pattern
    else:
        return b""
    if _top_level_alternation(pattern, (b"[", b"\\Q", b"\\c", b"(?#", b"(?C", b"(*")):
        return b""
    return _literal_run(body, _PCRE_META, frozenset())


def ere_literal_prefix(pattern: bytes, extended: bool, newline: bool) -> bytes:
    """Bytes every subject matching this POSIX ERE starts with (glibc, C locale)."""
    pattern = pattern.split(b"\0", 1)[0]
    if not extended or newline or pattern[:1] != b"^":
        return b""
    if _top_level_alternation(pattern, (b"[",)):
        return b""
    return _literal_run(pattern[1:], _PCRE_META, _ERE_SPECIAL_ESCAPES)


def _literal_tail(body: bytes, meta: frozenset[int], special_escapes: frozenset[int]) -> bytes:
    """The literal atoms at the end of ``body`` (what a final ``$`` follows)."""
    tail = bytearray()
    pos = len(body) - 1
    while pos >= 0:
        byte = body[pos]
        slashes = 0
        while pos - slashes - 1 >= 0 and body[pos - slashes - 1] == _BACKSLASH:
            slashes += 1
        if slashes % 2:
            if byte not in _PUNCTUATION or byte in special_escapes:
                break
            pos -= 2
        elif 0x20 <= byte < 0x7F and byte not in meta:
            pos -= 1
        else:
            break  # a quantifier, group, class... ends the literal tail
        tail.append(byte)
    tail.reverse()
    return bytes(tail)


def _ends_with_anchor(pattern: bytes) -> bool:
    """True if the last byte is an unescaped ``$``."""
    if pattern[-1:] != b"$":
        return False
    slashes = len(pattern) - 1 - len(pattern[:-1].rstrip(b"\\"))
    return slashes % 2 == 0


def _inline_options(pattern: bytes) -> bool:
    """True if some ``(?`` may set options (a letter, ``^`` or ``-`` follows it)."""
    start = pattern.find(b"(?")
    while start >= 0:
        after = pattern[start + 2 : start + 3]
        if after.isalpha() or after in (b"^", b"-"):
            return True
        start = pattern.find(b"(?", start + 2)
    return False


def _only_short_escapes(pattern: bytes) -> bool:
    """True if every backslash escape is two bytes long and cannot quote what follows.

    Read backwards, ``\\x41`` or ``\\k<name>`` would look like literal text; ``\\Q``
    quotes the rest. Patterns with such escapes get no suffix.
    """
    pos, end = 0, len(pattern)
    while pos < end:
        if pattern[pos] == _BACKSLASH:
            escaped = pattern[pos + 1 : pos + 2]
            if escaped.isalnum() and escaped[0] not in _SHORT_PCRE_ESCAPES:
                return False
            pos += 2
        else:
            pos += 1
    return True


def pcre_literal_suffix(pattern: bytes, multiline: bool, extended: bool) -> bytes:
    """Bytes every subject matching this PCRE2 pattern ends with, maybe before a final
    newline (b"" = none known). Compare it without regard to case: inline ``(?i)``
    may make it caseless.
    """
    pattern = pattern.split(b"\0", 1)[0]
    if extended or multiline or not _ends_with_anchor(pattern):
        return b""
    if b"(*" in pattern or _inline_options(pattern):
        return b""  # newline conventions; (?m) or (?x) would change what $ or blanks mean
    if not _only_short_escapes(pattern):
        return b""
    if _top_level_alternation(pattern, (b"[", b"\\c", b"(?#", b"(?C")):
        return b""
    return _literal_tail(pattern[:-1], _PCRE_META, frozenset())


def ere_literal_suffix(pattern: bytes, extended: bool, newline: bool) -> bytes:
    """Bytes every subject matching this POSIX ERE ends with (glibc, C locale)."""
    pattern = pattern.split(b"\0", 1)[0]
    if not extended or newline or not _ends_with_anchor(pattern):
        return b""
    if _top_level_alternation(pattern, (b"[",)):
        return b""
    return _literal_tail(pattern[:-1], _PCRE_META, _ERE_SPECIAL_ESCAPES)


class RunIndex:
    """Candidate rules of one run of match rules, by literal prefix, suffix or byte.

    ``end`` is the index after the run. ``always`` are rules that must always be
    tried; ``by_prefix`` is (length, caseless, {filed bytes: rule indexes});
    ``by_suffix`` is (length, {last bytes, lowercased: rule indexes}); ``by_byte``
    maps a byte that rules require anywhere in the (lowercased) key. A rule is filed
    once, under whichever of its keys the fewest rules share
    (``/^Subject:.*word1/`` ... ``/^Subject:.*word9/`` go by their digit).
    """

    __slots__ = ("end", "always", "by_prefix", "by_suffix", "by_byte")

    def __init__(
        self, end: int, rules: Sequence[tuple[int, bytes, bool, int | None, bytes]]
    ) -> None:
        """``rules``: (index, prefix, caseless, required byte or None, suffix), ascending.

        An empty prefix or suffix means none is known.
        """
        self.end = end
        self.always: list[int] = []
        self.by_prefix: list[tuple[int, bool, dict[bytes, list[int]]]] = []
        self.by_suffix: list[tuple[int, dict[bytes, list[int]]]] = []
        self.by_byte: dict[int, list[int]] = {}
        choices = []
        sharing: dict[object, int] = {}
        for _, prefix, caseless, byte, suffix in rules:
            slots = [
                slot
                for slot in (
                    _prefix_slot(prefix, caseless) if prefix else None,
                    _suffix_slot(suffix) if suffix else None,
                    byte,
                )
                if slot is not None
            ]
            for slot in slots:
                sharing[slot] = sharing.get(slot, 0) + 1
            choices.append(slots)
        for (index, *_), slots in zip(rules, choices, strict=True):
            if not slots:
                self.always.append(index)
                continue
            best = min(slots, key=sharing.__getitem__)  # ties: prefix, then suffix
            if isinstance(best, int):
                self.by_byte.setdefault(best, []).append(index)
            elif best[0] == _SUFFIX:
                self._file(self.by_suffix, (best[1],), best[2], index)
            else:
                self._file(self.by_prefix, best[:2], best[2], index)

    @staticmethod
    def _file(tables: list, head: tuple, filed: bytes, index: int) -> None:
        for entry in tables:
            if entry[:-1] == head:
                entry[-1].setdefault(filed, []).append(index)
                return
        tables.append((*head, {filed: [index]}))

    def candidates(self, key: bytes, lowered: bytes) -> list[int]:
        """Rule indexes to try, ascending; every other rule of the run cannot match."""
        found = self.always
        lists = 0
        for length, caseless, table in self.by_prefix:
            hit = table.get(lowered[:length] if caseless else key[:length])
            if hit is not None:
                found = found + hit if lists or found else hit
                lists += 1
        if self.by_suffix:
            # pcre's $ also matches before a final newline (unless E): try both ends.
            ends = (lowered, lowered[:-1]) if lowered[-1:] == b"\n" else (lowered,)
            for length, table in self.by_suffix:
                for text in ends:
                    hit = table.get(text[-length:])
                    if hit is not None:
                        found = found + hit if lists or found else hit
                        lists += 1
        if self.by_byte:
            for byte in set(lowered):
                hit = self.by_byte.get(byte)
                if hit is not None:
                    found = found + hit if lists or found else hit
                    lists += 1
        if lists > 1 or (lists == 1 and self.always):
            return sorted(found)
        return found


def _suffix_slot(suffix: bytes) -> tuple[str, int, bytes]:
    """(marker, bucket length, lowercased last bytes) of a literal suffix."""
    size = next(size for size in _BUCKETS if size <= len(suffix))
    return _SUFFIX, size, suffix[-size:].lower()


def _prefix_slot(prefix: bytes, caseless: bool) -> tuple[int, bool, bytes]:
    """(bucket length, caseless, filed bytes) of a literal prefix."""
    size = next(size for size in _BUCKETS if size <= len(prefix))
    return size, caseless, prefix[:size].lower() if caseless else prefix[:size]
