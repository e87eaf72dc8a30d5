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

    async def seek(self, tp: Any, offset: int) -> None:
        self.sought.append((tp, offset))


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
    made = consumer(10)
    assert made.ack(Message(TOPIC, 10, generation_id=0)) is False
    made.app.flow_control.active = False
    assert made.ack(Message(TOPIC, 10)) is False
    assert made._new_offset(TP(TOPIC, 0)) is None
    made.app.flow_control.active = True
    assert made.ack(Message(TOPIC, 10)) is True
    assert made._new_offset(TP(TOPIC, 0)) == 11


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
