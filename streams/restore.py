"""Restore: fill the golden table's RocksDB partitions straight from their changelog.

Faust rebuilds a table by replaying its changelog record by record through its own
consumer, conductor and event objects: about 110 µs of CPU per record, so a million
golden states took 145 s to recover on a fresh data dir or after a crash. This reads the
same records in batches with confluent-kafka and writes them in RocksDB write batches,
each with the partition's offset key as Faust keeps it, before Faust's recovery starts.
Faust then finds the partition up to date and replays only what came after.

Nothing here has to finish: whatever it did not restore (a rebalance, Kafka gone, a
partition behind by too little to bother), Faust's own replay restores from the offset
persisted with the last batch written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from rocksdict import WriteBatch, WriteOptions

log = logging.getLogger(__name__)

BATCH_BYTES = 8 * 1024**2  # one RocksDB write: big enough to amortise, small in memory
PROGRESS_EVERY_S = 5.0
# Nothing read for this long while records remain (an open transaction holds back the
# last stable offset, the broker went away): stop and leave the rest to Faust.
IDLE_GIVE_UP_S = 10.0


class PartitionDB(Protocol):
    """What restoring needs of one RocksDB partition (a `rocksdict.Rdict` in raw mode)."""

    def get(self, key: bytes) -> bytes | None: ...
    def write(self, write_batch: WriteBatch, write_opt: WriteOptions | None = None) -> None: ...
    def flush(self, wait: bool = True) -> None: ...


@dataclass(slots=True)
class PartitionProgress:
    """One changelog partition being restored: where it started, ends and has got to."""

    partition: int
    start: int  # first offset to read
    end: int  # the high watermark when restoring began
    records: int = 0  # written to RocksDB
    pending: WriteBatch = field(default_factory=lambda: WriteBatch(raw_mode=True))
    pending_bytes: int = 0
    pending_last: int | None = None  # offset of the last record pending

    @property
    def behind(self) -> int:
        return self.end - self.start

    def add(self, key: bytes, value: bytes | None, offset: int) -> None:
        if value is None:
            self.pending.delete(key)
        else:
            self.pending.put(key, value)
        self.pending_bytes += len(key) + len(value or b"")
        self.pending_last = offset

    def write(self, db: PartitionDB, offset_key: bytes, options: WriteOptions) -> None:
        """One atomic RocksDB write: the pending records and the offset of the last."""
        if self.pending_last is None:
            return
        self.pending.put(offset_key, str(self.pending_last).encode())
        records = self.pending.len() - 1
        db.write(self.pending, options)
        self.records += records
        self.pending = WriteBatch(raw_mode=True)
        self.pending_bytes = 0
        self.pending_last = None


@dataclass(frozen=True, slots=True)
class RestoreReport:
    partitions: dict[int, int]  # partition -> records written
    seconds: float
    complete: bool  # every partition planned reached its end

    @property
    def records(self) -> int:
        return sum(self.partitions.values())


class ChangelogRestore:
    """Restores golden table partitions from their changelog topic in bulk.

    `offset_key` is the key under which the table's store keeps the offset of the last
    changelog record it holds (Faust's `Store.offset_key`); `min_records` is how far
    behind a partition must be to be worth a consumer of its own.
    """

    def __init__(
        self,
        consumer_config: dict[str, Any],
        topic: str,
        offset_key: bytes,
        min_records: int,
    ) -> None:
        self.consumer_config = consumer_config
        self.topic = topic
        self.offset_key = offset_key
        self.min_records = min_records

    def persisted_offset(self, db: PartitionDB) -> int | None:
        raw = db.get(self.offset_key)
        return int(raw) if raw is not None else None

    def run(
        self, dbs: Mapping[int, PartitionDB], should_stop: Callable[[], bool] = lambda: False
    ) -> RestoreReport:
        """Restore each of `dbs` (partition -> RocksDB) that is far enough behind."""
        began = time.monotonic()
        consumer = Consumer(
            {
                **self.consumer_config,
                "group.id": "accord-restore",  # never joins: partitions are assigned
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
                "queued.max.messages.kbytes": 32 * 1024,
                "fetch.max.bytes": 16 * 1024**2,
                "max.partition.fetch.bytes": 4 * 1024**2,
                # librdkafka's default waits a second whenever the queue above is full,
                # which a restore fills all the time: that made it five times slower.
                "fetch.queue.backoff.ms": 5,
            }
        )
        plan: dict[int, PartitionProgress] = {}
        try:
            plan = self._plan(consumer, dbs)
            if not plan:
                return RestoreReport({}, time.monotonic() - began, True)
            complete = self._read(consumer, plan, dbs, should_stop)
        finally:
            consumer.close()
            for partition in plan:  # written without a WAL: persist it before going on
                dbs[partition].flush(True)
        report = RestoreReport(
            {p: progress.records for p, progress in plan.items()},
            time.monotonic() - began,
            complete,
        )
        log.info(
            "restored %s golden changelog records of %d partition(s) in %.1f s%s",
            f"{report.records:,}",
            len(plan),
            report.seconds,
            "" if complete else "; Faust replays the rest",
        )
        return report

    def _plan(
        self, consumer: Consumer, dbs: Mapping[int, PartitionDB]
    ) -> dict[int, PartitionProgress]:
        plan: dict[int, PartitionProgress] = {}
        for partition, db in sorted(dbs.items()):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=10
            )
            persisted = self.persisted_offset(db)
            start = low if persisted is None else max(low, persisted + 1)
            progress = PartitionProgress(partition, start, high)
            if progress.behind >= max(self.min_records, 1):
                plan[partition] = progress
        if plan:
            consumer.assign([TopicPartition(self.topic, p, s.start) for p, s in plan.items()])
            log.info(
                "restoring %s golden changelog records of partition(s) %s in bulk",
                f"{sum(s.behind for s in plan.values()):,}",
                ", ".join(str(p) for p in plan),
            )
        return plan

    def _read(
        self,
        consumer: Consumer,
        plan: dict[int, PartitionProgress],
        dbs: Mapping[int, PartitionDB],
        should_stop: Callable[[], bool],
    ) -> bool:
        """Read until every planned partition is at its end; False if it stopped early."""
        no_wal = WriteOptions()
        no_wal.disable_wal = True  # a crash mid-restore wipes the data dir anyway
        total = sum(s.behind for s in plan.values())
        last_read = last_report = time.monotonic()
        open_partitions = set(plan)
        while open_partitions:
            if should_stop():
                log.info("restore stopped by a rebalance; Faust replays the rest")
                break
            # consume() waits out its timeout unless 2,000 are there: short, for the last few.
            messages = consumer.consume(num_messages=2000, timeout=0.1)
            now = time.monotonic()
            for message in messages:
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)  # the caller leaves the rest to Faust
                partition = message.partition()
                progress = plan[partition]
                if error is None:
                    progress.add(message.key(), message.value(), message.offset())
                    at_end = message.offset() >= progress.end - 1
                else:
                    at_end = True
                if at_end or progress.pending_bytes >= BATCH_BYTES:
                    progress.write(dbs[partition], self.offset_key, no_wal)
                if at_end:
                    open_partitions.discard(partition)
            if messages:
                last_read = now
            elif now - last_read > IDLE_GIVE_UP_S:
                log.warning(
                    "restore read nothing for %.0f s with partition(s) %s unfinished; "
                    "Faust replays the rest",
                    IDLE_GIVE_UP_S,
                    ", ".join(str(p) for p in sorted(open_partitions)),
                )
                break
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                done = sum(s.records + s.pending.len() for s in plan.values())
                log.info(
                    "restoring the golden table: %s of %s records (%.0f%%)",
                    f"{done:,}",
                    f"{total:,}",
                    100 * done / max(total, 1),
                )
        for partition, progress in plan.items():
            progress.write(dbs[partition], self.offset_key, no_wal)
        return not open_partitions
