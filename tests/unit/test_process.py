"""Process bookkeeping against real child processes (sh, sleep): no mocks."""

import signal
import socket
from pathlib import Path

from streams.stack.process import ProcessSpec, port_in_use, read_pid, spawn, stop, wait_until


def _spec(tmp_path: Path, script: str, **kwargs: object) -> ProcessSpec:
    return ProcessSpec(
        name="probe",
        argv=["sh", "-c", script],
        log=tmp_path / "probe.log",
        pid_file=tmp_path / "probe.pid",
        **kwargs,  # type: ignore[arg-type]
    )


def test_spawn_tracks_and_stop_ends_the_whole_group(tmp_path: Path) -> None:
    # The shell starts a grandchild; stopping must not leave it behind.
    spec = _spec(tmp_path, "sleep 300 & echo started; wait")
    pid = spawn(spec)
    assert read_pid(spec) == pid
    assert wait_until(lambda: "started" in (tmp_path / "probe.log").read_text(), 10)
    assert stop(spec, timeout_s=10)
    assert read_pid(spec) is None
    assert not spec.pid_file.exists()
    assert _live_group_members(pid) == []


def _live_group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_stop_escalates_to_kill_when_the_signal_is_ignored(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "trap '' TERM; echo ready; while true; do sleep 1; done")
    spawn(spec)
    assert wait_until(lambda: "ready" in (tmp_path / "probe.log").read_text(), 10)
    assert stop(spec, timeout_s=1)
    assert read_pid(spec) is None


def test_recycled_pid_is_not_mistaken_for_ours(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "sleep 300")
    pid = spawn(spec)
    spec.pid_file.write_text(f"{pid} 1")  # same pid, different start time
    assert read_pid(spec) is None
    spec.pid_file.write_text(
        f"{pid} {Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[-1].split()[19]}"
    )
    assert stop(spec, timeout_s=10)


def test_exited_process_is_not_running(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "exit 3", stop_signal=signal.SIGINT)
    spawn(spec)
    assert wait_until(lambda: read_pid(spec) is None, 10)
    assert stop(spec) is False


def test_port_in_use() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)
