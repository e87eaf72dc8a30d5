"""The demo's wait for a worker with a backlog: as long as it reads, no longer."""

from collections.abc import Iterator

import pytest

from streams.demo import CAUGHT_UP, Backlog, Standing, follow_backlog
from streams.errors import AccordError


class Script:
    """Standings read one after another, each `step_s` later on a clock of its own."""

    def __init__(self, standings: list[Standing], step_s: float) -> None:
        self._standings: Iterator[Standing] = iter(standings)
        self.step_s = step_s
        self.now = 0.0
        self.reads = 0

    def standing(self) -> Standing:
        self.now += self.step_s
        self.reads += 1
        return next(self._standings)

    def clock(self) -> float:
        return self.now


def standing(raw: int, sink: int, read: int) -> Standing:
    return Standing({"raw changes": raw, "crm sink events": sink}, read)


def test_waits_through_a_backlog_far_longer_than_the_stall_limit() -> None:
    # 40 looks 30 s apart: 20 minutes of catching up, with a stall limit of 60 s. The
    # sink events pile up for a while as the raw changes are read: the total grows.
    standings = [standing(800_000 - 20_000 * i, 1_000 * i, 20_000 * i) for i in range(40)]
    standings.append(standing(0, CAUGHT_UP, 900_000))
    script, said = Script(standings, 30.0), []
    follow_backlog(script.standing, said.append, stall_s=60, poll_s=0, clock=script.clock)
    assert script.reads == len(standings)
    assert said[0].endswith("raw changes 800,000")  # nothing left in the sink: not named
    assert said[-1] == (
        "catching up at 667 records/s: raw changes 20,000, crm sink events 39,000 left"
    )


def test_a_worker_that_reads_nothing_fails_after_the_stall_limit() -> None:
    standings = [standing(50_000, 0, 0), standing(40_000, 0, 10_000)]
    standings += [standing(40_000, 0, 10_000)] * 10
    script = Script(standings, 30.0)
    with pytest.raises(AccordError, match=r"read nothing in 60s .*raw changes 40,000"):
        follow_backlog(script.standing, lambda _: None, stall_s=60, poll_s=0, clock=script.clock)
    assert script.reads == 5  # it last read at 60 s; 150 s is over 60 s past that


def test_no_backlog_says_nothing_and_returns_at_once() -> None:
    script, said = Script([standing(12, 3, 5)], 1.0), []
    follow_backlog(script.standing, said.append, stall_s=60, poll_s=0, clock=script.clock)
    assert script.reads == 1 and said == []


def test_backlog_rate_counts_reading_not_shrinking() -> None:
    backlog = Backlog(stall_s=60)
    backlog.observe(standing(100_000, 0, 0), now=0.0)
    later = standing(95_000, 8_000, 10_000)  # more left in all, yet 10,000 read
    backlog.observe(later, now=10.0)
    assert backlog.rate(later, now=10.0) == 1_000
    assert not backlog.stalled(now=70.0)
    assert backlog.stalled(now=70.5)
