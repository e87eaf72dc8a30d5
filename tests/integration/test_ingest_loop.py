"""The worker's ingest loop on the real broker, registry and Redis: a batch's offsets are
committed only once its changes and dead letters are on the broker, and a batch that
met a Redis outage is read again, whole, once Redis answers."""

from __future__ import annotations

import dataclasses
import struct
import threading
import uuid
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema

from streams.app import redis_client
from streams.codec import AvroCodec, SchemaCache, registry_fetcher
from streams.dedupe import Deduplicator
from streams.dlq import DeadLetterWriter
from streams.faust_codec import canonical_codec
from streams.identity import IdentityResolver
from streams.ingest import IngestLoop, IngestPipeline, RawDecoder
from streams.mapping import Mapper, load_mappings
from streams.registry import registry_client
from streams.rules import load_rules
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from streams.topology import ensure_topics, ingest_group
from tests import vectors
from tests.support import free_port, isolated

pytestmark = pytest.mark.integration

CREATES = ("crm-c", "billing-c", "support-c")


def _reframe(payload: bytes, schema_id: int) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + payload[5:]


class RawTopics:
    """This test's copies of the raw topics, holding the captured creates (and garbage);
    Accord's topics of the test's app are created too, as a worker would."""

    def __init__(self, settings: AccordSettings) -> None:
        self.settings = settings
        ensure_topics(settings)
        self.prefix = f"test-raw-{uuid.uuid4().hex[:8]}"
        self.mappings = {
            system: dataclasses.replace(mapping, topic=f"{self.prefix}.{mapping.topic}")
            for system, mapping in load_mappings(settings.connectors_dir).items()
        }
        self.by_vector_topic = {
            mapping.topic.removeprefix(f"{self.prefix}."): mapping.topic
            for mapping in self.mappings.values()
        }
        topics = list(self.by_vector_topic.values())
        admin = AdminClient(settings.kafka_config())
        for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
            future.result(30)
        self.producer = Producer(settings.kafka_config())
        self.registry = registry_client(settings)

    def write(self, name: str, value: bytes | None = None) -> None:
        """The vector `name` re-registered under this test's topic; `value` replaces its
        value (garbage)."""
        vector = vectors.load(name)
        topic = self.by_vector_topic[vector.topic]
        key_text, value_text = (
            vector.schemas[int.from_bytes(p[1:5], "big")] for p in (vector.key, vector.value)
        )
        key_id = self.registry.register_schema(f"{topic}-key", Schema(key_text, "AVRO"))
        value_id = self.registry.register_schema(f"{topic}-value", Schema(value_text, "AVRO"))
        self.producer.produce(
            topic,
            key=_reframe(vector.key, key_id),
            value=value if value is not None else _reframe(vector.value, value_id),
        )
        assert self.producer.flush(30) == 0

    def ends(self) -> dict[str, int]:
        consumer = Consumer(self.settings.kafka_config({"group.id": "test-ends"}))
        try:
            return {
                t: consumer.get_watermark_offsets(TopicPartition(t, 0), 10)[1]
                for t in self.by_vector_topic.values()
            }
        finally:
            consumer.close()


def _pipeline(settings: AccordSettings, raw: RawTopics, store: redis.Redis) -> IngestPipeline:
    worker = settings.worker
    return IngestPipeline(
        RawDecoder(AvroCodec(SchemaCache(registry_fetcher(raw.registry)))),
        Mapper(raw.mappings),
        Deduplicator(store, worker.redis_prefix, worker.dedupe_ttl_s),
        IdentityResolver(
            store,
            worker.redis_prefix,
            load_rules(worker.rules_file).match,
            key_secret=settings.match_key_secret(),
        ),
    )


def _loop(settings: AccordSettings, raw: RawTopics, pipeline: IngestPipeline) -> IngestLoop:
    registry = raw.registry
    return IngestLoop(
        settings.kafka_config(),
        ingest_group(settings),
        list(raw.by_vector_topic.values()),
        pipeline,
        settings.topics.changes,
        canonical_codec(
            settings, registry, "dev.accord.CustomerChange", settings.topics.changes
        ).dumps,
        lambda producer: DeadLetterWriter(settings, registry, producer),
        batch_size=50,
        batch_window_s=0.2,
    )


def _committed(settings: AccordSettings, raw: RawTopics) -> dict[str, int]:
    consumer = Consumer(settings.kafka_config({"group.id": ingest_group(settings)}))
    try:
        partitions = [TopicPartition(t, 0) for t in raw.by_vector_topic.values()]
        return {tp.topic: tp.offset for tp in consumer.committed(partitions, timeout=10)}
    finally:
        consumer.close()


def _read_all(settings: AccordSettings, topic: str) -> list[Any]:
    consumer = Consumer(
        settings.kafka_config({"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([topic])
    try:
        messages: list[Any] = []
        while batch := consumer.consume(100, 3.0):
            messages += [m for m in batch if m.error() is None]
        return messages
    finally:
        consumer.close()


def _run_until(loop: IngestLoop, done: Any, timeout_s: float = 60) -> None:
    stop = threading.Event()
    assert wait_until(lambda: loop.step(stop) >= 0 and done(), timeout_s, interval_s=0)
    assert loop.backoff_s == 0


def test_a_batch_is_committed_once_its_changes_and_dead_letters_are_delivered(
    stack: AccordSettings,
) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)
    for name in CREATES:
        raw.write(name)
    raw.write("crm-u", value=b"\x00\x00\x00\x00\x01garbage")  # unknown schema id 1
    ends = raw.ends()

    loop = _loop(settings, raw, _pipeline(settings, raw, redis_client(settings)))
    try:
        _run_until(loop, lambda: _committed(settings, raw) == ends)
    finally:
        loop.close()

    changes = _read_all(settings, settings.topics.changes)
    assert len(changes) == len(CREATES)
    assert all(uuid.UUID(m.key().decode()) for m in changes)  # keyed by golden id
    letters = [
        m for m in _read_all(settings, settings.topics.dlq) if raw.prefix.encode() in m.key()
    ]
    assert len(letters) == 1


def test_a_batch_that_met_a_redis_outage_is_read_again_whole(stack: AccordSettings) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)
    for name in CREATES:
        raw.write(name)
    ends = raw.ends()

    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens
    loop = _loop(settings, raw, _pipeline(settings, raw, nowhere))
    stop = threading.Event()
    try:
        # Read and refused twice: the pause after a refusal doubles from 0.25 s.
        assert wait_until(lambda: loop.step(stop) == 0 and loop.backoff_s >= 0.5, 60, 0)
        assert _committed(settings, raw) == {t: -1001 for t in ends}  # nothing committed
        assert _read_all(settings, settings.topics.changes) == []

        loop.pipeline = _pipeline(settings, raw, redis_client(settings))  # Redis is back
        _run_until(loop, lambda: _committed(settings, raw) == ends)
    finally:
        loop.close()
    assert len(_read_all(settings, settings.topics.changes)) == len(CREATES)
