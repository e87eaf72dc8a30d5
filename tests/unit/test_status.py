"""The status board's pure parts: percentiles from histogram buckets, group lag, gauges."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest

from streams.monitor import GroupLag, PartitionLag, Snapshot, accord_groups, group_lag
from streams.reconcile import Scorecard
from streams.review import review_summary
from streams.settings import AccordSettings
from streams.status import (
    BoardCollector,
    LastReconcile,
    StatusBoard,
    latency_by_target,
    percentiles,
)

INF = math.inf


def test_percentiles_interpolate_within_the_bucket_that_holds_the_rank() -> None:
    # 100 observations: 50 at or below 0.1 s, 90 at or below 0.2 s, all at or below 0.5 s.
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (INF, 100.0)]
    result = percentiles(buckets)
    assert result["p50"] == pytest.approx(0.1)
    assert result["p95"] == pytest.approx(0.2 + 0.3 * 0.5)
    assert result["p99"] == pytest.approx(0.2 + 0.3 * 0.9)


def test_percentiles_of_nothing_are_unknown_and_beyond_the_last_bucket_are_its_bound() -> None:
    assert percentiles([(0.1, 0.0), (INF, 0.0)]) == {"p50": None, "p95": None, "p99": None}
    assert percentiles([(0.1, 1.0), (INF, 10.0)])["p99"] == 0.1


def test_latency_by_target_reads_the_histogram_per_target() -> None:
    registry = CollectorRegistry()
    latency = Histogram(
        "accord_end_to_end_latency_seconds", "", ["target"], buckets=(0.1, 0.2), registry=registry
    )
    for seconds in (0.05, 0.15, 0.15, 0.15):
        latency.labels("crm").observe(seconds)
    result = latency_by_target(registry)
    assert list(result) == ["crm"]
    assert result["crm"]["count"] == 4
    assert result["crm"]["p50"] == pytest.approx(0.1 + 0.1 * (2 - 1) / 3)


def test_group_lag_covers_every_partition_of_a_topic_the_group_reads() -> None:
    ends = {("t", 0): 10, ("t", 1): 10, ("t", 2): 10, ("other", 0): 5}
    starts = {("t", 0): 0, ("t", 1): 2, ("t", 2): 0, ("other", 0): 0}
    # Committed on partition 0 only; partition 1 owned but never committed; 2 neither.
    lag = group_lag("g", "STABLE", {("t", 0): 7}, {("t", 1): "b"}, ends, starts, 1)
    assert [(p.partition, p.committed, p.lag, p.owner) for p in lag.partitions] == [
        (0, 7, 3, None),
        (1, None, 8, "b"),
        (2, None, 10, None),
    ]
    assert lag.lag == 21


def test_only_the_app_s_own_groups_are_watched() -> None:
    groups = ["accord", "accord-emit", "accord-sink-crm", "accordion", "other-accord"]
    assert accord_groups(groups, "accord") == ["accord", "accord-emit", "accord-sink-crm"]


def test_the_board_s_gauges_carry_lag_dlq_slots_and_drift() -> None:
    board = StatusBoard(AccordSettings(), monitor=object(), reconcile=list)  # type: ignore[arg-type]
    board.snapshot = Snapshot(
        taken_at=0,
        topics=[],
        groups=[GroupLag("accord", "STABLE", 1, 4, [PartitionLag("t", 2, 9, 5, 4, "w")])],
        connectors=[],
        slots=[],
        dlq_size=3,
        dlq_growth_per_s=None,
    )
    board.drift = LastReconcile(0, 0.1, [Scorecard("crm", checked=5, in_accord=4, drifted=1)])
    registry = CollectorRegistry()
    registry.register(BoardCollector(board))
    text = generate_latest(registry).decode()
    assert 'accord_consumer_lag{group="accord",partition="2",topic="t"} 4.0' in text
    assert "accord_dlq_messages 3.0" in text
    assert 'accord_reconcile_rows{state="drifted",target="crm"} 1.0' in text


def test_the_board_keeps_the_review_summary_and_counts_decisions() -> None:
    summary = review_summary(
        [("support:a", json.dumps({"reason": "role_address", "since_ms": 1_000}))],
        {"accept": 2, "reject": 1},
        now_ms=61_000,
    )
    monitor = SimpleNamespace(snapshot=lambda: None)
    board = StatusBoard(AccordSettings(), monitor=monitor, reconcile=list, review=lambda: summary)  # type: ignore[arg-type]
    board.refresh()
    assert board.as_dict()["review"]["by_reason"] == {"role_address": 1}
    assert REGISTRY.get_sample_value("accord_identity_held_rows") == 1
    registry = CollectorRegistry()
    registry.register(BoardCollector(board))
    text = generate_latest(registry).decode()
    assert 'accord_review_decisions_total{decision="accept"} 2.0' in text
    assert 'accord_review_decisions_total{decision="reject"} 1.0' in text
    assert "accord_review_oldest_hold_age_seconds 60.0" in text


def test_the_board_shows_why_it_could_not_read_the_review_queue() -> None:
    def away() -> dict:
        raise ConnectionError("redis away")

    monitor = SimpleNamespace(snapshot=lambda: None)
    board = StatusBoard(AccordSettings(), monitor=monitor, reconcile=list, review=away)  # type: ignore[arg-type]
    board.refresh()
    assert board.as_dict()["review"] is None
    assert board.as_dict()["review_error"] == "redis away"
