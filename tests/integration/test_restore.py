"""Bulk restore of the golden table from its changelog, against the real broker and real
RocksDB partitions opened as Faust opens them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from faust.stores.rocksdb import RocksDBOptions
from faust.stores.rocksdb import Store as RocksDBStore
from rocksdict import Rdict

from streams.restore import ChangelogRestore
from streams.settings import AccordSettings

pytestmark = pytest.mark.integration
OFFSET_KEY = RocksDBStore.offset_key
PARTITIONS = 2
RECORDS = 600  # per partition
Changelog = tuple[str, dict[int, dict[bytes, bytes]]]  # topic, what each partition must hold


@pytest.fixture
def changelog(stack: AccordSettings) -> Iterator[Changelog]:
    """A compressed changelog with overwrites and tombstones; also what each partition
    must hold once restored: the last value of every key not deleted last."""
    topic = f"restore-{uuid.uuid4().hex[:8]}-changelog"
    admin = AdminClient(stack.kafka_config())
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    producer = Producer(stack.kafka_config({"compression.type": "lz4", "linger.ms": 5}))
    expected: dict[int, dict[bytes, bytes]] = {p: {} for p in range(PARTITIONS)}
    for partition in range(PARTITIONS):
        for offset in range(RECORDS):
            key = f"g-{partition}-{offset % 150}".encode()
            if offset % 7 == 6:
                producer.produce(topic, key=key, value=None, partition=partition)
                expected[partition].pop(key, None)
            else:
                value = f"state {offset} of {key.decode()}".encode() * 20
                producer.produce(topic, key=key, value=value, partition=partition)
                expected[partition][key] = value
    assert producer.flush(30) == 0
    yield topic, expected
    admin.delete_topics([topic])


def _open(folder: Path, partition: int) -> Rdict:
    return RocksDBOptions().open(folder / f"golden-{partition}.db")


def _contents(db: Rdict) -> dict[bytes, bytes]:
    return {key: value for key, value in db.items() if key != OFFSET_KEY}


def _restore(settings: AccordSettings, topic: str, min_records: int = 0) -> ChangelogRestore:
    return ChangelogRestore(settings.kafka_config(), topic, OFFSET_KEY, min_records)


def test_an_empty_store_gets_each_keys_last_value_and_the_offset_faust_resumes_from(
    stack: AccordSettings, changelog: Changelog, tmp_path: Path
) -> None:
    topic, expected = changelog
    dbs = {p: _open(tmp_path, p) for p in range(PARTITIONS)}

    report = _restore(stack, topic).run(dbs)

    assert report.complete
    assert report.partitions == {p: RECORDS for p in range(PARTITIONS)}
    for partition, db in dbs.items():
        assert _contents(db) == expected[partition]
        assert db.get(OFFSET_KEY) == str(RECORDS - 1).encode()
        db.close()


def test_a_store_with_a_persisted_offset_reads_only_what_came_after_it(
    stack: AccordSettings, changelog: Changelog, tmp_path: Path
) -> None:
    topic, expected = changelog
    db = _open(tmp_path, 0)
    # Everything up to offset 449 is already there: a key only the first 450 records
    # wrote keeps the value the store has, the rest catches up.
    db[b"kept"] = b"from before"
    db[OFFSET_KEY] = b"449"

    report = _restore(stack, topic).run({0: db})

    assert report.partitions == {0: RECORDS - 450}
    assert db[b"kept"] == b"from before"
    assert db.get(OFFSET_KEY) == str(RECORDS - 1).encode()
    later = {f"g-0-{offset % 150}".encode() for offset in range(450, RECORDS)}
    assert {k: v for k, v in _contents(db).items() if k in later} == {
        k: v for k, v in expected[0].items() if k in later
    }
    db.close()


def test_a_partition_behind_by_less_than_the_minimum_is_left_to_faust(
    stack: AccordSettings, changelog: Changelog, tmp_path: Path
) -> None:
    topic, _ = changelog
    db = _open(tmp_path, 1)

    report = _restore(stack, topic, min_records=RECORDS + 1).run({1: db})

    assert report.partitions == {} and report.complete
    assert db.get(OFFSET_KEY) is None and not _contents(db)
    db.close()


def test_a_restore_stopped_by_a_rebalance_leaves_a_consistent_store_to_finish_later(
    stack: AccordSettings, changelog: Changelog, tmp_path: Path
) -> None:
    topic, expected = changelog
    db = _open(tmp_path, 0)

    stopped = _restore(stack, topic).run({0: db}, should_stop=lambda: True)
    assert not stopped.complete
    assert db.get(OFFSET_KEY) is None and not _contents(db)

    finished = _restore(stack, topic).run({0: db})
    assert finished.complete
    assert _contents(db) == expected[0]
    db.close()
