"""Explain a golden record: for each field, its value, where it came from, the rule that
chose it, the values that lost and why, and the field's history.

`explain` is plain: it reads a `GoldenState` (the merge's own state, which keeps every
linked row's last value of every field) and audit entries. `read_state` and
`read_audit` fetch them from Kafka: the golden table's changelog and `accord.audit`.
Both scan their topic, which is fine for thousands of records; a keyed lookup (the
table's own store) is the next step for millions.

A source row identity holds (`streams.identity.Hold`) has no golden record: `held_for`
picks the holds that concern a record or an address, and `hold_as_dict` says why each
row is held, for `accord explain`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streams.identity import Hold, HoldReason
from streams.merge import Cell, GoldenState, Resolved, loads, resolve_field
from streams.model import FIELDS, Value
from streams.rules import FieldRule, Rule, Rules
from streams.topics import scan

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Loser:
    system: str
    key: str
    value: Value
    source_ts: int  # µs since the epoch
    why: str
    clamped_from: int | None = None  # the commit time the source stated, when clamped


@dataclass(frozen=True)
class FieldExplanation:
    name: str
    value: Value
    rule: str
    system: str | None  # None: no linked row has a value for it
    key: str | None
    source_ts: int | None
    losers: tuple[Loser, ...] = ()
    history: tuple[dict[str, Any], ...] = ()  # audit entries, oldest first
    # The commit time the winning row's source stated, when it ran more than
    # `worker.max_clock_skew_s` ahead of its capture time: `source_ts` is the capture time.
    clamped_from: int | None = None


@dataclass(frozen=True)
class Explanation:
    golden_id: str
    version: int
    active: bool
    links: tuple[str, ...]
    fields: tuple[FieldExplanation, ...] = field(default_factory=tuple)
    held: tuple[Hold, ...] = ()  # rows held back from this record, or with its address
    merged_into: str | None = None  # a tombstone of `accord merge`: the record to follow

    def as_dict(self) -> dict[str, Any]:
        return {
            "golden_id": self.golden_id,
            "version": self.version,
            "active": self.active,
            "merged_into": self.merged_into,
            "links": list(self.links),
            "held": [hold_as_dict(hold) for hold in self.held],
            "fields": [
                {
                    "name": f.name,
                    "value": _json(f.value),
                    "rule": f.rule,
                    "system": f.system,
                    "key": f.key,
                    "source_time": _time(f.source_ts),
                    "clamped_from": _time(f.clamped_from),
                    "lost": [
                        {
                            "system": loser.system,
                            "key": loser.key,
                            "value": _json(loser.value),
                            "source_time": _time(loser.source_ts),
                            "clamped_from": _time(loser.clamped_from),
                            "why": loser.why,
                        }
                        for loser in f.losers
                    ],
                    "history": list(f.history),
                }
                for f in self.fields
            ],
        }


def explain(
    state: GoldenState,
    rules: Rules,
    audit: list[dict[str, Any]],
    held: tuple[Hold, ...] = (),
) -> Explanation:
    """Why each field of `state` holds what it holds; `held` rides along as given."""
    contributions = list(state.contributions.values())
    explained = []
    for name in FIELDS:
        spec = rules.fields[name]
        winner = resolve_field(name, contributions, rules)
        losers = []
        for contribution in contributions:
            cell = contribution.cells.get(name)
            if cell is None:
                continue
            if winner and (contribution.system, contribution.key) == (winner.system, winner.key):
                continue
            why = _why_lost(spec, contribution.system, cell, winner)
            losers.append(
                Loser(
                    contribution.system,
                    contribution.key,
                    cell.value,
                    cell.order[0],
                    why,
                    cell.clamped_from or None,
                )
            )
        history = tuple(
            sorted(
                (entry for entry in audit if entry["field"] == name),
                key=lambda entry: entry["golden_version"],
            )
        )
        explained.append(
            FieldExplanation(
                name,
                winner.value if winner else None,
                spec.rule.value,
                winner.system if winner else None,
                winner.key if winner else None,
                winner.source_ts if winner else None,
                tuple(losers),
                history,
                _clamped_from(state, name, winner),
            )
        )
    return Explanation(
        state.golden_id,
        state.version,
        state.active,
        tuple(sorted(state.contributions)),
        tuple(explained),
        held,
        state.merged_into,
    )


def _clamped_from(state: GoldenState, name: str, winner: Resolved | None) -> int | None:
    if winner is None:
        return None
    row = state.contributions.get(f"{winner.system}:{winner.key}")
    cell = row.cells.get(name) if row is not None else None
    return (cell.clamped_from or None) if cell is not None else None


def held_for(
    holds: list[Hold], golden_id: str | None = None, address: str | None = None
) -> tuple[Hold, ...]:
    """The holds that concern a golden record (held back from joining it) or an address
    (the value a held row matched by, compared as emails are: case and blanks ignored)."""
    wanted = address.strip().lower() if address else None
    return tuple(
        hold
        for hold in holds
        if (golden_id is not None and hold.golden_id == golden_id)
        or (wanted is not None and hold.match is not None and hold.match[1].lower() == wanted)
    )


def hold_as_dict(hold: Hold) -> dict[str, Any]:
    """A held row, and why, as `accord explain --json` prints it."""
    return {
        "row": f"{hold.system}:{hold.key}",
        "reason": hold.reason.value,
        "why": hold.describe(),
        "golden_id": hold.golden_id,
        "rows": hold.rows,
        "max_rows_per_record": hold.cap,
        "scores": dict(hold.scores) if hold.scores else None,  # a scored match: why
        "policy": dict(hold.policy) if hold.policy else None,
        "since": _time(hold.since_ms * 1000),
        "last_seen": _time(hold.last_seen_ms * 1000),
        "changes_since": hold.updates,
        "decide": f"accord review show|accept|reject {hold.system}:{hold.key}",
    }


def _scores(hold: Hold) -> dict[str, Any] | None:
    """The match scores a hold carries (a scored match), if any."""
    return dict(hold.scores) if hold.scores else None


def describe_hold(hold: Hold) -> str:
    """One line for a person: which row, why it is held, since when."""
    since = {0: "none", 1: "1 change"}.get(hold.updates, f"{hold.updates} changes")
    scores = _scores(hold) if hold.reason is not HoldReason.REVIEW else None  # describe() has them
    scored = "; scores: " + ", ".join(f"{k} {v}" for k, v in scores.items()) if scores else ""
    return (
        f"{hold.system}:{hold.key} is held, not linked: {hold.describe()}{scored}; "
        f"held since {_time(hold.since_ms * 1000)}, {since} since"
    )


def _why_lost(spec: FieldRule, system: str, cell: Cell, winner: Resolved | None) -> str:
    rule, order, owner = spec.rule, spec.order, spec.owner
    if cell.echo:
        return "Accord's own write, echoed back: it does not compete"
    if cell.value is None:
        return "no value"
    if rule is Rule.OWNER and system != owner:
        return f"only {owner} may set it"
    if rule is Rule.PRIORITY and system not in order:
        return f"{system} is not in the priority list"
    if winner is None:
        return "no winner"
    if rule is Rule.PRIORITY and system != winner.system:
        return f"{winner.system} ranks above {system}"
    if cell.order[0] < winner.source_ts:
        return "older"
    return "same time: lost the tie (source priority, then log position)"


# -------------------------------------------------------------------------- reading


def read_state(kafka: dict[str, Any], changelog: str, golden_id: str) -> GoldenState | None:
    """The merge's latest state of one golden record, from the table's changelog."""
    key = golden_id.encode()
    latest = None
    for message in scan(kafka, changelog, lambda m: m.key() == key):
        latest = message.value()
    return loads(latest) if latest else None


def read_audit(
    kafka: dict[str, Any], topic: str, golden_id: str, decode: Callable[[bytes], dict[str, Any]]
) -> list[dict[str, Any]]:
    key = golden_id.encode()
    return [
        decode(message.value())
        for message in scan(kafka, topic, lambda m: m.key() == key and m.value())
    ]


def _json(value: Value) -> Any:
    return value if value is None or isinstance(value, bool | str) else str(value)


def _time(micros: int | None) -> str | None:
    if micros is None or micros < 0:
        return None
    return (EPOCH + dt.timedelta(microseconds=micros)).isoformat()
