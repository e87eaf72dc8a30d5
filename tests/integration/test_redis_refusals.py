"""Redis refusals on the real Redis: ingest keeps every message and says why it is stuck.

A refusal that waiting will not cure (NOPERM from an ACL user without SET, WRONGTYPE from
a key of the wrong type where the dedupe writes) leaves the batch uncommitted and read
again with backoff, and names itself in what `/health` reports for ingest; once fixed,
the same batch goes through whole.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer

from streams.app import redis_client
from streams.codec import AvroCodec, SchemaCache, registry_fetcher
from streams.dedupe import Deduplicator
from streams.ingest import IngestLoop, RawDecoder
from streams.mapping import Mapper
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests.integration.test_ingest_loop import (
    CREATES,
    RawTopics,
    _committed,
    _loop,
    _pipeline,
    _read_all,
    _run_until,
)
from tests.support import isolated

pytestmark = pytest.mark.integration

STALL_AFTER_S = 120.0


def _refused_until(loop: IngestLoop, code: str, timeout_s: float = 60) -> list[str]:
    """Step until ingest reports the refusal `code`; returns what /health would list."""
    stop = threading.Event()

    def refused() -> bool:
        loop.step(stop)
        return (loop.progress.refusal or "").startswith(f"redis {code}: ")

    assert wait_until(refused, timeout_s, interval_s=0), loop.progress.refusal
    return loop.progress.problems(STALL_AFTER_S)


def _change_ids(settings: AccordSettings, raw: RawTopics) -> list[tuple[str, str]]:
    """The raw topic and change id of each of the test's raw messages, as ingest computes
    them."""
    decoder = RawDecoder(AvroCodec(SchemaCache(registry_fetcher(raw.registry))))
    mapper = Mapper(raw.mappings)
    consumer = Consumer(
        settings.kafka_config({"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"})
    )
    consumer.subscribe(list(raw.by_vector_topic.values()))
    ids: list[tuple[str, str]] = []
    try:
        assert wait_until(
            lambda: _collect(consumer, decoder, mapper, ids) >= len(CREATES), 60, interval_s=0
        )
    finally:
        consumer.close()
    return ids


def _collect(
    consumer: Consumer, decoder: RawDecoder, mapper: Mapper, ids: list[tuple[str, str]]
) -> int:
    for message in consumer.consume(100, 1.0):
        if message.error() is None:
            change = mapper.map(decoder.decode(message)).change  # type: ignore[union-attr,arg-type]
            ids.append((message.topic(), change.change_id))  # type: ignore[union-attr]
    return len(ids)


@pytest.fixture
def acl_user(stack: AccordSettings) -> Iterator[tuple[str, str]]:
    """A Redis ACL user of this test that may do everything but SET; deleted after."""
    name, password = f"test-noset-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = redis_client(stack)
    admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "+@all", "-set")
    try:
        yield name, password
    finally:
        admin.execute_command("ACL", "DELUSER", name)


def test_a_noperm_refusal_keeps_the_batch_and_names_itself(
    stack: AccordSettings, acl_user: tuple[str, str]
) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)
    for name in CREATES:
        raw.write(name)
    ends = raw.ends()
    name, password = acl_user
    restricted = redis.Redis.from_url(settings.redis, username=name, password=password)

    loop = _loop(settings, raw, _pipeline(settings, raw, restricted))
    try:
        problems = _refused_until(loop, "NOPERM")
        assert problems and problems[0].startswith("ingest: redis NOPERM: ")
        assert "'set' command" in problems[0]
        assert loop.backoff_s > 0  # still retried, with backoff
        assert _committed(settings, raw) == {t: -1001 for t in ends}  # nothing committed
        assert _read_all(settings, settings.topics.changes) == []

        loop.pipeline = _pipeline(settings, raw, redis_client(settings))  # permission given
        _run_until(loop, lambda: _committed(settings, raw) == ends)
        assert loop.progress.problems(STALL_AFTER_S) == []
    finally:
        loop.close()
    assert len(_read_all(settings, settings.topics.changes)) == len(CREATES)


def test_a_wrongtype_key_where_the_dedupe_writes_keeps_the_batch(stack: AccordSettings) -> None:
    settings = isolated(stack)  # a Redis prefix of this test's own
    raw = RawTopics(settings)
    for name in CREATES:
        raw.write(name)
    ends = raw.ends()
    store = redis_client(settings)
    dedupe = Deduplicator(store, settings.worker.redis_prefix, settings.worker.dedupe_ttl_s)
    poisoned_topic, poisoned_id = _change_ids(settings, raw)[1]
    poisoned = dedupe.key(poisoned_id)
    store.hset(poisoned, "not", "a string")  # the dedupe's SET ... GET meets a hash

    loop = _loop(settings, raw, _pipeline(settings, raw, store))
    try:
        problems = _refused_until(loop, "WRONGTYPE")
        assert problems == [
            "ingest: redis WRONGTYPE: Operation against a key holding the wrong kind of value"
        ]
        # The batch holding the poisoned change is kept whole: neither committed nor
        # handed on. A batch before it (the first poll may bring only some topics' message)
        # went through whole, committed with its changes.
        committed = _committed(settings, raw)
        assert committed[poisoned_topic] == -1001
        assert all(committed[t] in (-1001, end) for t, end in ends.items())
        done = sum(end for t, end in ends.items() if committed[t] == end)
        assert len(_read_all(settings, settings.topics.changes)) == done

        store.delete(poisoned)  # an operator removes the stray key
        _run_until(loop, lambda: _committed(settings, raw) == ends)
        assert loop.progress.problems(STALL_AFTER_S) == []
    finally:
        loop.close()
        store.delete(poisoned)
    changes: list[Any] = _read_all(settings, settings.topics.changes)
    assert len(changes) == len(CREATES)
