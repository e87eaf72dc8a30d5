"""The fault suite's run fixture, and the table it prints at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests.chaos.harness import CUSTOMERS, WITH_BILLING, Run
from tests.chaos.load import Load
from tests.chaos.report import REPORT, table
from tests.support import isolated, running_worker


def pytest_sessionstart(session: pytest.Session) -> None:
    REPORT.unlink(missing_ok=True)  # a table of this run only


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    text = table()
    if text:
        terminalreporter.section("fault suite")
        terminalreporter.write_line(text)
        terminalreporter.write_line(f"figures: {REPORT}")


@pytest.fixture
def run(connectors: AccordSettings, request: pytest.FixtureRequest) -> Iterator[Run]:
    """A worker on topics of its own, with the load's customers created and linked."""
    settings = isolated(connectors)
    guarantee = getattr(request, "param", "at_least_once")  # Faust's processing guarantee
    worker = settings.worker.model_copy(update={"processing_guarantee": guarantee})
    settings = settings.model_copy(update={"worker": worker})
    load = Load(settings)
    with running_worker(settings) as worker:
        load.create(CUSTOMERS, WITH_BILLING)
        assert wait_until(load.link_support_rows, 180), "support rows were not created"
        yield Run(settings, load, [worker])
