"""Ingest, first stage: raw Debezium messages in, typed source changes out.

Every message ends up in exactly one place: a `SourceChange` handed on, a tombstone
skipped (the delete before it carries the change), or a dead letter with its reason.
Offsets are committed only after the handler ran and the dead letters are on the
broker, so a crash replays the batch instead of losing it. A registry outage is not
the message's fault: the batch is rewound and retried, never dead-lettered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from prometheus_client import Counter

from streams.codec import AvroCodec, DecodeError, RegistryUnavailable, SchemaCache, registry_fetcher
from streams.debezium import EnvelopeError, EnvelopeReader, SourceChange
from streams.dlq import DeadLetter, DeadLetterWriter
from streams.registry import registry_client
from streams.settings import AccordSettings

log = logging.getLogger(__name__)

DECODED = Counter("accord_ingest_decoded_total", "Raw changes decoded", ["topic"])
NOT_AN_ENVELOPE = "not_a_debezium_envelope"


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


@dataclass
class StepResult:
    consumed: int = 0
    changes: int = 0
    dead: int = 0
    tombstones: int = 0
    retried: bool = False


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
            {"bootstrap.servers": settings.kafka, "enable.idempotence": True, "linger.ms": 5}
        )
        self.dlq = DeadLetterWriter(settings, registry, self.producer)
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka,
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "topic.metadata.refresh.interval.ms": 5000,
            }
        )
        self.consumer.subscribe(topics)
        self.handle = handle
        self.batch_size = batch_size
        self.totals = StepResult()

    def step(self, timeout_s: float = 1.0) -> StepResult:
        result = StepResult()
        messages = [m for m in self.consumer.consume(self.batch_size, timeout_s) if _ok(m)]
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
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            first.setdefault((message.topic(), message.partition()), message.offset())
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))
        time.sleep(1.0)

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
    log.warning("consumer: %s", error)
    return False
