"""The pure parts of identity resolution: golden ids, match rules and candidates."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal

import pytest

from streams.errors import ConfigError
from streams.identity import (
    MatchRule,
    golden_id_for,
    match_candidates,
    match_text,
    parse_link,
    rebuild_candidates,
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
