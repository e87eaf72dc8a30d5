"""`explain`: each field's winner, the values that lost and why, and its history."""

from __future__ import annotations

from streams.explain import explain
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
