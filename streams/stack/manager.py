"""Brings the local stack up in dependency order, reports its health, takes it down."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from streams.errors import StackError
from streams.settings import AccordSettings
from streams.stack import install
from streams.stack.components import (
    COMPONENT_TYPES,
    Component,
    StackPaths,
    find_java,
    secure_tree,
)
from streams.stack.process import (
    ProcessSpec,
    port_in_use,
    read_pid,
    spawn,
    stop,
    stop_together,
    tail,
    wait_until,
    write_private,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    port: int
    version: str
    detail: str
    log: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Stack:
    """The six processes of the local stack, as one unit."""

    def __init__(self, settings: AccordSettings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.paths = StackPaths(settings.stack.state_dir.resolve())
        self.components: dict[str, Component] = {
            component.name: component
            for kind in COMPONENT_TYPES
            for component in kind.instances(settings, self.paths)
        }
        self.progress: Progress = progress or (lambda _message: None)

    def select(self, names: list[str] | None = None) -> list[Component]:
        """The named components plus everything they depend on, in start order."""
        if not names:
            return list(self.components.values())
        unknown = [name for name in names if name not in self.components]
        if unknown:
            raise StackError(
                ", ".join(unknown), f"unknown component; choose from {', '.join(self.components)}"
            )
        wanted: set[str] = set()

        def add(name: str) -> None:
            if name not in wanted:
                wanted.add(name)
                component = self.components[name]
                for dependency in (*component.depends_on, *component.peers):
                    add(dependency)

        for name in names:
            add(name)
        return [c for name, c in self.components.items() if name in wanted]

    def up(self, names: list[str] | None = None) -> list[ComponentStatus]:
        """Install, start and bootstrap; idempotent, waits until every component is healthy."""
        components = self.select(names)
        require_loopback(self.settings.stack.host)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        if self.settings.stack.install_missing:
            install.ensure_installed(components, self.paths, self.progress)
        for component in components:
            if component.java_major:
                find_java(component.name, component.java_major)
            component.preflight()
        self._secure(components)  # state made by an older Accord, before anything starts
        for wave in self._waves(components):
            started = [c for c in wave if self._start(c)]
            for component in wave:
                self._await_healthy(component, just_started=component in started)
            for component in wave:
                self._bootstrap(component)
        self._secure(components)  # and what starting them made
        return self.status([c.name for c in components])

    def _secure(self, components: list[Component]) -> None:
        """Logs, pid files and each component's folder: owner only (0700 / 0600).

        The state folder itself is 0711 under root: the databases' system users must
        pass through it to their own folders, but nobody else may list it. Its other
        folders (the worker's state, reports, downloads) are closed at the top; a stack
        of its own inside it (a test's) is left to its own `up`.
        """
        os.chmod(self.paths.root, 0o711 if os.geteuid() == 0 else 0o700)
        for entry in self.paths.root.iterdir():
            if entry.is_dir() and not entry.is_symlink() and not _holds_a_stack(entry):
                entry.chmod(stat.S_IMODE(entry.stat().st_mode) & 0o700)
        secure_tree(self.paths.logs)
        secure_tree(self.paths.run)
        for component in components:
            component.secure()

    def _bootstrap(self, component: Component) -> None:
        try:
            component.bootstrap()
        except StackError:
            raise
        except Exception as exc:  # any driver error: report it against the component
            raise StackError(
                component.name, f"bootstrap failed: {type(exc).__name__}: {exc}", component.log
            ) from exc

    def _waves(self, components: list[Component]) -> list[list[Component]]:
        """Group components so each wave depends only on earlier waves."""
        names = {c.name for c in components}
        placed: set[str] = set()
        waves: list[list[Component]] = []
        remaining = list(components)
        while remaining:
            wave = [
                c for c in remaining if all(d in placed or d not in names for d in c.depends_on)
            ]
            waves.append(wave)
            placed.update(c.name for c in wave)
            remaining = [c for c in remaining if c not in wave]
        return waves

    def _start(self, component: Component) -> bool:
        spec = component.process()
        fingerprint_file = spec.pid_file.with_suffix(".cmdline")
        fingerprint = _fingerprint(spec, component.config_text())
        if read_pid(spec) is not None:
            if fingerprint_file.exists() and fingerprint_file.read_text() == fingerprint:
                self.progress(f"{component.name}: already running")
                return False
            # Started by an older Accord or other settings: restart it with the new ones.
            self.progress(f"{component.name}: command line changed, restarting")
            stop(spec)
        for setting, port in component.listens.items():
            if port_in_use(self.settings.stack.host, port):
                raise StackError(
                    component.name,
                    f"port {port} on {self.settings.stack.host} is in use by another "
                    f"process; free it or choose another port (ACCORD_STACK__{setting.upper()})",
                    component.log,
                )
        component.prepare()
        self.progress(f"{component.name}: starting on port {component.port}")
        spawn(component.process())
        write_private(fingerprint_file, fingerprint)
        return True

    def _await_healthy(self, component: Component, just_started: bool) -> None:
        spec = component.process()
        started = time.monotonic()
        last_detail = ""

        def ready() -> bool:
            nonlocal last_detail
            if read_pid(spec) is None:
                raise StackError(
                    component.name,
                    "process exited during start-up; last log lines:\n" + tail(component.log),
                    component.log,
                )
            health = component.health()
            last_detail = health.detail
            return health.ok

        if not wait_until(ready, self.settings.stack.startup_timeout_s, interval_s=0.5):
            raise StackError(
                component.name,
                f"not healthy after {self.settings.stack.startup_timeout_s:.0f}s ({last_detail})",
                component.log,
            )
        if just_started:
            self.progress(f"{component.name}: healthy in {time.monotonic() - started:.1f}s")

    def down(self) -> list[str]:
        """Stop every component, dependants first. Returns the names that were running."""
        stopped: list[str] = []
        done: set[str] = set()
        for component in reversed(list(self.components.values())):
            if component.name in done:
                continue
            # A cluster's nodes go together (`stop_together`).
            group = [component, *(self.components[p] for p in component.peers)]
            specs = {c.process().name: c for c in group}
            for spec in stop_together([c.process() for c in group]):
                self.progress(f"{spec.name}: stopped")
                stopped.append(specs[spec.name].name)
            done.update(c.name for c in group)
        return stopped

    def status(self, names: list[str] | None = None) -> list[ComponentStatus]:
        statuses = []
        for component in self.select(names):
            pid = read_pid(component.process())
            health = component.health() if pid else None
            try:
                version = component.version()
            except StackError as exc:
                version = f"not installed ({exc})"
            statuses.append(
                ComponentStatus(
                    name=component.name,
                    running=pid is not None,
                    healthy=bool(health and health.ok),
                    pid=pid,
                    port=component.port,
                    version=version,
                    detail=health.detail if health else "not running",
                    log=str(component.log),
                )
            )
        return statuses


def _holds_a_stack(folder: Path) -> bool:
    """True for the state folder of another stack (its own logs and pid files)."""
    paths = StackPaths(folder)
    return paths.logs.is_dir() and paths.run.is_dir()


def require_loopback(host: str) -> None:
    """Refuse a stack host that is not loopback: the local stack serves this machine only."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise StackError("stack", f"stack.host {host!r} does not resolve: {exc}") from exc
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a).is_loopback)
    if outside:
        raise StackError(
            "stack",
            f"stack.host {host!r} is not a loopback address ({', '.join(outside)}); the local "
            "stack listens on loopback only: set ACCORD_STACK__HOST=127.0.0.1",
        )


def _fingerprint(spec: ProcessSpec, config: str) -> str:
    """What a running component was started with: argv, environment, umask, generated
    config. A process started before the stack made its files private has another one."""
    text = json.dumps([list(spec.argv), sorted((spec.env or {}).items()), spec.umask, config])
    return hashlib.sha256(text.encode()).hexdigest()
