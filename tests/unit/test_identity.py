"""The pure parts of identity resolution: golden ids, match rules and candidates, and
the hold policy (role addresses, the cap on rows per record)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal

import pytest

from streams.errors import ConfigError
from streams.identity import (
    Hold,
    HoldReason,
    IdentityPolicy,
    MatchRule,
    golden_id_for,
    match_candidates,
    match_text,
    parse_link,
    rebuild_candidates,
    role_local_part,
)

RULES = (MatchRule("email"), MatchRule("tax_id", ("billing",)))


def test_golden_ids_are_deterministic_uuid5s() -> None:
    golden = golden_id_for("crm", "42")
    assert golden == golden_id_for("crm", "42")
    assert uuid.UUID(golden).version == 5
    assert len({golden, golden_id_for("billing", "42"), golden_id_for("crm", "43")}) == 3


def test_a_golden_id_is_fixed_forever() -> None:
    """Replays after losing Redis must recreate ids already stored in golden records."""
    assert golden_id_for("crm", "42") == "dab4dc51-f585-5ba5-a004-8a3b2a1371be"


@pytest.mark.parametrize(
    "rule",
    [
        lambda: MatchRule("e_mail"),
        lambda: MatchRule("email", ("erp",)),
        lambda: MatchRule("email", ()),
    ],
)
def test_a_bad_rule_is_a_config_error(rule: Callable[[], MatchRule]) -> None:
    with pytest.raises(ConfigError, match="match rule on"):
        rule()


def test_a_rule_applies_to_its_systems() -> None:
    assert MatchRule("email").applies_to("support")
    assert MatchRule("tax_id", ("billing",)).applies_to("billing")
    assert not MatchRule("tax_id", ("billing",)).applies_to("crm")


def test_candidates_follow_rule_order_and_systems() -> None:
    values = {"tax_id": "DE123", "email": "ada@example.com", "phone": "+4930123"}
    assert match_candidates("billing", values, RULES) == [
        ("email", "ada@example.com"),
        ("tax_id", "DE123"),
    ]
    assert match_candidates("billing", values, tuple(reversed(RULES))) == [
        ("tax_id", "DE123"),
        ("email", "ada@example.com"),
    ]
    assert match_candidates("crm", values, RULES) == [("email", "ada@example.com")]


def test_absent_and_empty_values_are_no_candidates() -> None:
    assert match_candidates("billing", {}, RULES) == []
    assert match_candidates("billing", {"email": None, "tax_id": ""}, RULES) == []


def test_a_field_in_two_rules_is_one_candidate() -> None:
    rules = (MatchRule("email", ("crm",)), MatchRule("email"))
    assert match_candidates("crm", {"email": "a@b.c"}, rules) == [("email", "a@b.c")]


def test_match_text_is_exact() -> None:
    assert match_text("Ada@Example.com") == "Ada@Example.com"  # mapping lower-cases, not us
    assert match_text(Decimal("1.50")) == "1.50"
    assert match_text(True) == "true"
    assert match_text(False) == "false"
    assert match_text(None) is None
    assert match_text("") is None


def test_rebuild_uses_rules_of_any_linked_system() -> None:
    values = {"email": "ada@example.com", "tax_id": "DE123"}
    crm_only = rebuild_candidates([("crm", "1")], values, RULES)
    assert crm_only == [("email", "ada@example.com")]
    with_billing = rebuild_candidates([("crm", "1"), ("billing", "A-1")], values, RULES)
    assert with_billing == [("email", "ada@example.com"), ("tax_id", "DE123")]
    assert rebuild_candidates([], values, RULES) == []


def test_links_parse_back_with_colons_in_keys() -> None:
    assert parse_link("crm:42") == ("crm", "42")
    assert parse_link("support:tenant:7:u-1") == ("support", "tenant:7:u-1")
    with pytest.raises(ValueError, match="system:key"):
        parse_link("crm")


# -- holds: role addresses and the cap ------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "info@acme.example",
        "INFO@Acme.Example",
        "  info@acme.example \n",
        "info+eu@acme.example",
        "Billing+Invoices-2024@acme.example",
        "no-reply@acme.example",
        "noreply@mail.acme.example",
        "hello@x.io",
    ],
)
def test_role_addresses_are_found_whatever_case_blanks_or_tag(address: str) -> None:
    assert IdentityPolicy().is_role_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "ada@acme.example",
        "information@acme.example",  # a mailbox, not the `info` role
        "ada.info@acme.example",
        "ada+info@acme.example",  # the tag is not the mailbox
        "info.desk@acme.example",
        "info",  # no address at all
        "",
    ],
)
def test_personal_addresses_are_no_role_addresses(address: str) -> None:
    assert not IdentityPolicy().is_role_address(address)


def test_role_local_part() -> None:
    assert role_local_part(" Info+EU@x.com ") == "info"
    assert role_local_part("a@b@c.com") == "a@b"  # the domain is after the last @
    assert role_local_part("no address") == ""


def test_the_role_list_is_configurable_and_normalized() -> None:
    policy = IdentityPolicy(role_addresses=frozenset({" Desk@", "INFO"}))
    assert policy.role_addresses == {"desk", "info"}
    assert policy.is_role_address("desk@acme.example")
    assert not policy.is_role_address("billing@acme.example")
    assert not IdentityPolicy(role_addresses=frozenset()).is_role_address("info@x.io")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rows_per_record": 0}, "max_rows_per_record must be at least 1"),
        ({"max_rows_per_record": True}, "max_rows_per_record must be at least 1"),
        ({"max_rows_per_record": "20"}, "max_rows_per_record must be at least 1"),
        ({"role_addresses": frozenset({""})}, "role_addresses"),
        ({"role_addresses": frozenset({"info@acme.example"})}, "role_addresses"),
        ({"role_addresses": frozenset({"info+x"})}, "role_addresses"),
    ],
)
def test_a_bad_policy_is_a_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IdentityPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_default_cap_is_in_the_tens_and_the_list_has_the_usual_roles() -> None:
    policy = IdentityPolicy()
    assert 10 <= policy.max_rows_per_record < 100
    assert {"info", "billing", "support", "noreply", "no-reply", "sales", "admin"} <= (
        policy.role_addresses
    )


def test_the_cap_admits_rows_below_it_only() -> None:
    policy = IdentityPolicy(max_rows_per_record=3)
    assert [policy.admits(rows) for rows in range(5)] == [True, True, True, False, False]


def test_split_keeps_role_addresses_out_of_matching() -> None:
    policy = IdentityPolicy()
    trusted, role = policy.split([("email", "info+x@acme.example"), ("tax_id", "DE123")])
    assert (trusted, role) == ([("tax_id", "DE123")], "info+x@acme.example")
    assert policy.split([("email", "ada@acme.example")]) == ([("email", "ada@acme.example")], "")
    # Only emails are role addresses: a tax id that reads like one is just a value.
    assert policy.split([("tax_id", "info@x")]) == ([("tax_id", "info@x")], "")


def test_a_hold_parses_and_describes_itself_without_personal_data() -> None:
    cap = Hold.parse(
        "support:tenant:7",
        '{"reason":"max_rows_per_record","golden_id":"g-1","rows":20,"cap":20,'
        '"match":["email","ada@acme.example"],"since_ms":1,"last_seen_ms":2,"updates":3}',
    )
    assert (cap.system, cap.key, cap.reason) == ("support", "tenant:7", HoldReason.MAX_ROWS)
    assert (cap.golden_id, cap.rows, cap.cap, cap.updates) == ("g-1", 20, 20, 3)
    assert "g-1" in cap.describe() and "20 rows" in cap.describe()
    assert "ada" not in cap.describe()
    role = Hold.parse(
        "crm:9",
        '{"reason":"role_address","match":["email","info+eu@acme.example"],'
        '"since_ms":1,"last_seen_ms":1,"updates":0}',
    )
    assert role.reason is HoldReason.ROLE_ADDRESS and role.golden_id is None
    assert "info@" in role.describe() and "acme" not in role.describe()


REVIEW_HOLD = (
    '{"reason":"review","golden_id":"g-1","match":["email","ada@acme.example"],'
    '"scores":{"total":0.6,"key":0.6,"name":0,"phone":0,"name_similarity":0.31,'
    '"phone_equal":false,"keys":{"email":"low"}},'
    '"policy":{"auto_link":1,"review":0.5,"decision":"review"},'
    '"since_ms":1,"last_seen_ms":1,"updates":0}'
)


def test_a_review_hold_parses_and_says_its_scores_without_personal_data() -> None:
    hold = Hold.parse("support:u-1", REVIEW_HOLD)
    assert (hold.reason, hold.golden_id) == (HoldReason.REVIEW, "g-1")
    assert hold.scores is not None and hold.scores["total"] == 0.6
    assert hold.policy == {"auto_link": 1, "review": 0.5, "decision": "review"}
    said = hold.describe()
    assert "matched by email golden record g-1, scoring 0.6" in said
    assert "email (low): 0.6" in said and "name similarity 0.31: 0" in said
    assert "review band [0.5, 1)" in said
    assert "ada" not in said and "acme" not in said
    # Holds written before scores existed parse as before.
    old = Hold.parse("crm:1", '{"reason":"role_address","match":["email","info@x.io"]}')
    assert old.scores is None and old.policy is None
