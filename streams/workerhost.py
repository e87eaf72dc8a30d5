"""Many workers on one host: a lock on each data dir, a web port per instance.

Two workers with the same `worker.app_id` and `worker.instance` share a data dir: the
second would find the first one's unclean-stop marker, delete its live RocksDB and fence
its transactional producer. So a worker locks its data dir first (`DataDirLock`, an
`fcntl.flock` on `<data dir>.lock`, held for the life of the process and released by the
kernel however it ends) and refuses to start when another holds it.

Files beside a worker's data dir `<base>/<app_id>-<instance>`:

    <data dir>.lock     the lock; holds the pid of the worker holding it
    <data dir>.running  the unclean-stop marker (`streams.app.run_worker`)
    <data dir>.port     "<port> <pid>": the web port the running worker listens on

The web port follows the instance (`default_web_port`), so instances 1, 2, 3 get 16066,
16067, 16068 without configuration; `worker.web_port = 0` takes a free port, which the
worker prints and publishes in `<data dir>.port` for whatever started it
(`streams.workers.WorkerProcess`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import IO, TYPE_CHECKING

from streams.errors import AccordError

if TYPE_CHECKING:
    from streams.settings import AccordSettings

__all__ = [
    "BASE_WEB_PORT",
    "DataDirLock",
    "PortTaken",
    "WorkerAlreadyRunning",
    "check_port_free",
    "data_dir",
    "default_web_port",
    "free_port",
    "lock_file",
    "port_file",
    "publish_port",
    "published_port",
]

BASE_WEB_PORT = 16066


class WorkerAlreadyRunning(AccordError):
    """Another live worker holds this data dir (same app id and instance)."""

    def __init__(self, directory: Path, instance: str, holder: int | None) -> None:
        self.directory = directory
        self.instance = instance
        self.holder = holder
        who = f"pid {holder}" if holder is not None else "a process whose pid is unknown"
        super().__init__(
            f"another worker ({who}) already runs instance {instance!r} of this app on this "
            f"host (data dir {directory} is locked). Give this worker another instance, e.g. "
            f"ACCORD_WORKER__INSTANCE=<n> (setting worker.instance), or stop the other one."
        )


class PortTaken(AccordError):
    """The worker's web port is in use by another process."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        super().__init__(
            f"web port {host}:{port} is already in use. Set ACCORD_WORKER__WEB_PORT to a free "
            f"port, or to 0 to let the worker pick one (it writes it to <data dir>.port)."
        )


def default_web_port(instance: str) -> int:
    """16066 for instance "1", 16066 + n - 1 for a numeric instance n >= 1, 16066 for any
    other name (two such workers need `worker.web_port` set, or 0)."""
    try:
        number = int(instance)
    except ValueError:
        return BASE_WEB_PORT
    if number < 1 or BASE_WEB_PORT + number - 1 > 65535:
        return BASE_WEB_PORT
    return BASE_WEB_PORT + number - 1


def data_dir(settings: AccordSettings) -> Path:
    """Where RocksDB keeps this worker's tables: one folder per app id and instance."""
    base = settings.worker.data_dir or settings.stack.state_dir / "worker"
    return base / f"{settings.worker.app_id}-{settings.worker.instance}"


def lock_file(directory: Path) -> Path:
    return directory.with_name(directory.name + ".lock")


def port_file(directory: Path) -> Path:
    return directory.with_name(directory.name + ".port")


class DataDirLock:
    """An exclusive, non-blocking `flock` on `<data dir>.lock` for this process's life.

    The kernel drops the lock when the process ends, a crash or SIGKILL included, so a
    lock is never stale; the pid written into the file only names the holder in the
    refusal. The file descriptor is not inherited by child processes.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = lock_file(directory)
        self._file: IO[str] | None = None

    def acquire(self, instance: str) -> None:
        """Take the lock or raise `WorkerAlreadyRunning` naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            raise WorkerAlreadyRunning(
                self.directory, instance, int(text) if text.isdigit() else None
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
            self._file.close()  # closing the last descriptor drops the flock
            self._file = None


def free_port(host: str) -> int:
    """A port the OS reports free on `host` now (another process may take it before the
    worker binds it; the worker then fails at once with "address already in use")."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise `PortTaken` when a process listens on `host:port` (bound as aiohttp binds,
    with SO_REUSEADDR, so a port in TIME_WAIT is not reported)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortTaken(host, port) from exc


def publish_port(directory: Path, port: int, pid: int | None = None) -> None:
    """Write `<data dir>.port` as "<port> <pid>", atomically."""
    target = port_file(directory)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(f"{port} {os.getpid() if pid is None else pid}\n")
    temporary.replace(target)


def published_port(directory: Path, pid: int | None = None) -> int | None:
    """The port in `<data dir>.port`, if there is one and (with `pid`) that process wrote
    it: a file a previous worker left behind is not the new worker's port."""
    try:
        port_text, writer = port_file(directory).read_text().split()
        port, writer_pid = int(port_text), int(writer)
    except (FileNotFoundError, ValueError):
        return None
    if pid is not None and writer_pid != pid:
        return None
    return port
