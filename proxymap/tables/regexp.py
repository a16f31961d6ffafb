"""regexp_table(5): POSIX extended regular expression tables.

NAME
    regexp -- ``regexp:/file`` and ``regexp:{ {rule}, ... }`` lookup tables

DESCRIPTION
    Rules are tried in file order and the first match wins (``docs/TABLES.md``
    section 3.11). A match rule is ``[!]/pattern/flags[!/pattern2/flags] result``;
    default options are extended and case-insensitive, and the flags ``i``, ``x``, ``m``
    toggle REG_ICASE, REG_EXTENDED and REG_NEWLINE. ``IF``/``ENDIF`` blocks nest.

    Matching is glibc's regcomp/regexec in the C locale (``posix_regex``), so results
    are byte-for-byte those of Postfix, leftmost-longest semantics and glibc quirks
    included. A pattern whose result has no ``$n`` is compiled with REG_NOSUB, like
    Postfix, and no sub-match is computed for it.

    Bad rules are dropped with a warning naming the file and line; a missing file makes
    the table unavailable. NO_REGSUB in the open flags drops every rule whose result
    uses ``$n``. FOLD_MUL in a request lowercases the key (ASCII) before matching.

    Long runs of match rules are indexed by the literal prefix (``^text``) or suffix
    (``text$``) of their patterns (``ruleindex``): a lookup only runs regexec for
    rules whose text starts (ends) the key, and for the rules without one, in file
    order.
"""

from __future__ import annotations

import logging

from proxymap import flags as F
from proxymap.tables import posix_regex as rx
from proxymap.tables.base import OpenContext, SyncTable
from proxymap.tables.patternfile import (
    ENDIF,
    IF,
    MATCH,
    Rule,
    RuleError,
    RuleList,
    index_runs,
    keyword_at,
    parse_replacement,
    require_read_only,
    rule_lines,
    rule_source,
    skip_space,
    take_pattern,
    warn,
)
from proxymap.tables.ruleindex import RunIndex, ere_literal_prefix, ere_literal_suffix

log = logging.getLogger("proxymap")


_FLAG_BITS = {ord("i"): rx.REG_ICASE, ord("m"): rx.REG_NEWLINE, ord("x"): rx.REG_EXTENDED}


def _options(flag_letters: bytes) -> int:
    options = rx.REG_EXTENDED | rx.REG_ICASE
    for letter in flag_letters:
        bit = _FLAG_BITS.get(letter)
        if bit is None:
            raise RuleError(f'unknown regexp option "{chr(letter)}": skipping this rule')
        options ^= bit
    return options


class RegexpTable(SyncTable):
    dict_type = "regexp"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None):
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN, ctx)
        require_read_only(self.dict_type, name, open_mode)
        self._no_regsub = bool(flags & F.NO_REGSUB)
        source = rule_source(self.dict_type, name)
        rules = RuleList(self.dict_type, name)
        with rx.c_locale():
            for lineno, line in rule_lines(source, name):
                try:
                    rules.add(self._parse_rule(line, lineno, rules.nesting))
                except RuleError as exc:
                    warn(self.dict_type, name, lineno, str(exc))
        self._rules = rules.finish()
        self._runs = _index_runs(self._rules)

    # --- loading ------------------------------------------------------------------------
    def _parse_rule(self, line: bytes, lineno: int, nesting: int) -> Rule:
        if not line[:1].isalnum():
            return self._parse_match(line, lineno)
        if keyword_at(line, b"IF"):
            positive, pattern, letters, pos = take_pattern(
                line, skip_space(line, 2), regexp_syntax=True
            )
            options = _options(letters)
            extra = line[skip_space(line, pos) :]
            if extra:
                self._warn(lineno, f'ignoring extra text after IF statement: "{_show(extra)}"')
                self._warn(lineno, "do not prepend whitespace to statements between IF and ENDIF")
            return Rule(IF, lineno, positive, self._compile(pattern, options | rx.REG_NOSUB))
        if keyword_at(line, b"ENDIF"):
            if nesting == 0:
                raise RuleError("ignoring ENDIF without matching IF")
            if line[skip_space(line, 5) :]:
                self._warn(lineno, "ignoring extra text after ENDIF")
            return Rule(ENDIF, lineno)
        raise RuleError("ignoring unrecognized request")

    def _parse_match(self, line: bytes, lineno: int) -> Rule:
        positive, pattern, letters, pos = take_pattern(line, 0, regexp_syntax=True)
        options = _options(letters)
        second = None
        if pos < len(line) and line[pos] == 0x21:  # "!": /pattern1/!/pattern2/
            second_positive, second_pattern, second_letters, pos = take_pattern(
                line, pos, regexp_syntax=True
            )
            second = (second_positive, second_pattern, _options(second_letters))
        text = line[skip_space(line, pos) :]
        if not text:
            self._warn(lineno, "no replacement text: using empty string")
        try:
            replacement = parse_replacement(text)
        except RuleError as exc:
            self._warn(lineno, str(exc))
            raise RuleError("bad replacement syntax: skipping this rule") from None
        max_sub = replacement.max_sub
        if max_sub and not positive:
            raise RuleError("$number found in negative match replacement text: skipping this rule")
        if max_sub and self._no_regsub:
            raise RuleError("regular expression substitution is not allowed: skipping this rule")
        rule_prefix = rule_suffix = b""  # a negated rule fires when the pattern fails
        if positive:
            extended, newline = bool(options & rx.REG_EXTENDED), bool(options & rx.REG_NEWLINE)
            rule_prefix = ere_literal_prefix(pattern, extended, newline)
            rule_suffix = ere_literal_suffix(pattern, extended, newline)
        if max_sub == 0:
            options |= rx.REG_NOSUB
        rule = Rule(
            MATCH, lineno, positive, self._compile(pattern, options, max_sub + 1 if max_sub else 0)
        )
        if max_sub > rule.matcher.nsub:
            rule.matcher.free()
            raise RuleError(f'out of range replacement index "{max_sub}": skipping this rule')
        if second is not None:
            second_positive, second_pattern, second_options = second
            try:
                rule.second = self._compile(second_pattern, second_options | rx.REG_NOSUB)
            except RuleError:
                rule.matcher.free()
                raise
            rule.second_positive = second_positive
        rule.replacement = replacement
        rule.prefix = rule_prefix
        rule.suffix = rule_suffix
        rule.caseless = bool(options & rx.REG_ICASE)
        return rule

    @staticmethod
    def _compile(pattern: bytes, options: int, nmatch: int = 0) -> rx.PosixRegex:
        try:
            return rx.PosixRegex(pattern, options, nmatch)
        except rx.RegexCompileError as exc:
            raise RuleError(str(exc)) from None

    def _warn(self, lineno: int, message: str) -> None:
        warn(self.dict_type, self.name, lineno, message)

    # --- lookup -------------------------------------------------------------------------
    def _holds(self, regex: rx.PosixRegex, positive: bool, key: bytes, lineno: int) -> bool:
        """The rule's condition: match (or, negated, no match); a regexec error is false."""
        error = regex.matches(key)
        if error == 0:
            return positive
        if error == rx.REG_NOMATCH:
            return not positive
        self._warn(lineno, regex.error_text(error))
        return False

    def lookup(self, key: bytes) -> bytes | None:
        key = self.fold(key)
        if 0 in key:  # the byte value: faster than `b"\0" in key`
            key = key.split(b"\0", 1)[0]
        with rx.c_locale():
            return self._first_match(key)

    def _first_match(self, key: bytes) -> bytes | None:
        rules = self._rules
        runs = self._runs
        lowered = None
        index, count = 0, len(rules)
        while index < count:
            run = runs[index]
            if run is not None:
                if lowered is None:
                    lowered = key.lower()
                for candidate in run.candidates(key, lowered):
                    value = self._match_value(rules[candidate], key)
                    if value is not None:
                        return value
                index = run.end
                continue
            rule = rules[index]
            index += 1
            kind = rule.kind
            if kind == MATCH:
                value = self._match_value(rule, key)
                if value is not None:
                    return value
            elif kind == IF and not self._holds(rule.matcher, rule.positive, key, rule.lineno):
                if rule.endif < 0:
                    return None
                index = rule.endif + 1
        return None

    def _match_value(self, rule: Rule, key: bytes) -> bytes | None:
        """The result of a match rule for this key, or None when the rule does not fire."""
        replacement = rule.replacement
        assert replacement is not None  # the parser gives every MATCH rule one
        spans = None
        if replacement.max_sub:
            spans = rule.matcher.search(key)
            if spans.__class__ is int:
                if spans != rx.REG_NOMATCH:
                    self._warn(rule.lineno, rule.matcher.error_text(spans))
                return None
        elif not self._holds(rule.matcher, rule.positive, key, rule.lineno):
            return None
        if rule.second is not None and not self._holds(
            rule.second, rule.second_positive, key, rule.lineno
        ):
            return None
        if replacement.literal is not None:
            return replacement.literal
        return replacement.expand(key, spans)

    def close(self) -> None:
        for rule in self._rules:
            for regex in (rule.matcher, rule.second):
                if regex is not None:
                    regex.free()
        self._rules = []


def _index_runs(rules: list[Rule]) -> list[RunIndex | None]:
    """Entry i is the index of the run of match rules that starts at rule i."""

    def build(start: int, end: int) -> RunIndex:
        filing = [
            (index, rules[index].prefix, rules[index].caseless, None, rules[index].suffix)
            for index in range(start, end)
        ]
        return RunIndex(end, filing)

    return index_runs(len(rules), lambda index: rules[index].kind == MATCH, build)


def _show(text: bytes) -> str:
    return text.decode("utf-8", "replace")
