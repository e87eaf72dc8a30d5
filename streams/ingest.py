"""Ingest, first stage: raw Debezium messages in, canonical changes with golden ids out.

Every message ends up in exactly one place: a change handed on, a tombstone skipped
(the delete before it carries the change), a duplicate or a delete of a row never seen
(both counted), a change of a row identity holds (counted and recorded in the hold, see
`streams.identity`: not a dead letter, as nothing is wrong with it; with the review topic
configured, the hold and the change are written there, `streams.review`), or a dead letter
with its reason. A registry or Redis outage is not the
message's fault: the batch is retried, never dead-lettered.

`RawDecoder` and `IngestPipeline` are plain logic over messages with confluent-kafka's
accessors (`topic()`, `partition()`, `offset()`, `key()`, `value()`); the Faust agent in
`IngestLoop` (what a worker runs) and `RawChangeConsumer` (decoding only, for tests)
below are thin confluent-kafka loops around them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from prometheus_client import Counter, Gauge

from streams.codec import (
    AvroCodec,
    DecodeError,
    RegistryUnavailable,
    schema_id_of,
)
from streams.debezium import EnvelopeError, EnvelopeReader, SourceChange
from streams.dedupe import Deduplicator, RedisUnavailable, origin_of
from streams.dlq import DeadLetter, DeadLetterWriter
from streams.errors import AccordError
from streams.health import StageProgress
from streams.identity import Hold, IdentityLost, IdentityResolver
from streams.mapping import Mapper, Rejected
from streams.model import Change
from streams.refusal import PRODUCE_REFUSED, refusal_of
from streams.registry import registry_client, writer_schemas
from streams.review import Origin, hold_fields, hold_record
from streams.settings import AccordSettings
from streams.topics import first_offsets, next_offsets, usable

log = logging.getLogger(__name__)

DECODED = Counter("accord_ingest_decoded_total", "Raw changes decoded", ["topic"])
INGESTED = Counter(
    "accord_ingest_events_total",
    "Raw messages by what ingest did with them",
    ["outcome"],  # change, tombstone, duplicate, unknown_delete, held, released, dead_letter
)
HELD = Counter(
    "accord_identity_held_total",
    "Changes of source rows held by identity instead of linked, by why",
    ["system", "reason"],  # reason: max_rows_per_record, role_address, review
)
HELD_ROWS = Gauge(
    "accord_identity_held_rows",
    "Source rows held by identity now, awaiting review (shared by every worker)",
)
NOT_AN_ENVELOPE = "not_a_debezium_envelope"
VALIDATION_FAILED = "validation_failed"


class ProduceRefused(AccordError):
    """The broker refused to take a change made from a raw record; the detail is the
    broker's (or librdkafka's) error."""

    def __init__(self, topic: str, error: KafkaError) -> None:
        super().__init__(f"{topic} refused the change: {error.name()}: {error.str()}")
        self.topic = topic
        self.error = error


class RawDecoder:
    """Wire bytes to `SourceChange`; a refusal becomes a `DeadLetter`."""

    def __init__(self, codec: AvroCodec, readers: dict[str, dict[str, Any]] | None = None) -> None:
        self.codec = codec
        self.envelopes = EnvelopeReader()
        self.readers = readers or {}  # topic -> reader schema for values

    def prefetch(self, messages: list[Any]) -> None:
        """Fetch the writer schemas of a batch's keys and values together, so that the
        retries of the ids the registry will not give wait once for the whole batch.
        Raises RegistryUnavailable."""
        ids = (schema_id_of(p) for m in messages for p in (m.key(), m.value()))
        self.codec.schemas.prefetch(i for i in ids if i is not None)

    def decode(self, message: Any) -> SourceChange | DeadLetter | None:
        """None for a tombstone. Raises RegistryUnavailable: retry, do not dead-letter."""
        value = message.value()
        if value is None:
            return None
        try:
            key = self.codec.decode(message.key()) if message.key() else None
            decoded = self.codec.decode(value, self.readers.get(message.topic()))
            return self.envelopes.unwrap(
                message.topic(),
                key.value if key else {},
                key.schema if key else None,
                decoded.value,
                decoded.schema,
            )
        except DecodeError as exc:
            return DeadLetter.of(message, exc.reason.value, exc, stage="decode")
        except EnvelopeError as exc:
            return DeadLetter.of(message, NOT_AN_ENVELOPE, exc, stage="decode")


class ValidationFailed(ValueError):
    """A record that broke a hard mapping rule; the message names every rule it broke."""


@dataclass
class IngestBatch:
    changes: list[Change]  # golden ids resolved, in input order
    dead: list[DeadLetter]
    origins: list[Any] = field(default_factory=list)  # the raw message of each change
    tombstones: int = 0
    duplicates: int = 0
    unknown_deletes: int = 0
    held: int = 0  # changes of held rows: recorded in the hold, handed on nowhere
    released: int = 0  # deletes of held rows: the hold ends
    # For the review topic: (row, hold record or None when its hold ended, raw message).
    reviews: list[tuple[str, bytes | None, Any]] = field(default_factory=list)
    dropped_fields: int = 0  # soft rule failures: the field was left out


class IngestPipeline:
    """decode -> map & validate -> dedupe -> resolve identity, one batch at a time.

    Raises `RegistryUnavailable` or `streams.dedupe.RedisUnavailable` when a service is
    down: the caller retries the whole batch, having handed nothing on.
    """

    def __init__(
        self,
        decoder: RawDecoder,
        mapper: Mapper,
        dedupe: Deduplicator,
        identity: IdentityResolver,
    ) -> None:
        self.decoder = decoder
        self.mapper = mapper
        self.dedupe = dedupe
        self.identity = identity

    def process(self, messages: list[Any]) -> IngestBatch:
        batch = IngestBatch([], [])
        mapped: list[tuple[Any, Change]] = []
        self.decoder.prefetch(messages)
        for message in messages:
            decoded = self.decoder.decode(message)
            if decoded is None:
                batch.tombstones += 1
            elif isinstance(decoded, DeadLetter):
                batch.dead.append(decoded)
            else:
                outcome = self.mapper.map(decoded)
                if isinstance(outcome, Rejected):
                    error = ValidationFailed(outcome.describe())
                    batch.dead.append(DeadLetter.of(message, outcome.reason, error, "map"))
                else:
                    batch.dropped_fields += len(outcome.dropped)
                    mapped.append((message, outcome.change))

        duplicates = self.dedupe.duplicates(
            [(c.change_id, origin_of(m.topic(), m.partition(), m.offset())) for m, c in mapped]
        )
        fresh = [pair for pair, dup in zip(mapped, duplicates, strict=True) if not dup]
        batch.duplicates = len(mapped) - len(fresh)
        resolved = self.identity.resolve_batch([change for _, change in fresh])
        for (message, change), result in zip(fresh, resolved.results, strict=True):
            if result.golden_id is not None:
                batch.changes.append(change.with_golden_id(result.golden_id))
                batch.origins.append(message)
            elif result.hold is not None:
                batch.held += 1
                _report_hold(result.hold)
                origin = Origin(message.topic(), message.partition(), message.offset())
                record = hold_record(
                    change.link, hold_fields(result.hold), change, origin, int(time.time() * 1000)
                )
                batch.reviews.append((change.link, record, message))
            elif result.released:
                batch.released += 1
                batch.reviews.append((change.link, None, message))
                log.info("identity: %s was deleted while held; its hold ends", change.link)
            else:
                batch.unknown_deletes += 1
        if fresh:
            HELD_ROWS.set(resolved.held_rows)

        for outcome, count in (
            ("change", len(batch.changes)),
            ("tombstone", batch.tombstones),
            ("duplicate", batch.duplicates),
            ("unknown_delete", batch.unknown_deletes),
            ("held", batch.held),
            ("released", batch.released),
            ("dead_letter", len(batch.dead)),
        ):
            if count:
                INGESTED.labels(outcome).inc(count)
        return batch


def _report_hold(hold: Hold) -> None:
    """Counts a held change; a row held for the first time gets a warning (no PII)."""
    HELD.labels(hold.system, hold.reason.value).inc()
    if hold.updates == 0:
        log.warning("identity: %s:%s held, not linked: %s", hold.system, hold.key, hold.describe())
    else:
        log.debug("identity: %s:%s still held (%d changes since)", hold.system, hold.key,
                  hold.updates)  # fmt: skip


@dataclass
class StepResult:
    consumed: int = 0
    changes: int = 0
    dead: int = 0
    tombstones: int = 0
    retried: bool = False


class IngestLoop:
    """The worker's ingest stage: raw topics in, changes keyed by golden id out.

    A confluent-kafka loop on a thread of the worker, beside the Faust agents (as the
    emitter is): in Faust, each raw message and each change sent cost more CPU in
    aiokafka's Python fetcher and producer and in Faust's per-event bookkeeping than
    ingest's own work (issue 8).

    At least once, in a consumer group of its own: a batch's offsets are committed only
    once its changes and dead letters are on the broker. A batch read again after a crash
    is harmless: the dedupe lets a message's own origin through again and the merge is
    idempotent. While Redis or the registry is down, the batch is read again after a
    backoff and nothing is committed past it. A change the broker refuses for good (too
    large, an invalid record: `refusal_of`) dead-letters its raw message with reason
    `produce_refused` and the batch is committed; any other delivery failure reads the
    batch again.
    """

    def __init__(
        self,
        kafka: dict[str, Any],
        group_id: str,
        raw_topics: list[str],
        pipeline: IngestPipeline,
        changes_topic: str,
        encode_change: Callable[[dict[str, Any]], bytes],
        make_dead_letters: Callable[[Producer], DeadLetterWriter],
        batch_size: int = 500,
        batch_window_s: float = 0.05,
        compression: str = "none",
        session_timeout_s: float = 45.0,
        client_id: str | None = None,
        on_identity_lost: Callable[[], None] = lambda: None,  # wakes `streams.relink`
        progress: StageProgress | None = None,
        review_topic: str | None = None,  # where holds are kept (None: nowhere)
    ) -> None:
        self.pipeline = pipeline
        self.review_topic = review_topic
        self.on_identity_lost = on_identity_lost
        self.progress = progress or StageProgress("ingest")
        self.changes_topic = changes_topic
        self.encode_change = encode_change
        self.batch_size = batch_size
        self.batch_window_s = batch_window_s
        self.consumer = Consumer(
            {
                **kafka,
                "group.id": group_id,
                "client.id": client_id or group_id,  # names this loop in `accord monitor`
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": int(session_timeout_s * 1000),
            }
        )
        self.consumer.subscribe(raw_topics)
        self.producer = Producer(
            {
                **kafka,
                "enable.idempotence": True,
                "linger.ms": 5,
                "compression.type": compression,
                # aiokafka's (and Java's) partitioner: a golden id keeps its partition of
                # the changes topic, and so its merge state, whichever client wrote it.
                "partitioner": "murmur2_random",
            }
        )
        self.dead_letters = make_dead_letters(self.producer)
        self._undelivered: list[str] = []
        self._refused: list[DeadLetter] = []  # this batch's raw messages refused as changes
        self._suspects: list[tuple[str, bytes, bytes | None, Any]] = []  # refused with their batch?
        self.backoff_s = 0.0  # the pause after a refused batch; 0 while services answer

    def step(self, stop: threading.Event) -> int:
        """One batch: returns how many raw messages it took (0 if it must be read again)."""
        messages = [
            m for m in self.consumer.consume(self.batch_size, self.batch_window_s) if usable(m)
        ]
        if not messages:
            self.progress.look_at_lag(self.consumer)
            return 0
        try:
            batch = self.pipeline.process(messages)
        except IdentityLost as exc:  # nothing resolved: read again once they are rebuilt
            self.on_identity_lost()
            self.backoff_s = min(max(self.backoff_s * 2, 0.25), 2.0)
            log.warning("ingest paused until the identity keys are rebuilt: %s", exc)
            self._rewind(messages)
            stop.wait(self.backoff_s)
            return 0
        except (RedisUnavailable, RegistryUnavailable) as exc:
            # Retried either way, nothing lost; a refusal waiting will not cure (Redis
            # NOPERM, WRONGTYPE, ...) also makes /health not ready with its reason.
            refused = isinstance(exc, RedisUnavailable) and not exc.transient
            self.progress.blocked(exc.reason if refused else None)
            self.backoff_s = min(max(self.backoff_s * 2, 0.25), 5.0)
            log.warning("ingest paused, retrying in %.1fs: %s", self.backoff_s, exc)
            self._rewind(messages)
            stop.wait(self.backoff_s)
            return 0
        self.backoff_s = 0.0
        for letter in batch.dead:
            self.dead_letters.write(letter)
        self._refused, self._suspects = [], []
        for change, origin in zip(batch.changes, batch.origins, strict=True):
            value = self.encode_change(change.to_record())
            self._produce(change.golden_id.encode(), value, origin, alone=False)
        if self.review_topic is not None:
            for link, record, origin in batch.reviews:
                self._produce(link.encode(), record, origin, alone=False, topic=self.review_topic)
        if not self._delivered_all(stop) or not self._resend_alone(stop):
            self._refused = []  # refused again, and dead-lettered, when the batch is reread
            self.progress.blocked()
            self._rewind(messages)
            return 0
        for letter in self._refused:
            self.dead_letters.write(letter)
        if batch.dead or self._refused:
            self.dead_letters.flush()  # a dead letter that failed for good stops the worker
        self.consumer.commit(offsets=next_offsets(messages), asynchronous=True)
        self.progress.moved(len(messages))
        return len(messages)

    def _produce(
        self, key: bytes, value: bytes | None, origin: Any, alone: bool, topic: str | None = None
    ) -> None:
        """Hands one change (or review record: `topic`) to the producer. librdkafka
        refuses a record over its size limit at once: its raw message is dead-lettered.
        A refusal on delivery may be the broker's refusal of the whole batch the record
        was sent in, so the record is only a suspect, sent again `alone`; refused alone,
        it is dead-lettered."""
        topic = topic or self.changes_topic

        def delivered(error: Any, _message: Any) -> None:
            if error is None:
                return
            if refusal_of(error) is None:
                self._undelivered.append(str(error))
            elif alone:
                self._refuse(origin, error, topic)
            else:
                self._suspects.append((topic, key, value, origin))

        while True:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=delivered)
                return
            except BufferError:  # the producer's queue is full: let it send some first
                self.producer.poll(0.1)
            except KafkaException as exc:
                error = exc.args[0]
                if refusal_of(error) is None:
                    raise
                self._refuse(origin, error, topic)
                return

    def _resend_alone(self, stop: threading.Event) -> bool:
        """Sends each change refused on delivery again, one at a time; False if one
        failed otherwise than by a refusal (the batch is read again)."""
        suspects, self._suspects = self._suspects, []
        for topic, key, value, origin in suspects:
            self._produce(key, value, origin, alone=True, topic=topic)
            if not self._delivered_all(stop):
                return False
        return True

    def _refuse(self, origin: Any, error: KafkaError, topic: str | None = None) -> None:
        refusal = ProduceRefused(topic or self.changes_topic, error)
        log.warning(
            "ingest: %s/%d/%d dead-lettered: %s",
            origin.topic(), origin.partition(), origin.offset(), refusal,
        )  # fmt: skip
        self._refused.append(DeadLetter.of(origin, PRODUCE_REFUSED, refusal, stage="ingest"))

    def _delivered_all(self, stop: threading.Event) -> bool:
        """Waits for the batch's deliveries (the producer retries by itself while the
        broker is away); False if one failed for good or the worker stops first."""
        while self.producer.flush(1.0):
            if stop.is_set():
                return False
        if self._undelivered:
            failures, self._undelivered = self._undelivered, []
            log.warning("ingest: %d changes not delivered, reading the batch again: %s",
                        len(failures), failures[:3])  # fmt: skip
            return False
        return True

    def _rewind(self, messages: list[Any]) -> None:
        for tp in first_offsets(messages):
            self.consumer.seek(tp)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step(stop)

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)


Handler = Callable[[list[SourceChange]], None]


class RawChangeConsumer:
    """A consumer group over raw topics that decodes, dead-letters and hands on batches."""

    def __init__(
        self,
        settings: AccordSettings,
        topics: list[str],
        group_id: str,
        handle: Handler,
        readers: dict[str, dict[str, Any]] | None = None,
        batch_size: int = 500,
    ) -> None:
        registry = registry_client(settings)
        self.decoder = RawDecoder(AvroCodec(writer_schemas(settings, registry)), readers)
        self.producer = Producer(
            settings.kafka_config({"enable.idempotence": True, "linger.ms": 5})
        )
        self.dlq = DeadLetterWriter(settings, registry, self.producer)
        self.consumer = Consumer(
            settings.kafka_config(
                {
                    "group.id": group_id,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "topic.metadata.refresh.interval.ms": 5000,
                }
            )
        )
        self.consumer.subscribe(topics)
        self.handle = handle
        self.batch_size = batch_size
        self.totals = StepResult()

    def step(self, timeout_s: float = 1.0) -> StepResult:
        result = StepResult()
        messages = [m for m in self.consumer.consume(self.batch_size, timeout_s) if usable(m)]
        if not messages:
            return result
        changes: list[SourceChange] = []
        try:
            self.decoder.prefetch(messages)
            for message in messages:
                outcome = self.decoder.decode(message)
                if outcome is None:
                    result.tombstones += 1
                elif isinstance(outcome, DeadLetter):
                    self.dlq.write(outcome)
                    result.dead += 1
                else:
                    changes.append(outcome)
                    DECODED.labels(message.topic()).inc()
        except RegistryUnavailable as exc:
            log.warning("schema registry unavailable, retrying the batch: %s", exc)
            self._rewind(messages)
            result.retried = True
            return result
        if changes:
            self.handle(changes)
        self.dlq.flush()
        self.consumer.commit(asynchronous=False)
        result.consumed, result.changes = len(messages), len(changes)
        for name in ("consumed", "changes", "dead", "tombstones"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(result, name))
        return result

    def _rewind(self, messages: list[Any]) -> None:
        for tp in first_offsets(messages):
            self.consumer.seek(tp)
        time.sleep(1.0)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)
