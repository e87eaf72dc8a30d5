"""The demo job, as a newcomer runs it."""

import subprocess
import sys

import pytest

from streams.settings import AccordSettings

pytestmark = pytest.mark.e2e


def test_demo_shows_every_change_arriving_decoded(connectors: AccordSettings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "run", "--count", "20", "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 9 changes arrived as decoded Debezium envelopes" in result.stdout
    assert "not seen" not in result.stdout
