"""pcre_table(5): Perl-compatible regular expression tables (PCRE2, 8-bit, no UTF).

NAME
    pcre -- ``pcre:/file`` and ``pcre:{ {rule}, ... }`` lookup tables

DESCRIPTION
    Same file structure as regexp tables (``patternfile``; ``docs/TABLES.md``
    section 3.12): first match wins, ``!`` negation, IF/ENDIF, ``$n`` results. Default
    options are caseless and dotall; the flags ``i m s x A E U`` toggle CASELESS,
    MULTILINE, DOTALL, EXTENDED, ANCHORED, DOLLAR_ENDONLY and UNGREEDY; ``X`` is
    accepted and ignored with a warning. There is no second ``!/pattern/``.

    Binding choice: ctypes to the system ``libpcre2-8.so.0``, the very library the
    Debian Postfix pcre plugin links, so patterns compile and match exactly as there.
    The PyPI ``pcre2`` package passes raw option bits through and would work, but it
    bundles its own (newer) PCRE2 release, and per-call it was no faster than ctypes
    (measured 1.7 us vs 1.3 us per match call). Patterns are JIT-compiled; a JIT
    resource error (e.g. its stack limit) makes that one match run again in the
    interpreter, which is what Postfix uses.

    Non-UTF mode: ``.`` is one byte, caseless matching is ASCII only.
"""

from __future__ import annotations

import ctypes
import logging

from proxymap import flags as F
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
from proxymap.tables.ruleindex import RunIndex, pcre_literal_prefix, pcre_literal_suffix

log = logging.getLogger("proxymap")

PCRE2_CASELESS = 0x00000008
PCRE2_DOLLAR_ENDONLY = 0x00000010
PCRE2_DOTALL = 0x00000020
PCRE2_EXTENDED = 0x00000080
PCRE2_MULTILINE = 0x00000400
PCRE2_UNGREEDY = 0x00040000
PCRE2_ANCHORED = 0x80000000
PCRE2_NO_JIT = 0x00002000
PCRE2_JIT_COMPLETE = 0x00000001
PCRE2_NO_START_OPTIMIZE = 0x00010000
PCRE2_INFO_ALLOPTIONS = 0
PCRE2_INFO_CAPTURECOUNT = 4
PCRE2_INFO_FIRSTCODEUNIT = 5
PCRE2_INFO_FIRSTCODETYPE = 6
PCRE2_INFO_LASTCODEUNIT = 11
PCRE2_INFO_LASTCODETYPE = 12
PCRE2_INFO_MINLENGTH = 16
PCRE2_ERROR_NOMATCH = -1
PCRE2_CONFIG_NEWLINE = 5
PCRE2_NEWLINE_LF = 2
PCRE2_UNSET = ctypes.c_size_t(-1).value

_FLAG_BITS = {
    ord("i"): PCRE2_CASELESS,
    ord("m"): PCRE2_MULTILINE,
    ord("s"): PCRE2_DOTALL,
    ord("x"): PCRE2_EXTENDED,
    ord("A"): PCRE2_ANCHORED,
    ord("E"): PCRE2_DOLLAR_ENDONLY,
    ord("U"): PCRE2_UNGREEDY,
}


def _load_library() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libpcre2-8.so.0")
    except OSError as exc:
        raise ImportError(f"libpcre2-8.so.0: {exc}") from exc


_lib = _load_library()
_p, _size, _u32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32

_compile = _lib.pcre2_compile_8
_compile.argtypes = [
    ctypes.c_char_p,
    _size,
    _u32,
    ctypes.POINTER(ctypes.c_int),
    ctypes.POINTER(_size),
    _p,
]
_compile.restype = _p
_match = _lib.pcre2_match_8
_match.argtypes = [_p, ctypes.c_char_p, _size, _size, _u32, _p, _p]
_match.restype = ctypes.c_int
_match_data_create = _lib.pcre2_match_data_create_from_pattern_8
_match_data_create.argtypes = [_p, _p]
_match_data_create.restype = _p
_ovector_pointer = _lib.pcre2_get_ovector_pointer_8
_ovector_pointer.argtypes = [_p]
_ovector_pointer.restype = ctypes.POINTER(_size)
_pattern_info = _lib.pcre2_pattern_info_8
_pattern_info.argtypes = [_p, _u32, _p]
_pattern_info.restype = ctypes.c_int
_error_message = _lib.pcre2_get_error_message_8
_error_message.argtypes = [ctypes.c_int, ctypes.c_char_p, _size]
_error_message.restype = ctypes.c_int
_jit_compile = _lib.pcre2_jit_compile_8
_jit_compile.argtypes = [_p, _u32]
_jit_compile.restype = ctypes.c_int
# The per-rule hot path calls pcre2_match without argtypes, on arguments converted once
# (c_void_p / c_size_t objects): ctypes then skips its per-argument conversion, which
# halves the cost of a call (measured 0.74 us vs 1.42 us).
_fast_match = ctypes.CDLL("libpcre2-8.so.0").pcre2_match_8
_fast_match.restype = ctypes.c_int
_ZERO = ctypes.c_size_t(0)
_code_free = _lib.pcre2_code_free_8
_code_free.argtypes = [_p]
_code_free.restype = None
_match_data_free = _lib.pcre2_match_data_free_8
_match_data_free.argtypes = [_p]
_match_data_free.restype = None


def _default_newline() -> int:
    value = ctypes.c_uint32()
    if _lib.pcre2_config_8(PCRE2_CONFIG_NEWLINE, ctypes.byref(value)) < 0:
        return 0
    return value.value


# A literal suffix before $ is checked against the key's end or the end before a final
# LF (ruleindex); another newline convention would let $ match before other bytes.
_SUFFIX_INDEX = _default_newline() == PCRE2_NEWLINE_LF


def _info(code: int, what: int) -> int:
    value = ctypes.c_uint32()
    if _pattern_info(code, what, ctypes.byref(value)) != 0:
        return 0
    return value.value


def error_message(code: int) -> str:
    buffer = ctypes.create_string_buffer(256)
    length = _error_message(code, buffer, len(buffer))
    if length < 0:
        return f"unexpected pcre2 error code {code}"
    return buffer.value.decode("ascii", "replace")


class PcrePattern:
    """A compiled pattern with its own match data (offsets of the last match)."""

    __slots__ = (
        "code",
        "match_data",
        "ovector",
        "capture_count",
        "code_arg",
        "match_data_arg",
        "min_length",
        "anchored_first",
        "required",
        "prefix",
        "caseless",
        "suffix",
    )

    def __init__(self, pattern: bytes, options: int) -> None:
        self.code = self.match_data = None
        error = ctypes.c_int()
        offset = ctypes.c_size_t()
        pattern = pattern.split(b"\0", 1)[0]  # Postfix passes a C string
        code = _compile(
            pattern, len(pattern), options, ctypes.byref(error), ctypes.byref(offset), None
        )
        if not code:
            raise RuleError(
                f"error in regex at offset {offset.value}: {error_message(error.value)}"
            )
        self.code = code
        self.capture_count = _info(code, PCRE2_INFO_CAPTURECOUNT)
        self._learn_prefilter(code)
        self.prefix = self._learn_prefix(pattern, options, code)
        self.caseless = bool(options & PCRE2_CASELESS)
        self.suffix = pcre_literal_suffix(
            pattern, bool(options & PCRE2_MULTILINE), bool(options & PCRE2_EXTENDED)
        )
        if not _SUFFIX_INDEX or (
            self.required is not None and self.suffix[-1:].lower() not in (b"", self.required)
        ):
            self.suffix = b""  # odd newlines, or PCRE2 disagrees on the last literal
        _jit_compile(code, PCRE2_JIT_COMPLETE)  # failure is fine: the interpreter runs
        self.match_data = _match_data_create(code, None)
        if not self.match_data:
            self.free()
            raise MemoryError("pcre2_match_data_create_from_pattern")
        self.ovector = _ovector_pointer(self.match_data)
        self.code_arg = ctypes.c_void_p(code)
        self.match_data_arg = ctypes.c_void_p(self.match_data)

    def _learn_prefilter(self, code: int) -> None:
        """Necessary conditions PCRE2 itself checks before matching, made cheap to test.

        A subject shorter than the minimum length, without the required last literal
        byte, or (anchored pattern) not starting with the known first byte cannot
        match; PCRE2 would say "no match" too. Bytes are compared after ASCII
        lowercasing on both sides, which is right whether the unit is caseless or not.
        Patterns that switch the start-up optimizations off get no prefilter.
        """
        self.min_length = 0
        self.anchored_first = self.required = None
        options = _info(code, PCRE2_INFO_ALLOPTIONS)
        if options & PCRE2_NO_START_OPTIMIZE:
            return
        self.min_length = _info(code, PCRE2_INFO_MINLENGTH)
        if _info(code, PCRE2_INFO_LASTCODETYPE) == 1:
            self.required = bytes([_info(code, PCRE2_INFO_LASTCODEUNIT)]).lower()
        if options & PCRE2_ANCHORED and _info(code, PCRE2_INFO_FIRSTCODETYPE) == 1:
            self.anchored_first = bytes([_info(code, PCRE2_INFO_FIRSTCODEUNIT)]).lower()

    def _learn_prefix(self, pattern: bytes, options: int, code: int) -> bytes:
        """Literal text every match starts with (``ruleindex``), checked against PCRE2.

        PCRE2 must agree that the pattern is anchored, and on its first byte when it
        knows one; otherwise (which our parser should never cause) no prefix is used.
        """
        prefix = pcre_literal_prefix(
            pattern,
            bool(options & PCRE2_ANCHORED),
            bool(options & PCRE2_MULTILINE),
            bool(options & PCRE2_EXTENDED),
        )
        if not prefix or not _info(code, PCRE2_INFO_ALLOPTIONS) & PCRE2_ANCHORED:
            return b""
        if _info(code, PCRE2_INFO_FIRSTCODETYPE) == 1:
            first = bytes([_info(code, PCRE2_INFO_FIRSTCODEUNIT)])
            if first.lower() != prefix[:1].lower():
                return b""
        return prefix

    def __getitem__(self, group: int) -> tuple[int, int]:
        """(start, end) of a group of the last match; (-1, -1) when unset."""
        start, end = self.ovector[2 * group], self.ovector[2 * group + 1]
        if start == PCRE2_UNSET:
            return -1, -1
        return start, end

    def free(self) -> None:
        if self.match_data:
            _match_data_free(self.match_data)
            self.match_data = None
        if self.code:
            _code_free(self.code)
            self.code = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone
            pass


def _options(flag_letters: bytes, warn_line) -> int:
    options = PCRE2_CASELESS | PCRE2_DOTALL
    for letter in flag_letters:
        if letter == ord("X"):
            warn_line(f'ignoring obsolete regexp option "{chr(letter)}"')
            continue
        bit = _FLAG_BITS.get(letter)
        if bit is None:
            raise RuleError(f'unknown regexp option "{chr(letter)}": skipping this rule')
        options ^= bit
    return options


class PcreTable(SyncTable):
    dict_type = "pcre"

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None):
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN, ctx)
        require_read_only(self.dict_type, name, open_mode)
        self._no_regsub = bool(flags & F.NO_REGSUB)
        source = rule_source(self.dict_type, name)
        rules = RuleList(self.dict_type, name)
        for lineno, line in rule_lines(source, name):
            try:
                rules.add(self._parse_rule(line, lineno, rules.nesting))
            except RuleError as exc:
                warn(self.dict_type, name, lineno, str(exc))
        self._rules = rules.finish()
        # The lookup loop reads flat tuples: attribute look-ups cost more than the checks.
        self._steps = [self._step(rule) for rule in self._rules]
        self._runs = self._index_runs(self._steps, self._rules)

    @staticmethod
    def _index_runs(steps: list[tuple], rules: list[Rule]) -> list[RunIndex | None]:
        """Index long runs of consecutive match rules (``ruleindex.RunIndex``).

        Large tables (header_checks, address maps) are mostly such runs. A rule is
        filed by its literal prefix or suffix or by the byte PCRE2 says it requires;
        negated rules and rules with none of these are always tried. Entry i is the index of the run
        that starts at rule i.
        """

        def build(start: int, end: int) -> RunIndex:
            filing = []
            for index in range(start, end):
                compiled = rules[index].matcher
                if rules[index].positive:
                    byte = None if compiled.required is None else compiled.required[0]
                    filing.append(
                        (index, compiled.prefix, compiled.caseless, byte, compiled.suffix)
                    )
                else:
                    filing.append((index, b"", False, None, b""))
            return RunIndex(end, filing)

        return index_runs(len(steps), lambda index: steps[index][0] == MATCH, build)

    @staticmethod
    def _step(rule: Rule) -> tuple:
        compiled = rule.matcher
        if compiled is None:  # ENDIF
            return (rule.kind, rule.positive, None, None, 0, None, None, rule)
        return (
            rule.kind,
            rule.positive,
            compiled.code_arg,
            compiled.match_data_arg,
            compiled.min_length,
            compiled.required,
            compiled.anchored_first,
            rule,
        )

    # --- loading ------------------------------------------------------------------------
    def _parse_rule(self, line: bytes, lineno: int, nesting: int) -> Rule:
        def note(message: str) -> None:
            warn(self.dict_type, self.name, lineno, message)

        if not line[:1].isalnum():
            positive, pattern, letters, pos = take_pattern(line, 0, regexp_syntax=False)
            options = _options(letters, note)
            text = line[skip_space(line, pos) :]
            if not text:
                note("no replacement text: using empty string")
            try:
                replacement = parse_replacement(text)
            except RuleError as exc:
                note(str(exc))
                raise RuleError("bad replacement syntax: skipping this rule") from None
            max_sub = replacement.max_sub
            if max_sub and not positive:
                raise RuleError(
                    "$number found in negative match replacement text: skipping this rule"
                )
            if max_sub and self._no_regsub:
                raise RuleError(
                    "regular expression substitution is not allowed: skipping this rule"
                )
            compiled = PcrePattern(pattern, options)
            if max_sub > compiled.capture_count:
                compiled.free()
                raise RuleError(f'out of range replacement index "{max_sub}": skipping this rule')
            rule = Rule(MATCH, lineno, positive, compiled)
            rule.replacement = replacement
            return rule
        if keyword_at(line, b"IF"):
            positive, pattern, letters, pos = take_pattern(
                line, skip_space(line, 2), regexp_syntax=False
            )
            options = _options(letters, note)
            extra = line[skip_space(line, pos) :]
            if extra:
                note(f'ignoring extra text after IF statement: "{_show(extra)}"')
                note("do not prepend whitespace to statements between IF and ENDIF")
            return Rule(IF, lineno, positive, PcrePattern(pattern, options))
        if keyword_at(line, b"ENDIF"):
            if nesting == 0:
                raise RuleError("ignoring ENDIF without matching IF")
            if line[skip_space(line, 5) :]:
                note("ignoring extra text after ENDIF")
            return Rule(ENDIF, lineno)
        raise RuleError("ignoring unrecognized request")

    # --- lookup -------------------------------------------------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        key = self.fold(key)
        if 0 in key:  # the byte value: faster than `b"\0" in key`
            key = key.split(b"\0", 1)[0]
        klen = len(key)
        length = ctypes.c_size_t(klen)
        lowered = key.lower()
        match = _fast_match
        steps = self._steps
        runs = self._runs
        index, count = 0, len(steps)
        while index < count:
            run = runs[index]
            if run is not None:
                for candidate in run.candidates(key, lowered):
                    value = self._try(steps[candidate], key, lowered, length)
                    if value is not None:
                        return value
                index = run.end
                continue
            kind, positive, code, data, min_length, required, first, rule = steps[index]
            index += 1
            if kind == ENDIF:
                continue
            # What any match needs (length, a required byte, the first byte of an anchored
            # pattern) rules most rules of a large table out before the library runs.
            # Inline here and in _try, on purpose: this runs once per rule, and a shared
            # helper costs a call per rule (+20% on a small table's lookup, measured).
            if (
                klen < min_length
                or (required is not None and required not in lowered)
                or (first is not None and lowered[:1] != first)
            ):
                status = PCRE2_ERROR_NOMATCH
            else:
                status = match(code, key, length, _ZERO, 0, data, None)
                if status < PCRE2_ERROR_NOMATCH:
                    status = self._rematch(rule.matcher, key, status, rule.lineno)
            holds = status > 0 if positive else status == PCRE2_ERROR_NOMATCH
            if kind == MATCH:
                if not holds:
                    continue
                replacement = rule.replacement
                if replacement.literal is not None:
                    return replacement.literal
                return replacement.expand(key, rule.matcher)
            if not holds:  # IF
                if rule.endif < 0:
                    return None
                index = rule.endif + 1
        return None

    def _try(self, step: tuple, key: bytes, lowered: bytes, length) -> bytes | None:
        """One match rule of an indexed run: its result, or None when it does not fire."""
        _, positive, code, data, min_length, required, first, rule = step
        if (  # the check of ``lookup``'s loop, inline for the same reason
            len(key) < min_length
            or (required is not None and required not in lowered)
            or (first is not None and lowered[:1] != first)
        ):
            status = PCRE2_ERROR_NOMATCH
        else:
            status = _fast_match(code, key, length, _ZERO, 0, data, None)
            if status < PCRE2_ERROR_NOMATCH:
                status = self._rematch(rule.matcher, key, status, rule.lineno)
        if not (status > 0 if positive else status == PCRE2_ERROR_NOMATCH):
            return None
        replacement = rule.replacement
        if replacement.literal is not None:
            return replacement.literal
        return replacement.expand(key, rule.matcher)

    def _rematch(self, compiled: PcrePattern, key: bytes, status: int, lineno: int) -> int:
        """A JIT failure (resource limit): run the interpreter, as Postfix does."""
        status = _match(compiled.code, key, len(key), 0, PCRE2_NO_JIT, compiled.match_data, None)
        if status < PCRE2_ERROR_NOMATCH:
            warn(self.dict_type, self.name, lineno, error_message(status))
            return -2
        return status

    def close(self) -> None:
        for rule in self._rules:
            if rule.matcher is not None:
                rule.matcher.free()
        self._rules = []
        self._steps = []
        self._runs = []


def _show(text: bytes) -> str:
    return text.decode("utf-8", "replace")
