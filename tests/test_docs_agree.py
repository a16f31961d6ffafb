"""README.rst, docs/DROPIN.md and the Makefile say the same (issue 12, point 6).

The interpreter, the Debian packages and the pip extras of an installation, and where a
Debian 12 box without rsyslog keeps the worker's log, appear in three places; an
administrator who follows either document must end with the same installation.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.rst").read_text()
DROPIN = (REPO / "docs" / "DROPIN.md").read_text()
MAKEFILE = (REPO / "Makefile").read_text()


def make_deps() -> set[str]:
    [value] = re.findall(r"^SYSTEM_BUILD_DEPS := (.+)$", MAKEFILE, re.M)
    return set(value.split())


def apt_lines(text: str) -> list[set[str]]:
    return [set(line.split()) for line in re.findall(r"apt-get install ([^\n#]+)", text)]


def test_same_debian_packages_as_make_deps():
    for name, text in (("README.rst", README), ("docs/DROPIN.md", DROPIN)):
        lines = apt_lines(text)
        assert lines, name
        assert all(packages == make_deps() for packages in lines), (name, lines)


def test_same_interpreter_and_extras():
    for name, text in (("README.rst", README), ("docs/DROPIN.md", DROPIN)):
        assert "/usr/bin/python3 -m venv /opt/pyproxymap" in text, name
        assert (
            "/opt/pyproxymap/bin/pip install '/path/to/pyproxymap[tables,databases,fast]'" in text
        ), name
        assert "python3 -m venv" not in text.replace("/usr/bin/python3 -m venv", ""), name
    assert "PYTHON ?= $(shell test -x /usr/bin/python3" in MAKEFILE
    assert "[tables,databases,fast]" in MAKEFILE  # what install-systemd puts in PREFIX


def test_same_log_location_without_rsyslog():
    for name, text in (("README.rst", README), ("docs/DROPIN.md", DROPIN)):
        assert "journalctl -t postfix/pyproxymap" in text, name
        assert "/var/log/mail.log" in text and "maillog_file" in text, name


def test_same_switch_command():
    for name, text in (("README.rst", README), ("docs/DROPIN.md", DROPIN)):
        for action in ("enable", "disable"):
            assert re.search(rf"proxymap-master (-c \S+ )?dropin {action}", text), (name, action)
        assert "ln -s /opt/pyproxymap/bin/proxymap /usr/lib/postfix/sbin" not in text, name
