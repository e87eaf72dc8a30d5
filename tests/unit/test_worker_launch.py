"""Launchers of worker processes fail fast when a worker exits (streams.workers)."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from streams.errors import AccordError
from streams.settings import AccordSettings, StackSettings, WorkerSettings
from streams.workers import WorkerProcess, wait_all_ready


def _process(tmp_path: Path, instance: str, code: str) -> WorkerProcess:
    """A WorkerProcess whose child runs `code` instead of a worker (a real process)."""
    settings = AccordSettings(
        stack=StackSettings(state_dir=tmp_path),
        worker=WorkerSettings(app_id="unit-launch", instance=instance, web_port=0),
    )
    process = WorkerProcess(settings)
    process.spec = replace(process.spec, argv=[sys.executable, "-c", code])
    return process


def test_a_worker_that_exits_fails_its_start_at_once_with_its_log(tmp_path: Path) -> None:
    dying = _process(tmp_path, "1", "print('another worker (pid 42) already runs'); exit(1)")
    started = time.monotonic()
    with pytest.raises(AccordError, match="exited on start") as failed:
        dying.start(ready_timeout_s=120)
    assert time.monotonic() - started < 15
    assert "another worker (pid 42) already runs" in str(failed.value)


def test_waiting_for_several_fails_as_soon_as_one_exits(tmp_path: Path) -> None:
    from streams.stack.process import spawn

    waiting = _process(tmp_path, "1", "import time; time.sleep(120)")  # never ready
    dying = _process(tmp_path, "2", "print('address already in use'); exit(1)")
    spawn(waiting.spec)
    spawn(dying.spec)
    try:
        started = time.monotonic()
        with pytest.raises(AccordError, match="worker-unit-launch-2 exited on start") as failed:
            wait_all_ready([waiting, dying], timeout_s=120)
        assert time.monotonic() - started < 15
        assert "address already in use" in str(failed.value)
    finally:
        waiting.kill()


def test_a_worker_that_never_gets_ready_fails_after_the_timeout(tmp_path: Path) -> None:
    waiting = _process(tmp_path, "1", "import time; time.sleep(120)")
    try:
        with pytest.raises(AccordError, match="not ready after 2s"):
            waiting.start(ready_timeout_s=2)
    finally:
        waiting.kill()
