"""The review queue: the rows identity holds (`streams.identity`), kept durably, and the
decisions an operator makes on them (`accord review`).

Where holds are kept, and why a compacted topic. A hold lives in the Redis hash
`<prefix>held`, which the resolve script reads atomically with the xrefs: that stays the
working copy. Its durable copy is the compacted topic `topics.review` (`accord.review`),
keyed by the row (`system:key`), made like the other compacted topics
(`durability.review`). Ingest writes a *hold record* with every change of a held row, in
the same batch as the changes it hands on, before committing its offsets: the record
keeps the hold and the row's latest change (canonical values, commit time, log position,
the raw message's coordinates), which is what an accept or reject feeds into the merge,
since the held change itself went nowhere. A held row's delete writes a tombstone (the
hold ended, nothing to decide); a decision writes a *decision record* (who, when, what).
Compaction keeps the latest record of each row, so the topic holds every open hold and
every decision, at one record a row. Kafka is already where Accord keeps what must
outlive Redis (the golden changelog that `streams.relink` rebuilds xrefs from), with
replication and acknowledgement settings per kind of topic; the worker's RocksDB state
store is per partition of the golden table and keyed by golden id, while a held row has
no golden id, and a CLI could not read it without a running worker.

After Redis lost its keys, `streams.relink` rebuilds the identity keys and then the held
hash from this topic (`restore_holds`): a row whose latest record is a hold and which no
xref links is held again; one decided is not (its xref comes back from its golden
record). Decision counts (`<prefix>review-decisions`) are recounted from it too.

Decisions (`decide_target`, pure; `DECIDE_SCRIPT`, atomic in Redis):
- accept links the row to the hold's candidate (`golden_id`), or to `--golden ID`. A
  role-address hold has no candidate: accept needs `--golden`; to give the row its own
  record, reject it. The script re-checks the row cap of the record it joins: an accept
  that would pass `identity.max_rows_per_record` is refused with the reason.
- reject links the row to its own golden record (`golden_id_for`, the id it would have
  founded had nothing matched): it is not held again for that candidate, since a row
  with an xref is never matched again.
Either way the xref and link are set and the hold removed in one script, the row's kept
change is replayed into `topics.changes` under the chosen golden id (partitioned as
ingest partitions it) so it merges and syncs like any change, and the decision record is
written. The script also checks that the hold is still at the change the record kept
(its `updates` count): while ingest has held a newer change whose record is on its way,
the command waits for it, so the change replayed is the row's latest. A run cut short
after the script (the row linked, no decision record yet) is finished by running the
same command again. Match keys are left as they are: a role
address is never indexed, and a capped record's key already names that record.

Records are JSON (`format` 1), read only by Accord: `hold_record`, `decision_record` and
`parse_record` are their only writers and reader.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

import redis

from streams.dedupe import redis_errors
from streams.errors import AccordError
from streams.identity import Hold, golden_id_for, parse_link
from streams.model import DECIMAL_FIELDS, Change, Op, Value

__all__ = [
    "DECIDE_SCRIPT",
    "DECISIONS_KEY",
    "RECORD_FORMAT",
    "RESTORE_SCRIPT",
    "Decision",
    "DecisionOutcome",
    "HeldRow",
    "NotHeld",
    "Origin",
    "RestoreReport",
    "ReviewRecord",
    "ReviewRefused",
    "Reviewer",
    "change_from_json",
    "change_to_json",
    "decide_target",
    "decision_record",
    "describe_hold_fields",
    "hold_fields",
    "hold_record",
    "latest_records",
    "operator",
    "parse_record",
    "read_decisions",
    "read_held",
    "restore_holds",
    "review_summary",
    "reviewer_of",
]

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
DECISIONS_KEY = "review-decisions"  # under the prefix: decision -> count (hash)
HOLD, DECISION = "hold", "decision"


class Decision(StrEnum):
    ACCEPT = "accept"  # link the row to the hold's candidate (or --golden)
    REJECT = "reject"  # the row founds its own golden record


class NotHeld(AccordError):
    """The row is neither held nor linked: nothing to decide."""

    def __init__(self, link: str) -> None:
        super().__init__(f"{link} is not held (and not linked to any golden record)")
        self.link = link


class ReviewRefused(AccordError):
    """A decision that cannot be carried out; `reason` says why, for the operator."""

    def __init__(self, link: str, decision: Decision, reason: str) -> None:
        super().__init__(f"{decision.value} {link} refused: {reason}")
        self.link = link
        self.decision = decision
        self.reason = reason


@dataclass(frozen=True)
class Origin:
    """Where the held change came from: the raw message's coordinates."""

    topic: str
    partition: int
    offset: int


# ------------------------------------------------------------------- record formats


def change_to_json(change: Change) -> dict[str, Any]:
    """A change as JSON: decimals as text, times as integers (µs / ms)."""
    return {
        "change_id": change.change_id,
        "system": change.system,
        "source_key": change.source_key,
        "op": change.op.value,
        "source_ts": change.source_ts,
        "position": change.position,
        "snapshot": change.snapshot,
        "values": {
            name: str(value) if isinstance(value, Decimal) else value
            for name, value in change.values.items()
        },
        "captured_at_ms": change.captured_at_ms,
        "clamped_from": change.clamped_from,  # a replay keeps the clamp's flag
    }


def change_from_json(data: Mapping[str, Any]) -> Change:
    values: dict[str, Value] = {
        name: Decimal(value) if name in DECIMAL_FIELDS and value is not None else value
        for name, value in data["values"].items()
    }
    return Change(
        change_id=data["change_id"],
        system=data["system"],
        source_key=data["source_key"],
        op=Op(data["op"]),
        source_ts=int(data["source_ts"]),
        position=data["position"],
        values=values,
        snapshot=bool(data.get("snapshot", False)),
        captured_at_ms=int(data.get("captured_at_ms", 0)),
        clamped_from=data.get("clamped_from"),
    )


def hold_fields(hold: Hold) -> dict[str, Any]:
    """A hold as the `held` hash stores it (the resolve script's JSON): every field the
    `Hold` has but its row, whatever the reason, None left out."""
    fields = dataclasses.asdict(hold)
    fields.pop("system")
    fields.pop("key")
    fields["reason"] = str(fields["reason"])
    if fields.get("match") is not None:
        fields["match"] = list(fields["match"])
    return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class ReviewRecord:
    """One record of the review topic: a hold (with the row's latest change) or a decision."""

    link: str
    kind: str  # HOLD or DECISION
    hold: dict[str, Any]
    change: Change | None = None
    origin: Origin | None = None
    at_ms: int = 0
    decision: Decision | None = None
    golden_id: str | None = None  # decisions: the record the row was linked to
    by: str | None = None  # decisions: who decided (`operator`)
    replayed: bool = False  # decisions: the kept change went to the changes topic


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def hold_record(
    link: str, hold: Mapping[str, Any], change: Change, origin: Origin | None, at_ms: int
) -> bytes:
    """The value ingest writes for a change of a held row (key: `link`)."""
    return _encode(
        {
            "format": RECORD_FORMAT,
            "kind": HOLD,
            "row": link,
            "hold": dict(hold),
            "change": change_to_json(change),
            "origin": dataclasses.asdict(origin) if origin else None,
            "at_ms": at_ms,
        }
    )


def decision_record(
    held: ReviewRecord, decision: Decision, golden_id: str, by: str, at_ms: int, replayed: bool
) -> bytes:
    """The value a decision writes (key: the row): the hold it ended, who, when, what."""
    return _encode(
        {
            "format": RECORD_FORMAT,
            "kind": DECISION,
            "row": held.link,
            "decision": decision.value,
            "golden_id": golden_id,
            "by": by,
            "at_ms": at_ms,
            "replayed": replayed,
            "hold": held.hold,
            "change": change_to_json(held.change) if held.change else None,
            "origin": dataclasses.asdict(held.origin) if held.origin else None,
        }
    )


def parse_record(key: bytes | str, value: bytes | None) -> ReviewRecord | None:
    """A review topic record; None for a tombstone. Raises ValueError for a record that is
    not one (another format, or not JSON)."""
    link = key.decode() if isinstance(key, bytes) else key
    if value is None:
        return None
    data = json.loads(value)
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise ValueError(f"review record of {link}: unknown format {data!r:.80}")
    kind = data.get("kind")
    if kind not in (HOLD, DECISION):
        raise ValueError(f"review record of {link}: unknown kind {kind!r}")
    origin = data.get("origin")
    change = data.get("change")
    return ReviewRecord(
        link=link,
        kind=kind,
        hold=dict(data.get("hold") or {}),
        change=change_from_json(change) if change else None,
        origin=Origin(**origin) if origin else None,
        at_ms=int(data.get("at_ms", 0)),
        decision=Decision(data["decision"]) if kind == DECISION else None,
        golden_id=data.get("golden_id"),
        by=data.get("by"),
        replayed=bool(data.get("replayed", False)),
    )


def latest_records(
    records: Iterable[tuple[bytes | None, bytes | None]],
) -> dict[str, ReviewRecord]:
    """The latest record of each row, from review topic records in log order; a
    tombstone forgets its row, a record that does not parse is skipped."""
    latest: dict[str, ReviewRecord] = {}
    for key, value in records:
        if key is None:
            continue
        link = key.decode()
        try:
            record = parse_record(link, value)
        except (ValueError, KeyError, TypeError):
            continue
        if record is None:
            latest.pop(link, None)
        else:
            latest[link] = record
    return latest


# ------------------------------------------------------------------ describing holds


@dataclass(frozen=True)
class HeldRow:
    """A held row as the `held` hash has it, whatever its reason (`fields`: the JSON)."""

    link: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return str(self.fields.get("reason", "?"))

    @property
    def golden_id(self) -> str | None:
        return self.fields.get("golden_id")

    @property
    def since_ms(self) -> int:
        return int(self.fields.get("since_ms") or 0)

    def describe(self) -> str:
        return describe_hold_fields(self.link, self.fields)

    def as_dict(self, now_ms: int) -> dict[str, Any]:
        return {
            "row": self.link,
            "reason": self.reason,
            "why": self.describe(),
            "golden_id": self.golden_id,
            "scores": self.fields.get("scores"),
            "match_field": (self.fields.get("match") or [None])[0],
            "since": _iso(self.since_ms),
            "age_s": round(max(now_ms - self.since_ms, 0) / 1000, 1) if self.since_ms else None,
            "changes_since": int(self.fields.get("updates") or 0),
            "hold": {name: value for name, value in self.fields.items() if name != "entry"},
        }


def describe_hold_fields(link: str, fields: Mapping[str, Any]) -> str:
    """Why a row is held, in words with no personal data: the hold's own description
    where its reason is one `Hold` knows, else its reason and candidate; scores, when
    the hold has them, follow."""
    try:
        text = Hold.parse(link, json.dumps(dict(fields))).describe()
    except (ValueError, KeyError, TypeError):
        candidate = fields.get("golden_id")
        text = f"held for {fields.get('reason', '?')}" + (
            f", best candidate golden record {candidate}" if candidate else ""
        )
    scores = fields.get("scores")
    if isinstance(scores, Mapping) and scores:
        text += "; scores: " + ", ".join(f"{name} {_score(v)}" for name, v in scores.items())
    return text


def _score(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _iso(ms: int) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def review_summary(
    entries: Iterable[tuple[str, str]],
    decisions: Mapping[str, int],
    now_ms: int,
    listed: int = 20,
) -> dict[str, Any]:
    """The status page's Review panel from the `held` hash's `(link, JSON)` entries:
    counts per reason, the oldest hold's age, decisions so far, and the `listed` oldest
    holds (rows and golden ids: values, shown only with the web token)."""
    rows = []
    for link, text in entries:
        try:
            rows.append(HeldRow(link, json.loads(text)))
        except ValueError:
            rows.append(HeldRow(link, {"reason": "unreadable"}))
    by_reason: dict[str, int] = {}
    for row in rows:
        by_reason[row.reason] = by_reason.get(row.reason, 0) + 1
    started = [row.since_ms for row in rows if row.since_ms]
    oldest = min(started) if started else None
    rows.sort(key=lambda row: (row.since_ms or now_ms, row.link))
    return {
        "held": len(rows),
        "by_reason": dict(sorted(by_reason.items())),
        "oldest_age_s": round((now_ms - oldest) / 1000, 1) if oldest else None,
        "decisions": {d.value: int(decisions.get(d.value, 0)) for d in Decision},
        "holds": [row.as_dict(now_ms) for row in rows[:listed]],
    }


# --------------------------------------------------------------------- decision logic


def decide_target(
    link: str,
    decision: Decision,
    hold: Mapping[str, Any] | None,
    linked_to: str | None,
    golden: str | None = None,
) -> str:
    """The golden id a decision links the row to.

    `hold`: the row's hold (from Redis, or its latest hold record when the row is already
    linked by a run cut short); `linked_to`: the row's xref. Raises `NotHeld` when there
    is neither, `ReviewRefused` for an accept with no candidate, a reject with `golden`,
    or a row linked to another record than the decision's.
    """
    system, key = parse_link(link)
    if decision is Decision.ACCEPT:
        target = golden or (hold or {}).get("golden_id")
        if not target:
            if hold is None and linked_to is None:
                raise NotHeld(link)
            raise ReviewRefused(
                link,
                decision,
                f"its hold ({(hold or {}).get('reason', '?')}) has no candidate record: pass "
                "--golden GOLDEN_ID to link it to one, or reject it to give it its own record",
            )
    else:
        if golden:
            raise ReviewRefused(link, decision, "--golden is for accept; a rejected row "
                                "gets its own golden record")  # fmt: skip
        target = golden_id_for(system, key)
    if linked_to is not None and linked_to != target:
        raise ReviewRefused(link, decision, f"it is not held: it is linked to {linked_to}")
    if hold is None and linked_to is None:
        raise NotHeld(link)
    return target


# KEYS: held hash, the row's xref, links of the target record, decision counts, and the
# epoch key (guarded). ARGV: "system:key", target golden id, cap ("" for none), decision,
# "1" if the target record must exist, the hold's `updates` the kept change was recorded
# with ("" for no kept change). Returns JSON [outcome, rows the record links now]:
# "decided", "already" (the row is linked to the target: a run cut short), "linked"
# (to another record: [outcome, that id]), "not_held", "no_record", "full", "moved" (a
# newer change of the row was held than the one kept: its record is on its way).
DECIDE_SCRIPT = """
if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 0 then
  return redis.error_reply('ACCORD_IDENTITY_LOST ' .. KEYS[5] .. ' is missing')
end
local gid = redis.call('GET', KEYS[2])
if gid then
  if gid == ARGV[2] then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return cjson.encode({'already', redis.call('SCARD', KEYS[3])})
  end
  return cjson.encode({'linked', gid})
end
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then
  return cjson.encode({'not_held', 0})
end
if ARGV[6] ~= '' and tonumber(cjson.decode(held)['updates']) ~= tonumber(ARGV[6]) then
  return cjson.encode({'moved', 0})
end
local rows = redis.call('SCARD', KEYS[3])
if ARGV[5] == '1' and rows == 0 then
  return cjson.encode({'no_record', 0})
end
if ARGV[3] ~= '' and rows >= tonumber(ARGV[3]) then
  return cjson.encode({'full', rows})
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
return cjson.encode({'decided', rows + 1})
"""

# KEYS: held hash, the row's xref. ARGV: "system:key", the hold's JSON. A row an xref
# links is not held again.
RESTORE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def operator(principal: str | None = None) -> str:
    """Who decides: the OS user running the command, and the Kafka principal it wrote the
    decision as, when the cluster authenticates clients (SASL)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user} (Kafka principal User:{principal})" if principal else user


def now_ms() -> int:
    return int(time.time() * 1000)


def _decoded(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def read_held(client: redis.Redis, prefix: str) -> list[tuple[str, str]]:
    """Every `(link, JSON)` entry of the `held` hash."""
    with redis_errors("reading the held rows"):
        entries = list(client.hscan_iter(f"{prefix}held", count=1000))
    return sorted((_decoded(k) or "", _decoded(v) or "") for k, v in entries)


def read_decisions(client: redis.Redis, prefix: str) -> dict[str, int]:
    with redis_errors("reading the review decision counts"):
        raw = client.hgetall(f"{prefix}{DECISIONS_KEY}")
    return {_decoded(k) or "": int(v) for k, v in raw.items()}


# ----------------------------------------------------------------------------- the I/O


@dataclass(frozen=True)
class RestoreReport:
    held: int = 0  # rows held again
    decided: int = 0  # rows whose latest record is a decision (not held again)
    skipped: int = 0  # hold records of rows an xref links now

    def describe(self) -> str:
        return (
            f"review queue: {self.held:,} holds restored from the review topic "
            f"({self.decided:,} decided rows, {self.skipped:,} held rows since linked)"
        )


def restore_holds(
    client: redis.Redis, prefix: str, records: Iterable[tuple[bytes | None, bytes | None]]
) -> RestoreReport:
    """Put back the `held` hash from the review topic's records (in log order): a row
    whose latest record is a hold is held again unless an xref links it; decision counts
    missing from Redis are recounted. Idempotent."""
    latest = latest_records(records)
    script = client.register_script(RESTORE_SCRIPT)
    held = skipped = 0
    counted: dict[str, int] = {}
    with redis_errors(f"restoring {len(latest)} review records"):
        for link, record in latest.items():
            if record.kind == DECISION and record.decision is not None:
                counted[record.decision.value] = counted.get(record.decision.value, 0) + 1
                continue
            text = json.dumps(record.hold, ensure_ascii=False, separators=(",", ":"))
            if script(keys=[f"{prefix}held", f"{prefix}xref:{link}"], args=[link, text]):
                held += 1
            else:
                skipped += 1
        for decision, count in counted.items():
            client.hsetnx(f"{prefix}{DECISIONS_KEY}", decision, count)
    return RestoreReport(held, sum(counted.values()), skipped)


@dataclass(frozen=True)
class DecisionOutcome:
    """What a decision did."""

    link: str
    decision: Decision
    golden_id: str
    by: str
    at_ms: int
    rows: int  # rows the golden record links now
    replayed: bool  # the row's kept change went to the changes topic
    already: bool = False  # decided before: nothing done this time

    def as_dict(self) -> dict[str, Any]:
        return {
            "row": self.link,
            "decision": self.decision.value,
            "golden_id": self.golden_id,
            "by": self.by,
            "at": _iso(self.at_ms),
            "rows": self.rows,
            "replayed": self.replayed,
            "already_decided": self.already,
        }


class Reviewer:
    """`accord review`: reads holds (Redis) and review records (the topic), and carries
    out decisions. `encode_change` makes a `CustomerChange` record's bytes; `producer`
    writes the changes and review topics, partitioned as ingest partitions."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        kafka: dict[str, Any],
        review_topic: str,
        changes_topic: str,
        encode_change: Callable[[dict[str, Any]], bytes],
        producer: Any,
        cap: int,
        guarded: bool = True,
        principal: str | None = None,  # the SASL user the producer authenticates as
    ) -> None:
        self.principal = principal
        self.client = client
        self.prefix = prefix
        self.kafka = kafka
        self.review_topic = review_topic
        self.changes_topic = changes_topic
        self.encode_change = encode_change
        self.producer = producer
        self.cap = cap
        self.guarded = guarded
        self._decide = client.register_script(DECIDE_SCRIPT)

    def holds(self) -> list[HeldRow]:
        entries = read_held(self.client, self.prefix)
        return [HeldRow(link, json.loads(text)) for link, text in entries]

    def hold(self, link: str) -> HeldRow | None:
        with redis_errors(f"reading the hold of {link}"):
            text = _decoded(self.client.hget(f"{self.prefix}held", link))
        return HeldRow(link, json.loads(text)) if text else None

    def linked_to(self, link: str) -> str | None:
        with redis_errors(f"looking up {link}"):
            return _decoded(self.client.get(f"{self.prefix}xref:{link}"))

    def record(self, link: str) -> ReviewRecord | None:
        """The row's latest review record (a scan of the topic)."""
        from streams.topics import scan

        key = link.encode()
        found = scan(self.kafka, self.review_topic, lambda m: m.key() == key)
        return latest_records((m.key(), m.value()) for m in found).get(link)

    def decide(
        self,
        link: str,
        decision: Decision,
        golden: str | None = None,
        settle_s: float = 10.0,
    ) -> DecisionOutcome:
        """Carry out a decision on a held row (see the module docstring). Raises
        `NotHeld`, `ReviewRefused`, `IdentityLost` (guarded, Redis lost its keys), or
        `AccordError` when the broker did not take the replay or the record.

        The decision applies to the change it replays: when ingest has held a newer
        change than the kept one and not yet written its record, the script refuses
        ("moved") and the record is read again, for up to `settle_s`."""
        parse_link(link)
        deadline = time.monotonic() + settle_s
        while True:
            outcome = self._attempt(
                link, decision, golden, self.record(link), operator(self.principal)
            )
            if outcome is not None:
                return outcome
            if time.monotonic() > deadline:
                raise ReviewRefused(
                    link,
                    decision,
                    f"its latest held change has not reached {self.review_topic} within "
                    f"{settle_s:.0f} s (is the worker's ingest stuck?); try again",
                )
            time.sleep(0.2)  # ingest's pace: the record follows its batch

    def accept_corroborated(
        self, candidates: Mapping[str, str], by: str
    ) -> tuple[list[DecisionOutcome], list[str]]:
        """Accept held rows for the candidate each now scores a link with (`link ->
        golden id`, `streams.corroborate`), reading the review topic once for all.
        Returns what was decided, and the rows to try again later: those whose latest
        held change is not on the review topic yet. A row decided or refused meanwhile
        (`NotHeld`, `ReviewRefused`: linked elsewhere, its candidate full) is left
        as it is, and logged."""
        from streams.topics import scan

        wanted = {link.encode() for link in candidates}
        found = scan(self.kafka, self.review_topic, lambda m: m.key() in wanted)
        records = latest_records((m.key(), m.value()) for m in found)
        decided: list[DecisionOutcome] = []
        later: list[str] = []
        for link, golden in candidates.items():
            record = records.get(link)
            if record is None or record.kind != HOLD or record.change is None:
                later.append(link)
                continue
            try:
                outcome = self._attempt(link, Decision.ACCEPT, golden, record, by)
            except (NotHeld, ReviewRefused) as exc:
                log.info("review: %s not accepted on corroboration: %s", link, exc)
                continue
            if outcome is None:
                later.append(link)
            else:
                decided.append(outcome)
        return decided, later

    def _attempt(
        self,
        link: str,
        decision: Decision,
        golden: str | None,
        record: ReviewRecord | None,
        by: str,
    ) -> DecisionOutcome | None:
        """One try at `decide`, given the row's latest review record; None when the
        hold moved past the kept change."""
        from streams.identity import EPOCH_KEY, LOST_MARKER, IdentityLost

        current = self.hold(link)
        linked_to = self.linked_to(link)
        if (
            current is None
            and record is not None
            and record.kind == DECISION
            and linked_to is not None
            and linked_to == record.golden_id
        ):
            assert record.decision is not None
            return DecisionOutcome(
                link, record.decision, linked_to, record.by or "?", record.at_ms, 0,
                record.replayed, already=True,
            )  # fmt: skip
        held_record = record if record is not None and record.kind == HOLD else None
        hold = current.fields if current else (held_record.hold if held_record else None)
        if current is None and linked_to is None:
            raise NotHeld(link)
        target = decide_target(link, decision, hold, linked_to, golden)
        accept = decision is Decision.ACCEPT
        keys = [
            f"{self.prefix}held",
            f"{self.prefix}xref:{link}",
            f"{self.prefix}links:{target}",
            f"{self.prefix}{DECISIONS_KEY}",
        ]
        if self.guarded:
            keys.append(f"{self.prefix}{EPOCH_KEY}")
        kept_updates = str(held_record.hold.get("updates", 0)) if held_record else ""
        args = [
            link,
            target,
            str(self.cap) if accept else "",
            decision.value,
            "1" if accept else "0",
            kept_updates,
        ]
        with redis_errors(f"{decision.value} {link}"):
            try:
                reply = self._decide(keys=keys, args=args)
            except redis.ResponseError as exc:
                if str(exc).startswith(LOST_MARKER):
                    raise IdentityLost(f"Redis lost Accord's identity keys: {exc}") from exc
                raise
        outcome, detail = json.loads(_decoded(reply) or "[]")
        if outcome == "moved":
            return None
        if outcome == "not_held":
            raise NotHeld(link)
        if outcome == "linked":
            raise ReviewRefused(link, decision, f"it is not held: it is linked to {detail}")
        if outcome == "no_record":
            raise ReviewRefused(link, decision, f"no golden record {target} links any row")
        if outcome == "full":
            raise ReviewRefused(
                link,
                decision,
                f"golden record {target} already links {detail} rows "
                f"(identity.max_rows_per_record: {self.cap})",
            )
        kept = held_record or ReviewRecord(link, HOLD, dict(hold or {}))
        replayed = False
        if kept.change is not None:
            change = kept.change.with_golden_id(target)
            self._send(self.changes_topic, target.encode(), self.encode_change(change.to_record()))
            replayed = True
        at = now_ms()
        self._send(
            self.review_topic,
            link.encode(),
            decision_record(kept, decision, target, by, at, replayed),
        )
        return DecisionOutcome(link, decision, target, by, at, int(detail), replayed)

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        self.producer.produce(topic, key=key, value=value, on_delivery=delivered)
        left = self.producer.flush(30)
        if left or failures:
            raise AccordError(
                f"{topic} did not take the record ({failures[0] if failures else 'timed out'}); "
                "the row is linked already: run the same command again to finish"
            )


def reviewer_of(settings: Any) -> Reviewer:
    """The reviewer of an app, from its settings (glue for `accord review`)."""
    from confluent_kafka import Producer

    from streams.app import redis_client
    from streams.faust_codec import canonical_codec
    from streams.registry import registry_client
    from streams.rules import load_rules

    topics, security = settings.topics, settings.kafka_security
    codecs: list[Any] = []

    def encode_change(record: dict[str, Any]) -> bytes:
        if not codecs:  # only a decision needs the registry
            codecs.append(
                canonical_codec(
                    settings, registry_client(settings), "dev.accord.CustomerChange", topics.changes
                )
            )
        return codecs[0].dumps(record)

    producer = Producer(
        settings.kafka_config({"enable.idempotence": True, "partitioner": "murmur2_random"})
    )
    return Reviewer(
        redis_client(settings),
        settings.worker.redis_prefix,
        settings.kafka_config(),
        topics.review,
        topics.changes,
        encode_change,
        producer,
        load_rules(settings.worker.rules_file).identity.max_rows_per_record,
        principal=security.sasl_username if security.uses_sasl else None,
    )
