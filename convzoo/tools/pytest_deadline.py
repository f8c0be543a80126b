"""A pytest plugin for ``convzoo-gpu-check``'s tests step: a deadline, the kernel tests first, and a progress file.

Load it with ``-p convzoo.tools.pytest_deadline``; each option is off unless given (also under ``-n``, where the
workers read the same options):

- ``--convzoo-deadline EPOCH`` (seconds since the epoch, so every xdist worker agrees): no test starts after it;
  those left are reported as skipped with the reason :data:`NOT_RUN` (so a junit report lists them, and the run
  ends within one test's time of the deadline).
- ``--convzoo-kernel-tests-first``: run the tests in three tiers, collection order kept within each: the ``gpu``
  marker's, then the kernel-vs-reference tests (those taking the ``kernel_device`` fixture, the ``path`` fixture's
  ``triton`` case, or in a ``test_*_kernel.py`` / ``test_*_kernels.py`` file), then the rest.
- ``--convzoo-progress PATH``: one line per test outcome, appended as it is reported (``outcome<TAB>nodeid``;
  outcome ``passed``, ``failed``, ``error``, ``skipped`` or ``notrun``), after a ``collected<TAB>N`` line; what
  a step that was stopped before pytest could write its junit report still tells.
"""

from __future__ import annotations

import re
import time

import pytest

NOT_RUN = "not run: past the convzoo-gpu-check deadline"


def pytest_addoption(parser):
    group = parser.getgroup("convzoo-deadline", "convzoo-gpu-check's time budget")
    group.addoption("--convzoo-deadline", type=float, default=None, metavar="EPOCH",
                    help="start no test after this time (seconds since the epoch); the rest are skipped as not run")
    group.addoption("--convzoo-kernel-tests-first", action="store_true", default=False,
                    help="gpu-marked tests first, then the kernel-vs-reference tests, then the rest")
    group.addoption("--convzoo-progress", default=None, metavar="PATH",
                    help="append one 'outcome<TAB>nodeid' line per test to PATH as it is reported")


def tier(item) -> int:
    """0: needs a GPU (``gpu`` marker); 1: a kernel against its reference; 2: everything else."""
    if item.get_closest_marker("gpu") is not None:
        return 0
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "kernel_device" in getattr(item, "fixturenames", ()) or params.get("path") == "triton" \
            or re.fullmatch(r"test_\w+_kernels?\.py", item.path.name):
        return 1
    return 2


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if config.getoption("convzoo_kernel_tests_first"):
        items[:] = sorted(items, key=tier)  # stable: collection order within a tier


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = item.config.getoption("convzoo_deadline")
    if deadline is not None and time.time() >= deadline:
        pytest.skip(NOT_RUN)


class _Progress:
    """The ``--convzoo-progress`` file, written by the process that sees every report (not an xdist worker)."""

    def __init__(self, path: str):
        self.path, self.counted = path, False
        open(path, "w").close()

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def _collected(self, n: int) -> None:
        if not self.counted:  # xdist: every worker collects the same ids
            self.counted = True
            self._write(f"collected\t{n}")

    def pytest_collection_finish(self, session):
        self._collected(len(session.items))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        self._collected(len(ids))

    def pytest_runtest_logreport(self, report):
        outcome = _outcome(report)
        if outcome is not None:
            self._write(f"{outcome}\t{report.nodeid}")


def _outcome(report) -> str | None:
    if report.when == "call":
        return "skipped" if report.skipped else report.outcome
    if report.when == "setup" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "notrun" if NOT_RUN in reason else "skipped"
    if report.failed:  # setup or teardown
        return "error"
    return None


def pytest_configure(config):
    path = config.getoption("convzoo_progress")
    if path is not None and not hasattr(config, "workerinput"):  # an xdist worker's reports reach the controller
        config.pluginmanager.register(_Progress(path), "convzoo-progress")
