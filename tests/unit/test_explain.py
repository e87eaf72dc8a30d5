"""`explain`: each field's winner, the values that lost and why, and its history."""

from __future__ import annotations

from streams.explain import describe_hold, explain, held_for
from streams.identity import Hold, HoldReason
from streams.merge import fold
from streams.rules import default_rules
from tests.unit.test_merge import change

RULES = default_rules()


def _fields(state, audit=()):  # type: ignore[no-untyped-def]
    return {f.name: f for f in explain(state, RULES, list(audit)).fields}


def test_names_the_winner_the_rule_and_why_each_other_value_lost() -> None:
    state = fold(
        "g-1",
        [
            change("crm", key="7", ts=100, first_name="Ada", email="ada@crm.example"),
            change("support", key="u-1", ts=300, first_name="ada", email="ada@support.example"),
            change("billing", key="AC-1", ts=200, email="ada@billing.example", company="Ada Ltd"),
        ],
        RULES,
    )
    fields = _fields(state)

    email = fields["email"]
    assert (email.value, email.system, email.key, email.rule) == (
        "ada@support.example",
        "support",
        "u-1",
        "lww",
    )
    assert {(loser.system, loser.value, loser.why) for loser in email.losers} == {
        ("crm", "ada@crm.example", "older"),
        ("billing", "ada@billing.example", "older"),
    }

    first = fields["first_name"]
    assert (first.value, first.system, first.rule) == ("Ada", "crm", "priority")
    assert [(loser.system, loser.why) for loser in first.losers] == [
        ("support", "crm ranks above support")
    ]
    assert fields["company"].system == "billing" and fields["company"].losers == ()
    assert fields["phone"].system is None and fields["phone"].value is None


def test_an_lww_tie_is_explained_as_a_lost_tie() -> None:
    state = fold(
        "g-1",
        [
            change("crm", key="7", ts=500, email="a@crm.example"),
            change("support", key="u-1", ts=500, email="a@support.example"),
        ],
        RULES,
    )
    [loser] = _fields(state)["email"].losers
    assert loser.system == "support" and loser.why.startswith("same time")


def test_history_is_the_field_s_audit_entries_in_version_order() -> None:
    state = fold("g-1", [change("crm", ts=1, email="b@x.io")], RULES)
    audit = [
        {"field": "email", "golden_version": 2, "before": "a@x.io", "after": "b@x.io"},
        {"field": "phone", "golden_version": 1, "before": None, "after": "+44"},
        {"field": "email", "golden_version": 1, "before": None, "after": "a@x.io"},
    ]
    history = _fields(state, audit)["email"].history
    assert [entry["golden_version"] for entry in history] == [1, 2]


def test_as_dict_is_json_ready() -> None:
    state = fold("g-1", [change("crm", key="7", ts=1_000_000, email="c@x.io")], RULES)
    record = explain(state, RULES, []).as_dict()
    email = next(f for f in record["fields"] if f["name"] == "email")
    assert email["source_time"] == "1970-01-01T00:00:01+00:00"
    assert record["links"] == ["crm:7"]


CAPPED = Hold(
    "support", "u-9", HoldReason.MAX_ROWS, "g-1", 20, 20, ("email", "c@x.io"), 1_000, 2_000, 2
)
ROLE = Hold("crm", "8", HoldReason.ROLE_ADDRESS, match=("email", "Info@Acme.example"))


def test_held_for_picks_the_holds_of_a_record_or_an_address() -> None:
    holds = [CAPPED, ROLE]
    assert held_for(holds, golden_id="g-1") == (CAPPED,)
    assert held_for(holds, golden_id="g-2") == ()
    assert held_for(holds, address=" info@acme.EXAMPLE ") == (ROLE,)
    assert held_for(holds, golden_id="g-1", address="info@acme.example") == (CAPPED, ROLE)
    assert held_for(holds) == ()


def test_an_explanation_lists_the_rows_held_back_from_its_record() -> None:
    state = fold("g-1", [change("crm", key="7", ts=1_000_000, email="c@x.io")], RULES)
    record = explain(state, RULES, [], held_for([CAPPED, ROLE], golden_id="g-1")).as_dict()
    [held] = record["held"]
    assert held["row"] == "support:u-9"
    assert held["reason"] == "max_rows_per_record"
    assert (held["golden_id"], held["rows"], held["max_rows_per_record"]) == ("g-1", 20, 20)
    assert "already links 20 rows (identity.max_rows_per_record: 20)" in held["why"]
    assert (held["since"], held["last_seen"]) == (
        "1970-01-01T00:00:01+00:00",
        "1970-01-01T00:00:02+00:00",
    )
    assert held["changes_since"] == 2
    assert explain(state, RULES, []).as_dict()["held"] == []


def test_a_held_row_is_described_in_one_line_without_its_address() -> None:
    line = describe_hold(ROLE)
    assert line.startswith("crm:8 is held, not linked: its only match is the role address info@")
    assert "acme" not in line.lower()
    assert line.endswith("none since")
    assert describe_hold(CAPPED).endswith("2 changes since")


def test_a_review_hold_is_explained_with_its_scores() -> None:
    from tests.unit.test_identity import REVIEW_HOLD

    [held] = explain(
        fold("g-1", [change("crm", key="7", ts=1_000_000, email="c@x.io")], RULES),
        RULES,
        [],
        (Hold.parse("support:u-1", REVIEW_HOLD),),
    ).as_dict()["held"]
    assert held["reason"] == "review" and held["golden_id"] == "g-1"
    assert held["scores"]["total"] == 0.6 and held["scores"]["keys"] == {"email": "low"}
    assert held["policy"] == {"auto_link": 1, "review": 0.5, "decision": "review"}
    assert "inside the review band" in held["why"]
