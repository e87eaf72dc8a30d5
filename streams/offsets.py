"""Offset commits that never move past a message an agent has not processed.

faust-streaming 0.15 can commit past an unprocessed message in two ways, and a worker
that dies right after such a commit loses the message for good (found by the SIGKILL
end-to-end test):

- after a rebalance or a restart, a message fetched before the partitions were sought
  back is *skipped* (stale generation, or flow control paused) and acked all the same;
- its commit accepts acked offsets that start one past the committed offset, so the
  message at the committed offset itself can be jumped over.

`guarded_consumer` wraps Faust's consumer class for the topics Accord's agents read: a
message is acked only while its generation is current and flow is active, and a commit
moves only over a contiguous run of acked offsets that starts at the committed offset.
Anything else is left uncommitted. A message Faust skipped is not always fetched again,
so a partition whose committed offset has not been processed for `REWIND_AFTER_S` is
sought back to it: the messages from there are processed again, which the pipeline
tolerates (dedupe keeps a redelivered message, the merge ignores a change it holds).

The price: Faust's gap handling (offsets that never arrive, e.g. transaction markers)
is off for these topics, so a raw topic written transactionally (Kafka Connect with
exactly-once source support) would stall. Accord's stack does not enable it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter

log = logging.getLogger(__name__)

REFUSED = Counter(
    "accord_offsets_refused_acks_total",
    "Acks not counted: the message was skipped by Faust or finished after a rebalance",
    ["topic"],
)
REWOUND = Counter(
    "accord_offsets_rewinds_total",
    "Partitions read again from their committed offset after it stalled",
    ["topic"],
)

REWIND_AFTER_S = 5.0


def _consecutive_run(offsets: list[int]) -> list[int]:
    run = offsets[:1]
    for offset in offsets[1:]:
        if offset != run[-1] + 1:
            break
        run.append(offset)
    return run


def guarded_consumer(base: type, topics: Iterable[str]) -> type:
    """A subclass of Faust consumer class `base` whose acks and commits are guarded for
    `topics`; other topics (Faust's own) keep Faust's behaviour."""
    guarded = frozenset(topics)

    class GuardedConsumer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._stalled_since: dict[Any, float] = {}
            self._rewinds: set[asyncio.Future] = set()

        def ack(self, message: Any) -> bool:
            if message.topic in guarded and not self._current(message):
                # Skipped, or finished after a rebalance: not ours to commit. Forget it,
                # so that a rebalance does not wait for it.
                self._unacked_messages.discard(message)
                REFUSED.labels(message.topic).inc()
                return False
            return bool(super().ack(message))

        def _current(self, message: Any) -> bool:
            app = self.app
            return (
                message.generation_id == app.consumer_generation_id and app.flow_control.is_active()
            )

        def _new_offset(self, tp: Any) -> int | None:
            if tp.topic not in guarded:
                return super()._new_offset(tp)
            acked = self._acked[tp]
            if not acked:
                return None
            acked.sort()
            committed = self._committed_offset[tp]
            if committed is not None:
                behind = acked[: bisect_left(acked, committed)]  # committed elsewhere
                del acked[: len(behind)]
                self._acked_index[tp].difference_update(behind)
            if not acked:
                return None
            if committed is not None and acked[0] != committed:
                self._rewind_if_stalled(tp, committed)
                return None  # the message at the committed offset is not done yet
            self._stalled_since.pop(tp, None)
            run = _consecutive_run(acked)
            del acked[: len(run)]
            self._acked_index[tp].difference_update(run)
            return run[-1] + 1

        def _rewind_if_stalled(self, tp: Any, committed: int | None) -> None:
            since = self._stalled_since.setdefault(tp, time.monotonic())
            if committed is None or time.monotonic() - since < REWIND_AFTER_S:
                return
            log.warning("%s: offset %s was never processed; reading again from it", tp, committed)
            del self._stalled_since[tp]
            REWOUND.labels(tp.topic).inc()
            rewind = asyncio.ensure_future(self.seek(tp, committed))
            self._rewinds.add(rewind)
            rewind.add_done_callback(self._rewinds.discard)

    return GuardedConsumer
