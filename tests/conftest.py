"""Test-wide policy.

* Under CI=true a skipped test is a failed test (also in pytest-xdist workers: the
  report is changed where it is made, before it travels to the controller).
* Parallel runs (``make test`` = ``pytest -n auto --dist loadfile``): a module is one
  unit of work, so its module-scoped fixtures (private database servers, Postfix
  instances) start once. What test processes share (the package installer, the vector
  fakes' fixed ports) is taken under a file lock (tests/support/locks.py).
* ``@pytest.mark.serial``: a test that measures wall time or latency runs while no other
  test runs (the other worker waits between two of its tests), so that the other core
  being busy with our own tests cannot make its bound fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.locks import Turnstile

IN_CI = os.environ.get("CI") == "true"

# Set by the controller of a parallel run for its workers (they inherit its environment).
LOCK_DIR_ENV = "PYPROXYMAP_TEST_LOCK_DIR"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true (a skip is a failure here): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report):
    # A worker sends its reports as UTF-8; a test's captured log may hold a key or table
    # name that is not (surrogate escapes of raw bytes), which would kill the worker.
    outcome = yield
    data = outcome.get_result()
    if data is not None and _is_worker(config):
        outcome.force_result(_utf8_encodable(data))


def _utf8_encodable(value):
    """VALUE (nested dicts, lists, tuples, strings) with lone surrogates as \\udcNN."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {key: _utf8_encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_utf8_encodable(item) for item in value)
    return value


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A new directory right under /tmp, for trees that hold UNIX sockets (107 bytes at
    most): pytest's tmp_path is long, and longer in a parallel worker (.../popen-gw0/...)."""
    directory = Path(tempfile.mkdtemp(prefix="pmt-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _runs_workers(config: pytest.Config) -> bool:
    return not _is_worker(config) and bool(getattr(config.option, "numprocesses", None))


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts a background job with SIGINT ignored, and
    # an ignored signal stays ignored across exec: the workers, masters and commands
    # the tests start would then outlive the SIGINT that some tests send them (our
    # workers keep an ignored SIGINT on purpose, as a foreground master's children).
    # The tests start them as Postfix's master and a terminal would: SIGINT at its
    # default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _runs_workers(config):
        directory = tempfile.mkdtemp(prefix="pyproxymap-xdist-")
        config.stash[_lock_dir_key] = directory
        os.environ[LOCK_DIR_ENV] = directory


def pytest_unconfigure(config: pytest.Config) -> None:
    turnstile = config.stash.get(_turnstile_key, None)
    if turnstile is not None:
        turnstile.close()
    directory = config.stash.get(_lock_dir_key, None)
    if directory is not None:
        os.environ.pop(LOCK_DIR_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


_lock_dir_key = pytest.StashKey[str]()
_turnstile_key = pytest.StashKey[Turnstile]()


def _turnstile(config: pytest.Config) -> Turnstile | None:
    if not _is_worker(config) or not os.environ.get(LOCK_DIR_ENV):
        return None
    if _turnstile_key not in config.stash:
        config.stash[_turnstile_key] = Turnstile(os.environ[LOCK_DIR_ENV])
    return config.stash[_turnstile_key]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    # Setup to teardown, module fixtures included (they start in their first test's
    # setup and stop in their last test's teardown).
    turnstile = _turnstile(item.config)
    if turnstile is None:
        yield
        return
    with turnstile.hold(alone=item.get_closest_marker("serial") is not None):
        yield
