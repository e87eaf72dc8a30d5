"""What makes a worker's `/health` not ready, besides a stopped thread or a rebalance.

Two things, each for the worker's own stages (ingest, merge, emit) only: a stalled
stage, or a stage that keeps being refused. A paused SQL target is not one of them: the
worker is fine and restarting it would not fix the target (it is a status and an alert).

- **Stalled**: records wait for the stage (it has lag) and it has moved none for
  `worker.stall_after_s`. Each stage records in a `StageProgress` when it last moved
  records, and whether it has work; `stall_problem` judges that, purely.
- **Refused**: a service answers with an error that waiting will not cure (Redis NOPERM
  or WRONGTYPE, see `streams.dedupe.classify_redis_error`). The stage keeps retrying with
  backoff, so nothing is lost and it resumes by itself once fixed, but an operator has
  to act: `/health` names the reason.

Stages write their `StageProgress` from their own threads and the health page reads it
from the event loop: each field is one attribute assignment, atomic under the GIL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

__all__ = ["LAG_CHECK_S", "StageProgress", "consumer_has_work", "stall_problem"]

LAG_CHECK_S = 5.0  # how often a stage looks at its lag while idle


def stall_problem(
    stage: str, now: float, last_progress: float, has_work: bool, stall_after_s: float
) -> str | None:
    """The health problem of a stage that has work and moved nothing for longer than
    `stall_after_s` (times in `time.monotonic()` seconds), else None.

    `last_progress` is the last time the stage moved records *or had none waiting*: a
    stage idle for an hour that is handed work now is not stalled.
    """
    idle_s = now - last_progress
    if has_work and idle_s > stall_after_s:
        return f"{stage}: records waiting and none moved for {idle_s:.0f}s"
    return None


class StageProgress:
    """One stage's progress, lag and refusal, as its loop last saw them."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self.last_progress = clock()
        self.has_work = False
        self.refusal: str | None = None
        self.last_lag_check = float("-inf")

    def moved(self, records: int = 1) -> None:
        """The stage handed on (or committed) `records` records."""
        if records > 0:
            self.last_progress = self.clock()
            self.refusal = None

    def lag(self, has_work: bool) -> None:
        """What the stage's last look at its lag found; no work counts as progress."""
        self.last_lag_check = self.clock()
        self.has_work = has_work
        if not has_work:
            self.last_progress = self.last_lag_check

    def lag_due(self, every_s: float = LAG_CHECK_S) -> bool:
        return self.clock() - self.last_lag_check >= every_s

    def blocked(self, refusal: str | None = None) -> None:
        """The stage could not hand its batch on and reads it again: it has work. With
        `refusal`, a service refused it in a way waiting will not cure."""
        self.refusal = refusal
        self.has_work = True

    def look_at_lag(self, consumer: Any, every_s: float = LAG_CHECK_S) -> None:
        """`lag` from a confluent-kafka consumer, at most every `every_s` seconds."""
        if self.lag_due(every_s):
            has_work = consumer_has_work(consumer)
            if has_work is not None:
                self.lag(has_work)
            else:
                self.last_lag_check = self.clock()

    def problems(self, stall_after_s: float) -> list[str]:
        """What `/health` reports for this stage: its refusal, and whether it stalled."""
        found = [f"{self.name}: {self.refusal}"] if self.refusal else []
        stalled = stall_problem(
            self.name, self.clock(), self.last_progress, self.has_work, stall_after_s
        )
        return found + ([stalled] if stalled else [])


def consumer_has_work(consumer: Any) -> bool | None:
    """Whether a confluent-kafka consumer's assigned partitions hold unread records, from
    its positions and librdkafka's cached high watermarks (updated by each fetch; no
    broker round trip). False with no partition assigned (other workers hold them); None
    when it cannot tell yet (never fetched)."""
    try:
        assignment = consumer.assignment()
        if not assignment:
            return False
        known = False
        for tp in consumer.position(assignment):
            offsets = consumer.get_watermark_offsets(tp, cached=True)
            if offsets is None or offsets[1] < 0 or tp.offset < 0:
                continue  # not fetched yet: unknown
            high = offsets[1]
            known = True
            if tp.offset < high:
                return True
        return False if known else None
    except KafkaException:
        return None
