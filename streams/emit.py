"""Emit: every new golden version becomes its outputs, exactly once.

The merge writes each golden record's state to the `golden` table, whose changelog is
the one source of truth: a version is written there once, together with what it
changed. This stage reads that changelog and, inside one Kafka transaction with its
consumer offsets, writes the golden record to `accord.golden` and one entry per changed
field to `accord.audit`. A crash anywhere replays into the same transaction boundary,
so readers with `isolation.level=read_committed` never see an entry twice.

`outputs` is plain: state in, records out. `Emitter` is the Kafka glue around it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import Counter

from streams.merge import GoldenState, loads
from streams.model import EPOCH, FIELDS, Value

log = logging.getLogger(__name__)

EMITTED = Counter("accord_emit_records_total", "Records emitted", ["topic_kind"])
STATUS_FIELD = "active"  # the audit entry of an activation or deactivation


@dataclass(frozen=True)
class Outputs:
    golden: dict[str, Any]  # dev.accord.Customer
    audit: list[dict[str, Any]] = field(default_factory=list)  # dev.accord.AuditEntry


def customer_record(state: GoldenState) -> dict[str, Any]:
    return {
        "golden_id": state.golden_id,
        "version": state.version,
        "active": state.active,
        "fields": {name: state.golden[name].value if name in state.golden else None
                   for name in FIELDS},
        "provenance": {
            name: {
                "system": r.system,
                "source_ts": _micros(r.source_ts),
                "position": r.position,
                "rule": r.rule.value,
            }
            for name, r in state.golden.items()
        },
        "links": [{"system": c.system, "key": c.key} for c in state.contributions.values()],
        "updated_at": _micros(state.updated_ts),
    }  # fmt: skip


def audit_records(state: GoldenState, recorded_ms: int) -> list[dict[str, Any]]:
    """One entry per field the latest version changed, with the rule that decided."""
    cause = state.cause
    entries = []
    for change in state.last_changes:
        resolved = state.golden.get(change.field)
        entries.append(
            {
                "audit_id": f"{state.golden_id}:{state.version}:{change.field}",
                "golden_id": state.golden_id,
                "golden_version": state.version,
                "field": change.field,
                "before": as_text(change.before),
                "after": as_text(change.after),
                "system": resolved.system if resolved else cause.system,
                "source_ts": _micros(resolved.source_ts if resolved else cause.order[0]),
                "position": resolved.position if resolved else cause.order[1],
                "rule": resolved.rule.value if resolved else "cleared",
                "change_id": state.last_change_id or "",
                "recorded_at": _millis(recorded_ms),
            }
        )
    if state.status_changed:
        entries.append(
            {
                "audit_id": f"{state.golden_id}:{state.version}:{STATUS_FIELD}",
                "golden_id": state.golden_id,
                "golden_version": state.version,
                "field": STATUS_FIELD,
                "before": as_text(not state.active),
                "after": as_text(state.active),
                "system": cause.system,
                "source_ts": _micros(cause.order[0]),
                "position": cause.order[1],
                "rule": "delete_policy",
                "change_id": state.last_change_id or "",
                "recorded_at": _millis(recorded_ms),
            }
        )
    return entries


def outputs(state: GoldenState, recorded_ms: int) -> Outputs:
    return Outputs(customer_record(state), audit_records(state, recorded_ms))


def as_text(value: Value) -> str | None:
    """Audit values are text: booleans as true/false, decimals as written."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _micros(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


def _millis(millis: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=millis)


# ------------------------------------------------------------------------ Kafka glue

Encoder = Callable[[dict[str, Any]], bytes]


@dataclass(frozen=True)
class EmitTopics:
    changelog: str  # the golden table's changelog (input)
    golden: str
    audit: str


class Emitter:
    """Reads the golden changelog; writes outputs and offsets in one transaction per batch."""

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        transactional_id: str,
        topics: EmitTopics,
        encode_golden: Encoder,
        encode_audit: Encoder,
        batch_size: int = 500,
    ) -> None:
        self.topics = topics
        self.encode_golden = encode_golden
        self.encode_audit = encode_audit
        self.batch_size = batch_size
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "transactional.id": transactional_id,
                "transaction.timeout.ms": 10_000,
                "linger.ms": 5,
            }
        )
        self.producer.init_transactions(30)
        self.consumer.subscribe([topics.changelog])
        self._emitted: dict[str, int] = {}  # golden id -> last version emitted in this run
        self.versions_emitted = 0

    def step(self, timeout_s: float = 0.5) -> int:
        """One batch: returns how many golden versions it emitted."""
        messages = self.consumer.consume(self.batch_size, timeout_s)
        messages = [m for m in messages if _ok(m)]
        if not messages:
            return 0
        now_ms = int(time.time() * 1000)
        emitted: dict[str, int] = {}
        self.producer.begin_transaction()
        try:
            for message in messages:
                if message.value() is None:
                    continue
                state = loads(message.value())
                last = emitted.get(state.golden_id, self._emitted.get(state.golden_id, 0))
                if not state.fresh or state.version <= last:
                    continue
                self._produce(state, now_ms)
                emitted[state.golden_id] = state.version
            self.producer.send_offsets_to_transaction(
                self.consumer.position(self.consumer.assignment()),
                self.consumer.consumer_group_metadata(),
            )
            self.producer.commit_transaction()
        except KafkaException as exc:
            log.warning("emit transaction failed, rewinding the batch: %s", exc)
            self._abort(messages)
            return 0
        self._emitted.update(emitted)
        self.versions_emitted += len(emitted)
        return len(emitted)

    def _produce(self, state: GoldenState, now_ms: int) -> None:
        result = outputs(state, now_ms)
        key = state.golden_id.encode()
        self.producer.produce(self.topics.golden, key=key, value=self.encode_golden(result.golden))
        EMITTED.labels("golden").inc()
        for entry in result.audit:
            self.producer.produce(self.topics.audit, key=key, value=self.encode_audit(entry))
        EMITTED.labels("audit").inc(len(result.audit))

    def _abort(self, messages: list[Any]) -> None:
        try:
            self.producer.abort_transaction()
        except KafkaException as exc:
            if exc.args and exc.args[0].fatal():
                raise
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            first.setdefault((message.topic(), message.partition()), message.offset())
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)


def _ok(message: Any) -> bool:
    error = message.error()
    if error is None:
        return True
    if error.fatal():
        raise KafkaException(error)
    if error.code() != KafkaError._PARTITION_EOF:
        log.warning("emit consumer: %s", error)
    return False
