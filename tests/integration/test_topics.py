"""RawTopicReader's "from now on" must hold for topics that appear after it starts."""

import json
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streams.registry import registry_client
from streams.settings import AccordSettings
from streams.topics import RawTopicReader

pytestmark = pytest.mark.integration

SCHEMA = json.dumps(
    {
        "type": "record",
        "name": "Probe",
        "namespace": "accord.test",
        "fields": [{"name": "n", "type": "int"}],
    }
)


def _produce(settings: AccordSettings, topic: str, n: int) -> None:
    registry = registry_client(settings)
    key = AvroSerializer(registry, '"string"')(
        "one-partition",  # one key keeps them in order
        SerializationContext(topic, MessageField.KEY),
    )
    value = AvroSerializer(registry, SCHEMA)(
        {"n": n}, SerializationContext(topic, MessageField.VALUE)
    )
    producer = Producer({"bootstrap.servers": settings.kafka})
    producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _values(reader: RawTopicReader, count: int) -> list[int]:
    seen = []
    for message in reader.messages(timeout_s=60):
        seen.append(message.value["n"])
        if len(seen) == count:
            break
    return seen


def test_a_topic_created_after_the_reader_starts_is_read_from_its_start(
    stack: AccordSettings,
) -> None:
    topic = f"accord-test-new-{uuid.uuid4().hex[:10]}"
    with RawTopicReader(stack, [topic], from_beginning=False) as reader:
        _produce(stack, topic, 1)  # auto-creates the topic, as Debezium does
        _produce(stack, topic, 2)
        assert _values(reader, 2) == [1, 2]


def test_an_existing_topic_is_read_from_the_reader_s_start_only(stack: AccordSettings) -> None:
    topic = f"accord-test-old-{uuid.uuid4().hex[:10]}"
    _produce(stack, topic, 1)
    with RawTopicReader(stack, [topic], from_beginning=False) as reader:
        _produce(stack, topic, 2)
        assert _values(reader, 1) == [2]
    with RawTopicReader(stack, [topic], from_beginning=True) as reader:
        assert _values(reader, 2) == [1, 2]
