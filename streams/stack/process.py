"""Detached processes tracked by pid files: the stack's only process bookkeeping."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Files and folders a process creates are its owner's only: logs and data hold customer
# records, and the stack's folders hold keys and passwords.
PRIVATE_UMASK = 0o077


@dataclass(frozen=True)
class ProcessSpec:
    """How to run one long-lived component process."""

    name: str
    argv: Sequence[str]
    log: Path
    pid_file: Path
    cwd: Path | None = None
    env: dict[str, str] | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    umask: int = PRIVATE_UMASK


def read_pid(spec: ProcessSpec) -> int | None:
    """The pid of the spec's process if it is still the one we started, else None.

    The pid file holds "pid start-time"; a recycled pid has another start time.
    """
    try:
        pid_text, started = spec.pid_file.read_text().split()
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    stat = _stat(pid)
    if stat is None or stat[0] == "Z" or stat[19] != started:
        return None
    return pid


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """A file descriptor on `path`, which is (made) readable and writable by its owner only.

    A folder made for it is private too; existing folders are left as they are.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_private(path: Path, text: str) -> None:
    """Write `path` with mode 0600 from the start: no moment when others can read it."""
    with open(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as out:
        out.write(text)


def spawn(spec: ProcessSpec) -> int:
    """Start the process in its own session, so it outlives the command that started it.

    Its log and pid file are private, and so is everything it creates (umask 077).
    """
    env = {**os.environ, **(spec.env or {})}
    with open(open_private(spec.log), "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(spec.argv),
            cwd=spec.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=spec.user,
            group=spec.user,
            umask=spec.umask,
        )
    stat = _stat(proc.pid)
    write_private(spec.pid_file, f"{proc.pid} {stat[19] if stat else 0}")
    return proc.pid


def stop(spec: ProcessSpec, timeout_s: float = 60.0) -> bool:
    """Signal the process group, wait for it to go, then kill what is left. True if stopped."""
    return bool(stop_together([spec], timeout_s))


def stop_together(specs: Sequence[ProcessSpec], timeout_s: float = 60.0) -> list[ProcessSpec]:
    """`stop` for processes that must go at once; returns those that were running.

    The nodes of a KRaft cluster: each waits for the controller quorum to finish shutting
    down, so one stopped after the others have gone would hang until killed.
    """
    running = {}
    for spec in specs:
        pid = read_pid(spec)
        if pid is None:
            spec.pid_file.unlink(missing_ok=True)
        else:
            running[pid] = spec
    for pid, spec in running.items():
        _signal_group(pid, spec.stop_signal)

    def gone() -> bool:
        return not any(_group_alive(pid) for pid in running)

    if not wait_until(gone, timeout_s):
        for pid in running:
            _signal_group(pid, signal.SIGKILL)
        wait_until(gone, 10.0)
    for pid, spec in running.items():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when we are its parent (tests, `demo run`)
        spec.pid_file.unlink(missing_ok=True)
    return list(running.values())


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process of the group remains."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(proc_dir.name))
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(proc_dir.name), os.WNOHANG)
            return True
    return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    """Poll a condition until it holds or the timeout passes; True if it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
