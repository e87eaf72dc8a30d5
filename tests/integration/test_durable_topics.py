"""Durable topics on a three-broker KRaft cluster of this test's own (never the shared stack).

The cluster gets its own state dir and ports and only Kafka's processes; it shares the
installed Kafka libraries of the local stack. Accord's topics are made on it with
3 copies and `min.insync.replicas` 2, a DLQ made before with a week's retention is raised
to "kept until deleted", and a write acknowledged by every in-sync copy still succeeds
with one broker down.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from streams.settings import AccordSettings, StackSettings
from streams.stack import install
from streams.stack.components import Kafka, StackPaths
from streams.stack.manager import Stack
from streams.stack.process import stop, wait_until
from streams.topology import accord_topics, ensure_topics, source_topics
from tests.support import isolated

pytestmark = pytest.mark.integration


def _free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _free_base() -> int:
    """A plaintext port whose 3 brokers' ports (each + 0..2, + 10 * node) are all free."""
    for base in range(29192, 32000, 100):
        if all(_free(base + 10 * node + offset) for node in range(3) for offset in range(3)):
            return base
    raise AssertionError("no free ports for a three-broker cluster")


@pytest.fixture(scope="module")
def cluster(
    settings: AccordSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AccordSettings]:
    shared = StackPaths(settings.stack.state_dir.resolve())
    install.ensure_installed([Kafka(settings, shared)], shared, print)  # a no-op once done
    state = tmp_path_factory.mktemp("durable-stack")
    (state / "kafka").mkdir()
    (state / "kafka" / "libs").symlink_to(shared.kafka_libs)
    base = _free_base()
    stack = StackSettings(
        state_dir=state,
        kafka_brokers=3,
        kafka_port=base,
        kafka_controller_port=base + 1,
        kafka_sasl_ssl_port=base + 2,
        install_missing=False,
        startup_timeout_s=120,
    )
    own = isolated(settings).model_copy(update={"stack": stack, "kafka_bootstrap": None})
    manager = Stack(own, progress=lambda m: print(f"[durable-stack] {m}"))
    try:
        statuses = manager.up(["kafka"])
        assert [s.name for s in statuses if s.healthy] == ["kafka", "kafka-2", "kafka-3"]
        yield own
    finally:
        assert set(manager.down()) <= {"kafka", "kafka-2", "kafka-3"}
    assert not (Path(state) / "run" / "kafka.pid").exists()


def _configs(admin: AdminClient, topic: str) -> dict[str, str]:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(30)
    return {name: entry.value for name, entry in entries.items()}


def test_accords_topics_have_three_copies_and_need_two(cluster: AccordSettings) -> None:
    admin = AdminClient(cluster.kafka_config())
    assert len(cluster.kafka.split(",")) == 3
    # A DLQ made before durability was configured: the broker's week of retention.
    dlq = cluster.topics.dlq
    made = admin.create_topics([NewTopic(dlq, 1, 3, config={"retention.ms": "604800000"})])
    made[dlq].result(30)

    ensure_topics(cluster)

    specs = [*source_topics(cluster, 3), *accord_topics(cluster, 3)]
    names = {spec.name for spec in specs}
    # Created topics reach every broker's metadata a moment after the creation returns.
    assert wait_until(lambda: names <= set(admin.list_topics(timeout=30).topics), 30)
    metadata = admin.list_topics(timeout=30)
    assert len(metadata.brokers) == 3
    for spec in specs:
        replicas = {len(p.replicas) for p in metadata.topics[spec.name].partitions.values()}
        assert replicas == {3}, spec.name
        assert _configs(admin, spec.name)["min.insync.replicas"] == "2", spec.name
    for kind in ("dlq", "audit"):
        topic = getattr(cluster.topics, kind)
        configs = _configs(admin, topic)
        assert (configs["retention.ms"], configs["retention.bytes"]) == ("-1", "-1"), topic
    assert _configs(admin, cluster.topics.golden)["cleanup.policy"] == "compact"
    # The broker's own topics that matter, and its default for topics others make.
    broker = ConfigResource(ResourceType.BROKER, "1")
    defaults = {k: e.value for k, e in admin.describe_configs([broker])[broker].result(30).items()}
    assert defaults["default.replication.factor"] == "3"
    assert defaults["min.insync.replicas"] == "2"
    assert defaults["offsets.topic.replication.factor"] == "3"
    assert defaults["transaction.state.log.replication.factor"] == "3"


def test_an_acknowledged_write_survives_one_broker_down(cluster: AccordSettings) -> None:
    ensure_topics(cluster)
    manager = Stack(cluster)
    assert stop(manager.components["kafka-3"].process())
    producer = Producer(cluster.kafka_config({"acks": "all", "message.timeout.ms": 30000}))
    delivered: list[object] = []
    producer.produce(cluster.topics.dlq, b"kept", on_delivery=lambda e, m: delivered.append(e))
    assert producer.flush(40) == 0
    assert delivered == [None]  # no error: two in-sync copies acknowledged it
    status = {s.name: s for s in manager.status(["kafka"])}
    assert not status["kafka-3"].running
    assert status["kafka"].healthy and status["kafka-2"].healthy
