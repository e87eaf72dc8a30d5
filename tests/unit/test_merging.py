"""`accord merge`'s command side (`streams.merging`) with a stand-in resolver and
producer: what it writes where, and a refusal that writes nothing."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from streams.identity import MergeRefused, MergeResult
from streams.merge import STATE_FORMAT, GoldenState, dumps
from streams.merging import MERGE, Merger, merge_change
from streams.model import Change

SURVIVOR, LOSER = "g-survivor", "g-loser"


class Identity:
    def __init__(self, refuse: str | None = None) -> None:
        self.refuse = refuse
        self.asked: list[tuple[str, str]] = []

    def merge(self, survivor: str, loser: str) -> MergeResult:
        self.asked.append((survivor, loser))
        if self.refuse:
            raise MergeRefused(survivor, loser, self.refuse)
        return MergeResult(survivor, loser, 3, ["support:u-1"])


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any) -> None:
        self.sent.append((topic, key, value))
        on_delivery(None, None)

    def flush(self, _timeout: float) -> int:
        return 0


def _merger(identity: Identity, producer: Producer) -> Merger:
    return Merger(
        identity,  # type: ignore[arg-type]
        "accord.changes",
        "accord.review",
        lambda record: json.dumps(record, default=str).encode(),
        producer,
        principal="ops",
    )


def test_a_merge_hands_the_loser_over_on_its_own_key_and_keeps_who_asked() -> None:
    producer = Producer()
    outcome = _merger(Identity(), producer).merge(SURVIVOR, LOSER)
    assert (outcome.rows, outcome.moved, outcome.already) == (3, ["support:u-1"], False)
    assert outcome.by.endswith("(Kafka principal User:ops)")
    [(changes, key, value), (review, review_key, record)] = producer.sent
    assert (changes, key) == ("accord.changes", LOSER.encode())
    control = json.loads(value)
    assert (control["golden_id"], control["merge_into"], control["absorb"]) == (
        LOSER,
        SURVIVOR,
        None,
    )
    assert (review, review_key) == ("accord.review", f"merge:{LOSER}".encode())
    kept = json.loads(record)
    assert kept["kind"] == MERGE and kept["by"] == outcome.by
    assert (kept["survivor"], kept["loser"], kept["moved"]) == (SURVIVOR, LOSER, ["support:u-1"])


def test_a_refused_merge_writes_nothing() -> None:
    producer = Producer()
    with pytest.raises(MergeRefused, match="would link 21 rows"):
        _merger(Identity("together they would link 21 rows"), producer).merge(SURVIVOR, LOSER)
    assert producer.sent == []


def test_control_changes_survive_the_avro_record_round_trip() -> None:
    control = merge_change(SURVIVOR, LOSER, 1_700_000_000_000_000)
    assert control.is_control
    assert Change.from_record(control.to_record()) == control
    handed = Change(
        "absorb:x", "accord", LOSER, control.op, 1, "merge", golden_id=SURVIVOR, absorb=b"{}"
    )
    assert handed.is_control and Change.from_record(handed.to_record()) == handed


def _state(golden_id: str, active: bool = True, merged_into: str | None = None) -> GoldenState:
    return GoldenState(golden_id, version=1, active=active, merged_into=merged_into)


def _checked(states: dict[str, GoldenState | None], identity: Identity, producer: Producer):
    merger = _merger(identity, producer)
    merger.read_state = states.get
    return merger


def test_an_inactive_record_is_refused_before_anything_moves() -> None:
    producer, identity = Producer(), Identity()
    states = {SURVIVOR: _state(SURVIVOR), LOSER: _state(LOSER, active=False)}
    with pytest.raises(MergeRefused, match=f"{LOSER} is inactive .* deactivate {SURVIVOR}"):
        _checked(states, identity, producer).merge(SURVIVOR, LOSER)
    assert identity.asked == [] and producer.sent == []
    with pytest.raises(MergeRefused, match="has not merged any change"):
        _checked({SURVIVOR: _state(SURVIVOR)}, identity, producer).merge(SURVIVOR, LOSER)
    assert identity.asked == []


def test_a_run_after_the_loser_was_retired_finishes_the_merge() -> None:
    producer, identity = Producer(), Identity()
    retired = _state(LOSER, active=False, merged_into=SURVIVOR)
    _checked({SURVIVOR: _state(SURVIVOR), LOSER: retired}, identity, producer).merge(
        SURVIVOR, LOSER
    )
    assert identity.asked == [(SURVIVOR, LOSER)]


def test_a_repeated_merge_sends_the_hand_over_again_but_keeps_the_first_record() -> None:
    class Again(Identity):
        def merge(self, survivor: str, loser: str) -> MergeResult:
            return MergeResult(survivor, loser, 3, [], already=True)

    producer = Producer()
    outcome = _merger(Again(), producer).merge(SURVIVOR, LOSER)
    assert outcome.already
    assert [topic for topic, _, _ in producer.sent] == ["accord.changes"]


def test_only_a_tombstone_is_written_in_the_new_state_format() -> None:
    assert orjson.loads(dumps(_state(SURVIVOR)))["fmt"] == 5  # a rollback still reads it
    tombstone = orjson.loads(dumps(_state(LOSER, active=False, merged_into=SURVIVOR)))
    assert tombstone["fmt"] == STATE_FORMAT and tombstone["mi"] == SURVIVOR
