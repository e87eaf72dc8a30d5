"""The worker's status board: what `/status`, `/status.json` and part of `/metrics` show.

A background loop (`StatusBoard.run`) refreshes a monitor snapshot every few seconds and,
on its own schedule, runs reconcile; the web handlers only read what it last found, so a
slow broker or a long reconcile never blocks the worker's event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streams.missing_columns import missing_columns
from streams.monitor import Monitor, Snapshot
from streams.reconcile import Scorecard
from streams.settings import AccordSettings

log = logging.getLogger(__name__)
LATENCY_METRIC = "accord_end_to_end_latency_seconds"
PERCENTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class LastReconcile:
    """The last scheduled reconcile."""

    finished_at: float
    took_s: float
    cards: list[Scorecard]
    error: str | None = None


def percentiles(
    buckets: list[tuple[float, float]], wanted: tuple[float, ...] = PERCENTILES
) -> dict[str, float | None]:
    """Percentiles from a Prometheus histogram's cumulative buckets, as Prometheus's
    `histogram_quantile` estimates them: linear within the bucket that holds the rank.

    `buckets`: (upper bound, cumulative count), ascending, ending with +Inf.
    """
    total = buckets[-1][1] if buckets else 0
    result: dict[str, float | None] = {}
    for q in wanted:
        name = f"p{round(q * 100)}"
        if not total:
            result[name] = None
            continue
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if bound == float("inf"):
                    result[name] = lower_bound  # beyond the last finite bucket
                else:
                    share = (
                        (rank - lower_count) / (count - lower_count) if count > lower_count else 1
                    )
                    result[name] = lower_bound + (bound - lower_bound) * share
                break
            lower_bound, lower_count = bound, count
    return result


def latency_by_target(registry: CollectorRegistry = REGISTRY) -> dict[str, dict[str, Any]]:
    """p50/p95/p99 and count of the end-to-end latency histogram, per target."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for metric in registry.collect():
        if metric.name != LATENCY_METRIC:
            continue
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets.setdefault(sample.labels["target"], []).append((bound, sample.value))
    return {
        target: {"count": int(points[-1][1]), **percentiles(sorted(points))}
        for target, points in sorted(buckets.items())
    }


class StatusBoard:
    """Holds the latest snapshot and drift scorecard; `run` keeps them fresh."""

    def __init__(
        self,
        settings: AccordSettings,
        monitor: Monitor | None = None,
        reconcile: Callable[[], list[Scorecard]] | None = None,
        review: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        from streams.reconcile import reconcile as reconcile_all

        self.settings = settings
        # No group descriptions in a long-running worker: see streams/monitor.py.
        self.monitor = monitor or Monitor(settings, members=False)
        self.reconcile = reconcile or (lambda: reconcile_all(settings))
        self.review_source = review or _review_source(settings)
        self.review: dict[str, Any] | None = None  # `streams.review.review_summary`
        self.review_error: str | None = None
        self.snapshot: Snapshot | None = None
        self.snapshot_error: str | None = None
        self.drift: LastReconcile | None = None
        self.started_at = time.time()

    def refresh(self) -> None:
        try:
            self.snapshot, self.snapshot_error = self.monitor.snapshot(), None
        except Exception as exc:  # shown on the page; the next refresh tries again
            self.snapshot_error = str(exc)[:300]
        try:
            self.review, self.review_error = self.review_source(), None
        except Exception as exc:  # Redis away: shown on the page, tried again next time
            self.review_error = str(exc)[:300]
        else:
            from streams.ingest import HELD_ROWS

            HELD_ROWS.set(self.review["held"])  # right after a decision too, not only ingest

    def reconcile_now(self) -> None:
        started = time.monotonic()
        try:
            cards, error = self.reconcile(), None
        except Exception as exc:
            log.warning("scheduled reconcile failed: %s", exc)
            cards, error = [], str(exc)[:300]
        self.drift = LastReconcile(time.time(), round(time.monotonic() - started, 2), cards, error)

    def run(self, stop: threading.Event) -> None:
        worker = self.settings.worker
        next_reconcile = time.monotonic() + min(worker.reconcile_interval_s, 60.0)
        while not stop.is_set():
            self.refresh()
            if worker.reconcile_interval_s and time.monotonic() >= next_reconcile:
                self.reconcile_now()
                next_reconcile = time.monotonic() + worker.reconcile_interval_s
            stop.wait(worker.status_interval_s)
        self.monitor.close()

    def close(self) -> None:
        pass

    def as_dict(self) -> dict[str, Any]:
        drift = None
        if self.drift is not None:
            drift = {
                "finished_at": self.drift.finished_at,
                "took_s": self.drift.took_s,
                "error": self.drift.error,
                "cards": [card.as_dict(details=10) for card in self.drift.cards],
            }
        return {
            "app_id": self.settings.worker.app_id,
            "up_since": self.started_at,
            "snapshot": self.snapshot.as_dict() if self.snapshot else None,
            "snapshot_error": self.snapshot_error,
            "latency": latency_by_target(),
            "missing_columns": missing_columns(),
            "drift": drift,
            "reconcile_interval_s": self.settings.worker.reconcile_interval_s,
            "review": self.review,
            "review_error": self.review_error,
        }


class BoardCollector(Collector):
    """Consumer lag, DLQ size, slot lag and drift as Prometheus gauges, from the board."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "accord_consumer_lag",
            "Messages between a consumer group's committed offset and the partition's end",
            labels=["group", "topic", "partition"],
        )
        dlq = GaugeMetricFamily("accord_dlq_messages", "Entries held in the dead-letter topic")
        slots = GaugeMetricFamily(
            "accord_replication_slot_lag_bytes",
            "WAL a source's replication slot holds back",
            labels=["system", "slot"],
        )
        drift = GaugeMetricFamily(
            "accord_reconcile_rows",
            "Target rows by state in the last scheduled reconcile",
            labels=["target", "state"],
        )
        snapshot = self.board.snapshot
        if snapshot is not None:
            for group in snapshot.groups:
                for p in group.partitions:
                    lag.add_metric([group.group, p.topic, str(p.partition)], p.lag)
            dlq.add_metric([], snapshot.dlq_size)
            for slot in snapshot.slots:
                if slot.lag_bytes is not None:
                    slots.add_metric([slot.system, slot.slot], slot.lag_bytes)
        if self.board.drift is not None:
            for card in self.board.drift.cards:
                for state in ("in_accord", "drifted", "missing", "orphaned"):
                    drift.add_metric([card.target, state], getattr(card, state))
        decisions = CounterMetricFamily(
            "accord_review_decisions",
            "Review decisions on held rows, by decision (accept, reject)",
            labels=["decision"],
        )
        oldest = GaugeMetricFamily(
            "accord_review_oldest_hold_age_seconds", "Age of the oldest held row (0: none)"
        )
        review = self.board.review
        if review is not None:
            for decision, count in review["decisions"].items():
                decisions.add_metric([decision], count)
            oldest.add_metric([], review["oldest_age_s"] or 0)
        yield from (lag, dlq, slots, drift, decisions, oldest)


def _review_source(settings: AccordSettings) -> Callable[[], dict[str, Any]]:
    """The review queue's summary from the app's Redis (`streams.review.review_summary`)."""
    from streams.app import redis_client
    from streams.review import now_ms, read_decisions, read_held, review_summary

    client = redis_client(settings)
    prefix = settings.worker.redis_prefix
    return lambda: review_summary(
        read_held(client, prefix), read_decisions(client, prefix), now_ms()
    )


def page() -> str:
    """The status page: static HTML that polls `/status.json`."""
    return resources.files("streams").joinpath("status.html").read_text()
