"""Debezium connectors as files: apply them to Kafka Connect and read back their state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from streams.errors import AccordError, ConfigError
from streams.stack.process import wait_until

SYSTEMS = ("crm", "billing", "support")


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

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

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

    def apply(self, connector: ConnectorFile) -> None:
        """Create or update: PUT of the config is idempotent in Connect's REST API."""
        validation = self._request(
            "PUT",
            f"/connector-plugins/{connector.config['connector.class']}/config/validate",
            json={**connector.config, "name": connector.name},
        ).json()
        if validation.get("error_count"):
            problems = [
                f"{item['value']['name']}: {'; '.join(item['value']['errors'])}"
                for item in validation.get("configs", [])
                if item["value"].get("errors")
            ]
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
        self.stop(name)
        if not wait_until(lambda: self.state(name).state == "STOPPED", wait_s):
            raise AccordError(f"connector {name} did not stop within {wait_s:.0f}s")
        self._request("PATCH", f"/connectors/{name}/offsets", json={"offsets": offsets})
        self.resume(name)
        if not wait_until(lambda: self.state(name).running, wait_s):
            raise AccordError(f"connector {name} did not resume within {wait_s:.0f}s")
