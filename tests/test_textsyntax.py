"""Shared text syntax: logical lines, postmap key/value split, brace names (docs/TABLES.md 2.6, 2.7)."""

from __future__ import annotations

import logging

import pytest

from proxymap.tables.textsyntax import (
    BraceError,
    braced_elements,
    logical_lines,
    split_braced,
    split_postmap_line,
    strip_braces,
)


def test_comments_blank_lines_and_continuations():
    data = b"# comment\nkey value\n  # indented comment\n\n\tmore\nnext x\n  tail"
    assert list(logical_lines(data)) == [(2, b"key value\tmore"), (6, b"next x  tail")]


def test_hash_inside_data_is_not_a_comment():
    assert list(logical_lines(b"hash#key value # not a comment\n")) == [
        (1, b"hash#key value # not a comment")
    ]


def test_continuation_at_top_is_dropped_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="proxymap"):
        assert list(logical_lines(b"  orphan\nk v", origin="/t")) == [(2, b"k v")]
    assert "/t, line 1: logical line must not start with whitespace" in caplog.text


def test_last_line_without_newline_and_crlf():
    assert list(logical_lines(b"a b\r\nc d")) == [(1, b"a b\r"), (2, b"c d")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"alice alice@example.com", (b"alice", b"alice@example.com")),
        (
            b'"john doe"@example.com quoted-localpart',
            (b'"john doe"@example.com', b"quoted-localpart"),
        ),
        (b"john\\ smith backslash-space-key", (b"john\\ smith", b"backslash-space-key")),
        (
            b"trailing   value with   internal   spaces  \r",
            (b"trailing", b"value with   internal   spaces"),
        ),
        (b"colon-key: looks-like-alias", (b"colon-key:", b"looks-like-alias")),
        (b"lonely-key", None),
        (b'"unbalanced value', None),
    ],
)
def test_split_postmap_line(line, expected):
    assert split_postmap_line(line) == expected


def test_split_braced_keeps_groups_and_ignores_quotes():
    assert split_braced('a, {b c, {d}} "x y"') == ["a", "{b c, {d}}", '"x', 'y"']


@pytest.mark.parametrize("bad", ["{a", "a}", "{a}}"])
def test_split_braced_rejects_unbalanced(bad):
    with pytest.raises(BraceError):
        split_braced(bad)


def test_strip_braces():
    assert strip_braces("{  a = 1 }") == "a = 1"
    assert strip_braces("{}") == ""
    for bad, message in [
        ("x{a}", "no '{' at start"),
        ("{a}x", "syntax error after '}'"),
        ("{a", "missing '}'"),
    ]:
        with pytest.raises(BraceError, match=message):
            strip_braces(bad)


def test_braced_elements():
    assert braced_elements("{ alice=A1, {k = v}, {n = {b} i} }") == [
        "alice=A1",
        "{k = v}",
        "{n = {b} i}",
    ]
