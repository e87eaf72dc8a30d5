"""Emit: every new revision of a golden record becomes its outputs, exactly once.

Two halves. `plan_sinks` runs in the merge, beside the state it reads: it decides what
each target must apply (echo suppression: a target is never sent a value it already
holds). The merge writes the state with those orders to the `golden` table, whose
changelog is the one source of truth: each revision is written there once.

`Emitter` reads that changelog and, inside one Kafka transaction with its consumer
offsets, writes the golden record to `accord.golden`, one entry per changed field to
`accord.audit` and each order to `accord.sink.<target>`. A crash anywhere replays into
the same transaction boundary, so readers with `isolation.level=read_committed` never
see an output twice.

A revision whose outputs Kafka will never take (one above `worker.max_record_bytes`, or
one the broker refuses as too large or invalid, see `streams.refusal`) emits nothing: it
is dead-lettered with its changelog record's coordinates, and the batch goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import Counter

from streams.dlq import DeadLetter, DeadLetterWriter
from streams.errors import AccordError
from streams.health import StageProgress
from streams.merge import GoldenState, Outcome, SinkOrder, deletes_everywhere, loads, stage
from streams.model import FIELDS, Change, Op, Value
from streams.projection import SinkSpec
from streams.refusal import RECORD_TOO_LARGE, Refusal, oversize, refusal_of
from streams.rules import Rules
from streams.topics import first_offsets, usable

log = logging.getLogger(__name__)

POLL_S = 0.02  # longest a lone record waits to be read (see `Emitter.run`)
# Each transactional call gives up after this long instead of librdkafka's default of
# waiting forever: a broker restart must end in an abort and a retry, not a hung thread.
TXN_CALL_S = 15.0
# Assigned partitions with unread records and nothing read for this long: the clients are
# stuck (librdkafka can lose its group coordinator over a broker restart) and are rebuilt.
STALL_S = 30.0
EMITTED = Counter("accord_emit_records_total", "Records emitted", ["topic_kind"])
STATUS_FIELD = "active"  # the audit entry of an activation or deactivation


DELETED = "deleted"  # `sent` marker of a row Accord asked its target to delete
PENDING_CREATE = "+"  # `sent` key suffix of a row Accord asked its target to create


# ------------------------------------------------------------------ deciding: in merge


def plan_sinks(
    state: GoldenState, change: Change, sinks: dict[str, SinkSpec], rules: Rules
) -> list[SinkOrder]:
    """What each target must apply after `change` merged into `state` (updates `state.sent`).

    A target row gets the fields where the golden value differs from what that row last
    reported (its cells), never its own values back. The same projection is not sent
    twice to a row, unless the row itself reported again and still differs (a lossy
    round trip, or an edit that lost): the applier then writes only what differs in the
    row, which ends any exchange in one step.
    """
    golden = state.values()
    orders: list[SinkOrder] = []
    delete_everywhere = deletes_everywhere(state, rules)
    for target, spec in sinks.items():
        projected = {name: golden.get(name) for name in spec.fields}
        fingerprint = _fingerprint(projected)
        rows = [c for c in state.contributions.values() if c.system == target]
        if delete_everywhere:
            for row in rows:
                if spec.delete and row.alive and state.sent.get(row.link) != DELETED:
                    orders.append(SinkOrder(target, Op.DELETE, row.key, {}, ()))
                    state.sent[row.link] = DELETED
            continue
        if not rows:
            pending = f"{target}:{PENDING_CREATE}"
            wanted = tuple(name for name, value in projected.items() if value is not None)
            if spec.create and state.active and wanted and state.sent.get(pending) != fingerprint:
                orders.append(SinkOrder(target, Op.UPSERT, None, projected, wanted))
                state.sent[pending] = fingerprint
            continue
        for row in rows:
            if not row.alive:
                continue
            differs = tuple(
                name
                for name, value in projected.items()
                if (name in row.cells and not _same(row.cells[name].value, value))
                or (name not in row.cells and value is not None)
            )
            if not differs:
                state.sent.pop(row.link, None)
                continue
            if state.sent.get(row.link) == fingerprint and change.link != row.link:
                continue
            held = {name: row.cells[name].value if name in row.cells else None for name in differs}
            orders.append(SinkOrder(target, Op.UPSERT, row.key, projected, differs, held))
            state.sent[row.link] = fingerprint
            state.remember_sent(row.link, {name: projected[name] for name in differs})
    return orders


def plan_repair(
    state: GoldenState, change: Change, sinks: dict[str, SinkSpec], rules: Rules
) -> list[SinkOrder]:
    """The correction of one target row that holds `change.values` (a repair request).

    The row drifted without telling the merge (an edit its CDC did not carry, an apply
    that was lost), so its cells cannot be trusted: the observed values decide what
    differs and are the compare-and-set's expectation. No golden value moves.
    """
    spec = sinks.get(change.system)
    row = state.contributions.get(change.link)
    if spec is None or row is None or not row.alive:
        return []
    if deletes_everywhere(state, rules):
        if not spec.delete:
            return []
        state.sent[row.link] = DELETED
        return [SinkOrder(spec.target, Op.DELETE, row.key, {}, ())]
    golden = state.values()
    projected = {name: golden.get(name) for name in spec.fields}
    observed = change.values
    differs = tuple(
        name for name, value in projected.items() if not _same(observed.get(name), value)
    )
    if not differs:
        return []
    state.sent[row.link] = _fingerprint(projected)
    state.remember_sent(row.link, {name: projected[name] for name in differs})
    # A row that fails its own mapping has no canonical reading to compare and set on.
    held = {name: observed.get(name) for name in differs} if observed else None
    return [SinkOrder(spec.target, Op.UPSERT, row.key, projected, differs, held)]


def repair(state: GoldenState, change: Change, sinks: dict[str, SinkSpec], rules: Rules) -> Outcome:
    """Stage a repair request's correction as a new revision (see `plan_repair`)."""
    orders = plan_repair(state, change, sinks, rules)
    outcome = Outcome((), False, bool(orders), ())
    if orders:
        stage(state, change, outcome, orders)
    return outcome


def _fingerprint(values: dict[str, Value]) -> str:
    text = json.dumps(sorted(values.items()), default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _same(a: Value, b: Value) -> bool:
    return type(a) is type(b) and a == b


# --------------------------------------------------------------- producing: in emit


@dataclass(frozen=True)
class Outputs:
    golden: dict[str, Any] | None  # dev.accord.Customer, when the record itself changed
    audit: list[dict[str, Any]] = field(default_factory=list)  # dev.accord.AuditEntry
    sinks: list[dict[str, Any]] = field(default_factory=list)  # dev.accord.SinkEvent


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
                "source_ts": r.source_ts,
                "position": r.position,
                "rule": r.rule.value,
            }
            for name, r in state.golden.items()
        },
        "links": [{"system": c.system, "key": c.key} for c in state.contributions.values()],
        "updated_at": state.updated_ts // 1000,  # micros; the field is timestamp-millis
        "merged_into": state.merged_into,
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
                "source_ts": resolved.source_ts if resolved else cause.order[0],
                "position": resolved.position if resolved else cause.order[1],
                "rule": resolved.rule.value if resolved else "cleared",
                "change_id": state.last_change_id or "",
                "recorded_at": recorded_ms,
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
                "source_ts": cause.order[0],
                "position": cause.order[1],
                "rule": "delete_policy",
                "change_id": state.last_change_id or "",
                "recorded_at": recorded_ms,
            }
        )
    return entries


def sink_records(state: GoldenState, emitted_ms: int) -> list[dict[str, Any]]:
    records = []
    for order in state.outbox:
        records.append(
            {
                "event_id": f"{order.target}:{state.golden_id}:{state.revision}:"
                f"{order.target_key or PENDING_CREATE}",
                "target": order.target,
                "op": order.op.value,
                "target_key": order.target_key,
                "golden_id": state.golden_id,
                "golden_version": state.revision,
                "fields": {name: order.values.get(name) for name in FIELDS},
                "changed": list(order.changed),
                "expected": None
                if order.expected is None
                else {name: order.expected.get(name) for name in FIELDS},
                "caused_by": state.caused_by,
                "emitted_at": emitted_ms,
                "source_ts": state.caused_ts if state.caused_ts else None,
            }
        )
    return records


def outputs(state: GoldenState, now_ms: int) -> Outputs:
    """Everything the latest revision of `state` emits.

    Timestamps are epoch integers in the unit of their field's logical type, which
    fastavro writes as they are: datetimes cost the emitter about 8% of its encoding
    (issue 8) only to be taken apart again."""
    changed = state.version_revision == state.revision
    return Outputs(
        customer_record(state) if changed else None,
        audit_records(state, now_ms) if changed else [],
        sink_records(state, now_ms),
    )


def as_text(value: Value) -> str | None:
    """Audit values are text: booleans as true/false, decimals as written."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


# ------------------------------------------------------------------------ Kafka glue

Encoder = Callable[[dict[str, Any]], bytes]
Coordinates = tuple[str, int, int]  # topic, partition, offset of a changelog record


@dataclass(frozen=True)
class EmitTopics:
    changelog: str  # the golden table's changelog (input)
    golden: str
    audit: str
    sink_prefix: str  # + target name

    def sink(self, target: str) -> str:
        return f"{self.sink_prefix}{target}"


class Emitter:
    """Reads the golden changelog; writes outputs and offsets in one transaction per batch."""

    def __init__(
        self,
        kafka: dict[str, Any],
        group_id: str,
        transactional_id: str,
        topics: EmitTopics,
        encode_golden: Encoder,
        encode_audit: Encoder,
        encode_sink: Encoder,
        batch_size: int = 500,
        session_timeout_s: float = 45.0,
        compression: str = "none",
        dead_letters: Callable[[], DeadLetterWriter] | None = None,
        max_record_bytes: int = 900_000,
        progress: StageProgress | None = None,
    ) -> None:
        self.topics = topics
        self.progress = progress or StageProgress("emit")
        self._make_dead_letters = dead_letters
        self._dead_letters: DeadLetterWriter | None = None
        self.max_record_bytes = max_record_bytes
        # Revisions the broker refused an output of. A refusal reported for a batch may
        # be another record's (the broker refuses a whole batch): such a revision is a
        # suspect, produced alone next time; refused alone, it is dead-lettered.
        self._suspects: set[Coordinates] = set()
        self._refused: dict[Coordinates, Refusal] = {}
        self.dead_lettered = 0
        self.encode_golden = encode_golden
        self.encode_audit = encode_audit
        self.encode_sink = encode_sink
        self.batch_size = batch_size
        self._consumer_config = {
            **kafka,
            "group.id": group_id,
            "client.id": transactional_id,  # names this emitter in `accord monitor`
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": int(session_timeout_s * 1000),
        }
        self.consumer = self._new_consumer()
        self._last_read = time.monotonic()
        self._producer_config = {
            **kafka,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": 10_000,
            "linger.ms": 5,
            "compression.type": compression,
            # No batch above what a topic takes: the broker refuses a batch whole.
            "batch.size": max_record_bytes,
        }
        self.producer = self._new_producer()
        self._emitted: dict[str, int] = {}  # golden id -> last revision emitted in this run
        self.revisions_emitted = 0

    def step(self, timeout_s: float = 0.5) -> int:
        """One batch: returns how many revisions it emitted."""
        messages = self.consumer.consume(self.batch_size, timeout_s)
        if messages:
            self._last_read = time.monotonic()
        messages = [m for m in messages if usable(m)]
        if not messages:
            return 0
        now_ms = int(time.time() * 1000)
        emitted: dict[str, int] = {}
        letters: list[DeadLetter] = []
        try:
            self.producer.begin_transaction()
            for message in messages:
                if message.value() is None:
                    continue
                state = loads(message.value(), cells=False)
                last = emitted.get(state.golden_id, self._emitted.get(state.golden_id, 0))
                if not state.fresh or state.revision <= last:
                    continue
                coordinates = (message.topic(), message.partition(), message.offset())
                records, refusal = self._records(state, now_ms)
                refusal = self._refused.get(coordinates) or refusal
                if refusal is None:
                    self._produce(records, coordinates)
                else:
                    letters.append(self._letter(message, coordinates, refusal))
                emitted[state.golden_id] = state.revision
            self._write_letters(letters)
            self.producer.send_offsets_to_transaction(
                self.consumer.position(self.consumer.assignment()),
                self.consumer.consumer_group_metadata(),
                TXN_CALL_S,
            )
            self.producer.commit_transaction(TXN_CALL_S)
        except KafkaException as exc:
            self._serve_reports()  # the refusals the next round needs
            log.warning("emit transaction failed, rewinding the batch: %s", exc)
            self._abort(messages)
            return 0
        for letter in letters:  # on the DLQ now, past the committed offsets
            self._refused.pop((letter.topic, letter.partition, letter.offset), None)
        self._emitted.update(emitted)
        self.revisions_emitted += len(emitted) - len(letters)
        self.dead_lettered += len(letters)
        return len(emitted) - len(letters)

    def _records(
        self, state: GoldenState, now_ms: int
    ) -> tuple[list[tuple[str, str, bytes, bytes]], Refusal | None]:
        """The revision's outputs encoded, as (kind, topic, key, value), or the refusal of
        the first one above `max_record_bytes`."""
        result = outputs(state, now_ms)
        key = state.golden_id.encode()
        records = []
        if result.golden is not None:
            records.append(("golden", self.topics.golden, key, self.encode_golden(result.golden)))
        for entry in result.audit:
            records.append(("audit", self.topics.audit, key, self.encode_audit(entry)))
        for event in result.sinks:
            topic = self.topics.sink(event["target"])
            records.append(("sink", topic, key, self.encode_sink(event)))
        for _kind, topic, _key, value in records:
            refusal = oversize(len(value), self.max_record_bytes, f"record for {topic}",
                               RECORD_TOO_LARGE)  # fmt: skip
            if refusal is not None:
                return [], refusal
        return records, None

    def _produce(self, records: list[tuple[str, str, bytes, bytes]], at: Coordinates) -> None:
        alone = at in self._suspects
        if alone:  # in batches of its own: a refusal then is its own
            self._flush()
        report = partial(self._delivered, at, alone)
        for kind, topic, key, value in records:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=report)
            except KafkaException as exc:  # refused before sending (librdkafka's own limit)
                refusal = refusal_of(exc)
                if refusal is not None:
                    self._refused[at] = refusal
                raise  # earlier outputs of the revision are in the transaction: abort it
            EMITTED.labels(kind).inc()
        if alone:
            self._flush()

    def _serve_reports(self) -> None:
        # A fatal producer raises its error again: `_abort` replaces it.
        with contextlib.suppress(KafkaException):
            self.producer.poll(0)

    def _flush(self) -> None:
        """Send what is batched and serve its delivery reports. confluent-kafka's flush
        of a producer in a fatal state (fenced) raises SystemError: a KafkaException here,
        so the batch is aborted and the producer replaced as for any failed transaction."""
        try:
            self.producer.flush(TXN_CALL_S)
        except SystemError as exc:
            raise KafkaException(KafkaError(KafkaError._FATAL, str(exc), fatal=True)) from exc

    def _delivered(self, at: Coordinates, alone: bool, error: Any, _message: Any) -> None:
        refusal = refusal_of(error)
        if refusal is None:
            if alone and error is None:
                self._suspects.discard(at)
            return
        if alone:
            self._suspects.discard(at)
            self._refused[at] = refusal
        else:
            self._suspects.add(at)

    def _letter(self, message: Any, at: Coordinates, refusal: Refusal) -> DeadLetter:
        log.warning("emit: revision at %s/%d/%d dead-lettered (%s): %s", *at,
                    refusal.reason, refusal.detail)  # fmt: skip
        return DeadLetter.at(
            at,
            message.key(),
            message.value(),
            refusal.reason,
            f"its outputs were not emitted: {refusal.detail}",
            stage="emit",
            replayable=False,  # a changelog record: only the merge writes the changelog
        )

    def _write_letters(self, letters: list[DeadLetter]) -> None:
        """In the batch's transaction: they commit with the offsets past their revisions."""
        if not letters:
            return
        if self._make_dead_letters is None:
            raise AccordError(f"emit: {len(letters)} revision(s) refused and no DLQ to write to")
        if self._dead_letters is None:
            self._dead_letters = self._make_dead_letters()
        for letter in letters:
            self._dead_letters.write(letter, self.producer)

    def _new_consumer(self) -> Consumer:
        consumer = Consumer(self._consumer_config)
        consumer.subscribe([self.topics.changelog])
        return consumer

    def _stalled(self) -> bool:
        """Nothing read for STALL_S although records wait: on a partition this emitter
        holds, or, holding none, anywhere in the changelog past the group's commits."""
        if time.monotonic() - self._last_read < STALL_S:
            return False
        self._last_read = time.monotonic()  # look again in STALL_S at the earliest
        try:
            partitions = self.consumer.assignment()
            if partitions:
                positions = self.consumer.position(partitions)
            else:  # left without partitions: is the group as a whole behind?
                metadata = self.consumer.list_topics(self.topics.changelog, timeout=5)
                count = len(metadata.topics[self.topics.changelog].partitions)
                every = [TopicPartition(self.topics.changelog, p) for p in range(count)]
                positions = self.consumer.committed(every, timeout=5)
            for tp in positions:
                _, high = self.consumer.get_watermark_offsets(tp, timeout=5)
                # A position never set after this long means fetching never started.
                if high > max(tp.offset, 0):
                    return True
        except KafkaException as exc:
            # Committed offsets a dead transaction still holds time out: rebuilding, whose
            # new producer aborts that transaction, is the cure for that too.
            log.warning("emit: cannot check progress (%s)", exc)
            return True
        return False

    def _rebuild(self) -> None:
        """New clients: the consumer rejoins the group from the committed offsets, and the
        new producer's `init_transactions` aborts whatever the old one left open."""
        log.warning("emit: no progress for %.0fs with records waiting; rebuilding clients", STALL_S)
        if self._replace_producer():
            self.consumer.close()
            self.consumer = self._new_consumer()
        self._last_read = time.monotonic()

    def _replace_producer(self) -> bool:
        try:
            producer = self._new_producer()
        except KafkaException as exc:  # the broker is still away: the next round tries again
            log.warning("emit: cannot start a new transactional producer yet (%s)", exc)
            return False
        self.producer.purge()
        self.producer = producer
        return True

    def _new_producer(self) -> Producer:
        producer = Producer(self._producer_config)
        producer.init_transactions(4 * TXN_CALL_S)
        return producer

    def _abort(self, messages: list[Any]) -> None:
        """Abort the batch's transaction and read the batch again.

        A producer that cannot abort (fenced, fatal error, or a call that timed out
        mid-restart) is replaced: its successor's `init_transactions` bumps the epoch,
        which fences the old one and makes the broker abort what it left open.
        """
        try:
            self.producer.abort_transaction(TXN_CALL_S)
        except KafkaException as exc:
            log.warning("emit: abort failed (%s); starting a new transactional producer", exc)
            self._replace_producer()
        for tp in first_offsets(messages):
            self.consumer.seek(tp)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # consume() waits its whole timeout unless a full batch is there: keep it
            # short, or every revision waits that long before it is emitted.
            if emitted := self.step(timeout_s=POLL_S):
                self.progress.moved(emitted)
            else:
                self.progress.look_at_lag(self.consumer)  # for /health
            if self._stalled():
                self._rebuild()

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)
