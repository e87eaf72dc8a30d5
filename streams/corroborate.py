"""Review holds scored again when their candidate changes: corroboration that arrives
after the row.

Identity holds a new row for review when its best candidate scores inside the review
band (`streams.identity`). What the candidate record knows when the row arrives depends
on which of its rows came first: a support sign-up whose only candidate so far is a
billing account (no person's name there) is held, while the same sign-up arriving after
the customer's CRM row (a similar name) links. The match would then depend on the order
the connectors happened to deliver in. So a review hold is scored again whenever its
candidate's match profile changes (a row linked to it, or a linked row's name or phone
changed) or the held row itself changes; when the score reaches `auto_link` the row is
accepted as an operator's `accord review accept` would (`Reviewer.accept_corroborated`:
the same script, row-cap check and replay of the kept change), recorded as decided by
`CORROBORATED_BY`. A score still in the band leaves the hold as it is; nothing here ever
holds or unlinks a row.

How the work is found (keys under the identity prefix, written by the resolve script):
`held-for:{golden_id}` lists the rows held for review with that record as candidate,
and `rescore` the golden ids whose holds want scoring again. The index may name rows no
longer held (decided, released, or held again for another candidate): they are dropped
when met. `sweep` indexes every review hold again, for holds made before the index
existed or put back by `streams.relink` after Redis lost its keys; the worker runs it at
start and every `sweep_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from prometheus_client import Counter

from streams.dedupe import RedisUnavailable, redis_errors
from streams.identity import Hold, HoldReason
from streams.matchpolicy import Decision, MatchPolicy, MatchSide, Score, decide, score
from streams.review import DecisionOutcome, Reviewer, read_held

__all__ = [
    "CORROBORATED",
    "CORROBORATED_BY",
    "HoldRescorer",
    "rescore",
]

log = logging.getLogger(__name__)

CORROBORATED_BY = "accord (corroborated by the candidate's rows)"
HELD_FOR = "held-for:"
RESCORE = "rescore"

CORROBORATED = Counter(
    "accord_identity_corroborated_total",
    "Review holds linked because their candidate record later corroborated them",
    ["system"],
)


def rescore(policy: MatchPolicy, hold: Hold, profile: Iterable[str | bytes]) -> Score | None:
    """A review hold's score against its candidate's current match profile (the
    profile hash's values); None when the hold cannot be scored again: another reason,
    no candidate, or no profile entry of the row (a hold made before holds kept one).

    The keys it matched on are those the hold was scored with: the row's values have
    not moved to another record, and a key it did not match then is not indexed to
    this candidate by this row."""
    if hold.reason is not HoldReason.REVIEW or not hold.golden_id or not hold.entry:
        return None
    side = MatchSide.parse(hold.entry)
    if side is None:
        return None
    matched = list((hold.scores or {}).get("keys") or {})
    if not matched and hold.match:
        matched = [hold.match[0]]
    entries = [entry for entry in (MatchSide.parse(text) for text in profile) if entry]
    return score(policy, side, matched, entries)


class HoldRescorer:
    """The worker's service that scores review holds again (`run(stop)`, a thread).

    `reviewer` makes the `Reviewer` that carries out an accept (built on first need: it
    opens a producer and reads the registry)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        policy: MatchPolicy,
        reviewer: Callable[[], Reviewer],
        interval_s: float = 1.0,
        sweep_s: float = 60.0,
        batch: int = 100,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._policy = policy
        self._make_reviewer = reviewer
        self._reviewer: Reviewer | None = None
        self._interval_s = interval_s
        self._sweep_s = sweep_s
        self._batch = batch

    def run(self, stop: threading.Event) -> None:
        next_sweep = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + self._sweep_s
                while self.step() and not stop.is_set():
                    pass
            except RedisUnavailable as exc:
                log.warning("corroboration: %s; trying again", exc)
            stop.wait(self._interval_s)

    def close(self) -> None:
        if self._reviewer is not None:
            self._reviewer.producer.flush(10)

    def sweep(self) -> int:
        """Index every review hold under its candidate and ask for its scoring; the
        number of holds indexed."""
        pipe = self._client.pipeline(transaction=False)
        indexed = 0
        for link, text in read_held(self._client, self._prefix):
            try:
                hold = Hold.parse(link, text)
            except (ValueError, KeyError, TypeError):
                continue
            if hold.reason is HoldReason.REVIEW and hold.golden_id:
                pipe.sadd(f"{self._prefix}{HELD_FOR}{hold.golden_id}", link)
                pipe.sadd(f"{self._prefix}{RESCORE}", hold.golden_id)
                indexed += 1
        with redis_errors("indexing review holds"):
            pipe.execute()
        return indexed

    def step(self) -> list[DecisionOutcome]:
        """Score the holds of up to `batch` candidates that changed; accept those that
        now reach `auto_link`. What it decided (empty: nothing was waiting)."""
        with redis_errors("reading the candidates to score again"):
            popped = self._client.spop(f"{self._prefix}{RESCORE}", self._batch) or []
        golden_ids = [_text(gid) for gid in popped]
        ready: dict[str, str] = {}
        scored: dict[str, Score] = {}
        for golden_id in golden_ids:
            for link, result in self._linkable(golden_id):
                ready[link] = golden_id
                scored[link] = result
        if not ready:
            return []
        decided, later = self._reviewer_of().accept_corroborated(ready, CORROBORATED_BY)
        for outcome in decided:
            CORROBORATED.labels(outcome.link.split(":", 1)[0]).inc()
            log.info(
                "identity: %s linked to golden record %s: its candidate now corroborates "
                "it (scored %.3f)",
                outcome.link,
                outcome.golden_id,
                scored[outcome.link].total,
            )
        if later:
            with redis_errors("asking for scoring again"):
                self._client.sadd(f"{self._prefix}{RESCORE}", *{ready[link] for link in later})
        return decided

    def _linkable(self, golden_id: str) -> list[tuple[str, Score]]:
        """The rows held for `golden_id` that now score a link; stale index entries
        dropped."""
        index = f"{self._prefix}{HELD_FOR}{golden_id}"
        with redis_errors(f"reading the holds on {golden_id}"):
            links = sorted(_text(link) for link in self._client.smembers(index))
            if not links:
                return []
            texts = self._client.hmget(f"{self._prefix}held", links)
            profile = self._client.hvals(f"{self._prefix}profile:{golden_id}")
        stale: list[str] = []
        linkable: list[tuple[str, Score]] = []
        for link, text in zip(links, texts, strict=True):
            hold = _parsed(link, text)
            if hold is None or hold.reason is not HoldReason.REVIEW or hold.golden_id != golden_id:
                stale.append(link)
                continue
            result = rescore(self._policy, hold, profile)
            if result is not None and decide(self._policy.scoring, result) is Decision.LINK:
                linkable.append((link, result))
        if stale:
            with redis_errors(f"dropping stale holds on {golden_id}"):
                self._client.srem(index, *stale)
        return linkable

    def _reviewer_of(self) -> Reviewer:
        if self._reviewer is None:
            self._reviewer = self._make_reviewer()
        return self._reviewer


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parsed(link: str, text: bytes | str | None) -> Hold | None:
    if text is None:
        return None
    try:
        return Hold.parse(link, _text(text))
    except (ValueError, KeyError, TypeError):
        return None
