"""The stall detector and stage progress behind `/health` (streams.health)."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from streams.health import StageProgress, consumer_has_work, stall_problem
from streams.monitor import GroupLag, PartitionLag, Snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_with_work_and_no_progress_past_the_limit_is_stalled() -> None:
    assert stall_problem("merge", 1121.0, 1000.0, True, 120.0) == (
        "merge: records waiting and none moved for 121s"
    )


def test_a_stage_within_the_limit_or_without_work_is_not_stalled() -> None:
    assert stall_problem("merge", 1119.0, 1000.0, True, 120.0) is None
    assert stall_problem("merge", 9999.0, 1000.0, False, 120.0) is None


def test_progress_keeps_a_busy_stage_healthy() -> None:
    clock = Clock()
    stage = StageProgress("ingest", clock)
    stage.lag(True)
    for _ in range(10):
        clock.now += 60
        stage.moved(5)
        assert stage.problems(120.0) == []


def test_a_stage_idle_for_long_that_gets_work_is_not_stalled_at_once() -> None:
    clock = Clock()
    stage = StageProgress("emit", clock)
    clock.now += 3600
    stage.lag(False)  # nothing waits: as good as progress
    clock.now += 5
    stage.lag(True)
    assert stage.problems(120.0) == []
    clock.now += 121
    assert stage.problems(120.0) == ["emit: records waiting and none moved for 126s"]
    stage.moved(1)
    assert stage.problems(120.0) == []


def test_moving_no_records_is_no_progress() -> None:
    clock = Clock()
    stage = StageProgress("emit", clock)
    stage.lag(True)
    clock.now += 200
    stage.moved(0)
    assert stage.problems(120.0) == ["emit: records waiting and none moved for 200s"]


def test_a_refusal_is_reported_at_once_until_a_batch_goes_through() -> None:
    clock = Clock()
    stage = StageProgress("ingest", clock)
    stage.blocked("redis NOPERM: no permissions to run the 'set' command")
    assert stage.problems(120.0) == [
        "ingest: redis NOPERM: no permissions to run the 'set' command"
    ]
    stage.blocked()  # a transient error next: no longer a refusal
    assert stage.problems(120.0) == []
    stage.blocked("redis WRONGTYPE: Operation against a key holding the wrong kind of value")
    stage.moved(3)
    assert stage.problems(120.0) == []


def test_a_stage_blocked_for_long_is_stalled_too() -> None:
    clock = Clock()
    stage = StageProgress("ingest", clock)
    stage.blocked()
    clock.now += 130
    assert stage.problems(120.0) == ["ingest: records waiting and none moved for 130s"]


class FakeConsumer:
    """assignment/position/get_watermark_offsets(cached=True), as confluent-kafka has them."""

    def __init__(self, positions: dict[int, int], highs: dict[int, int | None]) -> None:
        self.positions = positions
        self.highs = highs

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", p) for p in self.positions]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition("t", tp.partition, self.positions[tp.partition]) for tp in partitions
        ]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> Any:
        assert cached, "health must not cost a broker round trip"
        high = self.highs[tp.partition]
        return None if high is None else (0, high)


def test_consumer_has_work_compares_positions_with_cached_high_watermarks() -> None:
    assert consumer_has_work(FakeConsumer({0: 10, 1: 4}, {0: 10, 1: 7})) is True
    assert consumer_has_work(FakeConsumer({0: 10, 1: 7}, {0: 10, 1: 7})) is False
    assert consumer_has_work(FakeConsumer({}, {})) is False  # nothing assigned: no work here
    assert consumer_has_work(FakeConsumer({0: -1001}, {0: 5})) is None  # never fetched
    assert consumer_has_work(FakeConsumer({0: 3}, {0: None})) is None


def test_look_at_lag_keeps_what_it_knew_when_it_cannot_tell() -> None:
    clock = Clock()
    stage = StageProgress("ingest", clock)
    stage.look_at_lag(FakeConsumer({0: 1}, {0: 9}))
    assert stage.has_work
    clock.now += 1
    stage.look_at_lag(FakeConsumer({0: 9}, {0: 9}))  # not due yet: unchanged
    assert stage.has_work
    clock.now += 10
    stage.look_at_lag(FakeConsumer({0: -1001}, {0: 9}))
    assert stage.has_work
    clock.now += 10
    stage.look_at_lag(FakeConsumer({0: 9}, {0: 9}))
    assert not stage.has_work


def test_merge_work_counts_only_this_worker_s_partitions_of_the_changes_topic() -> None:
    from streams.app import merge_has_work

    def group(name: str, lags: dict[tuple[str, int], int]) -> GroupLag:
        parts = [PartitionLag(t, p, 100, 100 - lag, lag, None) for (t, p), lag in lags.items()]
        return GroupLag(name, "Stable", None, sum(lags.values()), parts)

    snapshot = Snapshot(
        0.0,
        [],
        [
            group("app", {("app.changes", 0): 0, ("app.changes", 1): 7}),
            group("app-emit", {("app-golden-changelog", 0): 9}),
        ],
        [],
        [],
        0,
        None,
    )
    assert merge_has_work(snapshot, "app", "app.changes", {("app.changes", 1)})
    assert not merge_has_work(snapshot, "app", "app.changes", {("app.changes", 0)})
    assert not merge_has_work(snapshot, "other", "app.changes", {("app.changes", 1)})
