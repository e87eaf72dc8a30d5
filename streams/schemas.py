"""Canonical schemas and their registry workflows: list, check, push, diff.

Local schemas are `schemas/<namespace>.<Name>.avsc`; a file may name a type defined
in another file, and each top-level schema is registered fully expanded, so every
Confluent-compatible client can read it without schema references. Subjects follow
the topic-name strategy: `<topic>-value`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import load_schema
from fastavro.utils import generate_many

from streams.errors import AccordError, ConfigError
from streams.settings import AccordSettings

NAMESPACE = "dev.accord"
LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)


def subjects(settings: AccordSettings) -> dict[str, str]:
    """Subject -> full name of the canonical schema written to that topic."""
    topics = settings.topics
    mapping = {
        topics.golden: "Customer",
        topics.changes: "CustomerChange",
        topics.audit: "AuditEntry",
        topics.dlq: "DeadLetter",
        **{topics.sink(system): "SinkEvent" for system in ("crm", "billing", "support")},
    }
    return {f"{topic}-value": f"{NAMESPACE}.{name}" for topic, name in mapping.items()}


def load_local(directory: Path, full_name: str) -> dict[str, Any]:
    """A canonical schema, expanded; errors name the file."""
    path = directory / f"{full_name}.avsc"
    if not path.is_file():
        raise ConfigError(f"{path}: schema file not found")
    try:
        json.loads(path.read_text())  # fastavro's own error loses the line
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    try:
        return load_schema(str(path), _write_hint=False)
    except Exception as exc:  # fastavro's schema errors have several types
        raise ConfigError(f"{path}: invalid Avro schema: {exc}") from exc


# ---------------------------------------------------------------- explaining a verdict


def field_diff(old: dict[str, Any], new: dict[str, Any], path: str = "") -> list[str]:
    """What changed between two record schemas, field by field."""
    lines: list[str] = []
    old_fields = {f["name"]: f for f in old.get("fields", [])}
    new_fields = {f["name"]: f for f in new.get("fields", [])}
    for name, spec in new_fields.items():
        where = f"{path}{name}"
        if name not in old_fields:
            default = (
                "with default " + json.dumps(spec["default"])
                if "default" in spec
                else ("WITHOUT a default")
            )
            lines.append(f"+ {where}: added ({_type_name(spec['type'])}) {default}")
            continue
        before = old_fields[name]
        if _record(before["type"]) and _record(spec["type"]):
            lines += field_diff(_record(before["type"]), _record(spec["type"]), f"{where}.")
        elif _type_name(before["type"]) != _type_name(spec["type"]):
            lines.append(
                f"~ {where}: type {_type_name(before['type'])} -> {_type_name(spec['type'])}"
            )
        if before.get("default", _MISSING) != spec.get("default", _MISSING):
            lines.append(
                f"~ {where}: default {before.get('default', '(none)')!r} -> "
                f"{spec.get('default', '(none)')!r}"
            )
    for name, spec in old_fields.items():
        if name not in new_fields:
            default = "had a default" if "default" in spec else "had NO default"
            lines.append(f"- {path}{name}: removed ({_type_name(spec['type'])}, {default})")
    return lines


_MISSING = object()


def _record(avro_type: Any) -> dict[str, Any] | None:
    if isinstance(avro_type, dict) and avro_type.get("type") == "record":
        return avro_type
    return None


def _type_name(avro_type: Any) -> str:
    if isinstance(avro_type, list):
        return " | ".join(_type_name(t) for t in avro_type)
    if isinstance(avro_type, dict):
        if avro_type.get("logicalType"):
            return f"{avro_type['type']}/{avro_type['logicalType']}"
        return _short(str(avro_type.get("name") or avro_type.get("type")))
    return _short(str(avro_type))


def _label(schema: Any) -> str:
    """A schema's name for a listing: records by name, anything else by its type."""
    if isinstance(schema, dict):
        name = schema.get("name") or schema.get("type", "?")
        namespace = schema.get("namespace")
        return f"{namespace}.{name}" if namespace and "." not in str(name) else str(name)
    return _type_name(schema)


def _short(name: str) -> str:
    """Type names compare without namespace: registries move it between name and namespace."""
    return name.rsplit(".", 1)[-1]


def resolution_problems(writer: dict[str, Any], reader: dict[str, Any]) -> list[str]:
    """Try what the compatibility level promises: read data of `writer` with `reader`."""
    parsed_writer, parsed_reader = parse_schema(writer), parse_schema(reader)
    problems: set[str] = set()
    for record in generate_many(parsed_writer, 5):
        buffer = io.BytesIO()
        schemaless_writer(buffer, parsed_writer, record)
        buffer.seek(0)
        try:
            schemaless_reader(buffer, parsed_writer, parsed_reader)
        except SchemaResolutionError as exc:
            problems.add(str(exc))
    return sorted(problems)


def explain(level: str, registered: list[dict[str, Any]], local: dict[str, Any]) -> list[str]:
    """Why `local` breaks `level` against the registered versions (oldest first)."""
    against = registered if level.endswith("TRANSITIVE") else registered[-1:]
    lines = [f"compatibility level {level}; changes against the latest registered version:"]
    lines += [f"  {line}" for line in field_diff(registered[-1], local)] or ["  (none)"]
    for version, old in enumerate(against, start=len(registered) - len(against) + 1):
        if level.startswith(("BACKWARD", "FULL")):
            for problem in resolution_problems(old, local):
                lines.append(
                    f"  new readers cannot read data written with version {version}: {problem}"
                )
        if level.startswith(("FORWARD", "FULL")):
            for problem in resolution_problems(local, old):
                lines.append(f"  readers on version {version} cannot read new data: {problem}")
    return lines


# --------------------------------------------------------------------- the workflows


@dataclass
class SubjectReport:
    subject: str
    schema: str
    state: str  # new, unchanged, compatible, incompatible, registered, refused
    level: str = "NONE"
    versions: list[int] = field(default_factory=list)
    schema_id: int | None = None
    explanation: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class SchemaWorkflows:
    """The integrator's view of canonical schemas against any Confluent-compatible registry."""

    def __init__(self, settings: AccordSettings, client: SchemaRegistryClient) -> None:
        self.settings = settings
        self.client = client

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except SchemaRegistryError as exc:
            raise AccordError(f"schema registry: {what}: {exc.error_message}") from exc
        except Exception as exc:  # transport errors
            raise AccordError(
                f"schema registry at {self.settings.registry}: {what}: {exc}"
            ) from exc

    def level(self, subject: str) -> str:
        try:
            return self.client.get_compatibility(subject)
        except SchemaRegistryError:
            return self._call("global compatibility", self.client.get_compatibility)

    def versions(self, subject: str) -> list[int]:
        try:
            return self.client.get_versions(subject)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return []
            raise AccordError(
                f"schema registry: versions of {subject}: {exc.error_message}"
            ) from exc

    def registered(self, subject: str, versions: list[int]) -> list[dict[str, Any]]:
        return [json.loads(self.client.get_version(subject, v).schema.schema_str) for v in versions]

    def already_registered(self, subject: str, schema: dict[str, Any]) -> bool:
        """The registry's own verdict: it compares schemas in canonical form."""
        try:
            self.client.lookup_schema(subject, Schema(json.dumps(schema), "AVRO"))
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return False
            raise AccordError(f"schema registry: lookup in {subject}: {exc.error_message}") from exc
        return True

    def list(self) -> list[SubjectReport]:
        reports = []
        for subject in sorted(self._call("list subjects", self.client.get_subjects)):
            versions = self.versions(subject)
            latest = self.client.get_version(subject, versions[-1]) if versions else None
            name = _label(json.loads(latest.schema.schema_str)) if latest else "?"
            reports.append(
                SubjectReport(
                    subject,
                    str(name),
                    "registered",
                    self.level(subject),
                    versions,
                    latest.schema_id if latest else None,
                )
            )
        return reports

    def check(self) -> list[SubjectReport]:
        reports = []
        for subject, full_name in subjects(self.settings).items():
            local = load_local(self.settings.schemas.directory, full_name)
            versions = self.versions(subject)
            report = SubjectReport(subject, full_name, "new", self.level(subject), versions)
            if versions:
                history = self.registered(subject, versions)
                if self.already_registered(subject, local):
                    report.state = "unchanged"
                elif self._call(
                    f"check {subject}",
                    self.client.test_compatibility,
                    subject,
                    Schema(json.dumps(local), "AVRO"),
                ):
                    report.state = "compatible"
                    report.explanation = field_diff(history[-1], local)
                else:
                    report.state = "incompatible"
                    report.explanation = explain(report.level, history, local)
            reports.append(report)
        return reports

    def push(self) -> list[SubjectReport]:
        """Register what is new or compatible; refuse the whole push if anything is not."""
        reports = self.check()
        if any(r.state == "incompatible" for r in reports):
            for report in reports:
                if report.state != "incompatible":
                    report.state = f"{report.state} (not pushed)"
            return reports
        for report in reports:
            if report.state == "unchanged":
                continue
            local = load_local(self.settings.schemas.directory, report.schema)
            created = report.state == "new"
            try:
                report.schema_id = self.client.register_schema(
                    report.subject, Schema(json.dumps(local), "AVRO")
                )
            except SchemaRegistryError as exc:
                report.state = "refused"
                report.explanation = [f"registry refused it: {exc.error_message}"]
                continue
            if created:
                self._call(
                    "set compatibility",
                    self.client.set_compatibility,
                    report.subject,
                    self.settings.schemas.default_compatibility,
                )
                report.level = self.settings.schemas.default_compatibility
            report.state = "registered"
            report.versions = self.versions(report.subject)
        return reports

    def diff(self) -> list[SubjectReport]:
        reports = []
        for subject, full_name in subjects(self.settings).items():
            local = load_local(self.settings.schemas.directory, full_name)
            versions = self.versions(subject)
            report = SubjectReport(
                subject,
                full_name,
                "new" if not versions else "unchanged",
                self.level(subject) if versions else "-",
                versions,
            )
            if versions:
                latest = self.registered(subject, versions[-1:])[0]
                report.explanation = field_diff(latest, local)
                if not self.already_registered(subject, local):
                    report.state = "differs"
            else:
                report.explanation = [f"+ {f['name']}" for f in local["fields"]]
            reports.append(report)
        return reports
