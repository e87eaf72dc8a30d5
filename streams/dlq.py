"""Dead letters: what could not be processed, with its original bytes and a reason.

Nothing is dropped silently: every message a stage refuses becomes a `DeadLetter` on
the DLQ topic (Avro, schema `dev.accord.DeadLetter`) and is counted by reason.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro import parse_schema
from prometheus_client import Counter

from streams.codec import AvroCodec, schema_id_of
from streams.errors import AccordError
from streams.redact import redact
from streams.schemas import load_local
from streams.settings import AccordSettings

DEAD_LETTERS = Counter(
    "accord_dead_letters_total", "Messages sent to the dead-letter topic", ["stage", "reason"]
)
DEAD_LETTER_SCHEMA = "dev.accord.DeadLetter"


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    schema_id: int | None
    reason: str
    error_class: str
    detail: str
    stage: str
    first_seen: int  # epoch milliseconds

    @classmethod
    def of(cls, message: Any, reason: str, error: BaseException, stage: str) -> DeadLetter:
        """From a confluent-kafka message and the error that stopped it."""
        value = message.value()
        return cls(
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            key=message.key(),
            value=value,
            schema_id=getattr(error, "schema_id", None) or schema_id_of(value),
            reason=reason,
            error_class=type(error).__name__,
            detail=redact(str(error))[:2000],
            stage=stage,
            first_seen=int(time.time() * 1000),
        )

    def record(self) -> dict[str, Any]:
        return asdict(self)


class DeadLetterWriter:
    """Produces dead letters; `flush` before committing the offsets they cover."""

    def __init__(
        self, settings: AccordSettings, registry: SchemaRegistryClient, producer: Producer
    ) -> None:
        self.topic = settings.topics.dlq
        schema = load_local(settings.schemas.directory, DEAD_LETTER_SCHEMA)
        subject = f"{self.topic}-value"
        if settings.schemas.auto_register:
            self.schema_id = registry.register_schema(subject, Schema(_json(schema), "AVRO"))
        else:
            self.schema_id = registry.get_latest_version(subject).schema_id
        self._parsed = parse_schema(schema)
        self._producer = producer
        self._failed: list[str] = []

    def write(self, letter: DeadLetter) -> None:
        payload = AvroCodec.encode(letter.record(), self.schema_id, self._parsed)
        self._producer.produce(
            self.topic,
            key=f"{letter.topic}/{letter.partition}/{letter.offset}".encode(),
            value=payload,
            on_delivery=self._delivered,
        )
        DEAD_LETTERS.labels(letter.stage, letter.reason).inc()

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._failed.append(str(error))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Every written letter is on the broker, or this raises: commit nothing then."""
        remaining = self._producer.flush(timeout_s)
        if remaining or self._failed:
            failures, self._failed = self._failed, []
            raise AccordError(
                f"dead letters not delivered to {self.topic}: {remaining} pending, "
                f"errors: {failures[:3]}"
            )


def _json(schema: dict[str, Any]) -> str:
    import json

    return json.dumps(schema)


# -------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class StoredLetter:
    """A dead letter as it sits on the DLQ topic, with its own coordinates there."""

    dlq_partition: int
    dlq_offset: int
    letter: dict[str, Any]  # the decoded `DeadLetter` record

    @property
    def coordinates(self) -> str:
        return f"{self.dlq_partition}:{self.dlq_offset}"

    def as_dict(self) -> dict[str, Any]:
        letter = dict(self.letter)
        for name in ("key", "value"):
            raw = letter.pop(name)
            letter[f"{name}_hex"] = raw.hex() if raw is not None else None
        first_seen = letter.get("first_seen")
        if hasattr(first_seen, "isoformat"):
            letter["first_seen"] = first_seen.isoformat()
        return {"at": self.coordinates, **letter}


def read_dead_letters(
    settings: AccordSettings,
    reason: str | None = None,
    topic: str | None = None,
    since: Any = None,
) -> list[StoredLetter]:
    """Every dead letter on the DLQ topic, oldest first, filtered by reason, original
    topic and first-seen time (an aware datetime)."""
    from streams.registry import registry_codec
    from streams.topics import scan

    codec = registry_codec(settings)
    letters = []
    for message in scan(
        settings.kafka_config(), settings.topics.dlq, lambda m: m.value() is not None
    ):
        record = codec.decode(message.value()).value
        if reason is not None and record["reason"] != reason:
            continue
        if topic is not None and record["topic"] != topic:
            continue
        if since is not None and record["first_seen"] < since:
            continue
        letters.append(StoredLetter(message.partition(), message.offset(), record))
    return sorted(letters, key=lambda s: (s.letter["first_seen"], s.dlq_partition, s.dlq_offset))


# ------------------------------------------------------------------------ replaying

REPLAY_HEADER = "accord-replayed-from"


@dataclass(frozen=True)
class ReplayReport:
    replayed: list[str]  # DLQ coordinates sent back to their original topic
    skipped: list[str]  # already replayed before: not sent again


def replay(
    settings: AccordSettings, letters: list[StoredLetter], redis_conn: Any, producer: Any
) -> ReplayReport:
    """Send each letter's original key and value back to its original topic and partition,
    after a fix, once: a Redis marker per DLQ entry makes a second replay a no-op."""
    replayed: list[str] = []
    skipped: list[str] = []
    failures: list[str] = []
    for stored in letters:
        origin = f"{settings.topics.dlq}:{stored.coordinates}"
        marker = f"{settings.worker.redis_prefix}dlq-replayed:{origin}"
        if not redis_conn.set(marker, str(time.time()), nx=True):
            skipped.append(stored.coordinates)
            continue

        def delivered(error: Any, _message: Any, marker: str = marker) -> None:
            if error is not None:
                failures.append(f"{marker}: {error}")
                redis_conn.delete(marker)  # not sent: it may be replayed again

        letter = stored.letter
        producer.produce(
            letter["topic"],
            key=letter["key"],
            value=letter["value"],
            partition=letter["partition"],
            headers=[(REPLAY_HEADER, origin.encode())],
            on_delivery=delivered,
        )
        replayed.append(stored.coordinates)
    producer.flush(30)
    if failures:
        raise AccordError(f"{len(failures)} replay(s) not delivered: {'; '.join(failures)}")
    return ReplayReport(replayed, skipped)
