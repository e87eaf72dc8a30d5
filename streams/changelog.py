"""The golden table's changelog writes, through librdkafka instead of aiokafka.

Faust sends every table write with aiokafka's producer, which builds, compresses and
sends record batches in Python on the event loop the merge runs on: about a quarter of
that loop's CPU in `make bench` (issue 8). Here the same records go through a
confluent-kafka producer, whose batching, compression and sending run in C on
librdkafka's own threads; a thread of the worker polls it for delivery reports and
settles the writes' futures on the event loop, many per wake-up.

What the merge relies on stays as it was: a write's future resolves once the broker has
the record (the merge acks its input then, see `streams.app.AcksAfterWrites`), records of
one partition keep their order (idempotent producer), and the table's persisted offset
is moved to the last confirmed write of each partition, as Faust's `_on_changelog_sent`
does, so a restart replays only what came after it. A rebalance waits for writes still
in flight: Faust's revoke waits until every input it handed out is acked.

Only under at-least-once: under Faust's exactly_once the writes belong to Faust's
transaction, so Faust sends them itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger(__name__)

POLL_S = 0.05  # how long the poll thread waits for delivery reports at a time
CLOSE_FLUSH_S = 10.0

OnPersisted = Callable[[int, int], None]  # (partition, offset) of a confirmed write


class ChangelogWriter:
    """Produces changelog records keyed and partitioned as the table says; each `send`
    returns an asyncio future of the record's offset."""

    def __init__(
        self,
        kafka: dict[str, Any],
        topic: str,
        on_persisted: OnPersisted,
        *,
        client_id: str,
        compression: str,
        linger_ms: int = 5,
        batch_bytes: int | None = None,
    ) -> None:
        self.topic = topic
        self.on_persisted = on_persisted
        self.producer = Producer(
            {
                **kafka,
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "compression.type": compression,
                # No batch above what the topic takes (`streams.refusal.record_limit`):
                # the broker refuses a batch whole, with every record in it.
                **({"batch.size": batch_bytes} if batch_bytes else {}),
            }
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        # Filled by delivery reports on the polling thread, emptied on the event loop.
        self._reports: deque[tuple[asyncio.Future, KafkaError | None, int, int]] = deque()

    def send(self, partition: int, key: bytes, value: bytes | None) -> asyncio.Future:
        """Called on the event loop. Waits (blocking it) only when librdkafka's queue is full."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        report = partial(self._delivered, future)
        while True:
            try:
                self.producer.produce(
                    self.topic, value, key, partition=partition, on_delivery=report
                )
                return future
            except BufferError:
                self.producer.poll(POLL_S)  # reports land in `_reports`, settled below

    def run(self, stop: threading.Event) -> None:
        """The polling thread: hands delivery reports to the event loop until `stop`."""
        while not stop.is_set():
            self.producer.poll(POLL_S)
            self._hand_over()

    def close(self) -> None:
        remaining = self.producer.flush(CLOSE_FLUSH_S)
        if remaining:
            log.warning("%d changelog writes unconfirmed at stop; their inputs are "
                        "merged again after the restart", remaining)  # fmt: skip
        self._hand_over()

    def _delivered(self, future: asyncio.Future, error: KafkaError | None, msg: Message) -> None:
        self._reports.append((future, error, msg.partition(), msg.offset()))

    def _hand_over(self) -> None:
        """One wake-up of the event loop per poll that brought reports. A settle that finds
        them taken by the one before it does nothing."""
        if not self._reports or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._settle)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            self._reports.clear()

    def _settle(self) -> None:
        last: dict[int, int] = {}
        reports = self._reports
        while reports:
            future, error, partition, offset = reports.popleft()
            if future.done():  # cancelled by a stopping worker
                continue
            if error is not None:
                future.set_exception(KafkaException(error))
                continue
            last[partition] = max(offset, last.get(partition, -1))
            future.set_result(offset)
        for partition, offset in last.items():
            self.on_persisted(partition, offset)
