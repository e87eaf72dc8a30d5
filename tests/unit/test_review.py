"""The review queue's pure parts: record formats, which record a row ends on, the target
of a decision, how holds are described and summed up for the status page."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from streams.identity import Hold, HoldReason, golden_id_for
from streams.model import Change, Op
from streams.review import (
    Decision,
    NotHeld,
    Origin,
    ReviewRecord,
    ReviewRefused,
    change_from_json,
    change_to_json,
    decide_target,
    decision_record,
    describe_hold_fields,
    hold_fields,
    hold_record,
    latest_records,
    operator,
    parse_record,
    review_summary,
)
from streams.web_auth import strip_values

CHANGE = Change(
    change_id="support/0/42",
    system="support",
    source_key="u-7",
    op=Op.UPSERT,
    source_ts=1_700_000_000_123_456,
    position="lsn:00000000000000001234",
    values={
        "email": "info@acme.example",
        "credit_limit": Decimal("1.50"),
        "marketing_opt_in": False,
        "phone": None,
    },
    snapshot=False,
    golden_id=None,
    captured_at_ms=1_700_000_001_000,
    clamped_from=1_800_000_000_000_000,  # a commit time from the future, clamped at ingest
)
CAPPED = {
    "reason": "max_rows_per_record",
    "golden_id": "g-1",
    "rows": 3,
    "cap": 3,
    "match": ["email", "ada@example.com"],
    "since_ms": 1_000,
    "last_seen_ms": 2_000,
    "updates": 2,
}
ROLE = {"reason": "role_address", "match": ["email", "info@acme.example"], "since_ms": 5_000}
REVIEW_BAND = {
    "reason": "review",
    "golden_id": "g-2",
    "scores": {"email": 1.0, "name": 0.41, "total": 0.62},
    "since_ms": 3_000,
}


def test_a_change_survives_json_with_its_decimals_booleans_and_nulls() -> None:
    back = change_from_json(json.loads(json.dumps(change_to_json(CHANGE))))
    assert back == CHANGE
    assert back.values["credit_limit"] == Decimal("1.50")
    assert str(back.values["credit_limit"]) == "1.50"  # not 1.5: the value as captured
    assert back.values["phone"] is None and "company" not in back.values


def test_a_hold_record_keeps_the_hold_the_change_and_where_it_came_from() -> None:
    value = hold_record("support:u-7", REVIEW_BAND, CHANGE, Origin("raw.support", 0, 42), 9_000)
    record = parse_record(b"support:u-7", value)
    assert record == ReviewRecord(
        "support:u-7", "hold", REVIEW_BAND, CHANGE, Origin("raw.support", 0, 42), 9_000
    )


def test_a_decision_record_says_who_decided_what_and_keeps_the_change() -> None:
    held = ReviewRecord("support:u-7", "hold", ROLE, CHANGE, Origin("raw.support", 0, 42), 1)
    value = decision_record(held, Decision.ACCEPT, "g-9", "alice", 7_000, replayed=True)
    record = parse_record("support:u-7", value)
    assert record is not None
    assert (record.kind, record.decision, record.golden_id, record.by, record.at_ms) == (
        "decision",
        Decision.ACCEPT,
        "g-9",
        "alice",
        7_000,
    )
    assert record.replayed and record.change == CHANGE and record.hold == ROLE


def test_a_tombstone_is_no_record_and_another_format_is_refused() -> None:
    assert parse_record(b"support:u-7", None) is None
    with pytest.raises(ValueError, match="unknown format"):
        parse_record(b"support:u-7", b'{"format": 2, "kind": "hold"}')
    with pytest.raises(ValueError, match="unknown kind"):
        parse_record(b"support:u-7", b'{"format": 1, "kind": "other"}')


def test_each_row_ends_on_its_latest_record_and_a_tombstone_forgets_it() -> None:
    hold = hold_record("support:a", ROLE, CHANGE, None, 1)
    later = hold_record("support:a", CAPPED, CHANGE, None, 2)
    held = ReviewRecord("support:b", "hold", ROLE)
    decided = decision_record(held, Decision.REJECT, "g-b", "bob", 3, replayed=False)
    latest = latest_records(
        [
            (b"support:a", hold),
            (b"support:b", hold_record("support:b", ROLE, CHANGE, None, 1)),
            (b"support:c", hold),
            (b"support:a", later),
            (b"support:b", decided),
            (b"support:c", None),  # its delete released it
            (b"support:d", b"not json"),  # skipped
            (None, hold),
        ]
    )
    assert set(latest) == {"support:a", "support:b"}
    assert latest["support:a"].hold == CAPPED
    assert latest["support:b"].decision is Decision.REJECT


def test_hold_fields_are_the_json_the_resolve_script_stores() -> None:
    hold = Hold.parse("billing:W-1", json.dumps(CAPPED))
    fields = hold_fields(hold)
    assert fields == CAPPED
    assert Hold.parse("billing:W-1", json.dumps(fields)) == hold
    role = hold_fields(Hold.parse("support:u", json.dumps(ROLE)))
    assert "golden_id" not in role and role["reason"] == HoldReason.ROLE_ADDRESS.value


def test_accept_links_to_the_candidate_or_to_the_golden_given() -> None:
    assert decide_target("billing:W-1", Decision.ACCEPT, CAPPED, None) == "g-1"
    assert decide_target("billing:W-1", Decision.ACCEPT, CAPPED, None, golden="g-5") == "g-5"
    assert decide_target("support:u", Decision.ACCEPT, REVIEW_BAND, None) == "g-2"
    assert decide_target("support:u", Decision.ACCEPT, ROLE, None, golden="g-5") == "g-5"


def test_accepting_a_role_address_hold_needs_a_golden_id() -> None:
    with pytest.raises(ReviewRefused, match="no candidate record: pass --golden") as refused:
        decide_target("support:u", Decision.ACCEPT, ROLE, None)
    assert refused.value.decision is Decision.ACCEPT and refused.value.link == "support:u"


def test_reject_gives_the_row_its_own_derived_golden_id() -> None:
    assert decide_target("support:u-7", Decision.REJECT, CAPPED, None) == golden_id_for(
        "support", "u-7"
    )
    with pytest.raises(ReviewRefused, match="--golden is for accept"):
        decide_target("support:u-7", Decision.REJECT, CAPPED, None, golden="g-1")


def test_a_row_linked_elsewhere_or_neither_held_nor_linked_is_refused() -> None:
    with pytest.raises(ReviewRefused, match="linked to g-other"):
        decide_target("billing:W-1", Decision.ACCEPT, None, "g-other", golden="g-1")
    with pytest.raises(NotHeld):
        decide_target("billing:W-1", Decision.ACCEPT, None, None)
    with pytest.raises(NotHeld):
        decide_target("billing:W-1", Decision.REJECT, None, None)
    # Linked to the decision's own target: a run cut short after the script, finished now.
    own = golden_id_for("billing", "W-1")
    assert decide_target("billing:W-1", Decision.REJECT, CAPPED, own) == own


def test_holds_are_described_by_their_reason_and_scores_without_the_address() -> None:
    role = describe_hold_fields("support:u", ROLE)
    assert "role address info@" in role and "acme" not in role
    capped = describe_hold_fields("billing:W-1", CAPPED)
    assert "already links 3 rows" in capped and "ada@" not in capped
    band = describe_hold_fields("support:u", REVIEW_BAND)  # a reason `Hold` may not know
    assert "scores: email 1.00, name 0.41, total 0.62" in band


def test_the_summary_counts_per_reason_and_ages_the_oldest_hold() -> None:
    entries = [
        ("support:a", json.dumps(ROLE)),
        ("billing:W-1", json.dumps(CAPPED)),
        ("support:b", json.dumps(REVIEW_BAND)),
        ("support:c", json.dumps({**ROLE, "since_ms": 8_000})),
    ]
    summary = review_summary(entries, {"accept": 4}, now_ms=11_000, listed=3)
    assert summary["held"] == 4
    assert summary["by_reason"] == {"max_rows_per_record": 1, "review": 1, "role_address": 2}
    assert summary["oldest_age_s"] == 10.0  # the capped hold, since 1 000 ms
    assert summary["decisions"] == {"accept": 4, "reject": 0}
    assert [hold["row"] for hold in summary["holds"]] == ["billing:W-1", "support:b", "support:a"]
    assert summary["holds"][1]["scores"] == REVIEW_BAND["scores"]
    empty = review_summary([], {}, now_ms=11_000)
    assert (empty["held"], empty["oldest_age_s"], empty["holds"]) == (0, None, [])


def test_without_the_token_the_review_panel_keeps_counts_but_no_rows() -> None:
    summary = review_summary([("support:a", json.dumps(CAPPED))], {}, now_ms=5_000)
    shown = strip_values({"review": summary, "drift": None, "snapshot": None})
    assert shown["review"]["held"] == 1
    assert shown["review"]["by_reason"] == {"max_rows_per_record": 1}
    assert "holds" not in shown["review"]
    assert "g-1" not in json.dumps(shown) and "support:a" not in json.dumps(shown)


def test_the_operator_is_the_os_user_and_the_kafka_principal_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "alice")
    assert operator() == "alice"
    assert operator("accord-ops") == "alice (Kafka principal User:accord-ops)"


class _Message:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def topic(self) -> str:
        return "support.public.users"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def test_ingest_keeps_each_held_change_and_ends_a_released_hold_on_the_review_topic() -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from streams.identity import BatchResolution, Resolution
    from streams.ingest import IngestPipeline
    from streams.mapping import Mapped

    held = Hold.parse("support:u-7", json.dumps(ROLE))
    deleted = replace(CHANGE, change_id="support/0/43", source_key="u-8", op=Op.DELETE)
    linked = replace(CHANGE, change_id="support/0/44", source_key="u-9")
    changes = {1: CHANGE, 2: deleted, 3: linked}
    results = [Resolution(hold=held), Resolution(released=True), Resolution(golden_id="g-9")]
    pipeline = IngestPipeline(
        SimpleNamespace(prefetch=lambda _m: None, decode=lambda m: m),  # type: ignore[arg-type]
        SimpleNamespace(map=lambda m: Mapped(changes[m.offset()])),  # type: ignore[arg-type]
        SimpleNamespace(duplicates=lambda pairs: [False] * len(pairs)),  # type: ignore[arg-type]
        SimpleNamespace(resolve_batch=lambda _c: BatchResolution(results, 1)),  # type: ignore[arg-type]
    )
    batch = pipeline.process([_Message(1), _Message(2), _Message(3)])

    assert [change.source_key for change in batch.changes] == ["u-9"]
    assert (batch.held, batch.released) == (1, 1)
    [(link, value, message), (released, tombstone, _)] = batch.reviews
    record = parse_record(link, value)
    assert record is not None and message.offset() == 1
    assert (record.link, record.kind, record.hold, record.change) == (
        "support:u-7",
        "hold",
        ROLE | {"last_seen_ms": 0, "updates": 0},  # as `Hold` has it: every field it keeps
        CHANGE,
    )
    assert record.origin == Origin("support.public.users", 0, 1)
    assert (released, tombstone) == ("support:u-8", None)
