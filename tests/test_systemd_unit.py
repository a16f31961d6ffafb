"""conf/pyproxymap.service: a valid Type=notify unit (checked by systemd-analyze verify)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.locks import APT_WAIT_FOR_LOCK, PACKAGE_INSTALL_LOCK, exclusive

UNIT = Path(__file__).resolve().parent.parent / "conf" / "pyproxymap.service"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None and os.geteuid() == 0:
        with exclusive(PACKAGE_INSTALL_LOCK):  # one apt-get at a time (parallel workers)
            if shutil.which("systemd-analyze") is None:
                subprocess.run(
                    ["apt-get", *APT_WAIT_FOR_LOCK, "install", "-y", "-q", "systemd"],
                    check=False,
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                    capture_output=True,
                )
        found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    return found


def test_unit_is_type_notify_with_reload_and_limits():
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "LimitNOFILE=65536",
    ):
        assert line in text.splitlines(), line


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    tool = systemd_analyze()
    venv_bin = Path(sys.executable).parent
    unit = tmp_path / "pyproxymap.service"
    unit.write_text(UNIT.read_text().replace("/opt/pyproxymap/bin", str(venv_bin)))
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in done.stderr.splitlines() if "pyproxymap.service" in line]
    assert done.returncode == 0 and not problems, done.stderr
