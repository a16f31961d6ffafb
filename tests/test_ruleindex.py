"""The exact rule pre-filters of pattern tables: literal prefixes, run indexes, cidr buckets.

Unit checks of what ``ruleindex`` may and may not treat as a required prefix, then
whole tables built so that every index path matters (prefix buckets of several
lengths, case variants, rules the index must not skip: optional first atom,
alternation, multiline, extended, negated, inside IF blocks, mixed cidr families),
each compared with the real ``postmap -q`` on a batch of keys.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from proxymap import flags as F
from proxymap.tables.cidr import CidrTable
from proxymap.tables.pcre import PcreTable
from proxymap.tables.regexp import RegexpTable
from proxymap.tables.ruleindex import (
    RunIndex,
    ere_literal_prefix,
    ere_literal_suffix,
    pcre_literal_prefix,
    pcre_literal_suffix,
)
from tests.support.postfix import ensure_postfix, postmap_path

REQUEST_FLAGS = 524353
OPEN_FLAGS = REQUEST_FLAGS | F.FOLD_FIX


def pcre_prefix(pattern: bytes, *, anchored=False, multiline=False, extended=False) -> bytes:
    return pcre_literal_prefix(pattern, anchored, multiline, extended)


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        (rb"^user1@example\.com$", b"user1@example.com"),
        (rb"^abc", b"abc"),
        (rb"^ab?c", b"a"),  # b may be absent
        (rb"^ab*c", b"a"),
        (rb"^ab+c", b"a"),  # kept simple: a quantified atom ends the prefix
        (rb"^ab{2}c", b"a"),
        (rb"^a\.?b", b"a"),  # an escaped atom can be quantified too
        (rb"^a\-b\/c", b"a-b/c"),
        (rb"^Subject:.*x", b"Subject:"),
        (rb"^Subject: (a|b)", b"Subject: "),  # alternation inside a group is fine
        (rb"^a(?i)b", b"a"),
        (rb"^\d", b""),
        (rb"^\Qab\E", b""),
        (rb"^[ab]c", b""),
        (rb"^^a", b""),
        (rb"^?a", b""),
        (b"^a\0bc", b"a"),  # the library sees a C string
    ],
)
def test_pcre_prefix_of_anchored_patterns(pattern, prefix):
    assert pcre_prefix(pattern) == prefix


@pytest.mark.parametrize(
    "pattern",
    [
        rb"abc",  # not anchored
        rb"^abc|def",  # top-level alternation
        rb"^abc|^def",
        rb"^ab(c)|d",
        rb"^ab[|]c|d",  # cannot tell: classes can hide | and parentheses
        rb"^ab\Q(\E|d",
        rb"^ab\c(|d",  # \c( is one character, then a top-level |
        rb"^ab(*MARK:(|)d",
        rb"^ab(?#(|)d",
        rb"^ab)|(c",
    ],
)
def test_pcre_patterns_without_a_certain_prefix(pattern):
    assert pcre_prefix(pattern) == b""


def test_pcre_prefix_respects_options():
    assert pcre_prefix(rb"^abc", multiline=True) == b""
    assert pcre_prefix(rb"^abc", extended=True) == b""
    assert pcre_prefix(rb"abc", anchored=True) == b"abc"
    assert pcre_prefix(rb"abc|d", anchored=True) == b""


@pytest.mark.parametrize(
    ("pattern", "extended", "newline", "prefix"),
    [
        (rb"^user1@example\.com$", True, False, b"user1@example.com"),
        (rb"^ab?c", True, False, b"a"),
        (rb"^a\(b\)", True, False, b"a(b)"),
        (rb"^ab\<c", True, False, b"ab"),  # glibc word boundary
        (rb"^ab\'", True, False, b"ab"),  # glibc end of buffer
        (rb"^ab|c", True, False, b""),
        (rb"^ab[(]|c", True, False, b""),  # a class may hide a parenthesis
        (rb"^ab\(|c", True, False, b""),  # so may an escape
        (rb"^ab(c|d)", True, False, b"ab"),
        (rb"^abc", False, False, b""),  # basic syntax: not handled
        (rb"^abc", True, True, b""),  # ^ after every newline
        (rb"abc", True, False, b""),
    ],
)
def test_ere_prefix(pattern, extended, newline, prefix):
    assert ere_literal_prefix(pattern, extended, newline) == prefix


def test_run_index_keeps_file_order_and_unindexed_rules():
    rules = [
        (10, b"abc", True, None, b""),
        (11, b"", False, None, b""),  # always tried
        (12, b"ABx", False, None, b""),  # case-sensitive
        (13, b"abcdefgh", True, None, b""),
        (14, b"", False, ord("z"), b""),
        (15, b"", False, None, b".Com"),  # suffixes compare caseless
    ]
    run = RunIndex(16, rules)
    # Prefixes are filed by their first 1, 2, 4, 8 or 16 bytes: "abc" under "ab".
    assert run.candidates(b"ABCDEFGHz", b"abcdefghz") == [10, 11, 12, 13, 14]
    assert run.candidates(b"ABx", b"abx") == [10, 11, 12]
    assert run.candidates(b"abx", b"abx") == [10, 11]
    assert run.candidates(b"zz", b"zz") == [11, 14]
    assert run.candidates(b"x.COM", b"x.com") == [11, 15]
    assert run.candidates(b"x.COM\n", b"x.com\n") == [11, 15]  # pcre: $ before a final \n
    assert run.end == 16


def test_run_index_prefers_the_less_shared_filter():
    rules = [(i, b"Subject:", True, ord(str(i)), b"") for i in range(10)]
    rules += [(10 + i, b"Subject:", True, None, f"word{i}".encode()) for i in range(10)]
    run = RunIndex(20, rules)
    assert run.candidates(b"Subject: 7", b"subject: 7") == [7]
    assert run.candidates(b"Subject: 17", b"subject: 17") == [1, 7]
    assert run.candidates(b"Subject: 1 word3", b"subject: 1 word3") == [1, 3, 13]


@pytest.mark.parametrize(
    ("pattern", "suffix"),
    [
        (rb"\.example\.com$", b".example.com"),
        (rb"^(.*)@example\.com$", b"@example.com"),
        (rb"ab\\$", b"ab\\"),  # an escaped backslash, then the anchor
        (rb"abc\$", b""),  # an escaped dollar is no anchor
        (rb"a+b$", b"b"),
        (rb"ab*$", b""),
        (rb"ab{2}$", b""),
        (rb"(a|b)c$", b"c"),
        (rb"a|bc$", b""),
        (rb"\w\.com$", b".com"),
        (rb"\x41$", b""),  # read backwards, 41 would look literal
        (rb"\k<ab>c$", b""),
        (rb"\cb$", b""),
        (rb"\101$", b""),
        (rb"\Qab$", b""),  # the $ is quoted
        (rb"(?x)a b$", b""),  # blanks do not count in extended syntax
        (rb"(?m)ab$", b""),  # $ before any newline
        (rb"(?i:x)(?-m)ab$", b""),
        (rb"(?:x)(?=a)ab$", b"ab"),  # groups that set no option are fine
        (rb"(*CR)ab$", b""),  # another newline convention
        (rb"abc$)", b""),
    ],
)
def test_pcre_suffix(pattern, suffix):
    assert pcre_literal_suffix(pattern, False, False) == suffix


def test_pcre_suffix_respects_options():
    assert pcre_literal_suffix(rb"abc$", True, False) == b""
    assert pcre_literal_suffix(rb"abc$", False, True) == b""


@pytest.mark.parametrize(
    ("pattern", "extended", "newline", "suffix"),
    [
        (rb"\.example\.com$", True, False, b".example.com"),
        (rb"\x41$", True, False, b"41"),  # glibc: \x is a plain x
        (rb"ab\'$", True, False, b""),
        (rb"ab[(]|c$", True, False, b""),
        (rb"abc$", False, False, b""),
        (rb"abc$", True, True, b""),
    ],
)
def test_ere_suffix(pattern, extended, newline, suffix):
    assert ere_literal_suffix(pattern, extended, newline) == suffix


# --- whole tables against postmap -------------------------------------------------------


@pytest.fixture(scope="module")
def postmap():
    ensure_postfix()
    return postmap_path()


def compare_with_postmap(postmap, tmp_path, cls, table_type, lines, keys):
    path = tmp_path / f"t.{table_type}"
    path.write_text("\n".join(lines) + "\n")
    batch = [key for key in keys if "\n" not in key]
    done = subprocess.run(
        [postmap, "-q", "-", f"{table_type}:{path}"],
        input=("\n".join(batch) + "\n").encode(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    expected = {}
    for line in done.stdout.decode().splitlines():
        key, _, value = line.partition("\t")
        expected[key] = value
    for key in keys:
        if "\n" in key:  # one at a time: postmap -q KEY (exit 1 = not found)
            one = subprocess.run(
                [postmap, "-q", key, f"{table_type}:{path}"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert one.returncode in (0, 1), one.stderr
            if one.returncode == 0:
                expected[key] = one.stdout.decode().removesuffix("\n")
    table = cls(str(path), os.O_RDONLY, OPEN_FLAGS)
    table.flags = REQUEST_FLAGS | F.PATTERN
    actual = {}
    for key in keys:
        value = table.lookup(key.encode())
        if value is not None:
            actual[key] = value.decode()
    table.close()
    assert actual == expected
    return actual


PCRE_TRICKY = [
    r"/^user1@example\.com$/ plain1",
    r"/^User2@Example\.com$/i case-sensitive2",
    r"/^user3@example\.com$/m multiline3",
    r"/^user 4@example\.com$/x extended4",
    r"/^xuser5@example\.com$|^user5/ alternation5",
    r"/^u?user6@example\.com$/ optional6",
    r"/user7@example\.com$/A anchored7",
    r"!/^user8@example\.com$/ negated8-not-user8",
    r"/^user9@example\.com$/ plain9",
    r"IF /^user1/",
    r"/^user10@example\.com$/ inside-if10",
    r"/^user11@example\.com$/ inside-if11",
    r"/^user12@example\.com$/ inside-if12",
    r"/^user13@example\.com$/ inside-if13",
    r"ENDIF",
    r"/^user1/ late-user1",
    r"/\.example\.org$/ suffix-org",
    r"/\.example\.net$/E suffix-net-endonly",
    r"/(?i)\.Example\.EDU$/i suffix-edu-inline-caseless",
    r"/\.example\.gov$/m suffix-gov-multiline",
    r"/(?m)\.example\.info$/ suffix-info-inline-multiline",
    r"/^u/ u",
    r"/^/ anything",
]
KEYS = [
    "user1@example.com",
    "USER1@EXAMPLE.COM",
    "User2@Example.com",
    "user2@example.com",
    "a\nuser3@example.com",
    "user4@example.com",
    "user5",
    "user6@example.com",
    "uuser6@example.com",
    "user7@example.com",
    "user8@example.com",
    "user9@example.com",
    "user10@example.com",
    "user13@example.com",
    "user14@example.com",
    "x",
    "a.example.org",
    "a.EXAMPLE.ORG\n",
    "a.example.org\n\n",
    "a.example.net",
    "a.example.net\n",
    "a.example.edu",
    "a.example.gov\nx",
    "a.example.info\nx",
]


def test_pcre_index_skips_only_rules_that_cannot_match(postmap, tmp_path):
    # The table is negated from line 8 on for every key but user8: only the keys that
    # earlier rules take are answered by them.
    answers = compare_with_postmap(postmap, tmp_path, PcreTable, "pcre", PCRE_TRICKY, KEYS)
    assert answers["User2@Example.com"] == "case-sensitive2"
    assert answers["user5"] == "alternation5"
    assert answers["user7@example.com"] == "anchored7"


def test_pcre_index_without_negation(postmap, tmp_path):
    lines = [line for line in PCRE_TRICKY if not line.startswith("!")]
    answers = compare_with_postmap(postmap, tmp_path, PcreTable, "pcre", lines, KEYS)
    assert answers["USER1@EXAMPLE.COM"] == "plain1"
    assert answers["user2@example.com"] == "u"
    assert answers["user13@example.com"] == "inside-if13"
    assert answers["a\nuser3@example.com"] == "multiline3"
    assert answers["user4@example.com"] == "extended4"
    assert answers["uuser6@example.com"] == "optional6"
    assert answers["a.EXAMPLE.ORG\n"] == "suffix-org"
    assert answers["a.example.edu"] == "suffix-edu-inline-caseless"
    assert answers["a.example.gov\nx"] == "suffix-gov-multiline"
    assert answers["a.example.info\nx"] == "suffix-info-inline-multiline"


def test_regexp_index_skips_only_rules_that_cannot_match(postmap, tmp_path):
    lines = [
        line.replace("/A ", "/ ").replace("$/x", "$/")
        for line in PCRE_TRICKY
        if not line.startswith("!")
    ]
    lines.insert(3, r"/^user3@example\.com$/m!/^zz/ multiline3")
    lines.insert(4, r"/^zz[(]|^user4/ class-hides-paren4")
    answers = compare_with_postmap(postmap, tmp_path, RegexpTable, "regexp", lines, KEYS)
    assert answers["USER1@EXAMPLE.COM"] == "plain1"
    assert answers["user4@example.com"] == "class-hides-paren4"


def test_cidr_buckets_keep_first_match_across_families_and_blocks(postmap, tmp_path):
    lines = [f"10.{i // 256}.{i % 256}.0/24 net{i}" for i in range(40)]
    lines[5:5] = ["10.0.0.0/8 wide-early", "2001:db8::/32 v6-wide"]
    lines += (
        ["!10.0.0.0/16 not-10.0", "IF 192.168.0.0/16"]
        + [f"192.168.{i}.0/24 inner{i}" for i in range(8)]
        + ["ENDIF", "0.0.0.0/0 any-v4", "::/0 any-v6"]
    )
    keys = [
        "10.0.1.9",
        "10.0.7.1",
        "10.1.0.1",
        "192.168.3.3",
        "192.168.200.1",
        "8.8.8.8",
        "2001:db8::1",
        "2001:db9::1",
        "::ffff:10.0.1.9",
        "bogus",
    ]
    answers = compare_with_postmap(postmap, tmp_path, CidrTable, "cidr", lines, keys)
    assert answers["10.0.7.1"] == "wide-early"
    assert answers["192.168.3.3"] == "not-10.0"


# --- cost: the bench's 1000-rule tables must not be scanned rule by rule ----------------


def average_lookup_us(table, keys: list[bytes], rounds: int = 3) -> float:
    for key in keys:  # warm-up: glibc builds its DFA states lazily
        table.lookup(key)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for key in keys:
            table.lookup(key)
        best = min(best, (time.perf_counter() - started) / len(keys) * 1e6)
    return best


@pytest.mark.parametrize(
    ("cls", "line", "key"),
    [
        (PcreTable, "/^user{i}@example\\.com$/ rule{i}", "user{i}@example.com"),
        (RegexpTable, "/^user{i}@example\\.com$/ rule{i}", "user{i}@example.com"),
        (PcreTable, "/\\.domain{i}\\.com$/ rule{i}", "mx.domain{i}.com"),
        (RegexpTable, "/\\.domain{i}\\.com$/ rule{i}", "mx.domain{i}.com"),
        (CidrTable, "10.{hi}.{lo}.0/24 rule{i}", "10.{hi}.{lo}.9"),
    ],
)
@pytest.mark.serial
def test_thousand_rule_tables_are_indexed(tmp_path, cls, line, key):
    path = tmp_path / "rules"
    path.write_text("".join(line.format(i=i, hi=i // 256, lo=i % 256) + "\n" for i in range(1000)))
    table = cls(str(path), os.O_RDONLY, 0)
    picks = [(i * 37) % 1000 for i in range(200)]
    keys = [key.format(i=i, hi=i // 256, lo=i % 256).encode() for i in picks]
    assert [table.lookup(k) for k in keys] == [f"rule{i}".encode() for i in picks]
    assert table.lookup(b"nomatch@x") is None
    # A rule-by-rule scan costs 60-700 us here; the index about 1-8 us.
    assert average_lookup_us(table, keys + [b"nomatch@x"] * 20) < 50
