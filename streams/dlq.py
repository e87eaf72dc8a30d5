"""Dead letters: what could not be processed, with its original bytes and a reason.

Nothing is dropped silently: every message a stage refuses becomes a `DeadLetter` on
the DLQ topic (Avro, schema `dev.accord.DeadLetter`) and is counted by reason. A letter
too big for the DLQ topic is written cut short (`truncated`): it keeps its original
coordinates, the first bytes of the value and the SHA-256 of all of them, and is never
replayed (the bytes are not all there).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
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
    truncated: bool = False  # key and value cut to fit the DLQ topic (`truncated`)
    value_sha256: str | None = None  # of the original value, when truncated
    value_size: int | None = None  # bytes of the original value, when truncated
    replayable: bool = True  # False: `accord dlq replay` must not send it back

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

    @classmethod
    def at(
        cls,
        coordinates: tuple[str, int, int],
        key: bytes | None,
        value: bytes | None,
        reason: str,
        detail: str,
        stage: str,
        error_class: str = "",
        replayable: bool = True,
    ) -> DeadLetter:
        """A record at (topic, partition, offset) that a stage refused for `reason`."""
        topic, partition, offset = coordinates
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            schema_id=schema_id_of(value),
            reason=reason,
            error_class=error_class or reason,
            detail=redact(detail)[:2000],
            stage=stage,
            first_seen=int(time.time() * 1000),
            replayable=replayable,
        )

    def record(self) -> dict[str, Any]:
        return asdict(self)


# Bytes left for the truncation's own fields and its note in `detail`, with room to spare.
TRUNCATION_ROOM = 512
KEY_KEPT = 1024  # most bytes of a key a truncated letter keeps


def cut_to_fit(letter: DeadLetter, max_bytes: int, overhead: int) -> DeadLetter:
    """`letter` cut to encode in at most `max_bytes`, given that it encodes in `overhead`
    bytes without its key and value.

    The coordinates, reason and error stay; the value keeps its first bytes, with the
    SHA-256 and size of all of them, and `detail` says what was cut. A truncated letter
    is not replayable: its bytes are not all there.
    """
    room = max(0, max_bytes - overhead - TRUNCATION_ROOM)
    notes = []
    key = letter.key
    if key is not None and len(key) > min(KEY_KEPT, room):
        kept = min(KEY_KEPT, room)
        notes.append(f"key cut to {kept} of {len(key)} bytes, sha256 {_sha256(key)}")
        key = key[:kept]
    value = letter.value
    digest = size = None
    if value is not None:
        kept = max(0, room - len(key or b""))
        digest, size = _sha256(value), len(value)
        if len(value) > kept:
            notes.append(f"value cut to {kept} of {size} bytes, sha256 {digest}")
            value = value[:kept]
    note = f" [truncated to fit the DLQ: {'; '.join(notes) or 'nothing cut'}]"
    return replace(
        letter,
        key=key,
        value=value,
        truncated=True,
        value_sha256=digest,
        value_size=size,
        replayable=False,
        detail=letter.detail[: 2000 - len(note)] + note,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DeadLetterWriter:
    """Produces dead letters; `flush` before committing the offsets they cover."""

    def __init__(
        self,
        settings: AccordSettings,
        registry: SchemaRegistryClient,
        producer: Producer | None,  # None: every `write` names its producer
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
        self.max_bytes = settings.worker.max_record_bytes

    def encode(self, letter: DeadLetter) -> bytes:
        """The letter as it goes on the DLQ topic: cut short when it would not fit."""
        payload = AvroCodec.encode(letter.record(), self.schema_id, self._parsed)
        if len(payload) <= self.max_bytes:
            return payload
        bare = replace(letter, key=None, value=None)
        overhead = len(AvroCodec.encode(bare.record(), self.schema_id, self._parsed))
        payload = AvroCodec.encode(
            cut_to_fit(letter, self.max_bytes, overhead).record(), self.schema_id, self._parsed
        )
        if len(payload) > self.max_bytes:  # only a limit below the letter's own fields
            raise AccordError(
                f"a dead letter from {letter.topic}/{letter.partition}/{letter.offset} takes "
                f"{len(payload)} bytes even truncated: worker.max_record_bytes "
                f"({self.max_bytes}) is too small"
            )
        return payload

    def write(self, letter: DeadLetter, producer: Producer | None = None) -> None:
        """Through the writer's producer (`flush` it), or through `producer`: a
        transactional one, whose commit then confirms the letter with the offsets past it."""
        key = f"{letter.topic}/{letter.partition}/{letter.offset}".encode()
        if producer is not None:
            producer.produce(self.topic, key=key, value=self.encode(letter))
        elif self._producer is not None:
            self._producer.produce(
                self.topic, key=key, value=self.encode(letter), on_delivery=self._delivered
            )
        else:
            raise AccordError("a DeadLetterWriter made without a producer needs one per write")
        DEAD_LETTERS.labels(letter.stage, letter.reason).inc()

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._failed.append(str(error))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Every written letter is on the broker, or this raises: commit nothing then."""
        if self._producer is None:  # each write went through its caller's producer
            return
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
    refused: list[str] = field(default_factory=list)  # not replayable: truncated, emit's


def replay(
    settings: AccordSettings, letters: list[StoredLetter], redis_conn: Any, producer: Any
) -> ReplayReport:
    """Send each letter's original key and value back to its original topic and partition,
    after a fix, once: a Redis marker per DLQ entry makes a second replay a no-op.
    Letters marked not replayable (cut short, or an emitter's record of the golden
    table's changelog, which only the merge writes) are refused, never sent."""
    replayed: list[str] = []
    skipped: list[str] = []
    refused: list[str] = []
    failures: list[str] = []
    for stored in letters:
        if not stored.letter.get("replayable", True):
            refused.append(stored.coordinates)
            continue
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
    return ReplayReport(replayed, skipped, refused)
