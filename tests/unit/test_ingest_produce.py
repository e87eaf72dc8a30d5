"""IngestLoop's produce step with a fake consumer and producer: a change refused for
good dead-letters its raw message and the batch is committed; a change refused with the
batch it went in is sent again alone; any other failure reads the batch again."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams.dlq import DeadLetter
from streams.ingest import IngestBatch, IngestLoop
from streams.refusal import PRODUCE_REFUSED
from tests import vectors


class Message(vectors.Message):
    def error(self) -> None:
        return None


@dataclass
class FakeChange:
    golden_id: str
    size: int

    def to_record(self) -> dict[str, Any]:
        return {"size": self.size}


class FakeConsumer:
    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.committed: list[Any] = []
        self.seeks: list[Any] = []

    def consume(self, _n: int, _timeout: float) -> list[Message]:
        return self.messages

    def commit(self, offsets: Any, asynchronous: bool) -> None:
        self.committed.append(offsets)

    def seek(self, tp: Any) -> None:
        self.seeks.append(tp)


class FakeProducer:
    """librdkafka refuses a value over `local_limit` at once; the "broker" refuses every
    record of a flush whose total is over `broker_limit`; `fail` gives other errors."""

    def __init__(self, local_limit: int, broker_limit: int, fail: int | None = None) -> None:
        self.local_limit, self.broker_limit, self.fail = local_limit, broker_limit, fail
        self.pending: list[tuple[bytes, Callable[[Any, Any], None]]] = []
        self.delivered: list[bytes] = []

    def produce(self, _topic: str, key: bytes, value: bytes, on_delivery: Any) -> None:
        if len(value) > self.local_limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.pending.append((value, on_delivery))

    def flush(self, _timeout: float = 0) -> int:
        batch, self.pending = self.pending, []
        too_big = sum(len(v) for v, _ in batch) > self.broker_limit
        for value, callback in batch:
            if len(value) == self.fail:
                callback(KafkaError(KafkaError._MSG_TIMED_OUT), None)
            elif too_big:
                callback(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
            else:
                self.delivered.append(value)
                callback(None, None)
        return 0

    def poll(self, _timeout: float) -> int:
        return 0


class FakeLetters:
    def __init__(self) -> None:
        self.written: list[DeadLetter] = []
        self.flushed = 0

    def write(self, letter: DeadLetter) -> None:
        self.written.append(letter)

    def flush(self) -> None:
        self.flushed += 1


class FakePipeline:
    def __init__(self, batch: IngestBatch) -> None:
        self.batch = batch

    def process(self, _messages: list[Message]) -> IngestBatch:
        return self.batch


@pytest.fixture
def make_loop() -> Iterator[Callable[[list[int], FakeProducer], tuple[IngestLoop, Any]]]:
    real: list[Any] = []

    def make(sizes: list[int], producer: FakeProducer) -> tuple[IngestLoop, Any]:
        messages = [Message("raw", b"k", b"v%d" % i, _offset=i, _partition=0) for i in sizes]
        changes = [FakeChange(f"g{i}", size) for i, size in enumerate(sizes)]
        loop = IngestLoop(
            {"bootstrap.servers": "127.0.0.1:1"},  # never reached: the clients are replaced
            "test-group",
            ["raw"],
            FakePipeline(IngestBatch(changes, [], origins=messages)),  # type: ignore[arg-type]
            "changes",
            lambda record: b"x" * record["size"],
            lambda _producer: FakeLetters(),  # type: ignore[arg-type,return-value]
        )
        real.append((loop.consumer, loop.producer))
        consumer = FakeConsumer(messages)
        loop.consumer, loop.producer = consumer, producer  # type: ignore[assignment]
        return loop, consumer

    yield make
    for consumer, _producer in real:
        consumer.close()


def test_a_change_refused_alone_is_dead_lettered_and_the_batch_committed(make_loop) -> None:
    producer = FakeProducer(local_limit=10_000, broker_limit=500)
    loop, consumer = make_loop([100, 800, 100], producer)
    assert loop.step(threading.Event()) == 3
    # The three went in one batch, which the broker refused whole; sent again alone, only
    # the 800-byte change is refused.
    assert producer.delivered == [b"x" * 100, b"x" * 100]
    letters = loop.dead_letters.written
    assert [(x.reason, x.offset, x.value) for x in letters] == [(PRODUCE_REFUSED, 800, b"v800")]
    assert "MSG_SIZE_TOO_LARGE" in letters[0].detail and letters[0].stage == "ingest"
    assert loop.dead_letters.flushed == 1
    assert len(consumer.committed) == 1 and consumer.seeks == []


def test_a_change_librdkafka_refuses_at_once_is_dead_lettered(make_loop) -> None:
    producer = FakeProducer(local_limit=1000, broker_limit=10_000)
    loop, consumer = make_loop([100, 2000, 100], producer)
    assert loop.step(threading.Event()) == 3
    assert producer.delivered == [b"x" * 100, b"x" * 100]
    assert [x.offset for x in loop.dead_letters.written] == [2000]
    assert len(consumer.committed) == 1


def test_any_other_delivery_failure_reads_the_batch_again(make_loop) -> None:
    producer = FakeProducer(local_limit=10_000, broker_limit=500, fail=100)
    loop, consumer = make_loop([100, 800], producer)
    assert loop.step(threading.Event()) == 0
    assert loop.dead_letters.written == []  # nothing dead-lettered for a transient failure
    assert consumer.committed == [] and len(consumer.seeks) == 1
