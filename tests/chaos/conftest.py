"""The fault suite prints its figures at the end of the session."""

from __future__ import annotations

import pytest

from tests.chaos.report import REPORT, table


def pytest_sessionstart(session: pytest.Session) -> None:
    REPORT.unlink(missing_ok=True)  # a table of this run only


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    text = table()
    if text:
        terminalreporter.section("fault suite")
        terminalreporter.write_line(text)
        terminalreporter.write_line(f"figures: {REPORT}")
