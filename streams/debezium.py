"""The Debezium change envelope, unwrapped into plain Python values.

Debezium marks semantic types with a `connect.name` on the Avro type (timestamps as
ISO strings or epoch numbers, enums as strings, uuids, decimals). The converters for a
writer schema are planned once per schema id, then applied to every row it writes.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from streams.codec import WriterSchema

Converter = Callable[[Any], Any]
EPOCH = dt.datetime(1970, 1, 1)
EPOCH_DATE = dt.date(1970, 1, 1)


def _time_from_micros(micros: int) -> dt.time:
    return (EPOCH + dt.timedelta(microseconds=micros)).time()


def _variable_scale_decimal(value: dict[str, Any]) -> Decimal:
    raw = value["value"]
    raw = base64.b64decode(raw) if isinstance(raw, str) else raw
    return Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(-value["scale"])


CONVERTERS: dict[str, Converter] = {
    "io.debezium.time.ZonedTimestamp": lambda v: dt.datetime.fromisoformat(v),
    "io.debezium.time.ZonedTime": lambda v: dt.time.fromisoformat(v),
    "io.debezium.time.Timestamp": lambda v: EPOCH + dt.timedelta(milliseconds=v),
    "io.debezium.time.MicroTimestamp": lambda v: EPOCH + dt.timedelta(microseconds=v),
    "io.debezium.time.NanoTimestamp": lambda v: EPOCH + dt.timedelta(microseconds=v // 1000),
    "io.debezium.time.Date": lambda v: EPOCH_DATE + dt.timedelta(days=v),
    "io.debezium.time.Time": lambda v: _time_from_micros(v * 1000),
    "io.debezium.time.MicroTime": _time_from_micros,
    "io.debezium.time.NanoTime": lambda v: _time_from_micros(v // 1000),
    "io.debezium.data.Uuid": uuid.UUID,
    "io.debezium.data.Enum": str,
    "io.debezium.data.EnumSet": lambda v: [item for item in v.split(",") if item],
    "io.debezium.data.VariableScaleDecimal": _variable_scale_decimal,
}


def _decimal_from_bytes(scale: int) -> Converter:
    """Decimals whose Avro type lacks the logical type arrive as raw two's-complement bytes."""
    return lambda v: (
        v
        if isinstance(v, Decimal)
        else Decimal(int.from_bytes(v, "big", signed=True)).scaleb(-scale)
    )


def _converter_for(avro_type: Any) -> Converter | None:
    if isinstance(avro_type, list):  # ["null", X]: plan for X
        branches = [t for t in avro_type if t != "null"]
        return _converter_for(branches[0]) if len(branches) == 1 else None
    if not isinstance(avro_type, dict):
        return None
    name = avro_type.get("connect.name")
    if name in CONVERTERS:
        return CONVERTERS[name]
    if name == "org.apache.kafka.connect.data.Decimal" and "logicalType" not in avro_type:
        return _decimal_from_bytes(int(avro_type.get("connect.parameters", {}).get("scale", 0)))
    return None


def plan_row(row_schema: dict[str, Any]) -> dict[str, Converter]:
    """Column name -> converter, for the columns whose type needs one."""
    plan = {}
    for field in row_schema.get("fields", []):
        converter = _converter_for(field["type"])
        if converter is not None:
            plan[field["name"]] = converter
    return plan


def convert_row(row: dict[str, Any] | None, plan: dict[str, Converter]) -> dict[str, Any] | None:
    """Typed column values; a value its logical type cannot parse is not a valid envelope."""
    if row is None or not plan:
        return row
    converted = {}
    for column, value in row.items():
        if value is None or column not in plan:
            converted[column] = value
            continue
        try:
            converted[column] = plan[column](value)
        except (ValueError, TypeError, OverflowError, KeyError) as exc:
            raise EnvelopeError(f"column {column!r}: {value!r} is not valid: {exc}") from exc
    return converted


@dataclass(frozen=True)
class SourcePosition:
    """Where a change sits in its source's log; `identity` is stable across replays."""

    connector: str
    database: str
    table: str
    commit_ts_us: int
    snapshot: bool
    lsn: int | None = None
    binlog_file: str | None = None
    binlog_pos: int | None = None
    binlog_row: int | None = None
    gtid: str | None = None

    @property
    def identity(self) -> str:
        if self.lsn is not None:
            return f"lsn:{self.lsn}"
        return f"binlog:{self.binlog_file}:{self.binlog_pos}:{self.binlog_row}"


@dataclass(frozen=True)
class SourceChange:
    """One row change from a Debezium envelope, with typed column values."""

    topic: str
    op: str  # c(reate), u(pdate), d(elete), r(ead by snapshot)
    key: dict[str, Any]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    position: SourcePosition
    captured_ms: int

    @property
    def row(self) -> dict[str, Any]:
        """The row the change is about: `after`, or `before` for a delete."""
        return self.after if self.after is not None else (self.before or {})

    @property
    def identity(self) -> str:
        """Same change, same identity: topic, key and source position."""
        key = ",".join(f"{k}={v}" for k, v in sorted(self.key.items()))
        return f"{self.topic}|{key}|{self.position.identity}"


class EnvelopeError(ValueError):
    """A decoded record that is not a Debezium change envelope."""


class EnvelopeReader:
    """Unwraps decoded envelopes; plans conversions once per writer schema."""

    def __init__(self) -> None:
        self._plans: dict[int, dict[str, Converter]] = {}

    def plan(self, schema: WriterSchema) -> dict[str, Converter]:
        plan = self._plans.get(schema.schema_id)
        if plan is None:
            plan = plan_row(_row_schema(schema.raw))
            self._plans[schema.schema_id] = plan
        return plan

    def key_plan(self, schema: WriterSchema) -> dict[str, Converter]:
        plan = self._plans.get(-schema.schema_id)  # keys and values never share an id here
        if plan is None:
            plan = plan_row(schema.raw) if schema.raw.get("type") == "record" else {}
            self._plans[-schema.schema_id] = plan
        return plan

    def unwrap(
        self,
        topic: str,
        key: dict[str, Any],
        key_schema: WriterSchema | None,
        value: dict[str, Any],
        value_schema: WriterSchema,
    ) -> SourceChange:
        try:
            op, source = value["op"], value["source"]
        except (KeyError, TypeError) as exc:
            raise EnvelopeError(f"not a Debezium envelope: missing {exc}") from exc
        if op not in ("c", "u", "d", "r"):
            raise EnvelopeError(f"unknown Debezium op {op!r}")
        try:
            return self._change(topic, op, source, key, key_schema, value, value_schema)
        except (KeyError, TypeError) as exc:
            raise EnvelopeError(f"not a Debezium envelope: {type(exc).__name__} {exc}") from exc

    def _change(
        self,
        topic: str,
        op: str,
        source: dict[str, Any],
        key: dict[str, Any],
        key_schema: WriterSchema | None,
        value: dict[str, Any],
        value_schema: WriterSchema,
    ) -> SourceChange:
        plan = self.plan(value_schema)
        key_plan = self.key_plan(key_schema) if key_schema else {}
        commit_us = source.get("ts_us") or source["ts_ms"] * 1000
        position = SourcePosition(
            connector=source["connector"],
            database=source["db"],
            table=source.get("table") or "",
            commit_ts_us=commit_us,
            snapshot=source.get("snapshot") not in (None, "false"),
            lsn=source.get("lsn"),
            binlog_file=source.get("file"),
            binlog_pos=source.get("pos"),
            binlog_row=source.get("row"),
            gtid=source.get("gtid"),
        )
        return SourceChange(
            topic=topic,
            op=op,
            key=convert_row(key, key_plan) or {},
            before=convert_row(value.get("before"), plan),
            after=convert_row(value.get("after"), plan),
            position=position,
            captured_ms=value.get("ts_ms") or 0,
        )


def _row_schema(envelope: dict[str, Any]) -> dict[str, Any]:
    """The row record schema inside an envelope's `before`/`after` union."""
    for field in envelope.get("fields", []):
        if field["name"] in ("before", "after"):
            for branch in field["type"] if isinstance(field["type"], list) else [field["type"]]:
                if isinstance(branch, dict) and branch.get("type") == "record":
                    return branch
    raise EnvelopeError(f"schema {envelope.get('name')!r} is not a Debezium envelope")
