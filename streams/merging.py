"""`accord merge SURVIVOR LOSER`: two golden records found to be one customer become one.

The merge happens in three steps, each safe to repeat, so a command cut short is finished
by running it again:

1. Identity (`IdentityResolver.merge`, one Redis script): every row of the loser, its
   xref, link, match profile and match keys, moves to the survivor, review holds waiting
   on the loser wait on the survivor, and `merged:{loser}` points at the survivor. From
   then on ingest resolves those rows, and any match key still naming the loser, to the
   survivor; an applier that links a row to the loser links it to the survivor.
2. The hand-over, through the changes topic: a control change keyed by the loser
   (`Change.merge_into`). The merge agent that owns the loser's partition sends the
   loser's whole state to the survivor's key (`Change.absorb`), then retires the loser
   into a tombstone (`streams.merge.retire`: inactive, no rows, `merged_into` set, which
   consumers of `accord.golden` follow). The agent that owns the survivor takes the rows
   in (`streams.merge.absorb`), recomputes every field by the rules from all rows and
   plans every target as after any change. Changes already resolved to the loser before
   step 1 reach its tombstone later: the agent forwards them to the survivor. The two
   records may live on different partitions; nothing crosses them but the changes topic.
3. The audit trail: a `merge` record on the review topic (keyed `merge:{loser}`) with who
   asked (the OS user, and the Kafka principal when the cluster authenticates clients),
   when, and the rows moved (a run that finishes an earlier one keeps that record).

Before anything moves, both records are read from the table's changelog: one the worker
has not merged yet, one merged already, or an inactive one is refused (`_check_states`).

A target that holds a row for each of the two records keeps both linked: each gets the
survivor's values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from streams.errors import AccordError
from streams.identity import IdentityResolver, MergeRefused, MergeResult
from streams.merge import GoldenState
from streams.model import CONTROL_SYSTEM, Change, Op
from streams.review import RECORD_FORMAT, now_ms, operator

__all__ = ["MERGE", "MergeOutcome", "Merger", "merge_change", "merge_record", "merger_of"]

MERGE = "merge"  # the review topic record kind (readers of holds and decisions skip it)


@dataclass(frozen=True)
class MergeOutcome:
    survivor: str
    loser: str
    rows: int  # rows the survivor links now
    moved: list[str]  # the loser's rows, now the survivor's ("system:key")
    by: str
    at_ms: int
    already: bool  # identity had made this merge before: the hand-over was sent again

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_change(survivor: str, loser: str, at_us: int) -> Change:
    """The control change that hands the loser over (keyed by the loser)."""
    return Change(
        change_id=f"merge:{loser}:{survivor}",
        system=CONTROL_SYSTEM,
        source_key=loser,
        op=Op.UPSERT,
        source_ts=at_us,
        position="merge",
        golden_id=loser,
        merge_into=survivor,
    )


def merge_record(result: MergeResult, by: str, at_ms: int) -> bytes:
    """The review topic's record of a merge (key `merge:{loser}`)."""
    return json.dumps(
        {
            "format": RECORD_FORMAT,
            "kind": MERGE,
            "survivor": result.survivor,
            "loser": result.loser,
            "moved": result.moved,
            "rows": result.rows,
            "by": by,
            "at_ms": at_ms,
        },
        separators=(",", ":"),
    ).encode()


class Merger:
    """Carries out `accord merge` (see the module docstring). `encode_change` makes a
    `CustomerChange` record's bytes; `producer` writes the changes and review topics,
    partitioned as ingest partitions."""

    def __init__(
        self,
        identity: IdentityResolver,
        changes_topic: str,
        review_topic: str,
        encode_change: Callable[[dict[str, Any]], bytes],
        producer: Any,
        principal: str | None = None,
        read_state: Callable[[str], GoldenState | None] | None = None,
    ) -> None:
        self.read_state = read_state
        self.identity = identity
        self.changes_topic = changes_topic
        self.review_topic = review_topic
        self.encode_change = encode_change
        self.producer = producer
        self.principal = principal

    def merge(self, survivor: str, loser: str) -> MergeOutcome:
        """Merge `loser` into `survivor`. Raises `MergeRefused` with the reason, or
        `AccordError` when the broker did not take the hand-over (run it again)."""
        self._check_states(survivor, loser)
        result = self.identity.merge(survivor, loser)
        at_ms = now_ms()
        by = operator(self.principal)
        change = merge_change(survivor, loser, at_ms * 1000)
        self._send(self.changes_topic, loser.encode(), self.encode_change(change.to_record()))
        if not result.already:  # a run finishing an earlier one keeps that one's record
            self._send(
                self.review_topic, f"{MERGE}:{loser}".encode(), merge_record(result, by, at_ms)
            )
        return MergeOutcome(survivor, loser, result.rows, result.moved, by, at_ms, result.already)

    def _check_states(self, survivor: str, loser: str) -> None:
        """Refuse a merge the worker could not make sensibly, before anything moves: a
        record the table does not hold yet, or an inactive one (a linked row was
        deleted): every row counts in `active`, so an inactive loser would deactivate
        the survivor, and under `delete_policy: propagate` delete it everywhere. A loser
        already retired into this survivor passes: the run finishes an earlier one."""
        if self.read_state is None:
            return
        states = {golden_id: self.read_state(golden_id) for golden_id in (survivor, loser)}
        retired = states[loser]
        if retired is not None and retired.merged_into == survivor:
            return
        for golden_id, state in states.items():
            if state is None:
                raise MergeRefused(
                    survivor, loser, f"the worker has not merged any change of {golden_id} yet"
                )
            if state.merged_into is not None:
                raise MergeRefused(
                    survivor, loser, f"{golden_id} was merged into {state.merged_into} already"
                )
            if not state.active:
                raise MergeRefused(
                    survivor,
                    loser,
                    f"{golden_id} is inactive (a linked row was deleted): merged, it would "
                    f"deactivate {survivor}",
                )

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        self.producer.produce(topic, key=key, value=value, on_delivery=delivered)
        left = self.producer.flush(30)
        if left or failures:
            raise AccordError(
                f"{topic} did not take the merge ({failures[0] if failures else 'timed out'}); "
                "identity has moved the rows already: run the same command again to finish"
            )


def merger_of(settings: Any) -> Merger:
    """The merger of an app, from its settings (glue for `accord merge`)."""
    from confluent_kafka import Producer

    from streams.app import redis_client
    from streams.explain import read_state
    from streams.faust_codec import canonical_codec
    from streams.registry import registry_client
    from streams.rules import load_rules
    from streams.topology import changelog_topic

    topics, security = settings.topics, settings.kafka_security
    rules = load_rules(settings.worker.rules_file)
    identity = IdentityResolver(
        redis_client(settings),
        settings.worker.redis_prefix,
        rules.match,
        rules.identity,
        guarded=True,
        key_secret=settings.match_key_secret(),
    )
    codec = canonical_codec(
        settings, registry_client(settings), "dev.accord.CustomerChange", topics.changes
    )
    producer = Producer(
        settings.kafka_config({"enable.idempotence": True, "partitioner": "murmur2_random"})
    )
    return Merger(
        identity,
        topics.changes,
        topics.review,
        codec.dumps,
        producer,
        principal=security.sasl_username if security.uses_sasl else None,
        read_state=lambda golden_id: read_state(
            settings.kafka_config(), changelog_topic(settings), golden_id
        ),
    )
