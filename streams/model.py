"""The canonical customer model every stage speaks: field names and one normalized change.

Pure data, no I/O: mapping produces `Change`s, identity fills in their golden id, the
merge folds them into golden records. `tests/unit/test_model.py` keeps `FIELDS` equal
to `schemas/dev.accord.CanonicalFields.avsc`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any

from streams.debezium import SourcePosition

FIELDS: tuple[str, ...] = (
    "first_name",
    "last_name",
    "email",
    "phone",
    "company",
    "segment",
    "country",
    "marketing_opt_in",
    "tax_id",
    "street",
    "city",
    "postal_code",
    "currency",
    "payment_terms",
    "credit_limit",
    "account_status",
    "support_tier",
    "locale",
)
SYSTEMS: tuple[str, ...] = ("crm", "billing", "support")
# The `system` of a merge's control changes (`Change.merge_into`, `Change.absorb`).
CONTROL_SYSTEM = "accord"
DECIMAL_FIELDS = frozenset({"credit_limit"})
BOOLEAN_FIELDS = frozenset({"marketing_opt_in"})

Value = str | bool | Decimal | None


class Op(StrEnum):
    UPSERT = "UPSERT"
    DELETE = "DELETE"


def sortable_position(position: SourcePosition) -> str:
    """A source log position as text that sorts in log order (within one system)."""
    if position.lsn is not None:
        return f"lsn:{position.lsn:020d}"
    return (
        f"binlog:{position.binlog_file or ''}:{position.binlog_pos or 0:015d}"
        f":{position.binlog_row or 0:06d}"
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One normalized change to one source row.

    `values` holds only the fields the change carries: a carried None says "this row has
    no value", an absent field says "this change does not speak about it" (a soft rule
    dropped it, or the system does not map it).
    """

    change_id: str  # stable across replays: topic, key and source position
    system: str
    source_key: str
    op: Op
    source_ts: int  # source commit time, microseconds since the epoch
    position: str  # `sortable_position`: orders changes of one row
    values: Mapping[str, Value] = field(default_factory=dict)
    snapshot: bool = False
    golden_id: str | None = None
    captured_at_ms: int = 0
    # A repair request (`accord reconcile --repair`): `values` are what the target row
    # holds now, read by reconcile. The merge corrects the row and resolves nothing from it.
    observed: bool = False
    # The applier's report of a row it is creating (`streams.sinks`): `values` are what it
    # inserts. The merge recognises the row's CDC echo by its key, never by values alone.
    created: bool = False
    # The commit time the source stated, when it ran more than `worker.max_clock_skew_s`
    # ahead of the capture time and `source_ts` was clamped to it (`streams.mapping`).
    clamped_from: int | None = None
    # A merge's control changes (`streams.merging`): they carry no row. `merge_into`, on
    # the merged record's key: retire it into that record. `absorb`, on the surviving
    # record's key: the merged record's whole state (`streams.merge.dumps`) to take in.
    merge_into: str | None = None
    absorb: bytes | None = None

    @property
    def is_control(self) -> bool:
        """A merge's control change, not a change of a source row."""
        return self.merge_into is not None or self.absorb is not None

    @property
    def link(self) -> str:
        """The source row this change is about, as `system:key`."""
        return f"{self.system}:{self.source_key}"

    @property
    def order(self) -> tuple[int, str]:
        """Total order of changes to one source row: commit time, then log position."""
        return (self.source_ts, self.position)

    def with_golden_id(self, golden_id: str) -> Change:
        return replace(self, golden_id=golden_id)

    # -- Avro (dev.accord.CustomerChange) ---------------------------------------------

    def to_record(self) -> dict[str, Any]:
        return {
            "change_id": self.change_id,
            "system": self.system,
            "source_key": self.source_key,
            "op": self.op.value,
            "golden_id": self.golden_id,
            "source_ts": _micros_to_datetime(self.source_ts),
            "position": self.position,
            "snapshot": self.snapshot,
            "fields": {name: self.values.get(name) for name in FIELDS},
            "present": [name for name in FIELDS if name in self.values],
            "captured_at": _micros_to_datetime(self.captured_at_ms * 1000),
            "observed": self.observed,
            "created": self.created,
            "clamped_from": None
            if self.clamped_from is None
            else _micros_to_datetime(self.clamped_from),
            "merge_into": self.merge_into,
            "absorb": self.absorb,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Change:
        fields = record["fields"]
        return cls(
            change_id=record["change_id"],
            system=record["system"],
            source_key=record["source_key"],
            op=Op(record["op"]),
            source_ts=_datetime_to_micros(record["source_ts"]),
            position=record["position"],
            values={name: fields.get(name) for name in record["present"]},
            snapshot=record["snapshot"],
            golden_id=record["golden_id"],
            captured_at_ms=_datetime_to_micros(record["captured_at"]) // 1000,
            observed=record.get("observed", False),
            created=record.get("created", False),
            clamped_from=None
            if record.get("clamped_from") is None
            else _datetime_to_micros(record["clamped_from"]),
            merge_into=record.get("merge_into"),
            absorb=record.get("absorb"),
        )


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _micros_to_datetime(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


def _datetime_to_micros(value: dt.datetime | int) -> int:
    if isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
