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


def _env_text(value: Any) -> str:
    """A setting as its ACCORD_ variable spells it: secrets in clear, lists as JSON."""
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def worker_env(settings: AccordSettings) -> dict[str, str]:
    """The settings a child worker must share with its parent, as ACCORD_ variables."""
    env = {}
    for section in ("topics", "worker", "stack", "kafka_security"):
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
        self.health_url = f"http://{settings.stack.host}:{worker.web_port}/health"

    @property
    def log(self) -> Path:
        return self.spec.log

    @property
    def running(self) -> bool:
        return read_pid(self.spec) is not None

    def start(self, ready_timeout_s: float = 180.0) -> None:
        """Start and wait until `/health` says ready; a failure names the log."""
        if self.running:
            raise AccordError(f"{self.name} is already running (log: {self.log})")
        spawn(self.spec)
        if not wait_until(lambda: self.ready() or not self.running, ready_timeout_s, 0.5):
            raise AccordError(
                f"{self.name} not ready after {ready_timeout_s:.0f}s (log: {self.log})\n"
                + tail(self.log)
            )
        if not self.running:
            raise AccordError(f"{self.name} exited on start (log: {self.log})\n" + tail(self.log))

    def ready(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, as the tests need one."""
        pid = read_pid(self.spec)
        if pid is not None:
            stop(replace(self.spec, stop_signal=signal.SIGKILL), 30)

    def stop(self, timeout_s: float = 60.0) -> None:
        stop(self.spec, timeout_s)


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
