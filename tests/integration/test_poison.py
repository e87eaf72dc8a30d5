"""Poison at the merge and the DLQ, on the real stack: a change whose golden state is
too big for Kafka, one the broker refuses, and one that does not decode each land in
the DLQ with their original coordinates, and the worker goes on merging the next
change; a dead letter too big for the DLQ is written truncated, with its digest."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from streams.dlq import DeadLetter, DeadLetterWriter, read_dead_letters, replay
from streams.faust_codec import canonical_codec
from streams.model import Change, Op
from streams.registry import registry_client
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from streams.topology import changelog_topic
from tests.support import TopicTail, isolated, running_worker, without_appliers

pytestmark = pytest.mark.integration


class Changes:
    """Writes `accord.changes` records straight to the test's own topic, as ingest does,
    and remembers where each landed."""

    def __init__(self, settings: AccordSettings) -> None:
        self.topic = settings.topics.changes
        self.codec = canonical_codec(
            settings, registry_client(settings), "dev.accord.CustomerChange", self.topic
        )
        self.producer = Producer(settings.kafka_config())
        self.count = 0

    def send(self, golden_id: str, key: str, **values: Any) -> tuple[str, int, int]:
        self.count += 1
        ts = 1_700_000_000_000_000 + self.count
        change = Change(
            f"crm|{key}|{self.count}", "crm", key, Op.UPSERT, ts, f"p{self.count:08d}", values
        )
        record = change.with_golden_id(golden_id).to_record()
        return self.raw(golden_id.encode(), self.codec.dumps(record))

    def raw(self, key: bytes, value: bytes) -> tuple[str, int, int]:
        landed: list[Any] = []

        def delivered(_error: Any, message: Any) -> None:
            landed.append(message)

        self.producer.produce(self.topic, key=key, value=value, partition=0, on_delivery=delivered)
        self.producer.flush(30)
        (message,) = landed
        assert message.error() is None, message.error()
        return (message.topic(), message.partition(), message.offset())


def _letter_at(settings: AccordSettings, at: tuple[str, int, int]) -> dict[str, Any] | None:
    for stored in read_dead_letters(settings, topic=at[0]):
        letter = stored.letter
        if (letter["topic"], letter["partition"], letter["offset"]) == at:
            return letter
    return None


def _wait_for_letter(settings: AccordSettings, at: tuple[str, int, int]) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        letter = _letter_at(settings, at)
        if letter is not None:
            found.append(letter)
        return letter is not None

    assert wait_until(arrived, 90, 1.0), f"no dead letter for {at}"
    return found[0]


def _golden(tail: TopicTail, golden_id: str) -> list[dict[str, Any]]:
    return [r for r in tail.records if r and r["golden_id"] == golden_id]


def test_poison_changes_are_dead_lettered_and_the_merge_goes_on(stack: AccordSettings) -> None:
    settings = without_appliers(isolated(stack))
    run = uuid.uuid4().hex[:8]
    with running_worker(settings) as worker:
        changes = Changes(settings)
        golden = TopicTail(settings, settings.topics.golden)

        # 1. Bytes that are no change at all (no wire format; an unknown schema id):
        #    dead-lettered whole, with their reason.
        for garbage, why in ((b"not avro at all", "bad_magic_byte"),
                             (b"\x00\x7f\xff\xff\xffnot avro", "unknown_schema_id")):  # fmt: skip
            at = changes.raw(b"garbage-key", garbage)
            letter = _wait_for_letter(settings, at)
            assert (letter["reason"], letter["stage"]) == ("undecodable", "merge")
            assert letter["detail"].startswith(why)
            assert (letter["key"], letter["value"]) == (b"garbage-key", garbage)

        # 2. A 300 KB first name makes a golden state of about 1.5 MB: never written.
        huge_id, other_id = f"g-huge-{run}", f"g-other-{run}"
        huge = "x" * 300_000
        at = changes.send(huge_id, f"huge-{run}", email=f"huge-{run}@example.com", first_name=huge)
        letter = _wait_for_letter(settings, at)
        assert letter["reason"] == "state_too_large" and letter["stage"] == "merge"
        assert letter["replayable"] is True and letter["truncated"] is False
        assert changes.codec.loads(letter["value"])["fields"]["first_name"] == huge

        # 3. The next change, of another customer, is merged and emitted.
        changes.send(other_id, f"other-{run}", email=f"other-{run}@example.com")
        assert golden.wait_for(lambda _: bool(_golden(golden, other_id)), 90)

        # 4. The too-big customer's next change starts from the state before the refused
        #    one (none): version 1, without the huge name.
        changes.send(huge_id, f"huge-{run}", email=f"huge-{run}@example.com", first_name="Ada")
        assert golden.wait_for(lambda _: bool(_golden(golden, huge_id)), 90)
        (record,) = _golden(golden, huge_id)
        assert record["version"] == 1 and record["fields"]["first_name"] == "Ada"

        # 5. The changelog topic is made to take less while the worker runs: the broker
        #    refuses a state the worker's own limit let through. Dead-lettered, undone.
        admin = AdminClient(settings.kafka_config())
        resource = ConfigResource(
            ConfigResource.Type.TOPIC,
            changelog_topic(settings),
            incremental_configs=[
                ConfigEntry(
                    "max.message.bytes", "60000", incremental_operation=AlterConfigOpType.SET
                )
            ],
        )
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(30)

        def lowered() -> bool:  # the broker applies a topic's new config on its own time
            current = ConfigResource(ConfigResource.Type.TOPIC, changelog_topic(settings))
            (described,) = admin.describe_configs([current]).values()
            return described.result(10)["max.message.bytes"].value == "60000"

        assert wait_until(lowered, 30)
        refused_id = f"g-refused-{run}"
        noise = base64.b64encode(os.urandom(30_000)).decode()  # lz4 cannot shrink it
        email = f"r-{run}@example.com"
        at = changes.send(refused_id, f"refused-{run}", email=email, first_name=noise)
        letter = _wait_for_letter(settings, at)
        assert letter["reason"] == "produce_refused" and "MSG_SIZE_TOO_LARGE" in letter["detail"]
        changes.send(refused_id, f"refused-{run}", email=email, last_name="Ng")
        assert golden.wait_for(lambda _: bool(_golden(golden, refused_id)), 90)
        (record,) = _golden(golden, refused_id)
        assert record["version"] == 1 and record["fields"]["first_name"] is None
        assert record["fields"]["last_name"] == "Ng"

        assert worker.running and worker.ready()
        golden.close()


def test_a_dead_letter_of_1_2_mb_is_written_truncated_with_its_digest(
    stack: AccordSettings,
) -> None:
    settings = isolated(stack)
    admin = AdminClient(settings.kafka_config())
    admin.create_topics([NewTopic(settings.topics.dlq, 1, 1)])[settings.topics.dlq].result(30)
    value = os.urandom(1_200_000)
    at = ("accord.changes", 2, 987_654)
    writer = DeadLetterWriter(
        settings, registry_client(settings), Producer(settings.kafka_config())
    )
    writer.write(DeadLetter.at(at, b"golden-1", value, "state_too_large", "too big", "merge"))
    writer.flush()

    (stored,) = read_dead_letters(settings)
    letter = stored.letter
    assert (letter["topic"], letter["partition"], letter["offset"]) == at
    assert letter["truncated"] is True and letter["replayable"] is False
    assert letter["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert letter["value_size"] == len(value)
    assert value.startswith(letter["value"]) and len(letter["value"]) > 800_000
    assert letter["reason"] == "state_too_large" and "truncated" in letter["detail"]

    producer = Producer(settings.kafka_config())
    report = replay(settings, [stored], redis_conn=None, producer=producer)  # never asked
    assert report.refused == [stored.coordinates] and report.replayed == []
