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
Anything else is left uncommitted.

Losing a message also breaks the order within a partition: Faust goes on with the
messages after it (one it skipped, or one it fetched while flow was paused for recovery
and dropped), and when the lost change is read again it loses last-writer-wins to its
successor, so its value never shows in the golden record or its audit trail (found by
the same test: one of twelve edits missing from the history). So `admit` lets the agents
see each partition in offset order: a message past the next expected offset (the last
admitted one plus one, or the committed offset after an assignment) means one was lost;
the partition is sought back to the expected offset and every later message is passed
over, unacked, until it comes. Reading again is tolerated by the pipeline (dedupe keeps
a redelivered message, the merge ignores a change it holds). Where no offset is known
yet (a group that never committed), a lost message leaves the committed offset stalled:
after `REWIND_AFTER_S` the partition is sought back to it as well.

The price: Faust's gap handling (offsets that never arrive, e.g. transaction markers)
is off for these topics, so a raw topic written transactionally (Kafka Connect with
exactly-once source support) would stall. Accord's stack does not enable it. Under
Faust's experimental `exactly_once` guarantee the changes topic itself is written in
transactions, so `in_order=False` turns admission in order off there.
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

PASSED_OVER = Counter(
    "accord_offsets_passed_over_total",
    "Messages passed over until a lost earlier offset of their partition was read again",
    ["topic"],
)

REWIND_AFTER_S = 5.0
RESEEK_AFTER_S = 2.0


def _consecutive_run(offsets: list[int]) -> list[int]:
    run = offsets[:1]
    for offset in offsets[1:]:
        if offset != run[-1] + 1:
            break
        run.append(offset)
    return run


def guarded_consumer(base: type, topics: Iterable[str], in_order: bool = True) -> type:
    """A subclass of Faust consumer class `base` whose acks and commits are guarded for
    `topics`, and whose `admit` keeps them in offset order unless `in_order` is False;
    other topics (Faust's own) keep Faust's behaviour."""
    guarded = frozenset(topics)

    class GuardedConsumer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._stalled_since: dict[Any, float] = {}
            self._rewinds: set[asyncio.Future] = set()
            self._next: dict[Any, int] = {}  # partition -> offset the agents see next
            self._sought: dict[Any, tuple[int, float]] = {}  # partition -> (offset, when)
            self._passed_over: dict[int, Any] = {}  # id -> message `admit` turned away

        def admit(self, message: Any) -> bool:
            """May an agent process this message now? Not if an earlier offset of its
            partition was lost on the way: that one is read again first, then this."""
            if not in_order or message.topic not in guarded:
                return True
            tp, offset = message.tp, message.offset
            expected = self._next.get(tp, self._committed_offset[tp])
            if expected is not None and offset > expected:
                self._passed_over[id(message)] = message
                PASSED_OVER.labels(message.topic).inc()
                self._acked.setdefault(tp, [])  # commit rounds visit it: `_new_offset`
                self._seek_back(tp, expected)
                return False
            self._next[tp] = offset + 1
            if self._sought.pop(tp, None) is not None:
                log.info("%s: offset %s read again, in order from here", tp, offset)
            return True

        def ack(self, message: Any) -> bool:
            if message.topic in guarded:
                passed_over = self._passed_over.pop(id(message), None) is message
                if passed_over or not self._current(message):
                    # Passed over, skipped, or finished after a rebalance: not ours to
                    # commit. Forget it, so that a rebalance does not wait for it.
                    self._unacked_messages.discard(message)
                    if not passed_over:
                        REFUSED.labels(message.topic).inc()
                    return False
            return bool(super().ack(message))

        def _seek_back(self, tp: Any, offset: int) -> None:
            """Seek once per gap; again only if the first seek brought nothing back."""
            sought = self._sought.get(tp)
            now = time.monotonic()
            if sought is not None and sought[0] == offset and now - sought[1] < RESEEK_AFTER_S:
                return
            log.info("%s: offset %s was lost on the way; reading again from it", tp, offset)
            self._sought[tp] = (offset, now)
            self._seek_soon(tp, offset)

        def _seek_again_if_waiting(self, tp: Any) -> None:
            """Called on every commit round: a gap whose seek brought nothing back for
            `RESEEK_AFTER_S` is sought again, even if no later message comes to ask."""
            sought = self._sought.get(tp)
            if sought is not None:
                self._seek_back(tp, sought[0])

        async def on_partitions_revoked(self, revoked: set[Any]) -> None:
            self._forget(revoked)
            await super().on_partitions_revoked(revoked)

        async def on_partitions_assigned(self, assigned: set[Any], generation_id: int = 0) -> None:
            self._forget(assigned)  # Faust seeks them to their committed offsets
            await super().on_partitions_assigned(assigned, generation_id)

        def _forget(self, partitions: set[Any]) -> None:
            for tp in partitions:
                self._next.pop(tp, None)
                self._sought.pop(tp, None)
                self._stalled_since.pop(tp, None)

        def _seek_soon(self, tp: Any, offset: int) -> None:
            # On the consumer's own thread: aiokafka is not thread-safe, and Faust's
            # `seek` calls it from this one.
            seek = asyncio.ensure_future(self._thread.seek_wait({tp: offset}))
            self._rewinds.add(seek)
            seek.add_done_callback(self._seeked)

        def _seeked(self, seek: asyncio.Future) -> None:
            self._rewinds.discard(seek)
            if not seek.cancelled() and seek.exception() is not None:
                log.warning("seeking back failed (tried again later): %s", seek.exception())

        def _current(self, message: Any) -> bool:
            app = self.app
            return (
                message.generation_id == app.consumer_generation_id and app.flow_control.is_active()
            )

        def _new_offset(self, tp: Any) -> int | None:
            if tp.topic not in guarded:
                return super()._new_offset(tp)
            self._seek_again_if_waiting(tp)
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
            self._next[tp] = committed
            self._seek_soon(tp, committed)

    return GuardedConsumer
