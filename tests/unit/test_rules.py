"""Survivorship rules files: the shipped one loads, and every mistake names file and line."""

import re
from pathlib import Path

import pytest

from streams.errors import ConfigError
from streams.identity import DEFAULT_ROLE_ADDRESSES, IdentityPolicy, MatchRule
from streams.model import FIELDS, SYSTEMS
from streams.rules import DeletePolicy, FieldRule, Rule, default_rules, load_rules

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "connectors" / "survivorship.yaml"


# -- the shipped file ---------------------------------------------------------------------


def test_the_shipped_rules_load() -> None:
    rules = load_rules(SHIPPED)
    assert rules == default_rules()
    assert set(rules.priority) <= set(SYSTEMS)
    assert rules.delete_policy in DeletePolicy


def test_the_shipped_rules_cover_every_canonical_field() -> None:
    rules = default_rules()
    assert set(rules.fields) == set(FIELDS)
    for name, spec in rules.fields.items():
        if spec.rule is Rule.PRIORITY:
            assert spec.order and set(spec.order) <= set(SYSTEMS), name
        if spec.rule is Rule.OWNER:
            assert spec.owner in SYSTEMS, name


# -- a valid file, and its mistakes -------------------------------------------------------

VALID = """\
priority: [crm, billing, support]
delete_policy: deactivate
match:
  - field: email
  - field: tax_id
    systems: [billing]
fields:
  email: {rule: lww}
  phone:
    rule: lww
  first_name:
    rule: priority
    order:
      - crm
      - support
      - billing
  last_name: {rule: priority, order: [crm, support, billing]}
  company: {rule: priority, order: [billing, crm]}
  country: {rule: priority, order: [billing, crm, support]}
  segment:
    rule: owner
    owner: crm
  marketing_opt_in: {rule: owner, owner: crm}
  tax_id: {rule: owner, owner: billing}
  street: {rule: owner, owner: billing}
  city: {rule: owner, owner: billing}
  postal_code: {rule: owner, owner: billing}
  currency: {rule: owner, owner: billing}
  payment_terms: {rule: owner, owner: billing}
  credit_limit: {rule: owner, owner: billing}
  account_status: {rule: owner, owner: billing}
  support_tier: {rule: owner, owner: support}
  locale: {rule: owner, owner: support}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "survivorship.yaml"
    path.write_text(text)
    return path


def _errors(tmp_path: Path, text: str) -> list[tuple[int, str]]:
    """Each reported mistake as (line, message); every one must name the file."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_rules(path)
    found = []
    for line in str(caught.value).splitlines():
        match = re.fullmatch(rf"{re.escape(str(path))}:(\d+): (.*)", line)
        assert match, f"does not name file and line: {line!r}"
        found.append((int(match.group(1)), match.group(2)))
    return found


def test_the_valid_example_loads(tmp_path: Path) -> None:
    rules = load_rules(_write(tmp_path, VALID))
    assert rules.priority == ("crm", "billing", "support")
    assert rules.delete_policy is DeletePolicy.DEACTIVATE
    assert rules.match == (MatchRule("email"), MatchRule("tax_id", ("billing",)))
    assert rules.fields["email"] == FieldRule(Rule.LWW)
    assert rules.fields["first_name"] == FieldRule(
        Rule.PRIORITY, order=("crm", "support", "billing")
    )
    assert rules.fields["segment"] == FieldRule(Rule.OWNER, owner="crm")
    assert set(rules.fields) == set(FIELDS)


def test_priority_delete_policy_and_match_are_optional(tmp_path: Path) -> None:
    fields = VALID[VALID.index("fields:") :]
    rules = load_rules(_write(tmp_path, fields))
    assert rules.priority == SYSTEMS
    assert rules.delete_policy is DeletePolicy.DEACTIVATE
    assert rules.match == ()
    text = fields + "delete_policy: propagate\n"
    assert load_rules(_write(tmp_path, text)).delete_policy is DeletePolicy.PROPAGATE


def test_the_shipped_identity_policy_is_the_default() -> None:
    identity = default_rules().identity
    assert identity == IdentityPolicy()
    assert identity.max_rows_per_record == 20
    assert identity.role_addresses == frozenset(DEFAULT_ROLE_ADDRESSES)


def test_identity_is_optional_and_each_option_overrides_its_default(tmp_path: Path) -> None:
    assert load_rules(_write(tmp_path, VALID)).identity == IdentityPolicy()
    text = VALID.replace("fields:", "identity:\n  max_rows_per_record: 5\nfields:", 1)
    assert load_rules(_write(tmp_path, text)).identity == IdentityPolicy(5)
    text = VALID.replace("fields:", "identity:\n  role_addresses: [Desk, info@]\nfields:", 1)
    identity = load_rules(_write(tmp_path, text)).identity
    assert identity.role_addresses == {"desk", "info"}
    assert identity.max_rows_per_record == IdentityPolicy().max_rows_per_record
    text = VALID.replace("fields:", "identity:\n  role_addresses: []\nfields:", 1)
    assert load_rules(_write(tmp_path, text)).identity.role_addresses == frozenset()


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("identity: 20\n", [(7, r"identity must be a mapping of max_rows_per_record")]),
        (
            "identity:\n  max_rows_per_recrd: 20\n",
            [
                (
                    8,
                    r"unknown option 'max_rows_per_recrd' \(did you mean 'max_rows_per_record'",
                )
            ],
        ),
        (
            "identity:\n  max_rows_per_record: 0\n",
            [(8, r"identity.max_rows_per_record must be at least 1, got 0")],
        ),
        (
            "identity:\n  max_rows_per_record: lots\n",
            [(8, r"identity.max_rows_per_record must be at least 1, got 'lots'")],
        ),
        (
            "identity:\n  role_addresses: info\n",
            [(8, r"identity: role_addresses must be a list of mailbox names")],
        ),
        (
            "identity:\n  role_addresses: [info@acme.example]\n",
            [(8, r"identity.role_addresses: each entry is a mailbox name")],
        ),
    ],
)
def test_identity_mistakes_name_their_line(
    tmp_path: Path, identity: str, expected: list[tuple[int, str]]
) -> None:
    text = VALID.replace("fields:", identity + "fields:", 1)
    found = _errors(tmp_path, text)
    assert [line for line, _ in found] == [line for line, _ in expected], found
    for (_, message), (_, pattern) in zip(found, expected, strict=True):
        assert re.search(pattern, message), message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # unknown keys, at every level
        (
            "delete_policy: deactivate\n",
            "delete_policy: deactivate\ncolour: blue\n",
            [(3, r"unknown key 'colour' \(expected one of priority, delete_policy")],
        ),
        ("match:", "matches:", [(3, r"unknown key 'matches' \(did you mean 'match'\?\)")]),
        ("    systems:", "    system:", [(6, r"match: unknown option 'system'")]),
        (
            "    rule: lww\n",
            "    rule: lww\n    ordr: [crm]\n",
            [(11, r"phone: unknown option 'ordr' \(expected rule\)")],
        ),
        (
            "email: {rule: lww}",
            "email: {rule: lww, owner: crm}",
            [(8, r"email: option 'owner' does not apply to lww")],
        ),
        # unknown canonical fields
        (
            "  phone:\n",
            "  fone:\n",
            [
                (7, r"no rule for canonical field\(s\): phone$"),
                (9, r"unknown canonical field 'fone' \(did you mean 'phone'\?\)"),
            ],
        ),
        (
            "  - field: email",
            "  - field: e_mail",
            [(4, r"match: 'e_mail' is not a canonical field \(did you mean 'email'\?\)")],
        ),
        ("  - field: email", "  - systems: [crm]", [(4, r"match: each rule needs `field")]),
        # rules
        (
            "    rule: lww\n",
            "    rule: newest\n",
            [(10, r"phone: rule 'newest' is not one of: lww, priority, owner")],
        ),
        (
            "last_name: {rule: priority, order: [crm, support, billing]}",
            "last_name: {rule: priority}",
            [(17, r"last_name: a priority rule needs `order")],
        ),
        (
            "    rule: priority\n    order:\n      - crm\n      - support\n      - billing\n",
            "    rule: priority\n",
            [(12, r"first_name: a priority rule needs `order")],
        ),
        (
            "    owner: crm",
            "    owner: sales",
            [(22, r"segment: owner must be one of crm, billing, support, not 'sales'")],
        ),
        (
            "marketing_opt_in: {rule: owner, owner: crm}",
            "marketing_opt_in: {rule: owner}",
            [(23, r"marketing_opt_in: an owner rule needs `owner: <system>`")],
        ),
        # systems
        (
            "priority: [crm, billing, support]",
            "priority: [crm, biling, support]",
            [(1, r"priority: unknown system 'biling' \(did you mean 'billing'\?\)")],
        ),
        ("priority: [crm, billing, support]", "priority: crm", [(1, r"expected a list")]),
        (
            "systems: [billing]",
            "systems: [helpdesk]",
            [(6, r"match on tax_id: systems: unknown system 'helpdesk'")],
        ),
        ("      - support\n", "      - suport\n", [(15, r"first_name: order: unknown system")]),
        ("      - billing\n", "      - crm\n", [(16, r"first_name: order: 'crm' is listed twice")]),
        # duplicate keys
        (
            "  locale: {rule: owner, owner: support}\n",
            "  locale: {rule: owner, owner: support}\n  email: {rule: lww}\n",
            [(34, r"duplicate key 'email' \(first at line 8\)")],
        ),
        (
            "    owner: crm\n",
            "    owner: crm\n    owner: billing\n",
            [(23, r"duplicate key 'owner' \(first at line 22\)")],
        ),
        # missing rules
        (
            "  locale: {rule: owner, owner: support}\n",
            "",
            [(7, r"no rule for canonical field\(s\): locale$")],
        ),
        (
            "  city: {rule: owner, owner: billing}\n  postal_code: {rule: owner, owner: billing}\n",
            "",
            [(7, r"no rule for canonical field\(s\): city, postal_code$")],
        ),
        # delete policy
        (
            "delete_policy: deactivate",
            "delete_policy: delete",
            [(2, r"delete_policy 'delete' is not one of: deactivate, propagate")],
        ),
        # invalid YAML
        (
            "company: {rule: priority, order: [billing, crm]}",
            "company: {rule: priority, order: [billing, crm]]}",
            [(18, r"invalid YAML: ")],
        ),
        ("    owner: crm", "   owner: crm", [(22, r"invalid YAML: ")]),
    ],
)
def test_mistakes_name_file_and_line(
    tmp_path: Path, old: str, new: str, expected: list[tuple[int, str]]
) -> None:
    assert VALID.count(old) == 1, old
    errors = _errors(tmp_path, VALID.replace(old, new))
    assert [line for line, _ in errors] == [line for line, _ in expected], errors
    for (_, message), (_, pattern) in zip(errors, expected, strict=True):
        assert re.search(pattern, message), message


def test_two_mistakes_are_both_named(tmp_path: Path) -> None:
    text = VALID.replace("[crm, billing, support]", "[crm, billing, sales]", 1)
    text = text.replace("    owner: crm", "    owner: sales")
    errors = _errors(tmp_path, text)
    assert [line for line, _ in errors] == [1, 22]
    assert "priority: unknown system 'sales'" in errors[0][1]
    assert "segment: owner must be one of" in errors[1][1]


def test_every_duplicate_key_is_named(tmp_path: Path) -> None:
    text = VALID.replace("delete_policy: deactivate\n", "delete_policy: a\ndelete_policy: b\n")
    text += "  email: {rule: lww}\n"
    assert [line for line, _ in _errors(tmp_path, text)] == [3, 35]


def test_a_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    assert _errors(tmp_path, "- lww\n- owner\n") == [
        (1, "expected a mapping of priority, delete_policy, match, identity, fields")
    ]
    assert _errors(tmp_path, "") == [
        (1, "expected a mapping of priority, delete_policy, match, identity, fields")
    ]
    [(line, message)] = _errors(tmp_path, "priority: [crm]\n")
    assert line == 1 and message.startswith("missing fields")


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"survivorship\.yaml: file not found"):
        load_rules(tmp_path / "survivorship.yaml")
