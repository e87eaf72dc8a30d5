"""The golden table's changelog writer on the real broker: a write's future resolves with
the record's offset only once the broker has it, the persisted offset follows the last
confirmed write of each partition, and a write the broker refuses fails its future."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streams.changelog import ChangelogWriter
from streams.settings import AccordSettings
from streams.topics import scan

pytestmark = pytest.mark.integration

PARTITIONS = 2
WRITES = 300


@pytest.fixture
def topic(stack: AccordSettings) -> Iterator[str]:
    name = f"test-changelog-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(stack.kafka_config())
    admin.create_topics([NewTopic(name, PARTITIONS, 1)])[name].result(30)
    yield name
    admin.delete_topics([name])[name].result(30)


def _running(writer: ChangelogWriter) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=writer.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def test_writes_resolve_with_their_offsets_and_move_the_persisted_offset(
    stack: AccordSettings, topic: str
) -> None:
    persisted: dict[int, list[int]] = {}
    writer = ChangelogWriter(
        stack.kafka_config(),
        topic,
        lambda partition, offset: persisted.setdefault(partition, []).append(offset),
        client_id="test-changelog-writer",
        compression="lz4",
    )
    thread, stop = _running(writer)

    async def write_all() -> list[int]:
        futures = [
            writer.send(n % PARTITIONS, f"golden-{n % 50}".encode(), f"state-{n}".encode())
            for n in range(WRITES)
        ]
        return await asyncio.wait_for(asyncio.gather(*futures), 60)

    try:
        offsets = asyncio.run(write_all())
    finally:
        stop.set()
        thread.join(30)
        writer.close()

    on_broker = {
        (m.partition(), m.offset()): (m.key(), m.value())
        for m in scan(stack.kafka_config(), topic, lambda m: True)
    }
    for n, offset in enumerate(offsets):
        assert on_broker[(n % PARTITIONS, offset)] == (
            f"golden-{n % 50}".encode(),
            f"state-{n}".encode(),
        )
    # In order within a partition, and the persisted offset only ever moves forward to
    # the last write of the partition.
    for partition in range(PARTITIONS):
        mine = offsets[partition::PARTITIONS]
        assert mine == sorted(mine)
        assert persisted[partition] == sorted(persisted[partition])
        assert persisted[partition][-1] == mine[-1]


def test_a_refused_write_fails_its_future_and_persists_nothing(
    stack: AccordSettings, topic: str
) -> None:
    persisted: list[tuple[int, int]] = []
    writer = ChangelogWriter(
        stack.kafka_config(),
        topic,
        lambda partition, offset: persisted.append((partition, offset)),
        client_id="test-changelog-writer",
        compression="lz4",
    )
    thread, stop = _running(writer)

    async def write_to_missing_partition() -> None:
        await asyncio.wait_for(writer.send(PARTITIONS + 5, b"golden-1", b"state"), 60)

    try:
        with pytest.raises(KafkaException, match=r"(?i)partition"):
            asyncio.run(write_to_missing_partition())
    finally:
        stop.set()
        thread.join(30)
        writer.close()
    assert persisted == []
