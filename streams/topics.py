"""Reading raw Debezium topics as decoded records, for the demo and for tests.

Decoding goes through confluent-kafka's AvroDeserializer against the registry's
Confluent-compatible API, exactly as any downstream consumer would.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streams.registry import registry_client
from streams.settings import AccordSettings

log = logging.getLogger(__name__)

RAW_TOPICS = {
    "crm": "crm.public.customers",
    "billing": "billing.billing.accounts",
    "support": "support.public.users",
}


@dataclass(frozen=True)
class DecodedMessage:
    topic: str
    partition: int
    offset: int
    schema_id: int | None
    key: dict[str, Any] | None
    value: dict[str, Any] | None  # None for a tombstone

    @property
    def op(self) -> str | None:
        return self.value["op"] if self.value else None

    @property
    def row(self) -> dict[str, Any] | None:
        """The row image the change is about: `after`, or `before` for a delete."""
        if not self.value:
            return None
        return self.value["after"] if self.value["after"] is not None else self.value["before"]


class RawTopicReader:
    """A throwaway consumer over raw topics that yields decoded messages.

    `from_beginning=False` means "everything produced after this reader was created",
    exactly: each partition that exists now starts at its current end, and a partition
    that appears later (Debezium creates a topic with its first event) starts at 0.
    Kafka's own `auto.offset.reset=latest` would skip events written between the topic's
    creation and our assignment.
    """

    def __init__(self, settings: AccordSettings, topics: list[str], from_beginning: bool) -> None:
        self._deserializer = AvroDeserializer(registry_client(settings))
        self._consumer = Consumer(
            settings.kafka_config(
                {
                    "group.id": f"accord-reader-{uuid.uuid4().hex[:12]}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                    "topic.metadata.refresh.interval.ms": 1000,
                    "allow.auto.create.topics": False,
                }
            )
        )
        self._start: dict[tuple[str, int], int] = (
            {} if from_beginning else self._end_offsets(topics)
        )
        self._consumer.subscribe(topics, on_assign=self._position)

    def _end_offsets(self, topics: list[str]) -> dict[tuple[str, int], int]:
        metadata = self._consumer.list_topics(timeout=10)
        ends = {}
        for topic in topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                continue
            for partition in metadata.topics[topic].partitions:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10
                )
                ends[(topic, partition)] = high
        return ends

    def _position(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            tp.offset = self._start.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)

    def wait_assigned(self, timeout_s: float = 30.0) -> None:
        """Poll until partitions are assigned, so later writes are not missed with 'latest'."""
        deadline = time.monotonic() + timeout_s
        while not self._consumer.assignment() and time.monotonic() < deadline:
            self._consumer.poll(0.2)

    def messages(self, timeout_s: float) -> Iterator[DecodedMessage]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self._consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().fatal():
                    raise KafkaException(message.error())
                continue
            yield self._decode(message)

    def _decode(self, message: Any) -> DecodedMessage:
        topic, raw = message.topic(), message.value()
        key_context = SerializationContext(topic, MessageField.KEY)
        value_context = SerializationContext(topic, MessageField.VALUE)
        return DecodedMessage(
            topic=topic,
            partition=message.partition(),
            offset=message.offset(),
            schema_id=int.from_bytes(raw[1:5], "big") if raw and len(raw) > 5 else None,
            key=self._deserializer(message.key(), key_context) if message.key() else None,
            value=self._deserializer(raw, value_context) if raw else None,
        )

    def find(
        self, predicate: Callable[[DecodedMessage], bool], timeout_s: float
    ) -> DecodedMessage | None:
        for message in self.messages(timeout_s):
            if predicate(message):
                return message
        return None

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> RawTopicReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def first_offsets(messages: list[Any]) -> list[TopicPartition]:
    """Where to seek to read a batch again: each partition's first offset in it."""
    first: dict[tuple[str, int], int] = {}
    for message in messages:
        first.setdefault((message.topic(), message.partition()), message.offset())
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]


def next_offsets(messages: list[Any]) -> list[TopicPartition]:
    """What to commit once a batch is done: each partition's offset after its last."""
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        last[(message.topic(), message.partition())] = message.offset()
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def usable(message: Any) -> bool:
    """A consumed message to process; False for a transient error (logged), which the
    client recovers from by itself. A fatal error raises: the consumer is unusable."""
    error = message.error()
    if error is None:
        return True
    if error.fatal():
        raise KafkaException(error)
    if error.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer: %s", error)
    return False


# Errors a broker restart or leader move produces and that go away on their own.
PASSING_ERRORS = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN,
}


def _high_watermark(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> int:
    """The partition's end; a retriable error (a leader moving, as after a broker
    restart) is asked again until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return consumer.get_watermark_offsets(tp, 10)[1]
        except KafkaException as exc:
            error = exc.args[0]
            passing = error.retriable() or error.code() in PASSING_ERRORS
            if not passing or time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # a backoff before asking again, not a synchronisation


def scan(
    kafka: dict[str, Any], topic: str, keep: Callable[[Any], bool], timeout_s: float = 60.0
) -> Iterator[Any]:
    """Every message of `topic` (committed ones) that `keep` accepts, from the beginning
    to the end the topic had when the scan started."""
    consumer = Consumer(
        {
            **kafka,
            "group.id": f"accord-scan-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return
        partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
        ends = {tp.partition: _high_watermark(consumer, tp, timeout_s) for tp in partitions}
        remaining = {p for p, end in ends.items() if end > 0}
        consumer.assign(partitions)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} to its end took over {timeout_s:.0f}s")
            # Short waits: the end may be a transaction marker, which a fetch passes
            # (moving the position) without returning a message.
            for message in consumer.consume(1000, 0.2):
                if message.error() is None and keep(message):
                    yield message
            for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                if tp.offset >= ends[tp.partition]:
                    remaining.discard(tp.partition)
    finally:
        consumer.close()
