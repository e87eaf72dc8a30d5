"""Many workers on one host: a second `accord worker` of the same instance leaves at once,
naming the setting to change, and the first one's state is untouched; whatever starts a
worker hears about it as soon as that worker exits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streams.errors import AccordError
from streams.settings import AccordSettings
from streams.workerhost import data_dir, published_port
from streams.workers import WorkerProcess
from tests.support import accord, isolated, running_worker

pytestmark = pytest.mark.e2e


def _stores(directory: Path) -> dict[Path, int]:
    """Each open RocksDB store of the worker (a CURRENT file), by its folder's inode: a
    wiped and recreated store has another."""
    return {current.parent: current.parent.stat().st_ino for current in directory.rglob("CURRENT")}


def test_a_second_worker_of_the_same_instance_leaves_the_first_alone(
    stack: AccordSettings, tmp_path: Path
) -> None:
    settings = isolated(stack)
    directory = data_dir(settings)
    with running_worker(settings) as first:
        stores = _stores(directory)
        assert stores, f"no RocksDB store under {directory}"
        assert published_port(directory, first.pid) == settings.worker.port

        started = time.monotonic()
        second = accord(settings, "worker")
        took = time.monotonic() - started
        said = second.stdout + second.stderr
        assert second.returncode != 0, said
        assert took < 30, f"the second worker took {took:.0f}s to leave"
        assert "ACCORD_WORKER__INSTANCE" in said and f"(pid {first.pid})" in said, said

        # Started by a launcher (its own pid file and log), it fails as fast, with the log.
        elsewhere = settings.model_copy(
            update={"stack": settings.stack.model_copy(update={"state_dir": tmp_path})}
        )
        started = time.monotonic()
        with pytest.raises(AccordError, match="exited on start") as failed:
            WorkerProcess(elsewhere).start(ready_timeout_s=120)
        assert time.monotonic() - started < 30
        assert "ACCORD_WORKER__INSTANCE" in str(failed.value)

        # Another instance on the first one's port: refused before it starts anything.
        neighbour = settings.model_copy(
            update={
                "worker": settings.worker.model_copy(
                    update={"instance": "2", "web_port": settings.worker.port}
                )
            }
        )
        with pytest.raises(AccordError, match="ACCORD_WORKER__WEB_PORT"):
            WorkerProcess(neighbour).start(ready_timeout_s=120)

        assert first.ready()
        assert _stores(directory) == stores  # nothing wiped, nothing recreated
        assert directory.with_name(directory.name + ".running").exists()


def test_a_worker_on_port_zero_publishes_the_port_it_took(stack: AccordSettings) -> None:
    base = isolated(stack)
    settings = base.model_copy(update={"worker": base.worker.model_copy(update={"web_port": 0})})
    with running_worker(settings) as worker:
        port = published_port(data_dir(settings), worker.pid)
        assert port and port != 0 and worker.port == port
        assert worker.ready()
        assert f"web port {port}" in worker.log.read_text()
