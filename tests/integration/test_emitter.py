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

from streams.emit import Emitter, EmitTopics, plan_sinks
from streams.merge import GoldenState, apply, dumps, stage
from streams.model import Change, Op
from streams.projection import load_sinks
from streams.rules import default_rules
from streams.settings import AccordSettings
from streams.stack.process import wait_until

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
