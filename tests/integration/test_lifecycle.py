"""up / status / down on a separate stack instance, so the shared one is left alone."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.settings import AccordSettings, StackSettings
from streams.stack.manager import Stack

pytestmark = pytest.mark.integration

COMPONENTS = ["postgres", "mariadb", "redis", "kafka"]


def _stack_processes(state_dir: Path) -> list[int]:
    """Every live process whose command line or working directory is in the state folder."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if str(state_dir) in cmdline and status != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Databases run as their system users, so the folder must be reachable by them."""
    path = Path(tempfile.mkdtemp(prefix="accord-lifecycle-"))
    path.chmod(0o755)
    yield path / "state"
    shutil.rmtree(path, ignore_errors=True)


def test_up_is_idempotent_and_down_leaves_no_process(
    settings: AccordSettings, state_dir: Path
) -> None:
    state = state_dir
    isolated = AccordSettings(
        stack=StackSettings(
            state_dir=state,
            postgres_port=25432,
            mariadb_port=23306,
            redis_port=26379,
            kafka_port=29092,
            kafka_controller_port=29093,
            kafka_sasl_ssl_port=29094,
        )
    )
    stack = Stack(isolated)
    try:
        first = stack.up(COMPONENTS)
        assert [s.name for s in first] == COMPONENTS and all(s.healthy for s in first)
        pids = {s.name: s.pid for s in first}
        assert _stack_processes(state.resolve())

        second = stack.up(COMPONENTS)  # already running: nothing restarts
        assert {s.name: s.pid for s in second} == pids
    finally:
        stopped = stack.down()
    assert set(stopped) == set(COMPONENTS)
    assert _stack_processes(state.resolve()) == []
    assert not any(s.running for s in stack.status(COMPONENTS))
