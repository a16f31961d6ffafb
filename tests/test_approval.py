"""The approved set (proxy_read_maps / proxy_write_maps), Postfix 3.11+ rules.

The worked example of docs/PROTOCOL.md section 2.11 (observed with Postfix 3.12, whose
export mode printed the list in section 6.9), edge cases, and a differential check
that takes the parameter values from the real postconf(1).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from proxymap.approval import approved_tables, tokens
from tests.support.postfix import ensure_postfix

# The 3.12 worked example, with the /srv/pmh files moved under DIR.
EXAMPLE_READ_MAPS = (
    "proxy:texthash:DIR/r312,{ proxy:texthash:DIR/braced312 opt=x } "
    "pipemap:{proxy:inline:{a=b}, proxy:texthash:DIR/pipe312} "
    "unionmap:{proxy:texthash:DIR/union312} proxy:proxy:texthash:DIR/dbl312 "
    "texthash:DIR/notproxied DIR/filelist312 [::1]:25 proxy:nocolon $mydestination {unbalanced"
)
EXAMPLE_APPROVED = [
    "texthash:DIR/r312",
    "texthash:DIR/braced312",
    "inline:{a=b}",
    "texthash:DIR/pipe312",
    "texthash:DIR/union312",
    "texthash:DIR/dbl312",
    "texthash:DIR/fl312",
    "texthash:DIR/fl312b",
    "nocolon",
    "texthash:DIR/mydest",
    "texthash:DIR/rc312",
]


@pytest.fixture
def example(tmp_path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "filelist312").write_text(
        "# a list of tables\nproxy:texthash:DIR/fl312 # comment\n"
        "  proxy:texthash:DIR/fl312b\n".replace("DIR", str(tmp_path))
    )
    params = {
        "proxy_read_maps": EXAMPLE_READ_MAPS.replace(
            "$mydestination", "proxy:texthash:DIR/mydest"
        ).replace("DIR", str(tmp_path)),
        "proxy_write_maps": "proxy:internal:w312 proxy:texthash:DIR/w312 btree:DIR/cache".replace(
            "DIR", str(tmp_path)
        ),
        "smtpd_restriction_classes": "myclass",
        "myclass": f"check_sender_access proxy:texthash:{tmp_path}/rc312",
    }
    return tmp_path, params


def expected(directory: Path, names: list[str]) -> list[str]:
    return [name.replace("DIR", str(directory)) for name in names]


def test_worked_example(example, caplog):
    directory, params = example
    with caplog.at_level(logging.WARNING, "proxymap"):
        approved = approved_tables(params, "proxymap")
    assert approved == expected(directory, EXAMPLE_APPROVED)
    assert [r.getMessage() for r in caplog.records] == [
        "bad syntax in proxy_read_maps content: missing '}' in \"{unbalanced\""
    ]


def test_export_all_adds_references_without_proxy(example):
    directory, params = example
    approved = approved_tables(params, "proxymap", export_all=True)
    assert sorted(approved) == sorted(
        expected(directory, [*EXAMPLE_APPROVED, "texthash:DIR/notproxied"])
    )


def test_writer_uses_proxy_write_maps_only(example):
    directory, params = example
    assert approved_tables(params, "proxywrite") == ["internal:w312", f"texthash:{directory}/w312"]


def test_restriction_classes_only_for_the_reader():
    params = {
        "proxy_read_maps": "",
        "proxy_write_maps": "",
        "smtpd_restriction_classes": "a, b undefined",
        "a": "proxy:hash:/a",
        "b": "{ proxy:hash:/b } proxy:hash:/c",
    }
    assert approved_tables(params, "proxymap") == ["hash:/a", "hash:/b", "hash:/c"]
    assert approved_tables(params, "proxywrite") == []


def test_file_indirection_is_recursive_with_loop_protection(tmp_path, caplog):
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text(f"proxy:hash:/one {two}\n")
    two.write_text(f"proxy:hash:/two\n{one}\n{tmp_path}/missing\n")
    with caplog.at_level(logging.WARNING, "proxymap"):
        approved = approved_tables({"proxy_read_maps": str(one)}, "proxymap")
    assert approved == ["hash:/one", "hash:/two"]
    text = caplog.text
    assert "file includes itself" in text
    assert f"open {tmp_path}/missing: No such file or directory" in text


def test_brace_errors_are_reported_with_their_origin(tmp_path, caplog):
    listing = tmp_path / "list"
    listing.write_text("{x}y proxy:hash:/ok\n")
    with caplog.at_level(logging.WARNING, "proxymap"):
        approved = approved_tables(
            {"proxy_read_maps": f"pipemap:{{proxy:a:b {listing}"}, "proxymap"
        )
    assert approved == []
    approved = approved_tables({"proxy_read_maps": str(listing)}, "proxymap")
    assert approved == ["hash:/ok"]
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "bad syntax in proxy_read_maps content: missing '}' in \"{proxy:a:b "
        f'{listing}"' in messages
    )
    assert f"bad syntax in {listing} content: syntax error after '}}' in \"{{x}}y\"" in messages


@pytest.mark.parametrize(
    ("value", "approved"),
    [
        ("proxy:pipemap:{proxy:a:b}", ["pipemap:{proxy:a:b}"]),
        ("pipemap:{unionmap:{proxy:a:b, proxy:c:d}, proxy:e:f}", ["a:b", "c:d", "e:f"]),
        ("pipemap:proxy:a:b unionmap", []),
        ("proxy:a:b,proxy:c:d\tproxy:e:f\r\nproxy:a:b", ["a:b", "c:d", "e:f"]),
        ("!proxy:a:b #proxy:c:d [proxy:e:f] proxy:ok:1", ["ok:1"]),
        ("{ {proxy:a:b} } { } {proxy:c:d,x}", ["c:d"]),
        ("proxy:inline:{a=1, b=2} proxy:static:{ x y }", ["inline:{a=1, b=2}", "static:{ x y }"]),
        ("}proxy:a:b proxy:c:d}", ["c:d}"]),
    ],
)
def test_token_rules(value, approved):
    assert approved_tables({"proxy_read_maps": value}, "proxymap") == approved


def test_tokenizer_keeps_groups_and_tolerates_stray_braces():
    assert list(tokens("a,{b c},d{e f}g } {h")) == ["a", "{b c}", "d{e f}g", "}", "{h"]


def postconf(directory: Path, name: str) -> str:
    return subprocess.run(
        ["postconf", "-c", str(directory), "-xh", name], capture_output=True, text=True, check=True
    ).stdout.rstrip("\n")


@pytest.fixture
def postconf_dir(tmp_path) -> Path:
    if subprocess.run(["sh", "-c", "command -v postconf"], capture_output=True).returncode:
        ensure_postfix()
    (tmp_path / "main.cf").write_text("")
    return tmp_path


def test_default_configuration_from_postconf(postconf_dir):
    params = {
        name: postconf(postconf_dir, name)
        for name in ("proxy_read_maps", "proxy_write_maps", "smtpd_restriction_classes")
    }
    assert "proxy:unix:passwd.byname" in params["proxy_read_maps"]
    assert approved_tables(params, "proxymap") == ["unix:passwd.byname"]
    assert approved_tables(params, "proxywrite") == []


def test_worked_example_expanded_by_postconf(postconf_dir, example):
    directory, params = example
    main_cf = postconf_dir / "main.cf"
    main_cf.write_text(
        "proxy_read_maps = " + EXAMPLE_READ_MAPS.replace("DIR", str(directory)) + "\n"
        f"mydestination = proxy:texthash:{directory}/mydest\n"
        "smtpd_restriction_classes = myclass\n"
        f"myclass = check_sender_access proxy:texthash:{directory}/rc312\n"
    )
    from_postconf = {
        name: postconf(postconf_dir, name)
        for name in ("proxy_read_maps", "smtpd_restriction_classes", "myclass")
    }
    assert approved_tables(from_postconf, "proxymap") == expected(directory, EXAMPLE_APPROVED)
