"""Match policy: scoring candidates, deciding link / review / new, and the policy's
section of the survivorship rules (`identity.trust`, `identity.scoring`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.errors import ConfigError
from streams.matchpolicy import (
    DEFAULT_TRUST,
    Decision,
    MatchPolicy,
    MatchScoring,
    MatchSide,
    Score,
    Trust,
    decide,
    name_similarity,
    normalized_name,
    profile_entry,
    score,
)
from streams.rules import load_rules
from tests.unit.test_rules import VALID, _errors, _write

POLICY = MatchPolicy()
EMAIL = {"email": "digest-of-ada"}


def side(system: str, first: str = "", last: str = "", phone: str = "", **keys: str) -> MatchSide:
    values = {"first_name": first or None, "last_name": last or None, "phone": phone or None}
    return MatchSide.of(system, values, keys or EMAIL)


CUSTOMER = [
    side("crm", "Ada", "Lovelace", "+441632960001"),
    side("billing", "Ada", "Lovelace", "+441632960001"),
]


def outcome(row: MatchSide, profile: list[MatchSide], matched: tuple[str, ...] = ("email",)):
    result = score(POLICY, row, matched, profile)
    return decide(POLICY.scoring, result), result


# -- the stranger, and what corroborates a low-trust key ------------------------------------


def test_a_support_email_alone_is_held_for_review_not_linked() -> None:
    stranger = side("support", "Mallory", "Jones", "+441632960999")
    decision, result = outcome(stranger, CUSTOMER)
    assert decision is Decision.REVIEW
    assert result.keys == (("email", Trust.LOW),)
    assert result.name == 0 and result.phone == 0 and not result.phone_equal
    assert result.total == pytest.approx(0.6)
    assert result.as_dict() == {
        "total": 0.6,
        "key": 0.6,
        "name": 0.0,
        "phone": 0.0,
        "name_similarity": pytest.approx(result.name_similarity, abs=1e-4),
        "phone_equal": False,
        "keys": {"email": "low"},
    }


def test_a_support_email_with_a_similar_name_links() -> None:
    decision, result = outcome(side("support", "ada", "LOVELACE "), CUSTOMER)
    assert decision is Decision.LINK
    assert result.name_similarity == 1.0 and result.total == pytest.approx(1.1)
    # A typo still corroborates: similarity above name_min.
    assert outcome(side("support", "Ada", "Lovelace-King"), CUSTOMER)[0] is Decision.REVIEW
    assert outcome(side("support", "Ada", "Lovlace"), CUSTOMER)[0] is Decision.LINK


def test_a_support_email_with_the_same_phone_links() -> None:
    decision, result = outcome(side("support", "Mallory", "", "+441632960001"), CUSTOMER)
    assert decision is Decision.LINK and result.phone_equal


def test_a_family_sharing_an_address_is_reviewed() -> None:
    # Same last name, another first name: not the same person.
    assert outcome(side("support", "Byron", "Lovelace"), CUSTOMER)[0] is Decision.REVIEW


def test_trusted_keys_link_alone() -> None:
    assert outcome(side("crm", "Someone", "Else"), CUSTOMER)[0] is Decision.LINK
    billing = side("billing", tax_id="digest-of-tax")
    assert outcome(billing, [], ("tax_id",))[0] is Decision.LINK


def test_a_record_founded_by_a_low_trust_key_does_not_vouch_for_a_trusted_row() -> None:
    """The stranger signed up first: the customer's CRM row is not linked to them on
    the email alone; a record whose profile says nothing (before profiles) is trusted."""
    founded_by_stranger = [side("support", "Mallory", "Jones")]
    decision, result = outcome(side("crm", "Ada", "Lovelace"), founded_by_stranger)
    assert decision is Decision.REVIEW and result.keys == (("email", Trust.LOW),)
    assert outcome(side("crm", "Ada", "Lovelace"), [])[0] is Decision.LINK
    # A trusted row carrying the same value vouches for it.
    both = [*founded_by_stranger, side("billing")]
    assert outcome(side("crm"), both)[0] is Decision.LINK
    # The stranger changed address since founding it: no row carries the value any
    # more, so the least-trusted row's word counts, not blanket trust.
    moved = [side("support", "Mallory", "Jones", email="digest-of-another")]
    assert outcome(side("crm", "Ada", "Lovelace"), moved)[0] is Decision.REVIEW
    rebuilt = [MatchSide("", "ada lovelace")]  # `accord identity rebuild`'s entry
    assert outcome(side("crm", "Someone", "Else"), rebuilt)[0] is Decision.LINK


def test_a_key_the_system_may_not_link_on_counts_nothing() -> None:
    result = score(POLICY, side("crm", tax_id="t"), ("tax_id",), CUSTOMER)
    assert result.keys == () and decide(POLICY.scoring, result) is Decision.NEW
    assert not POLICY.may_link("crm", "tax_id") and POLICY.may_link("billing", "tax_id")
    # A system the trust map leaves out trusts every match rule.
    assert MatchPolicy(trust={}).trust_of("support", "email") is Trust.TRUSTED


def test_below_review_a_row_founds_its_own_record() -> None:
    policy = MatchPolicy(scoring=MatchScoring(low=0.3))
    result = score(policy, side("support"), ("email",), CUSTOMER)
    assert decide(policy.scoring, result) is Decision.NEW


def test_names_are_folded_and_their_order_does_not_count() -> None:
    assert normalized_name("  Zoë ", "O'Brien") == "zoe o brien"
    assert normalized_name(None, "") == ""
    assert name_similarity("ada lovelace", "lovelace ada") == 1.0
    assert name_similarity("", "ada") == 0.0


def test_profile_entries_round_trip_and_carry_only_what_the_change_carries() -> None:
    text = profile_entry("support", {"first_name": "Zoë", "phone": "+1"}, {"email": "d"})
    assert '"l"' not in text  # last_name not carried: the script keeps the old one
    parsed = MatchSide.parse(text)
    assert parsed == MatchSide("support", "zoe", "+1", {"email": "d"})
    assert MatchSide.parse("not json") is None
    assert MatchSide.parse('{"f": "x"}') is None


# -- properties ---------------------------------------------------------------------------

names = st.text(alphabet=st.characters(categories=("L", "Zs")), max_size=20)
phones = st.sampled_from(["", "+441632960001", "+441632960002", "+14155550142"])
systems = st.sampled_from(["crm", "billing", "support"])


@st.composite
def sides(draw: st.DrawFn, system: st.SearchStrategy[str] = systems) -> MatchSide:
    return side(draw(system), draw(names), draw(names), draw(phones))


@given(row=sides(), profile=st.lists(sides(), max_size=5))
def test_a_support_email_never_links_without_corroboration(
    row: MatchSide, profile: list[MatchSide]
) -> None:
    support_row = MatchSide("support", row.name, row.phone, EMAIL)
    decision, result = outcome(support_row, profile)
    corroborated = result.name_similarity >= POLICY.scoring.name_min or result.phone_equal
    assert result.keys == (("email", Trust.LOW),)
    assert (decision is Decision.LINK) == corroborated
    assert decision in (Decision.LINK, Decision.REVIEW)  # 0.6: never below the band
    stranger = MatchSide("support", "", "", EMAIL)  # nothing to corroborate with
    assert outcome(stranger, profile)[0] is Decision.REVIEW


@given(a=names, b=names, c=names, d=names)
def test_name_similarity_is_symmetric_and_ignores_word_order(a: str, b: str, c: str, d: str):
    one, other = normalized_name(a, b), normalized_name(c, d)
    assert name_similarity(one, other) == name_similarity(other, one)
    assert name_similarity(normalized_name(a, b), other) == name_similarity(
        normalized_name(b, a), other
    )
    assert 0.0 <= name_similarity(one, other) <= 1.0
    if one:
        assert name_similarity(one, one) == 1.0


@given(row=sides(), profile=st.lists(sides(), max_size=4), extra=sides())
def test_more_evidence_never_lowers_a_score(
    row: MatchSide, profile: list[MatchSide], extra: MatchSide
) -> None:
    before = score(POLICY, row, ("email",), profile)
    after = score(POLICY, row, ("email",), [*profile, extra])
    # Another row on the candidate's side can only add corroboration, except that it
    # may vouch for the key (raising its trust), never lower it.
    assert after.name_similarity >= before.name_similarity
    assert after.phone_equal >= before.phone_equal
    assert after.total >= before.total - 1e-9 or before.key > after.key


@given(
    total=st.floats(0, 3),
    review=st.floats(0.01, 2),
    width=st.floats(0, 1),
    higher=st.floats(0, 1),
)
def test_decisions_are_monotone_in_the_score(
    total: float, review: float, width: float, higher: float
) -> None:
    scoring = MatchScoring(low=0, review=review, auto_link=review + width + 0.01)
    rank = {Decision.NEW: 0, Decision.REVIEW: 1, Decision.LINK: 2}

    def decided(value: float) -> Decision:
        return decide(scoring, Score(value, value, 0, 0, 0, False, (("email", Trust.TRUSTED),)))

    assert rank[decided(total + higher)] >= rank[decided(total)]
    assert decided(scoring.auto_link) is Decision.LINK
    assert decided(scoring.review) is Decision.REVIEW
    assert decided(scoring.review - 0.001) is Decision.NEW
    # No allowed key matched: never linked, whatever the rest adds up to.
    assert decide(scoring, Score(total + 9, 0, total + 9, 0, 1, True, ())) is Decision.NEW


# -- the policy in the survivorship rules ---------------------------------------------------


def test_the_shipped_policy_is_the_documented_default() -> None:
    from streams.rules import default_rules

    matching = default_rules().identity.matching
    assert matching == MatchPolicy()
    assert matching.trust == DEFAULT_TRUST
    assert matching.trust_of("support", "email") is Trust.LOW
    assert matching.trust_of("billing", "tax_id") is Trust.TRUSTED
    assert matching.trust_of("crm", "email") is Trust.TRUSTED


def test_trust_and_scoring_are_read_from_the_identity_section(tmp_path: Path) -> None:
    text = VALID.replace(
        "fields:",
        "identity:\n"
        "  trust:\n"
        "    support: {email: trusted}\n"
        "    billing: {tax_id: low}\n"
        "  scoring: {low: 0.4, review: 0.3, auto_link: 0.9}\n"
        "fields:",
        1,
    )
    matching = load_rules(_write(tmp_path, text)).identity.matching
    assert matching.trust_of("support", "email") is Trust.TRUSTED
    assert matching.trust_of("billing", "tax_id") is Trust.LOW
    assert matching.trust_of("billing", "email") is None  # listed: only what it lists
    assert matching.trust_of("crm", "email") is Trust.TRUSTED  # not listed: every rule
    assert matching.scoring == MatchScoring(low=0.4, review=0.3, auto_link=0.9)


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (
            "identity:\n  trust:\n    suport: {email: low}\n",
            [(9, r"unknown system 'suport' \(did you mean 'support'")],
        ),
        (
            "identity:\n  trust:\n    support: {phone: low}\n",
            [(9, r"'phone' is not a match rule's field")],
        ),
        (
            "identity:\n  trust:\n    crm: {tax_id: trusted}\n",
            [(9, r"the match rule on tax_id does not apply to crm")],
        ),
        (
            "identity:\n  trust:\n    support:\n      email: sometimes\n",
            [(10, r"'sometimes' is not one of trusted, low")],
        ),
        ("identity:\n  trust: [crm]\n", [(8, r"identity.trust must map systems")]),
        (
            "identity:\n  scoring:\n    low: 1.2\n",
            [(9, r"low \(1.2\) must be below auto_link \(1.0\)")],
        ),
        (
            "identity:\n  scoring:\n    review: 2\n",
            [(9, r"need 0 < review <= auto_link")],
        ),
        (
            "identity:\n  scoring:\n    name_min: 7\n",
            [(9, r"name_min is a similarity from 0 to 1")],
        ),
        (
            "identity:\n  scoring:\n    phone: -1\n",
            [(9, r"scoring.phone must be a number >= 0")],
        ),
        (
            "identity:\n  scoring:\n    auto_lnk: 1\n",
            [(9, r"unknown option 'auto_lnk' \(did you mean 'auto_link'")],
        ),
    ],
)
def test_policy_mistakes_name_their_line(
    tmp_path: Path, identity: str, expected: list[tuple[int, str]]
) -> None:
    found = _errors(tmp_path, VALID.replace("fields:", identity + "fields:", 1))
    assert [line for line, _ in found] == [line for line, _ in expected], found
    for (_, message), (_, pattern) in zip(found, expected, strict=True):
        assert re.search(pattern, message), message


def test_a_policy_made_in_code_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="unknown system"):
        MatchPolicy(trust={"erp": {"email": Trust.LOW}})
    with pytest.raises(ConfigError, match="must be below auto_link"):
        MatchScoring(low=1.0)


@pytest.mark.parametrize(
    ("first", "last", "phone", "total", "decision"),
    [
        ("Mallory", "Jones", "+441632960999", 0.6, Decision.REVIEW),
        ("ada", "lovlace", "", 1.078, Decision.LINK),
        ("", "", "+441632960001", 1.1, Decision.LINK),
        ("Byron", "Lovelace", "", 0.6, Decision.REVIEW),
    ],
)
def test_the_worked_example_of_the_connectors_readme(
    first: str, last: str, phone: str, total: float, decision: Decision
) -> None:
    """connectors/README.md, "Match policy": the table's totals and decisions."""
    decided, result = outcome(side("support", first, last, phone), CUSTOMER)
    assert decided is decision
    assert result.total == pytest.approx(total, abs=0.005)


def test_a_row_an_applier_linked_vouches_for_nothing() -> None:
    copied = MatchSide.parse('{"s": "crm", "k": {"email": "digest-of-ada"}, "a": true}')
    assert copied is not None and not copied.vouches
    founded_by_stranger = [side("support", "Mallory"), copied]
    decision, result = outcome(side("billing"), founded_by_stranger)
    assert decision is Decision.REVIEW and result.keys == (("email", Trust.LOW),)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    auto_link=st.floats(0.1, 5, allow_nan=False).map(lambda x: round(x, 3)),
    review_share=st.floats(0.01, 1),
    low_share=st.floats(0, 0.99),
    name=st.floats(0, 3).map(lambda x: round(x, 3)),
    name_min=st.floats(0, 1).map(lambda x: round(x, 3)),
    levels=st.fixed_dictionaries(
        {}, optional={s: st.sampled_from(["trusted", "low"]) for s in ("crm", "support")}
    ),
)
def test_any_valid_policy_reads_back_as_written(
    tmp_path: Path,
    auto_link: float,
    review_share: float,
    low_share: float,
    name: float,
    name_min: float,
    levels: dict[str, str],
) -> None:
    review = max(round(auto_link * review_share, 3), 0.001)
    low = round(auto_link * low_share, 3)
    if review > auto_link or low >= auto_link:
        return
    trust = "".join(f"    {system}: {{email: {level}}}\n" for system, level in levels.items())
    text = VALID.replace(
        "fields:",
        "identity:\n"
        + ("  trust:\n" + trust if trust else "")
        + f"  scoring: {{auto_link: {auto_link}, review: {review}, low: {low}, name: {name}, "
        f"name_min: {name_min}}}\nfields:",
        1,
    )
    matching = load_rules(_write(tmp_path, text)).identity.matching
    assert matching.scoring == MatchScoring(
        low=low, name=name, name_min=name_min, auto_link=auto_link, review=review
    )
    expected = (
        {s: {"email": Trust(level)} for s, level in levels.items()} if levels else DEFAULT_TRUST
    )
    assert matching.trust == expected
