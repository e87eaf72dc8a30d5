"""Guarded offset commits: never past a message an agent has not processed."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import REGISTRY

from streams import offsets
from streams.offsets import guarded_consumer

TOPIC = "crm.public.customers"


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass(eq=False)
class Message:
    topic: str
    offset: int
    generation_id: int = 1
    tp: TP = field(init=False)

    def __post_init__(self) -> None:
        self.tp = TP(self.topic, 0)


class FlowControl:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


class App:
    def __init__(self) -> None:
        self.consumer_generation_id = 1
        self.flow_control = FlowControl()


class FaustLikeConsumer:
    """The slice of Faust's consumer bookkeeping that the guard builds on."""

    def __init__(self) -> None:
        self.app = App()
        self._acked: defaultdict[Any, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[Any, set[int]] = defaultdict(set)
        self._committed_offset: defaultdict[Any, int | None] = defaultdict(lambda: None)
        self._unacked_messages: set[Message] = set()
        self.sought: list[tuple[Any, int]] = []

    def ack(self, message: Message) -> bool:
        self._acked_index[message.tp].add(message.offset)
        self._acked[message.tp].append(message.offset)
        return True

    def _new_offset(self, tp: Any) -> int | None:
        return -1  # Faust's own rule: the guard must not use it for guarded topics

    @property
    def _thread(self) -> Any:
        return self  # Faust's consumer thread: seeks are made there

    async def seek_wait(self, partitions: dict[Any, int]) -> None:
        self.sought.extend(partitions.items())

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[Any], generation_id: int = 0) -> None:
        pass


def consumer(committed: int | None = 10) -> Any:
    made = guarded_consumer(FaustLikeConsumer, [TOPIC])()
    made._committed_offset[TP(TOPIC, 0)] = committed
    return made


def ack_all(made: Any, *offsets_: int) -> None:
    for offset in offsets_:
        made.ack(Message(TOPIC, offset))


def test_commits_a_run_that_starts_at_the_committed_offset() -> None:
    made = consumer(10)
    ack_all(made, 12, 10, 11, 14)
    assert made._new_offset(TP(TOPIC, 0)) == 13
    assert made._acked[TP(TOPIC, 0)] == [14]


def test_never_jumps_over_the_message_at_the_committed_offset() -> None:
    made = consumer(10)
    ack_all(made, 11, 12)  # Faust itself would commit 13 here
    assert made._new_offset(TP(TOPIC, 0)) is None


def test_acks_from_a_stale_generation_or_paused_flow_are_refused() -> None:
    async def scenario() -> None:
        made = consumer(10)
        assert made.ack(Message(TOPIC, 10, generation_id=0)) is False
        made.app.flow_control.active = False
        assert made.ack(Message(TOPIC, 10)) is False
        assert made._new_offset(TP(TOPIC, 0)) is None
        made.app.flow_control.active = True
        assert made.ack(Message(TOPIC, 10)) is True
        assert made._new_offset(TP(TOPIC, 0)) == 11

    asyncio.run(scenario())


def test_a_message_past_a_lost_one_is_passed_over_until_the_lost_one_is_read_again() -> None:
    """Faust goes on after a message it skipped or dropped: processing the next ones
    first would let the lost change lose last-writer-wins to its successor."""

    async def scenario() -> None:
        made = consumer(10)
        assert made.admit(Message(TOPIC, 10))
        made.ack(Message(TOPIC, 10))
        early = Message(TOPIC, 12)  # 11 never came
        assert not made.admit(early)
        assert not made.admit(Message(TOPIC, 13))  # one seek for the gap, not one each
        await asyncio.sleep(0)
        assert made.sought == [(TP(TOPIC, 0), 11)]
        assert made.ack(early) is False
        assert made._new_offset(TP(TOPIC, 0)) == 11
        made._committed_offset[TP(TOPIC, 0)] = 11
        for offset in (11, 12, 13):  # read again, in order
            again = Message(TOPIC, offset)
            assert made.admit(again)
            made.ack(again)
        assert made._new_offset(TP(TOPIC, 0)) == 14

    before = REGISTRY.get_sample_value("accord_offsets_passed_over_total", {"topic": TOPIC}) or 0
    asyncio.run(scenario())
    after = REGISTRY.get_sample_value("accord_offsets_passed_over_total", {"topic": TOPIC})
    assert after == before + 2


def test_the_first_message_after_an_assignment_must_be_the_committed_one() -> None:
    async def scenario() -> None:
        made = consumer(10)
        await made.on_partitions_assigned({TP(TOPIC, 0)}, 2)
        assert not made.admit(Message(TOPIC, 11))  # 10 was dropped while flow was paused
        await asyncio.sleep(0)
        assert made.sought == [(TP(TOPIC, 0), 10)]
        assert made.admit(Message(TOPIC, 10))

    asyncio.run(scenario())


def test_reading_again_from_an_earlier_offset_is_admitted() -> None:
    made = consumer(10)
    for offset in (10, 11, 12, 10, 11, 12, 13):  # a rewind to the committed offset
        assert made.admit(Message(TOPIC, offset))


def test_a_seek_that_brought_nothing_back_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> list[tuple[Any, int]]:
        made = consumer(10)
        now = [100.0]
        monkeypatch.setattr(offsets.time, "monotonic", lambda: now[0])
        assert not made.admit(Message(TOPIC, 12))
        now[0] += offsets.RESEEK_AFTER_S / 2
        assert not made.admit(Message(TOPIC, 13))
        now[0] += offsets.RESEEK_AFTER_S
        assert not made.admit(Message(TOPIC, 14))
        await asyncio.sleep(0)
        return made.sought

    assert asyncio.run(scenario()) == [(TP(TOPIC, 0), 10), (TP(TOPIC, 0), 10)]


def test_a_commit_round_seeks_again_when_nothing_came_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> list[tuple[Any, int]]:
        made = consumer(10)
        now = [100.0]
        monkeypatch.setattr(offsets.time, "monotonic", lambda: now[0])
        assert not made.admit(Message(TOPIC, 11))  # the last message there is
        assert TP(TOPIC, 0) in made._acked  # so commit rounds look at the partition
        assert made._new_offset(TP(TOPIC, 0)) is None
        now[0] += offsets.RESEEK_AFTER_S * 2
        assert made._new_offset(TP(TOPIC, 0)) is None
        await asyncio.sleep(0)
        return made.sought

    assert asyncio.run(scenario()) == [(TP(TOPIC, 0), 10), (TP(TOPIC, 0), 10)]


def test_without_a_committed_offset_or_in_order_off_everything_is_admitted() -> None:
    assert consumer(None).admit(Message(TOPIC, 7))
    unordered = guarded_consumer(FaustLikeConsumer, [TOPIC], in_order=False)()
    unordered._committed_offset[TP(TOPIC, 0)] = 10
    assert unordered.admit(Message(TOPIC, 12))


def test_offsets_committed_elsewhere_are_dropped() -> None:
    made = consumer(None)
    ack_all(made, 3, 4)
    made._committed_offset[TP(TOPIC, 0)] = 20  # another member committed further
    ack_all(made, 20)
    assert made._new_offset(TP(TOPIC, 0)) == 21


def test_other_topics_keep_faust_behaviour() -> None:
    made = consumer(10)
    assert made._new_offset(TP("accord-__assignor-__leader", 0)) == -1


def test_a_stalled_partition_is_read_again_from_its_committed_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> Any:
        made = consumer(10)
        ack_all(made, 11)
        now = [100.0]
        monkeypatch.setattr(offsets.time, "monotonic", lambda: now[0])
        assert made._new_offset(TP(TOPIC, 0)) is None  # stall starts
        now[0] += offsets.REWIND_AFTER_S / 2
        assert made._new_offset(TP(TOPIC, 0)) is None  # not long enough yet
        await asyncio.sleep(0)
        assert made.sought == []
        now[0] += offsets.REWIND_AFTER_S / 2
        assert made._new_offset(TP(TOPIC, 0)) is None  # long enough: rewind
        await asyncio.sleep(0)
        return made.sought

    before = REGISTRY.get_sample_value("accord_offsets_rewinds_total", {"topic": TOPIC}) or 0
    assert asyncio.run(scenario()) == [(TP(TOPIC, 0), 10)]
    after = REGISTRY.get_sample_value("accord_offsets_rewinds_total", {"topic": TOPIC})
    assert after == before + 1
