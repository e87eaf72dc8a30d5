"""One data dir, one worker; a web port per instance (streams.workerhost)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streams.errors import AccordError
from streams.settings import AccordSettings, TopicSettings, WorkerSettings
from streams.workerhost import (
    DataDirLock,
    PortTaken,
    WorkerAlreadyRunning,
    check_port_free,
    default_web_port,
    publish_port,
    published_port,
)


@pytest.mark.parametrize(
    "instance, port",
    [("1", 16066), ("2", 16067), ("10", 16075), ("0", 16066), ("-3", 16066), ("blue", 16066)],
)
def test_the_web_port_follows_a_numeric_instance(instance: str, port: int) -> None:
    assert default_web_port(instance) == port
    assert WorkerSettings(instance=instance).port == port


def test_a_set_web_port_wins_and_zero_asks_for_a_free_one() -> None:
    assert WorkerSettings(instance="3", web_port=18000).port == 18000
    assert WorkerSettings(instance="3", web_port=0).port == 0


def _holder(directory: Path) -> subprocess.Popen[str]:
    """Another process that takes the lock and holds it until killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from streams.workerhost import DataDirLock
        lock = DataDirLock(Path({str(directory)!r}))
        lock.acquire("1")
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_the_lock_refuses_a_second_worker_and_names_the_holder(tmp_path: Path) -> None:
    directory = tmp_path / "accord-1"
    holder = _holder(directory)
    try:
        with pytest.raises(WorkerAlreadyRunning) as refused:
            DataDirLock(directory).acquire("1")
        assert refused.value.holder == holder.pid
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "ACCORD_WORKER__INSTANCE" in message
        assert isinstance(refused.value, AccordError)
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock
        holder.wait(10)
    lock = DataDirLock(directory)
    lock.acquire("1")
    assert (tmp_path / "accord-1.lock").read_text().strip() == str(os.getpid())
    lock.release()


def test_two_locks_in_one_process_exclude_each_other_too(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path / "a-1"), DataDirLock(tmp_path / "a-1")
    first.acquire("1")
    with pytest.raises(WorkerAlreadyRunning):
        second.acquire("1")
    DataDirLock(tmp_path / "a-2").acquire("2")  # another instance is another lock
    first.release()
    second.acquire("1")
    second.release()


def test_run_worker_refuses_before_touching_the_holder_s_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash marker of a live worker must not make a second one wipe its RocksDB."""
    import streams.app
    from streams.app import data_dir, run_worker

    def went_on(*_: object) -> None:
        raise AssertionError("run_worker went past the lock")

    # Should the lock fail, the worker must get no further: no topics, no Kafka.
    monkeypatch.setattr(streams.app, "ensure_topics", went_on)
    settings = AccordSettings(
        redact_pii=False,
        kafka_bootstrap="127.0.0.1:1",
        topics=TopicSettings.under("unit-lock"),
        worker=WorkerSettings(app_id="unit-lock", data_dir=tmp_path, web_port=0),
    )
    directory = data_dir(settings)
    (directory / "golden-0").mkdir(parents=True)
    (directory / "golden-0" / "CURRENT").write_text("live rocksdb\n")
    marker = directory.with_name(directory.name + ".running")
    marker.write_text("a worker is running\n")
    holder = _holder(directory)
    try:
        with pytest.raises(WorkerAlreadyRunning, match="ACCORD_WORKER__INSTANCE"):
            run_worker(settings)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (directory / "golden-0" / "CURRENT").read_text() == "live rocksdb\n"
    assert marker.exists()


def test_reset_refuses_while_a_worker_holds_the_data_dir(tmp_path: Path) -> None:
    """`accord reset` wipes the data dir: never under a live worker, whatever its port."""
    from streams.reset import reset

    settings = AccordSettings(
        kafka_bootstrap="127.0.0.1:1",  # never reached
        topics=TopicSettings.under("unit-reset"),
        worker=WorkerSettings(app_id="unit-reset", data_dir=tmp_path, web_port=0),
    )
    directory = tmp_path / "unit-reset-1"
    (directory / "golden-0").mkdir(parents=True)
    holder = _holder(directory)
    try:
        with pytest.raises(AccordError, match=f"is running \\(pid {holder.pid}\\)"):
            reset(settings, print)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (directory / "golden-0").is_dir()


def test_a_port_someone_listens_on_is_refused_with_the_setting_to_change() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortTaken, match="ACCORD_WORKER__WEB_PORT"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again once closed


def test_a_published_port_is_read_only_for_the_process_that_wrote_it(tmp_path: Path) -> None:
    directory = tmp_path / "accord-2"
    assert published_port(directory) is None
    publish_port(directory, 41234, pid=777)
    assert published_port(directory) == 41234
    assert published_port(directory, pid=777) == 41234
    assert published_port(directory, pid=778) is None  # left by an earlier worker
