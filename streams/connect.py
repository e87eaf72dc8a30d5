"""Debezium connectors as files: apply them to Kafka Connect and read back their state."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import KafkaException

from streams.errors import AccordError, ConfigError
from streams.settings import AccordSettings
from streams.stack.process import wait_until

SYSTEMS = ("crm", "billing", "support")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectorFile:
    system: str
    name: str
    config: dict[str, str]


@dataclass(frozen=True)
class ConnectorState:
    name: str
    state: str
    tasks: list[str]
    trace: str | None

    @property
    def running(self) -> bool:
        return (
            self.state == "RUNNING"
            and bool(self.tasks)
            and all(task == "RUNNING" for task in self.tasks)
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state,
            "tasks": self.tasks,
            "running": self.running,
            "trace": self.trace,
        }


def load_connector(connectors_dir: Path, system: str) -> ConnectorFile:
    path = connectors_dir / system / "source.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such connector file") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(document.get("name"), str) or not isinstance(document.get("config"), dict):
        raise ConfigError(f"{path}: needs a string 'name' and an object 'config'")
    not_strings = [key for key, value in document["config"].items() if not isinstance(value, str)]
    if not_strings:
        raise ConfigError(f"{path}: config values must be strings: {', '.join(not_strings)}")
    return ConnectorFile(system, document["name"], document["config"])


class ConnectClient:
    """The few Kafka Connect REST calls Accord needs, with errors that say what failed."""

    def __init__(
        self, base_url: str, timeout_s: float = 30.0, auth: tuple[str, str] | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, auth=auth)

    @classmethod
    def of(cls, settings: AccordSettings, timeout_s: float = 30.0) -> ConnectClient:
        return cls(settings.connect, timeout_s, settings.connect_auth())

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise AccordError(f"Kafka Connect at {self.base_url} is unreachable: {exc}") from exc
        if response.status_code >= 400 and response.status_code != 404:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise AccordError(f"Kafka Connect {method} {path}: {response.status_code} {message}")
        return response

    def validate(self, connector: ConnectorFile) -> list[str]:
        """What Connect and the connector find wrong with a config, one line per setting;
        nothing is created. Debezium's check includes connecting to the database (TLS too)."""
        validation = self._request(
            "PUT",
            f"/connector-plugins/{connector.config['connector.class']}/config/validate",
            json={**connector.config, "name": connector.name},
        ).json()
        if not validation.get("error_count"):
            return []
        return [
            f"{item['value']['name']}: {'; '.join(item['value']['errors'])}"
            for item in validation.get("configs", [])
            if item["value"].get("errors")
        ]

    def apply(self, connector: ConnectorFile) -> None:
        """Create or update: PUT of the config is idempotent in Connect's REST API."""
        problems = self.validate(connector)
        if problems:
            raise ConfigError(f"connector {connector.name} is invalid: " + " | ".join(problems))
        self._request("PUT", f"/connectors/{connector.name}/config", json=connector.config)

    def state(self, name: str) -> ConnectorState:
        response = self._request("GET", f"/connectors/{name}/status")
        if response.status_code == 404:
            return ConnectorState(name, "MISSING", [], None)
        body = response.json()
        tasks = body.get("tasks", [])
        traces = [t.get("trace") for t in [body["connector"], *tasks] if t.get("trace")]
        return ConnectorState(
            name=name,
            state=body["connector"]["state"],
            tasks=[task["state"] for task in tasks],
            trace=traces[0].splitlines()[0] if traces else None,
        )

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/connectors/{name}")

    def restart(self, name: str, only_failed: bool = False) -> None:
        self._request(
            "POST",
            f"/connectors/{name}/restart",
            params={"includeTasks": "true", "onlyFailed": str(only_failed).lower()},
        )

    def offsets(self, name: str) -> list[dict[str, Any]]:
        """The source offsets Connect holds for a connector (where it resumes from)."""
        return self._request("GET", f"/connectors/{name}/offsets").json()["offsets"]

    def stop(self, name: str) -> None:
        self._request("PUT", f"/connectors/{name}/stop")

    def resume(self, name: str) -> None:
        self._request("PUT", f"/connectors/{name}/resume")

    def rewind(self, name: str, offsets: list[dict[str, Any]], wait_s: float = 60.0) -> None:
        """Stop, set the offsets back, resume: the connector replays what came after them."""
        self._offsets_while_stopped(name, "PATCH", {"offsets": offsets}, wait_s)

    def resnapshot(self, name: str, wait_s: float = 60.0) -> None:
        """Stop, forget the stored offsets, resume: with `snapshot.mode=initial` Debezium
        reads every table again and then streams from a slot it creates if it is gone.

        This is the way back after a lost replication slot: changes committed while no
        slot held the WAL reach Kafka as snapshot reads; everything Accord already has
        is a no-op in the merge.
        """
        self._offsets_while_stopped(name, "DELETE", None, wait_s)

    def _offsets_while_stopped(
        self, name: str, method: str, body: dict[str, Any] | None, wait_s: float
    ) -> None:
        """Connect changes a connector's offsets only while it is stopped."""
        self.stop(name)
        if not wait_until(lambda: self.state(name).state == "STOPPED", wait_s):
            raise AccordError(f"connector {name} did not stop within {wait_s:.0f}s")
        self._request(method, f"/connectors/{name}/offsets", json=body)
        self.resume(name)
        if not wait_until(lambda: self.state(name).running, wait_s):
            raise AccordError(f"connector {name} did not resume within {wait_s:.0f}s")


class ConnectorWatchdog:
    """Keeps the source connectors flowing: restarts failed tasks and hung ones.

    Connect leaves a failed task failed until someone restarts it, and a task blocked
    inside its converter (an HTTP call to the registry that never returns) still reports
    RUNNING. Debezium writes a heartbeat every `heartbeat.interval.ms`; a connector
    whose heartbeat topic has not grown for `stall_s` is hung, and is restarted.
    """

    def __init__(
        self,
        client: ConnectClient,
        connectors: list[ConnectorFile],
        heartbeat_end: Any,  # callable: topic -> end offset (sum over partitions)
        stall_s: float = 60.0,
        interval_s: float = 10.0,
    ) -> None:
        self.client = client
        self.connectors = connectors
        self.heartbeat_end = heartbeat_end
        self.stall_s = stall_s
        self.interval_s = interval_s
        self.restarts: list[tuple[str, str]] = []  # (connector, why)
        self._seen: dict[str, tuple[int, float]] = {}  # connector -> (end, since)

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for connector in self.connectors:
            state = self.client.state(connector.name)
            if state.state == "MISSING":
                continue
            if state.state == "FAILED" or "FAILED" in state.tasks:
                self._restart(connector, f"failed: {state.trace or state.state}", only_failed=True)
                continue
            if state.state != "RUNNING":
                continue
            prefix = connector.config.get("topic.prefix", connector.system)
            end = self.heartbeat_end(f"__debezium-heartbeat.{prefix}")
            last_end, since = self._seen.get(connector.name, (end, now))
            if end != last_end:
                since = now
            self._seen[connector.name] = (end, since)
            if now - since > self.stall_s:
                self._restart(connector, f"no heartbeat for {now - since:.0f}s")
                self._seen[connector.name] = (end, now)

    def _restart(self, connector: ConnectorFile, why: str, only_failed: bool = False) -> None:
        log.warning("connector %s %s: restarting it", connector.name, why)
        self.client.restart(connector.name, only_failed=only_failed)
        self.restarts.append((connector.name, why))

    def run(self, stop: Any) -> None:
        while not stop.wait(self.interval_s):
            try:
                self.check()
            except (AccordError, KafkaException) as exc:
                # Connect or the broker is away (a restart, a leader election): a
                # watchdog that cannot look this time looks again next time.
                log.warning("connector watchdog: %s", exc)

    def close(self) -> None:
        self.client.http.close()
