"""The demo job, as a newcomer runs it (`make demo` runs `accord demo run`)."""

import subprocess
import sys

import pytest

from streams.settings import AccordSettings

pytestmark = pytest.mark.e2e


def test_demo_shows_each_edit_applied_in_every_other_system(connectors: AccordSettings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "run", "--count", "30", "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "every system holds the golden records" in result.stdout
    assert "conflict: crm sets" in result.stdout
    assert "ms" in result.stdout and "p99" in result.stdout


def test_demo_trace_shows_every_change_arriving_decoded(connectors: AccordSettings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "trace", "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 9 changes arrived as decoded Debezium envelopes" in result.stdout
    assert "not seen" not in result.stdout
