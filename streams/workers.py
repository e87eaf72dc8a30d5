"""Accord worker processes started by Accord itself: for the demo and the tests.

In production a supervisor (systemd, Kubernetes) runs `accord worker`; here the demo and
the end-to-end tests need to start, SIGKILL and restart real worker processes, with the
same settings as the caller, and to know when one is ready (its `/health` says so).
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from streams.errors import AccordError
from streams.settings import AccordSettings
from streams.stack.process import ProcessSpec, read_pid, spawn, stop, tail, wait_until
from streams.workerhost import data_dir, published_port


def _env_text(value: Any) -> str:
    """A setting as its ACCORD_ variable spells it: secrets in clear, lists as JSON."""
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def worker_env(settings: AccordSettings) -> dict[str, str]:
    """The settings a child worker must share with its parent, as ACCORD_ variables."""
    env = {}
    for section in ("topics", "worker", "stack", "kafka_security", "identity"):
        for name, value in getattr(settings, section).model_dump().items():
            if value is None:
                continue
            env[f"ACCORD_{section.upper()}__{name.upper()}"] = _env_text(value)
    for name in (
        "kafka_bootstrap",
        "schema_registry_url",
        "connect_url",
        "redis_url",
        "redis_username",
        "redis_password",
        "redis_password_file",
        "registry_basic_auth",
        "registry_basic_auth_file",
        "connect_basic_auth",
        "connect_basic_auth_file",
    ):
        value = getattr(settings, name)
        if value is not None:
            env[f"ACCORD_{name.upper()}"] = _env_text(value)
    env["ACCORD_CONNECTORS_DIR"] = str(settings.connectors_dir)
    env["ACCORD_REDACT_PII"] = str(settings.redact_pii).lower()
    return env


class WorkerProcess:
    """One `accord worker` child process, in its own process group."""

    def __init__(self, settings: AccordSettings) -> None:
        self.settings = settings
        worker = settings.worker
        logs = settings.stack.state_dir / "logs"
        self.name = f"worker-{worker.app_id}-{worker.instance}"
        self.spec = ProcessSpec(
            name=self.name,
            argv=[sys.executable, "-m", "streams.cli", "worker"],
            log=logs / f"{self.name}.log",
            pid_file=settings.stack.state_dir / "run" / f"{self.name}.pid",
            cwd=Path.cwd(),
            env=worker_env(settings),
        )

    @property
    def log(self) -> Path:
        return self.spec.log

    @property
    def pid(self) -> int | None:
        return read_pid(self.spec)

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def port(self) -> int | None:
        """The web port: the configured one (or its instance's), or with `web_port = 0`
        the one the running worker published; None until it has."""
        worker = self.settings.worker
        if worker.port:
            return worker.port
        pid = self.pid
        return published_port(data_dir(self.settings), pid) if pid is not None else None

    @property
    def health_url(self) -> str | None:
        port = self.port
        return f"http://{self.settings.stack.host}:{port}/health" if port else None

    def start(self, ready_timeout_s: float = 180.0) -> None:
        """Start and wait until `/health` says ready; a failure names the log."""
        if self.running:
            raise AccordError(f"{self.name} is already running (log: {self.log})")
        spawn(self.spec)
        self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Wait until `/health` says ready. Raises `AccordError` with the tail of the log
        as soon as the process exits (a second worker of the same instance, a port in
        use, a bad setting), or when the timeout passes."""
        settled = wait_until(lambda: self.ready() or not self.running, timeout_s, 0.5)
        self._judge(settled, timeout_s)

    def _judge(self, settled: bool, waited_s: float) -> None:
        """Raise if the worker exited, or if the wait ended unsettled, with its log."""
        if not self.running:
            raise AccordError(
                f"{self.name} exited on start (log: {self.log})\n" + tail(self.log, 30)
            )
        if not settled:
            raise AccordError(
                f"{self.name} not ready after {waited_s:.0f}s (log: {self.log})\n"
                + tail(self.log, 30)
            )

    def ready(self) -> bool:
        """True when the worker on this port answers ready. Once this object started one
        (a pid file), only that very process counts: the pid in the answer tells it from
        a neighbour on the same port."""
        url, pid = self.health_url, self.pid
        if url is None:
            return False
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code != 200:
                return False
            return pid is None or answer.json().get("pid") in (pid, None)
        except (httpx.HTTPError, ValueError):
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, as the tests need one."""
        pid = read_pid(self.spec)
        if pid is not None:
            stop(replace(self.spec, stop_signal=signal.SIGKILL), 30)

    def stop(self, timeout_s: float = 60.0) -> None:
        stop(self.spec, timeout_s)


def wait_all_ready(workers: list[WorkerProcess], timeout_s: float = 180.0) -> None:
    """Wait until every worker is ready; raises as soon as any of them exits, or when the
    timeout passes, with that worker's log (`WorkerProcess.wait_ready`)."""

    def settled() -> bool:
        return any(not w.running for w in workers) or all(w.ready() for w in workers)

    done = wait_until(settled, timeout_s, 0.5)
    for worker in sorted(workers, key=lambda w: w.running):  # the exited first
        worker._judge(done, timeout_s)


def applier_process(settings: AccordSettings, target: str) -> ProcessSpec:
    """An `accord sink --target` process for `target` with the caller's settings: the
    appliers a worker runs without (`worker.sinks = []`), one process and GIL each."""
    state = settings.stack.state_dir
    name = f"sink-{settings.worker.app_id}-{target}"
    return ProcessSpec(
        name=name,
        argv=[sys.executable, "-m", "streams.cli", "sink", "--target", target],
        log=state / "logs" / f"{name}.log",
        pid_file=state / "run" / f"{name}.pid",
        env=worker_env(settings),
    )
