"""Deduplicator against the real Redis: replays dropped, redeliveries kept."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry

from streams.dedupe import Deduplicator, RedisUnavailable, origin_of
from streams.settings import AccordSettings

pytestmark = pytest.mark.integration

TTL_S = 3600


@pytest.fixture
def client(stack: AccordSettings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis)
    yield client
    client.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


def test_replay_from_another_message_is_dropped(client: redis.Redis, prefix: str) -> None:
    dedupe = Deduplicator(client, prefix, TTL_S)
    first = [("c1", origin_of("crm.public.customers", 0, 10)), ("c2", origin_of("t", 0, 11))]
    assert dedupe.duplicates(first) == [False, False]
    # Connector restart: Debezium produces the same changes again, as new messages.
    replay = [("c1", origin_of("crm.public.customers", 0, 57)), ("c3", origin_of("t", 0, 58))]
    assert dedupe.duplicates(replay) == [True, False]


def test_redelivery_of_the_same_message_is_kept(client: redis.Redis, prefix: str) -> None:
    """A crashed worker may have marked the change without producing it: process again."""
    dedupe = Deduplicator(client, prefix, TTL_S)
    batch = [("c1", "t/0/10"), ("c2", "t/1/4")]
    assert dedupe.duplicates(batch) == [False, False]
    assert dedupe.duplicates(batch) == [False, False]
    # Still a duplicate when a replay arrives later: the first origin is kept.
    assert dedupe.duplicates([("c1", "t/0/99"), ("c2", "t/1/4")]) == [True, False]


def test_a_later_item_of_the_same_batch_is_the_duplicate(client: redis.Redis, prefix: str) -> None:
    dedupe = Deduplicator(client, prefix, TTL_S)
    batch = [("c1", "t/0/1"), ("c2", "t/0/2"), ("c1", "t/0/3"), ("c1", "t/0/1")]
    assert dedupe.duplicates(batch) == [False, False, True, False]


def test_ids_are_remembered_for_the_ttl(client: redis.Redis, prefix: str) -> None:
    dedupe = Deduplicator(client, prefix, TTL_S)
    dedupe.duplicates([("c1", "t/0/1")])
    assert client.get(dedupe.key("c1")) == b"t/0/1"
    assert 0 < client.ttl(dedupe.key("c1")) <= TTL_S


def test_one_round_trip_per_batch(stack: AccordSettings, prefix: str) -> None:
    sent = 0

    class Counting(redis.Connection):
        """Counts what the client sends: one send is one round trip."""

        def send_packed_command(self, command: object, check_health: bool = True) -> None:
            nonlocal sent
            sent += 1
            super().send_packed_command(command, check_health)

    client = redis.Redis.from_url(stack.redis, connection_class=Counting)
    try:
        client.ping()  # the connection handshake is not the batch's
        dedupe = Deduplicator(client, prefix, TTL_S)
        sent = 0
        assert dedupe.duplicates([(f"c{i}", f"t/0/{i}") for i in range(500)]) == [False] * 500
        assert sent == 1
        assert dedupe.duplicates([]) == []
        assert sent == 1
    finally:
        client.close()


def test_counters(client: redis.Redis, prefix: str) -> None:
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    checked, hits = sample("accord_dedupe_checked_total"), sample("accord_dedupe_hits_total")
    dedupe = Deduplicator(client, prefix, TTL_S)
    dedupe.duplicates([("c1", "t/0/1"), ("c2", "t/0/2")])
    dedupe.duplicates([("c1", "t/0/5"), ("c2", "t/0/2"), ("c3", "t/0/6")])
    assert sample("accord_dedupe_checked_total") - checked == 5
    assert sample("accord_dedupe_hits_total") - hits == 1


def test_redis_down_is_a_clear_error() -> None:
    client = redis.Redis(
        host="127.0.0.1", port=closed_port(), retry=Retry(NoBackoff(), 0), password="s3cret"
    )
    dedupe = Deduplicator(client, "test-down:", TTL_S)
    with pytest.raises(RedisUnavailable) as failure:
        dedupe.duplicates([("c1", "t/0/1")])
    message = str(failure.value)
    assert "checking 1 change ids for duplicates" in message
    assert "ConnectionError" in message
    assert "s3cret" not in message


def closed_port() -> int:
    """A loopback port nothing listens on: bound, never listened, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
