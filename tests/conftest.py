"""Suite-wide rules: a skipped test fails the run (a missing package is a broken install,
not a pass), and every test runs on CPU with DeepSpeed's CPU accelerator."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} skipped test(s) count as failures: " + ", ".join(_skipped), red=True
        )
