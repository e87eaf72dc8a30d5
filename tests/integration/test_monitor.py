"""`accord monitor --once --json` on the real stack: lag per partition that stays right
through a forced rebalance, the DLQ's size, the connectors and the replication slots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.monitor import Monitor
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests.support import accord, isolated

pytestmark = pytest.mark.integration
PER_PARTITION = 10


@pytest.fixture
def sink_topic(connectors: AccordSettings) -> Iterator[tuple[AccordSettings, str]]:
    """An isolated app whose support sink topic holds 10 messages in each of 3 partitions."""
    settings = isolated(connectors)
    topic = settings.topics.sink("support")
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    admin.create_topics([NewTopic(topic, 3, 1), NewTopic(settings.topics.dlq, 1, 1)])[
        topic
    ].result()
    producer = Producer({"bootstrap.servers": settings.kafka})
    for partition in range(3):
        for n in range(PER_PARTITION):
            producer.produce(topic, value=f"{partition}-{n}".encode(), partition=partition)
    for n in range(2):
        producer.produce(settings.topics.dlq, value=f"poison-{n}".encode())
    assert producer.flush(30) == 0
    yield settings, topic
    admin.delete_topics([topic, settings.topics.dlq])


def member(settings: AccordSettings, group: str, name: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": group,
            "client.id": name,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    consumer.subscribe([topic])
    return consumer


def snapshot(settings: AccordSettings) -> dict[str, Any]:
    result = accord(settings, "monitor", "--once", "--json", "--interval", "0.5")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def owners(settings: AccordSettings, group: str) -> dict[int, str | None]:
    [lag] = [g for g in Monitor(settings).snapshot(False, False).groups if g.group == group]
    return {p.partition: p.owner for p in lag.partitions}


def test_lag_per_partition_follows_a_forced_rebalance(
    sink_topic: tuple[AccordSettings, str],
) -> None:
    settings, topic = sink_topic
    group = f"{settings.worker.app_id}-sink-support"  # as the support applier's group
    first = member(settings, group, "applier-a", topic)
    assert wait_until(lambda: first.poll(0.2) is not None or bool(first.assignment()), 30)
    committed = {0: 4, 1: 7, 2: PER_PARTITION}
    first.commit(
        offsets=[TopicPartition(topic, p, o) for p, o in committed.items()], asynchronous=False
    )
    assert wait_until(lambda: set(owners(settings, group).values()) == {"applier-a"}, 30)

    second = member(settings, group, "applier-b", topic)

    def both_own_partitions() -> bool:
        first.poll(0.1)
        second.poll(0.1)
        return set(owners(settings, group).values()) == {"applier-a", "applier-b"}

    assert wait_until(both_own_partitions, 60)
    first.close()  # a member leaves: the group rebalances again, without it

    def second_owns_all() -> bool:
        second.poll(0.1)
        return owners(settings, group) == {0: "applier-b", 1: "applier-b", 2: "applier-b"}

    assert wait_until(second_owns_all, 60)
    try:
        report = snapshot(settings)
    finally:
        second.close()

    [lag] = [g for g in report["groups"] if g["group"] == group]
    assert lag["members"] == 1
    rows = {p["partition"]: p for p in lag["partitions"] if p["topic"] == topic}
    assert sorted(rows) == [0, 1, 2]  # every partition, none left behind by the rebalance
    for partition, offset in committed.items():
        row = rows[partition]
        assert (row["committed"], row["end_offset"]) == (offset, PER_PARTITION)
        assert row["lag"] == PER_PARTITION - offset
        assert row["owner"] == "applier-b"
    assert lag["lag"] == 6 + 3 + 0

    [sink] = [t for t in report["topics"] if t["topic"] == topic]
    assert (sink["partitions"], sink["messages"], sink["end_offsets"]) == (3, 30, [10, 10, 10])
    assert report["dlq_size"] == 2


def test_the_snapshot_shows_connectors_and_replication_slots(
    sink_topic: tuple[AccordSettings, str],
) -> None:
    settings, _ = sink_topic
    report = snapshot(settings)
    states = {c["name"]: (c["state"], c["tasks"]) for c in report["connectors"]}
    assert states == {
        name: ("RUNNING", ["RUNNING"])
        for name in ("accord-crm-source", "accord-billing-source", "accord-support-source")
    }
    slots = {s["system"]: s for s in report["slots"]}
    assert set(slots) == {"crm", "support"}
    assert all(s["active"] and s["lag_bytes"] >= 0 for s in slots.values())
    kinds = {t["kind"] for t in report["topics"]}
    assert kinds == {"source", "changes", "changelog", "golden", "audit", "sink", "dlq"}
