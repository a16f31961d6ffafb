"""``make install-systemd`` into a temporary DESTDIR, and the unit's commands as written
(issue 12, point 2).

There is no systemd to boot here, so the unit is checked twice over:
``systemd-analyze verify`` on the installed file, and its ``ExecStartPre=`` and
``ExecStart=`` lines run verbatim inside the installed tree, which a private mount
namespace makes the root directory, with the hardening the unit asks for rebuilt from
its own lines: everything read-only (``ProtectSystem=strict``) except its
``ReadWritePaths=``, a private /tmp. The master must start, its workers (unprivileged,
as the installed master.cf says) must answer through the queue directory, and it must
stop on SIGTERM (``KillSignal=``). Nothing is installed into the real /etc or /var.

The installed files name the paths of a real installation (/etc/pyproxymap,
/var/spool/pyproxymap, ...); only PREFIX points at this venv, which the namespace
shows at the same path, so that ``ExecStart=`` needs no rewriting either.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.postfix import _editable_sources as editable_sources
from tests.support.postfix import ensure_postfix, python_paths_of

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # not resolved: the venv's own bin/ path
QUERY = VENV / "bin" / "proxymap-query"
UNIT = "etc/systemd/system/pyproxymap.service"
# What the programs read from /etc besides their own configuration.
HOST_ETC = (
    "passwd",
    "group",
    "shadow",
    "gshadow",
    "nsswitch.conf",
    "ld.so.cache",
    "hosts",
    "resolv.conf",
    "host.conf",
    "localtime",
    "services",
    "protocols",
)


def unit_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            settings.setdefault(name, []).append(value)
    return settings


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    ensure_postfix()
    root = tmp_path_factory.mktemp("root")
    root.chmod(0o755)  # it becomes "/": the workers (postfix) must traverse it
    # The software is this venv: DESTDIR$(PREFIX) must hold it for the target to use it.
    staged_venv = root / str(VENV).lstrip("/")
    staged_venv.parent.mkdir(parents=True)
    staged_venv.symlink_to(VENV)
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "install-systemd", f"DESTDIR={root}", f"PREFIX={VENV}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    staged_venv.unlink()  # the namespace mounts the real one there
    return root


def test_layout(installed):
    root = installed
    for path in (
        "etc/pyproxymap/main.cf",
        "etc/pyproxymap/master.cf",
        "etc/pyproxymap/tables/aliases",
        UNIT,
    ):
        assert (root / path).is_file(), path
    for path in ("var/spool/pyproxymap", "var/lib/pyproxymap"):
        assert (root / path).is_dir(), path
    main_cf = (root / "etc/pyproxymap/main.cf").read_text()
    assert "queue_directory = /var/spool/pyproxymap\n" in main_cf
    assert "data_directory = /var/lib/pyproxymap\n" in main_cf
    assert f"daemon_directory = {VENV}/bin\n" in main_cf
    assert "pyproxymap_home" not in main_cf  # nothing left relative to /etc/pyproxymap
    master_cf = (root / "etc/pyproxymap/master.cf").read_text().split()
    # Workers drop to mail_owner (unpriv "-") on a mail server.
    assert master_cf[-16:-8] == ["proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"]
    settings = unit_settings(root / UNIT)
    assert settings["ExecStart"] == [f"{VENV}/bin/proxymap-master -c /etc/pyproxymap start"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ReadWritePaths"] == ["/var/spool/pyproxymap /var/lib/pyproxymap"]


def test_a_second_install_keeps_the_configuration(installed):
    main_cf = installed / "etc/pyproxymap/main.cf"
    edited = main_cf.read_text() + "# edited by the administrator\n"
    main_cf.write_text(edited)
    staged_venv = installed / str(VENV).lstrip("/")
    staged_venv.symlink_to(VENV)
    try:
        done = subprocess.run(
            [
                "make",
                "-s",
                "-C",
                str(REPO),
                "install-systemd",
                f"DESTDIR={installed}",
                f"PREFIX={VENV}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        staged_venv.unlink()
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout
    assert main_cf.read_text() == edited


def test_systemd_analyze_verify(installed):
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is part of the systemd package"
    done = subprocess.run(
        [tool, "verify", str(installed / UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in done.stderr.splitlines() if "pyproxymap.service" in line]
    assert done.returncode == 0 and not problems, done.stderr


def software_paths() -> set[str]:
    """What the installed PREFIX needs at its own path: the venv, the checkout, and the
    sources its editable install points at (they may be another checkout's)."""
    paths = {str(REPO), str(VENV)}
    purelib = python_paths_of(VENV / "bin" / "proxymap").get("purelib")
    if purelib:
        paths.update(editable_sources(Path(purelib)))
    # Nested paths are covered by their parent's mount.
    return {p for p in paths if not any(p.startswith(q + "/") for q in paths)}


def namespace_script(root: Path, settings: dict[str, list[str]]) -> str:
    """A shell script for `unshare -m`: root becomes / with the unit's sandbox, then the
    unit's ExecStartPre (a leading "-": its failure is ignored, as systemd does) and
    ExecStart, exec'ed so that the master keeps the script's pid."""
    writable = " ".join(" ".join(settings.get("ReadWritePaths", [])).split())
    pre = []
    for line in settings.get("ExecStartPre", []):
        ignore = line.startswith("-")
        command = line.lstrip("-@+!")
        pre.append(f"{command}" + (" || true" if ignore else " || exit 1"))
    [start] = settings["ExecStart"]
    environment = " ".join(settings.get("Environment", []))
    inner = "; ".join([*pre, f"exec env {environment} {start}"])
    mounts = sorted(software_paths())
    lines = [
        "set -e",
        f"R={shlex.quote(str(root))}",
        "mount --make-rprivate /",
        # The installed tree, read-only as a whole (ProtectSystem=strict)...
        'mount --bind "$R" "$R"',
        'for d in usr dev proc tmp; do mkdir -p "$R/$d"; done',
        'for l in bin sbin lib lib64; do [ -L "/$l" ] && ln -sfn "$(readlink /$l)" "$R/$l"; done',
        'mount --bind /usr "$R/usr"',
        'mount --rbind /dev "$R/dev"',
        'mount -t proc proc "$R/proc"',
        'mount -t tmpfs tmpfs "$R/tmp"',  # PrivateTmp=yes
        *[f'mkdir -p "$R{m}" && mount --bind {shlex.quote(m)} "$R{m}"' for m in mounts],
        'mkdir -p "$R/etc"',
        *[f'[ -e /etc/{name} ] && cp -p /etc/{name} "$R/etc/{name}" || true' for name in HOST_ETC],
        'mount -o remount,bind,ro "$R"',
        'mount -o remount,bind,ro "$R/usr"',
        *[f'mount -o remount,bind,ro "$R{m}"' for m in mounts],
        # ...but for ReadWritePaths.
        *[
            f'mount --bind "$R{p}" "$R{p}" && mount -o remount,bind,rw "$R{p}"'
            for p in writable.split()
        ],
        f'exec chroot "$R" /bin/sh -c {shlex.quote(inner)}',
    ]
    return "\n".join(lines) + "\n"


def test_the_unit_runs_as_written_with_its_hardening(installed):
    root = installed
    settings = unit_settings(root / UNIT)
    script = namespace_script(root, settings)
    log = root.parent / "unit.log"
    with open(log, "wb") as output:
        master = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    socket_path = root / "var/spool/pyproxymap/private/proxymap"
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists() and master.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert socket_path.exists(), log.read_text()
        # From outside: the socket the installed layout put in the spool directory.
        table = "proxy:texthash:/etc/pyproxymap/tables/aliases"
        answer = None
        while time.monotonic() < deadline:
            answer = subprocess.run(
                [str(QUERY), "-s", str(socket_path), "alice", table],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if answer.returncode != 75:  # 75: the master is still bringing workers up
                break
            time.sleep(0.2)
        assert answer is not None and answer.returncode == 0, answer.stderr + log.read_text()
        assert answer.stdout == "alice@example.com\n"
        # proxywrite updates its table in the data directory, writable by the unit.
        write = subprocess.run(
            [
                str(QUERY),
                "-s",
                str(root / "var/spool/pyproxymap/private/proxywrite"),
                "--update",
                "k",
                "v",
                "proxy:btree:/var/lib/pyproxymap/verify_cache",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert write.returncode == 0, write.stderr + log.read_text()
        text = log.read_text()
        # ExecStartPre's report went where systemd would put it: the journal (here: the log).
        assert "approved: texthash:/etc/pyproxymap/tables/aliases: ok" in text, text
        assert "configuration ok" in text
        assert "Read-only file system" not in text and "Traceback" not in text, text
        assert "pyproxymap/master: daemon started" in text
    finally:
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)  # KillSignal=SIGTERM, to the master only
            try:
                master.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
                master.wait()
    assert master.returncode == 0, log.read_text()
    assert "warning" not in log.read_text(), log.read_text()
