"""Property-based differential tests: generated regexp, pcre and cidr tables vs real postmap.

Hypothesis writes whole table files from a small grammar (patterns with groups,
alternation, classes, quantifiers, anchors; flags, including unknown ones; ``!``
negation; the two-pattern regexp form; IF/ENDIF nesting, unclosed IFs, stray
ENDIFs; ``$n``/``${n}``/``$(n)``/``$$`` results, with the malformed forms that make
Postfix skip a rule; for cidr, canonical, non-canonical, bracketed and broken
networks of both families) and a batch of keys. The real ``postmap -q - TYPE:FILE``
answers the whole batch in one run; every answer of ours must be identical.

Each type runs at least MIN_CASES (file, key) cases.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxymap import flags as F
from proxymap.tables.cidr import CidrTable
from proxymap.tables.pcre import PcreTable
from proxymap.tables.regexp import RegexpTable
from tests.support.postfix import ensure_postfix, postmap_path

MIN_CASES = 2000
EXAMPLES = 300
KEYS_PER_FILE = (40, 50)
OPEN_FLAGS = 524353 | F.FOLD_FIX  # postmap -q: utf8_request | lock | warn_dup | fold_fix
REQUEST_FLAGS = 524353

SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module", autouse=True)
def real_postfix():
    ensure_postfix()


def postmap_answers(table_type: str, path: str, keys: list[str]) -> dict[str, str | None]:
    """Ask the real postmap for every key at once (one key per stdin line)."""
    done = subprocess.run(
        [postmap_path(), "-q", "-", f"{table_type}:{path}"],
        input="\n".join(keys).encode() + b"\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"fatal" not in done.stderr, done.stderr.decode(errors="replace")
    lines = done.stdout.decode("utf-8", "surrogateescape").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    answers: dict[str, str | None] = {}
    position = 0
    for key in keys:
        if position < len(lines) and lines[position].startswith(key + "\t"):
            answers[key] = lines[position][len(key) + 1 :]
            position += 1
        else:
            answers[key] = None
    assert position == len(lines), f"unparsed postmap output: {lines[position:]}"
    return answers


def our_answers(cls, path: str, keys: list[str]) -> dict[str, str | None]:
    table = cls(path, os.O_RDONLY, OPEN_FLAGS)
    table.flags = REQUEST_FLAGS | F.PATTERN
    answers = {}
    for key in keys:
        value = table.lookup(key.encode())
        answers[key] = None if value is None else value.decode("utf-8", "surrogateescape")
    table.close()
    return answers


def differential(tmp_path, cls, table_type: str, lines: list[str], keys: list[str]) -> int:
    path = tmp_path / f"generated.{table_type}"
    path.write_text("\n".join(lines) + "\n")
    expected = postmap_answers(table_type, str(path), keys)
    actual = our_answers(cls, str(path), keys)
    differences = {k: (expected[k], actual[k]) for k in keys if expected[k] != actual[k]}
    assert not differences, f"table:\n{path.read_text()}\n(postmap, ours): {differences}"
    return len(keys)


# --- regular expression grammar ------------------------------------------------------------

LITERALS = st.sampled_from(list("abAB1-@x") + ["\\.", "\\-", "\\/", "/"])
CLASSES = st.sampled_from(
    [".", "[ab]", "[^a]", "[a-c]", "[[:alpha:]]", "[[:digit:]]", "[[:upper:]]"]
)
QUANTIFIERS = st.sampled_from(["", "", "", "*", "+", "?", "{1,2}", "{2}"])
PCRE_EXTRAS = st.sampled_from(
    [
        "\\d",
        "\\w",
        "(?:ab)",
        "(?=a)",
        "(?!b)",
        "x*?",
        "a+?",
        "\\b",
        "(?i)a",
        "(?-i)B",
        "(?s).",
        "\\A",
        "\\Z",
        "\\z",
        "(?<n>a|b)",
        "(?:a(*ACCEPT)b)",
        "(*NO_START_OPT)a",
    ]
)
REGEXP_EXTRAS = st.sampled_from(
    ["\\d", "\\(a\\)", "[[:space:]]", "\\1", "a{0,1}", "\\<a", "\\w", "[]a]", "(|a)"]
)


def regex_body(extras: st.SearchStrategy[str] | None):
    base = st.one_of(LITERALS, CLASSES) if extras is None else st.one_of(LITERALS, CLASSES, extras)

    def extend(inner):
        group = st.builds(
            lambda a, b, alt: "(" + a + ("|" + b if alt else "") + ")", inner, inner, st.booleans()
        )
        return st.one_of(base, group)

    atom = st.recursive(base, extend, max_leaves=4)
    piece = st.builds(lambda a, q: a + q, atom, QUANTIFIERS)
    return st.builds(
        lambda anchor, pieces, end: anchor + "".join(pieces) + end,
        st.sampled_from(["", "^", "^"]),
        st.lists(piece, min_size=1, max_size=3),
        st.sampled_from(["", "", "$"]),
    )


GOOD_PIECES = st.sampled_from(
    [
        "x",
        "y=",
        ",",
        "+",
        "-",
        " ",
        "$1",
        "$1",
        "$2",
        "$3",
        "${1}",
        "$(2)",
        "${1}0",
        "$$",
        "$$1",
        "$10",
        "z",
        "[$1]",
        "$2$1",
    ]
)
BAD_PIECES = st.sampled_from(["$0", "$1x", "${", "$-", "$(1", "$", "$9"])
REPLACEMENT_PIECES = st.one_of(*[GOOD_PIECES] * 9, BAD_PIECES)
REPLACEMENT = st.builds(
    lambda parts: "".join(parts).strip(), st.lists(REPLACEMENT_PIECES, min_size=1, max_size=4)
)
NEGATION = st.sampled_from(["", "", "", "!", "! ", "!!"])


def grouped(body):
    """Patterns with several groups, most of which match often."""
    return st.one_of(
        body,
        body,
        st.builds(lambda a, b: f"^({a})(.*)$", body, body),
        st.builds(lambda a: f"({a}|.)(.)?", body),
        st.just("^(.)(.*)$"),
    )


def pattern_text(body, flag_letters: str):
    body = grouped(body)
    flags = st.text(alphabet=flag_letters, max_size=2)
    delimiters = st.sampled_from(["/", "/", "/", "%", "#"])
    return st.builds(lambda neg, d, b, f: f"{neg}{d}{b}{d}{f}", NEGATION, delimiters, body, flags)


def rule_file(rule_line, condition):
    """Lines with nested IF/ENDIF blocks, occasionally unbalanced, plus junk lines."""
    junk = st.sampled_from(
        [
            "bogus line",
            "/unclosed",
            "endif",
            "# comment",
            "if",
            "IF /a/ extra",
            "ENDIF extra",
            "EndIf",
            "/ab\\",
            " continued x",
            "!",
            "/a/\r",
            "  # indented comment",
            "ifx /a/ y",
        ]
    )

    def block(inner):
        return st.builds(
            lambda c, body, close: [f"if {c}", *body] + (["endif"] if close else []),
            condition,
            inner,
            st.sampled_from([True, True, True, False]),
        )

    single = st.one_of(rule_line.map(lambda line: [line]), junk.map(lambda line: [line]))
    nested = st.recursive(
        st.lists(single, min_size=1, max_size=3).map(_flatten),
        lambda inner: st.lists(st.one_of(single, block(inner)), min_size=1, max_size=4).map(
            _flatten
        ),
        max_leaves=8,
    )
    return st.lists(st.one_of(single, nested), min_size=1, max_size=8).map(_flatten)


def _flatten(items) -> list[str]:
    out: list[str] = []
    for item in items:
        out.extend(item if isinstance(item, list) else [item])
    return out


KEYS = st.lists(
    st.text(alphabet="abAB1-@x.z ", min_size=1, max_size=7).map(str.strip).filter(bool),
    min_size=KEYS_PER_FILE[0],
    max_size=KEYS_PER_FILE[1],
    unique=True,
)


def regexp_rules():
    body = regex_body(REGEXP_EXTRAS)
    first = pattern_text(body, "imxq")
    second = st.one_of(st.just(""), st.just(""), pattern_text(body, "imx").map(lambda p: "!" + p))
    line = st.builds(
        lambda a, b, sep, r: f"{a}{b}{sep}{r}",
        first,
        second,
        st.sampled_from(["\t", " ", "  "]),
        REPLACEMENT,
    )
    return rule_file(line, pattern_text(body, "imx"))


def pcre_rule_line():
    first = pattern_text(regex_body(PCRE_EXTRAS), "imsxAEUXq")
    return st.builds(
        lambda a, sep, r: f"{a}{sep}{r}", first, st.sampled_from(["\t", " "]), REPLACEMENT
    )


def pcre_rules():
    return rule_file(pcre_rule_line(), pattern_text(regex_body(PCRE_EXTRAS), "imsxAEU"))


def test_regexp_tables_match_postmap(tmp_path):
    cases = []

    @SETTINGS
    @given(lines=regexp_rules(), keys=KEYS)
    def check(lines, keys):
        cases.append(differential(tmp_path, RegexpTable, "regexp", lines, keys))

    check()
    assert sum(cases) >= MIN_CASES


def test_pcre_tables_match_postmap(tmp_path):
    cases = []

    @SETTINGS
    @given(lines=pcre_rules(), keys=KEYS)
    def check(lines, keys):
        cases.append(differential(tmp_path, PcreTable, "pcre", lines, keys))

    check()
    assert sum(cases) >= MIN_CASES


def test_pcre_long_rule_runs_match_postmap(tmp_path):
    """Long runs of match rules: the pcre table indexes them by required byte."""
    cases = []

    body = st.one_of(
        regex_body(PCRE_EXTRAS),
        st.builds(
            lambda a, b, c: a + b + c,
            st.sampled_from(["", "^", "^"]),
            st.text(alphabet="abAB1x@", min_size=1, max_size=3),
            st.sampled_from(["", ".*", "$", "(.)", "[ab]+"]),
        ),
    )
    literal_pattern = st.builds(
        lambda neg, body, flags: f"{neg}/{body}/{flags}",
        NEGATION,
        body,
        st.text(alphabet="imsxAEU", max_size=1),
    )
    line = st.builds(
        lambda p, r: f"{p} {r}",
        literal_pattern,
        st.sampled_from(["one", "two", "x y", "$$", "=", "z"]),
    )

    @settings(SETTINGS, max_examples=100)
    @given(
        lines=st.lists(st.one_of(line, line, line, pcre_rule_line()), min_size=8, max_size=40),
        keys=KEYS,
    )
    def check(lines, keys):
        cases.append(differential(tmp_path, PcreTable, "pcre", lines, keys))

    check()
    assert sum(cases) >= MIN_CASES


# --- cidr grammar ---------------------------------------------------------------------

OCTET = st.sampled_from(["0", "0", "1", "128", "255"])
V4 = st.builds(lambda a, b, c: f"10.{a}.{b}.{c}", OCTET, OCTET, OCTET)
V6 = st.builds(lambda tail: f"2001:db8::{tail}", st.sampled_from(["", "1", "ff", "1:0", "a:b"]))
V4_KEYS = st.one_of(V4, V4, V4, st.sampled_from(["10.0.0.256", "010.0.0.1", "10.0.0", "1.2.3.4"]))
V6_KEYS = st.one_of(
    V6,
    st.sampled_from(
        ["::ffff:10.0.0.1", "::1", "2001:DB8::1", "2001:db8:0:0:0:0:0:1", "fe80::1%eth0"]
    ),
)
GOOD_LENGTHS = st.sampled_from(
    ["", "/0", "/1", "/8", "/16", "/17", "/24", "/31", "/32", "/64", "/120", "/128"]
)
BAD_LENGTHS = st.sampled_from(["/33", "/129", "/", "/x", "/08", "/-1"])


def network():
    length = st.one_of(*[GOOD_LENGTHS] * 6, BAD_LENGTHS)

    def shape(address, suffix, bracket):
        if bracket == 1:
            return f"[{address}{suffix}]"
        if bracket == 2:
            return f"[{address}]{suffix}"
        if bracket == 3:
            return f"[{address}"
        return address + suffix

    address = st.one_of(V4, V4, V6, st.sampled_from(["::ffff:10.0.0.0", "nonsense", "::"]))
    return st.builds(shape, address, length, st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3]))


def cidr_rules():
    negation = st.sampled_from(["", "", "", "!", "! ", "!!"])
    value = st.sampled_from(["v1", "v2", "value  with  blanks", "x", "y", "z", "w", ""])
    line = st.builds(lambda n, net, v: f"{n}{net} {v}".rstrip(), negation, network(), value)
    condition = st.builds(lambda n, net: f"{n}{net}", negation, network())
    return rule_file(line, condition)


def test_cidr_tables_match_postmap(tmp_path):
    cases = []

    @settings(SETTINGS, max_examples=400)
    @given(
        lines=cidr_rules(),
        keys=st.lists(st.one_of(V4_KEYS, V6_KEYS), min_size=20, max_size=30, unique=True),
    )
    def check(lines, keys):
        cases.append(differential(tmp_path, CidrTable, "cidr", lines, keys))

    check()
    assert sum(cases) >= MIN_CASES


# --- byte semantics: UTF-8 keys (results without $n, so no value is cut inside a character)

UTF8_KEYS = st.lists(
    st.text(alphabet="aAé€ßxÉ1", min_size=1, max_size=5), min_size=25, max_size=30, unique=True
)
LITERAL_RESULT = st.sampled_from(["one", "two", "x y", "$$", "é"])
UTF8_BODY = st.lists(
    st.sampled_from(
        [".", "..", "...", "é", "É", "[^a]", "[[:alpha:]]", "\\w", "a", "(.)", "ß", ".*", "x?"]
    ),
    min_size=1,
    max_size=3,
).map(lambda parts: "^" + "".join(parts) + "$")


@pytest.mark.parametrize(
    ("cls", "table_type", "flag_letters"), [(RegexpTable, "regexp", "i"), (PcreTable, "pcre", "is")]
)
def test_utf8_keys_are_matched_byte_by_byte(tmp_path, cls, table_type, flag_letters):
    cases = []
    line = st.builds(
        lambda neg, body, flags, result: f"{neg}/{body}/{flags} {result}",
        NEGATION,
        UTF8_BODY,
        st.text(alphabet=flag_letters, max_size=1),
        LITERAL_RESULT,
    )

    @settings(SETTINGS, max_examples=40)
    @given(lines=st.lists(line, min_size=1, max_size=6), keys=UTF8_KEYS)
    def check(lines, keys):
        cases.append(differential(tmp_path, cls, table_type, lines, keys))

    check()
    assert sum(cases) >= 1000


# --- runs of anchored rules with literal prefixes/suffixes (the ruleindex fast path) ----

LITERAL_ATOMS = ["a", "b", "A", "B", "a", "b", "\\."]
TRICKY_ATOMS = [
    "a?",
    "b*",
    "A+",
    "a{2}",
    "b{0}",
    "a{0,1}",
    "\\.?",
    "(a|b)",
    "|",
    "|b",
    "|^b",
    ".",
    "[ab]",
    "[a|]",
    "[(]",
    "\\d",
    " ",
    "#",
]
PCRE_PREFIX_ATOMS = TRICKY_ATOMS + [
    "(?i)",
    "(?-i)a",
    "\\Qa|\\E",
    "\\x41",
    "(?#|)",
    "\\c(|",
    "\\Q",
    "(?x)",
    "(?m)",
    "\\x4",
    "\\\\",
    "\\$",
]
REGEXP_PREFIX_ATOMS = TRICKY_ATOMS + ["\\<", "\\'", "\\(", "\\|", "\\{", "\\\\", "\\$"]
PREFIX_KEYS = st.lists(
    st.text(alphabet="abAB.", min_size=1, max_size=4),
    min_size=KEYS_PER_FILE[0],
    max_size=KEYS_PER_FILE[1],
    unique=True,
)


def prefix_rule_lines(atoms: list[str], flag_letters: list[str]):
    """A run of mostly ``^literal...`` / ``...literal$`` rules (indexed by prefix or
    suffix), maybe partly inside IF."""
    atom = st.sampled_from(LITERAL_ATOMS * 3 + atoms)
    body = st.builds(
        lambda anchor, parts, end: anchor + "".join(parts) + end,
        st.sampled_from(["^", "^", ""]),
        st.lists(atom, min_size=1, max_size=4),
        st.sampled_from(["$", "$", "$", "", ".*", "(.)"]),
    )
    # Rarely negated: a negated rule fires for most keys and ends the lookup.
    negation = st.sampled_from([""] * 9 + ["!"])
    rule = st.builds(
        lambda neg, b, f, r: f"{neg}/{b}/{f} {r}",
        negation,
        body,
        st.sampled_from(flag_letters),
        st.sampled_from(["one", "two", "x y", "z"]),
    )

    def wrap(lines, condition, start, length):
        if condition:
            start %= len(lines)
            lines = [
                *lines[:start],
                condition,
                *lines[start : start + length],
                "ENDIF",
                *lines[start + length :],
            ]
        return lines

    return st.builds(
        wrap,
        st.lists(rule, min_size=8, max_size=30),
        st.sampled_from(["", "", "IF /^a/", "IF !/^b/", "IF /^/"]),
        st.integers(0, 30),
        st.integers(4, 12),
    )


@pytest.mark.parametrize(
    ("cls", "table_type", "atoms", "flag_letters"),
    [
        (PcreTable, "pcre", PCRE_PREFIX_ATOMS, ["", "", "", "i", "m", "x", "A", "E", "im", "iA"]),
        (RegexpTable, "regexp", REGEXP_PREFIX_ATOMS, ["", "", "", "i", "m", "x", "im"]),
    ],
)
def test_prefix_indexed_runs_match_postmap(tmp_path, cls, table_type, atoms, flag_letters):
    cases = []

    @settings(SETTINGS, max_examples=100)
    @given(lines=prefix_rule_lines(atoms, flag_letters), keys=PREFIX_KEYS)
    def check(lines, keys):
        cases.append(differential(tmp_path, cls, table_type, lines, keys))

    check()
    assert sum(cases) >= MIN_CASES


def cidr_run_lines():
    """Long runs of mostly plain rules (the per-length network index), maybe inside IF."""
    length = st.sampled_from(["", "/0", "/8", "/16", "/16", "/24", "/24", "/31", "/64", "/120"])
    negation = st.sampled_from([""] * 9 + ["!"])
    line = st.builds(
        lambda n, address, suffix, v: f"{n}{address}{suffix} {v}",
        negation,
        st.one_of(V4, V4, V4, V6),
        length,
        st.sampled_from(["v1", "v2", "v3", "x", "y", "z"]),
    )

    def wrap(lines, condition, start, size):
        if condition:
            start %= len(lines)
            lines = [
                *lines[:start],
                condition,
                *lines[start : start + size],
                "ENDIF",
                *lines[start + size :],
            ]
        return lines

    return st.builds(
        wrap,
        st.lists(line, min_size=8, max_size=40),
        st.sampled_from(["", "", "IF 10.0.0.0/8", "IF !10.0.0.0/16", "IF 2001:db8::/32"]),
        st.integers(0, 40),
        st.integers(4, 12),
    )


def test_cidr_indexed_runs_match_postmap(tmp_path):
    cases = []

    @settings(SETTINGS, max_examples=100)
    @given(
        lines=cidr_run_lines(),
        keys=st.lists(st.one_of(V4_KEYS, V4_KEYS, V6_KEYS), min_size=20, max_size=30, unique=True),
    )
    def check(lines, keys):
        cases.append(differential(tmp_path, CidrTable, "cidr", lines, keys))

    check()
    assert sum(cases) >= MIN_CASES
