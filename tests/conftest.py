"""Shared fixtures: the real local stack, started once per run (or reused if running)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from streams.settings import AccordSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs a modest number of examples; `make test-property` runs the
# dedicated 10,000-example profile (`--hypothesis-profile=thorough`).
hypothesis_settings.register_profile("accord", max_examples=200, deadline=None)
hypothesis_settings.register_profile(
    "thorough",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("hypothesis_profile", None):
        hypothesis_settings.load_profile("accord")


@pytest.fixture(scope="session", autouse=True)
def _run_from_repo_root() -> Iterator[None]:
    """Settings default to paths relative to the project (./.accord, ./connectors)."""
    previous = Path.cwd()
    os.chdir(ROOT)
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def settings() -> AccordSettings:
    return load_settings()


@pytest.fixture(scope="session")
def stack(settings: AccordSettings) -> AccordSettings:
    """Start whatever part of the stack is not running; reuse what is."""
    from streams.stack.manager import Stack

    statuses = Stack(settings, progress=lambda m: print(f"[stack] {m}")).up()
    unhealthy = [s.name for s in statuses if not s.healthy]
    assert not unhealthy, f"stack components unhealthy after up: {unhealthy}"
    return settings


@pytest.fixture(scope="session")
def connectors(stack: AccordSettings) -> AccordSettings:
    """The three Debezium source connectors, applied and running."""
    from streams.demo import apply_connectors

    apply_connectors(stack, wait_s=120)
    return stack
