"""The emitter's transactions against the real broker: a producer that can no longer
commit or abort (fenced by a zombie with its transactional id, as after a broker restart
mid-transaction) is replaced, the batch is read again, and every output is written once."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.dlq import DeadLetterWriter, read_dead_letters
from streams.emit import Emitter, EmitTopics, plan_sinks
from streams.merge import GoldenState, apply, dumps, stage
from streams.model import Change, Op
from streams.projection import load_sinks
from streams.registry import registry_client
from streams.rules import default_rules
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests.support import isolated

pytestmark = pytest.mark.integration
_positions = itertools.count(1)


def _revision(state: GoldenState, email: str) -> bytes:
    """The merge's write of one CRM change, as it lands on the golden changelog."""
    rules = default_rules()
    change = Change(
        f"crm|1|p{next(_positions):06d}", "crm", "1", Op.UPSERT, 1, "p", {"email": email}
    )
    outcome = apply(state, change, rules)
    orders = plan_sinks(state, change, load_sinks(Path("connectors")), rules)
    stage(state, change, outcome, orders)
    return dumps(state)


@pytest.fixture
def topics(stack: AccordSettings) -> Iterator[EmitTopics]:
    run = uuid.uuid4().hex[:8]
    names = EmitTopics(f"emit-{run}.changelog", f"emit-{run}.golden", f"emit-{run}.audit",
                       f"emit-{run}.sink.")  # fmt: skip
    every = [names.changelog, names.golden, names.audit, names.sink("support")]
    admin = AdminClient(stack.kafka_config())
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in every]).values():
        future.result(30)
    yield names
    admin.delete_topics(every)


def _emitter(settings: AccordSettings, topics: EmitTopics, txn_id: str) -> Emitter:
    def encode(record: dict) -> bytes:
        return json.dumps(record, default=str).encode()

    return Emitter(settings.kafka_config(), f"{txn_id}-group", txn_id, topics,
                   encode, encode, encode, session_timeout_s=10)  # fmt: skip


def _committed_golden(settings: AccordSettings, topic: str) -> list[bytes]:
    reader = Consumer(
        settings.kafka_config(
            {"group.id": f"read-{uuid.uuid4().hex}", "isolation.level": "read_committed"}
        )
    )
    reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        return [m.value() for m in reader.consume(100, timeout=3) if m.error() is None]
    finally:
        reader.close()


def test_a_fenced_emitter_replaces_its_producer_and_emits_each_revision_once(
    stack: AccordSettings, topics: EmitTopics
) -> None:
    txn_id = f"emit-test-{uuid.uuid4().hex[:8]}"
    emitter = _emitter(stack, topics, txn_id)
    changelog = Producer(stack.kafka_config())
    state = GoldenState(f"g-{uuid.uuid4().hex[:8]}")
    changelog.produce(topics.changelog, key=state.golden_id.encode(),
                      value=_revision(state, "first@example.com"))  # fmt: skip
    changelog.flush(10)
    try:
        assert wait_until(lambda: emitter.step(timeout_s=0.5) == 1, 60)

        # A zombie takes the transactional id: the emitter's producer is now fenced.
        zombie = Producer(stack.kafka_config({"transactional.id": txn_id}))
        zombie.init_transactions(30)
        changelog.produce(topics.changelog, key=state.golden_id.encode(),
                          value=_revision(state, "second@example.com"))  # fmt: skip
        changelog.flush(10)

        results = []
        assert wait_until(lambda: results.append(emitter.step(timeout_s=0.5)) or 1 in results, 90)
        assert results[0] == 0  # the fenced attempt emitted nothing and rewound
        assert emitter.revisions_emitted == 2
    finally:
        emitter.close()

    golden = [json.loads(v) for v in _committed_golden(stack, topics.golden)]
    assert [g["fields"]["email"] for g in golden] == ["first@example.com", "second@example.com"]


def test_a_revision_the_broker_refuses_is_dead_lettered_and_the_rest_emitted(
    stack: AccordSettings,
) -> None:
    """The golden topic takes at most 3,000 bytes a batch: one revision's golden record
    is larger. Refused in a batch with another revision's, each is produced alone once;
    the one refused alone is dead-lettered with its changelog coordinates, the other is
    emitted, and nothing of the refused revision is."""
    settings = isolated(stack)
    topics = EmitTopics(f"{settings.worker.app_id}.changelog", settings.topics.golden,
                        settings.topics.audit, settings.topics.sink_prefix)  # fmt: skip
    small = {"max.message.bytes": "3000"}
    admin = AdminClient(stack.kafka_config())
    new = [NewTopic(topics.changelog, 1, 1), NewTopic(topics.golden, 1, 1, config=small),
           NewTopic(topics.audit, 1, 1), NewTopic(topics.sink("support"), 1, 1),
           NewTopic(settings.topics.dlq, 1, 1)]  # fmt: skip
    for future in admin.create_topics(new).values():
        future.result(30)

    def encode(record: dict) -> bytes:
        return json.dumps(record, default=str).encode()

    txn_id = f"emit-test-{uuid.uuid4().hex[:8]}"
    registry = registry_client(settings)
    emitter = Emitter(settings.kafka_config(), f"{txn_id}-group", txn_id, topics,
                      encode, encode, encode, session_timeout_s=10,
                      dead_letters=lambda: DeadLetterWriter(settings, registry, None))  # fmt: skip
    big, fine = GoldenState(f"g-big-{txn_id}"), GoldenState(f"g-fine-{txn_id}")
    changelog = Producer(stack.kafka_config())
    landed: list = []
    for state, email in ((big, "a" * 5000 + "@example.com"), (fine, "fine@example.com")):
        changelog.produce(topics.changelog, key=state.golden_id.encode(),
                          value=_revision(state, email),
                          on_delivery=lambda _e, m: landed.append(m))  # fmt: skip
    changelog.flush(10)
    try:
        assert wait_until(lambda: emitter.step(timeout_s=0.5) == 1 or emitter.dead_lettered, 90)
        assert (emitter.revisions_emitted, emitter.dead_lettered) == (1, 1)
    finally:
        emitter.close()

    golden = [json.loads(v) for v in _committed_golden(stack, topics.golden)]
    assert [g["golden_id"] for g in golden] == [fine.golden_id]
    audit = [json.loads(v) for v in _committed_golden(stack, topics.audit)]
    assert {a["golden_id"] for a in audit} == {fine.golden_id}
    (stored,) = read_dead_letters(settings)
    letter = stored.letter
    at = landed[0]
    assert (letter["topic"], letter["partition"], letter["offset"]) == (
        at.topic(), at.partition(), at.offset())  # fmt: skip
    assert (letter["reason"], letter["stage"], letter["replayable"]) == (
        "produce_refused", "emit", False)  # fmt: skip
    assert "MSG_SIZE_TOO_LARGE" in letter["detail"] and letter["value"] == at.value()
