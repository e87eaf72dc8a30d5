"""Ingest, first stage: raw Debezium messages in, canonical changes with golden ids out.

Every message ends up in exactly one place: a change handed on, a tombstone skipped
(the delete before it carries the change), a duplicate or a delete of a row never seen
(both counted), or a dead letter with its reason. A registry or Redis outage is not the
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
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import Counter

from streams.codec import AvroCodec, DecodeError, RegistryUnavailable, SchemaCache, registry_fetcher
from streams.debezium import EnvelopeError, EnvelopeReader, SourceChange
from streams.dedupe import Deduplicator, RedisUnavailable, origin_of
from streams.dlq import DeadLetter, DeadLetterWriter
from streams.identity import IdentityResolver
from streams.mapping import Mapper, Rejected
from streams.model import Change
from streams.registry import registry_client
from streams.settings import AccordSettings
from streams.topics import first_offsets, next_offsets, usable

log = logging.getLogger(__name__)

DECODED = Counter("accord_ingest_decoded_total", "Raw changes decoded", ["topic"])
INGESTED = Counter(
    "accord_ingest_events_total",
    "Raw messages by what ingest did with them",
    ["outcome"],  # change, tombstone, duplicate, unknown_delete, dead_letter
)
NOT_AN_ENVELOPE = "not_a_debezium_envelope"
VALIDATION_FAILED = "validation_failed"


class RawDecoder:
    """Wire bytes to `SourceChange`; a refusal becomes a `DeadLetter`."""

    def __init__(self, codec: AvroCodec, readers: dict[str, dict[str, Any]] | None = None) -> None:
        self.codec = codec
        self.envelopes = EnvelopeReader()
        self.readers = readers or {}  # topic -> reader schema for values

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
    tombstones: int = 0
    duplicates: int = 0
    unknown_deletes: int = 0
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
        fresh = [change for (_, change), dup in zip(mapped, duplicates, strict=True) if not dup]
        batch.duplicates = len(mapped) - len(fresh)
        for change, golden_id in zip(fresh, self.identity.resolve(fresh), strict=True):
            if golden_id is None:
                batch.unknown_deletes += 1
            else:
                batch.changes.append(change.with_golden_id(golden_id))

        for outcome, count in (
            ("change", len(batch.changes)),
            ("tombstone", batch.tombstones),
            ("duplicate", batch.duplicates),
            ("unknown_delete", batch.unknown_deletes),
            ("dead_letter", len(batch.dead)),
        ):
            if count:
                INGESTED.labels(outcome).inc(count)
        return batch


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
    backoff and nothing is committed past it.
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
    ) -> None:
        self.pipeline = pipeline
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
        self.backoff_s = 0.0  # the pause after a refused batch; 0 while services answer

    def step(self, stop: threading.Event) -> int:
        """One batch: returns how many raw messages it took (0 if it must be read again)."""
        messages = [
            m for m in self.consumer.consume(self.batch_size, self.batch_window_s) if usable(m)
        ]
        if not messages:
            return 0
        try:
            batch = self.pipeline.process(messages)
        except (RedisUnavailable, RegistryUnavailable) as exc:
            self.backoff_s = min(max(self.backoff_s * 2, 0.25), 5.0)
            log.warning("ingest paused, retrying in %.1fs: %s", self.backoff_s, exc)
            self._rewind(messages)
            stop.wait(self.backoff_s)
            return 0
        self.backoff_s = 0.0
        for letter in batch.dead:
            self.dead_letters.write(letter)
        for change in batch.changes:
            self.producer.produce(
                self.changes_topic,
                key=change.golden_id.encode(),
                value=self.encode_change(change.to_record()),
                on_delivery=self._delivered,
            )
        if not self._delivered_all(stop):
            self._rewind(messages)
            return 0
        if batch.dead:
            self.dead_letters.flush()  # a dead letter that failed for good stops the worker
        self.consumer.commit(offsets=next_offsets(messages), asynchronous=True)
        return len(messages)

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._undelivered.append(str(error))

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
        self.decoder = RawDecoder(AvroCodec(SchemaCache(registry_fetcher(registry))), readers)
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
