"""Garbage between valid events: each lands in the DLQ with its bytes and reason, every
valid event is processed, and the consumer never stops."""

import json
import struct
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streams.registry import registry_client
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests import vectors
from tests.integration.conftest import running_consumer
from tests.support import accord, isolated

pytestmark = pytest.mark.integration


def _reframe(payload: bytes, schema_id: int) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + payload[5:]


def test_every_kind_of_garbage_is_dead_lettered_and_valid_events_flow(
    stack: AccordSettings,
) -> None:
    settings = isolated(stack)
    topic = f"test-raw-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    registry = registry_client(settings)

    # A real Debezium envelope, re-registered here so its id is valid on any registry.
    vector = vectors.load("crm-c")
    key_text, value_text = (
        vector.schemas[int.from_bytes(p[1:5], "big")] for p in (vector.key, vector.value)
    )
    key_id = registry.register_schema(f"{topic}-key", Schema(key_text, "AVRO"))
    value_id = registry.register_schema(f"{topic}-value", Schema(value_text, "AVRO"))
    valid_key, valid = _reframe(vector.key, key_id), _reframe(vector.value, value_id)
    other_id = registry.register_schema(
        f"{topic}-other-value",
        Schema(
            json.dumps(
                {
                    "type": "record",
                    "name": "Envelope",
                    "namespace": "crm.public.customers",
                    "fields": [{"name": "op", "type": "int"}],
                }
            ),
            "AVRO",
        ),
    )
    garbage = {
        "payload_too_short": [b"", b"\x00\x01\x02", valid[:5]],
        "bad_magic_byte": [b"\x01" + valid[1:], b'{"op": "c"}'],
        "unknown_schema_id": [_reframe(valid, 2_000_000_000)],
        "corrupt_avro": [valid[: len(valid) // 2], valid[:5] + b"\xff" * 64, valid + b"\x00"],
        "schema_not_resolvable": [b"\x00" + struct.pack(">I", other_id) + b"\x02"],
    }
    sequence: list[tuple[str | None, bytes]] = []
    for reason, payloads in garbage.items():
        for payload in payloads:
            sequence += [(None, valid), (reason, payload)]
    sequence.append((None, valid))

    producer = Producer({"bootstrap.servers": settings.kafka})
    offsets: dict[int, tuple[str | None, bytes]] = {}

    def delivered(error, message) -> None:
        assert error is None
        offsets[message.offset()] = sequence[len(offsets)]

    for _reason, payload in sequence:
        producer.produce(topic, key=valid_key, value=payload, partition=0, on_delivery=delivered)
        producer.flush(30)

    reader = json.loads(value_text)  # resolve every value to the envelope we expect
    with running_consumer(settings, [topic], readers={topic: reader}) as (
        consumer,
        changes,
        thread,
    ):
        expected_valid = sum(1 for reason, _ in sequence if reason is None)
        assert wait_until(lambda: consumer.totals.consumed == len(sequence), 120), consumer.totals
        assert thread.is_alive()
    assert len(changes) == expected_valid
    assert all(change.op == "c" for change in changes)
    assert consumer.totals.dead == len(sequence) - expected_valid

    letters = _read_dead_letters(settings, len(sequence) - expected_valid)
    for letter in letters:
        reason, payload = offsets[letter["offset"]]
        assert letter["reason"] == reason, letter
        assert letter["value"] == payload and letter["key"] == valid_key
        assert (letter["topic"], letter["partition"]) == (topic, 0)
        assert letter["error_class"] and letter["detail"]
    assert sorted(letter["reason"] for letter in letters) == sorted(
        reason for reason, payloads in garbage.items() for _ in payloads
    )

    # The operator's view: `accord dlq list` filters, `accord dlq show` gives one whole.
    listed = _accord(
        settings, "dlq", "list", "--json", "--topic", topic, "--reason", "corrupt_avro"
    )
    assert [entry["reason"] for entry in listed] == ["corrupt_avro"] * 3
    assert sorted(bytes.fromhex(entry["value_hex"]) for entry in listed) == sorted(
        garbage["corrupt_avro"]
    )
    assert _accord(settings, "dlq", "list", "--json", "--topic", "elsewhere") == []
    shown = _accord(settings, "dlq", "show", listed[0]["at"])
    assert shown["offset"] == listed[0]["offset"] and shown["value_decoded"] is None
    assert shown["value_not_decodable"]

    # Replay sends the original bytes back to their topic and partition, once.
    probe = Consumer({"bootstrap.servers": settings.kafka, "group.id": uuid.uuid4().hex})
    try:
        _, end = probe.get_watermark_offsets(TopicPartition(topic, 0), 10)
        first = _accord_text(settings, "dlq", "replay", listed[0]["at"], "--yes")
        again = _accord_text(settings, "dlq", "replay", listed[0]["at"], "--yes")
        assert "replayed 1, skipped 0" in first and "replayed 0, skipped 1" in again
        assert probe.get_watermark_offsets(TopicPartition(topic, 0), 10)[1] == end + 1
        probe.assign([TopicPartition(topic, 0, end)])
        message = probe.poll(10)
        assert message is not None
        assert message.value() == bytes.fromhex(listed[0]["value_hex"])
        assert dict(message.headers())["accord-replayed-from"].decode().endswith(listed[0]["at"])
    finally:
        probe.close()


def _accord(settings: AccordSettings, *args: str) -> Any:
    return json.loads(_accord_text(settings, *args))


def _accord_text(settings: AccordSettings, *args: str) -> str:
    result = accord(settings, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _read_dead_letters(settings: AccordSettings, count: int) -> list[dict]:
    deserializer = AvroDeserializer(registry_client(settings))
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.topics.dlq])
    letters: list[dict] = []

    def read_one() -> bool:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            letters.append(
                deserializer(
                    message.value(), SerializationContext(message.topic(), MessageField.VALUE)
                )
            )
        return len(letters) >= count

    try:
        assert wait_until(read_one, 60, interval_s=0), f"{len(letters)} of {count} dead letters"
    finally:
        consumer.close()
    return letters
