"""Scoring a review hold again against its candidate's current profile
(`streams.corroborate.rescore`): pure, no Redis."""

from __future__ import annotations

import json

import pytest

from streams.corroborate import rescore
from streams.identity import Hold, HoldReason
from streams.matchpolicy import Decision, MatchPolicy, decide, profile_entry

POLICY = MatchPolicy()
EMAIL = {"email": "digest-of-ada"}


def entry(system: str, first: str = "", last: str = "", phone: str = "") -> str:
    values = {"first_name": first or None, "last_name": last or None, "phone": phone or None}
    return profile_entry(system, values, EMAIL)


def held(row_entry: str | None, reason: HoldReason = HoldReason.REVIEW, **extra: object) -> Hold:
    return Hold(
        "support",
        "u-1",
        reason,
        golden_id="g-1",
        match=("email", "ada@example.com"),
        scores={"total": 0.6, "keys": {"email": "low"}},
        entry=row_entry,
        **extra,  # type: ignore[arg-type]
    )


BILLING_ONLY = [entry("billing", phone="+441632960999")]
WITH_CRM = [*BILLING_ONLY, entry("crm", "Ada", "Lovelace", "+441632960001")]


def test_the_customers_own_sign_up_links_once_her_crm_row_joins_the_candidate() -> None:
    hold = held(entry("support", "ada", "lovelace"))
    before = rescore(POLICY, hold, BILLING_ONLY)
    assert before is not None and decide(POLICY.scoring, before) is Decision.REVIEW
    after = rescore(POLICY, hold, WITH_CRM)
    assert after is not None and decide(POLICY.scoring, after) is Decision.LINK
    assert after.name_similarity == pytest.approx(1.0)
    assert after.total == pytest.approx(1.1)


def test_a_stranger_stays_in_the_band_whatever_joins_the_candidate() -> None:
    hold = held(entry("support", "Mallory", "Jones", "+441632960777"))
    result = rescore(POLICY, hold, WITH_CRM)
    assert result is not None and decide(POLICY.scoring, result) is Decision.REVIEW
    assert result.total == pytest.approx(0.6)


def test_the_same_phone_corroborates_as_the_first_scoring_would() -> None:
    hold = held(entry("support", phone="+441632960001"))
    result = rescore(POLICY, hold, WITH_CRM)
    assert result is not None and result.phone_equal
    assert decide(POLICY.scoring, result) is Decision.LINK


def test_a_hold_that_cannot_be_scored_again_is_left_to_review() -> None:
    assert rescore(POLICY, held(None), WITH_CRM) is None  # made before holds kept entries
    assert rescore(POLICY, held("not json"), WITH_CRM) is None
    capped = held(entry("support", "Ada", "Lovelace"), HoldReason.MAX_ROWS)
    assert rescore(POLICY, capped, WITH_CRM) is None  # a full record: room, not evidence
    role = Hold("support", "u-2", HoldReason.ROLE_ADDRESS, match=("email", "info@x.example"))
    assert rescore(POLICY, role, WITH_CRM) is None


def test_the_entry_survives_the_held_hash_round_trip() -> None:
    text = entry("support", "Ada", "Lovelace")
    stored = json.dumps({"reason": "review", "golden_id": "g-1", "entry": text})
    assert Hold.parse("support:u-1", stored).entry == text
