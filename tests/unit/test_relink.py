"""Relink's plain parts: what a missing epoch calls for, and identities out of golden states."""

from __future__ import annotations

import itertools

import pytest

from streams.merge import apply, dumps, fold
from streams.model import Change, Op, Value
from streams.relink import (
    Plan,
    RelinkReport,
    decide,
    identity_of,
    latest_identities,
    with_ledger,
)
from streams.rules import default_rules

RULES = default_rules()
MATCH_FIELDS = {"email", "tax_id"}
_positions = itertools.count(1)


def change(system: str, key: str, op: Op = Op.UPSERT, ts: int = 1, **values: Value) -> Change:
    position = next(_positions)
    return Change(
        change_id=f"{system}:{key}:{position}",
        system=system,
        source_key=key,
        op=op,
        source_ts=ts,
        position=f"{position:020d}",
        values=values,
    )


@pytest.mark.parametrize(
    ("epoch", "state", "plan"),
    [
        (True, True, Plan.INTACT),
        (True, False, Plan.INTACT),
        (False, False, Plan.FRESH),
        (False, True, Plan.REBUILD),
    ],
)
def test_a_missing_epoch_means_rebuild_only_when_golden_state_exists(
    epoch: bool, state: bool, plan: Plan
) -> None:
    assert decide(epoch, state) is plan


def test_identity_of_a_state_is_every_linked_row_and_the_match_values() -> None:
    state = fold(
        "g-1",
        [
            change("crm", "7", email="ada@example.com", first_name="Ada"),
            change("billing", "W-1", ts=2, email="ada@example.com", tax_id="DE1"),
            change("support", "3", ts=3, email="ada@example.com"),
            change("support", "3", Op.DELETE, ts=4),
        ],
        RULES,
    )
    golden_id, links, values = identity_of(state, MATCH_FIELDS)
    assert golden_id == "g-1"
    # the deleted support row stays linked: its xref outlived its delete
    assert links == (("billing", "W-1"), ("crm", "7"), ("support", "3"))
    assert values == {"email": "ada@example.com", "tax_id": "DE1"}


def test_latest_identities_keep_the_last_version_of_each_key_and_forget_tombstones() -> None:
    first = fold("g-1", [change("crm", "1", email="old@example.com")], RULES)
    v1 = dumps(first)
    apply(first, change("crm", "1", ts=5, email="new@example.com"), RULES)
    apply(first, change("support", "9", ts=6, email="new@example.com"), RULES)
    v2 = dumps(first)
    gone = dumps(fold("g-2", [change("crm", "2", email="x@example.com")], RULES))
    kept = dumps(fold("g-3", [change("billing", "B", tax_id="AT9")], RULES))
    records = [
        (b"g-1", v1),
        (b"g-2", gone),
        (b"g-3", kept),
        (b"g-1", v2),
        (b"g-2", None),  # a tombstone
        (None, b"ignored"),
    ]
    identities = latest_identities(records, MATCH_FIELDS)
    assert identities == {
        "g-1": ("g-1", (("crm", "1"), ("support", "9")), {"email": "new@example.com"}),
        "g-3": ("g-3", (("billing", "B"),), {"tax_id": "AT9"}),
    }


def test_ledger_rows_link_only_what_no_golden_state_links_yet() -> None:
    identities = {
        "g-1": ("g-1", (("crm", "1"),), {"email": "a@example.com"}),
        "g-2": ("g-2", (("support", "5"),), {}),
    }
    ledger = [
        ("g-1", "crm", "1"),  # linked already: its echo was merged
        ("g-1", "support", "u-1"),  # created, echo not merged yet
        ("g-1", "support", "u-1"),  # twice in the ledger (two versions)
        ("g-9", "billing", "W-9"),  # a record whose state the scan did not see
        ("g-2", "crm", "1"),  # another record's row: it stays where it is
    ]
    added = with_ledger(identities, ledger)
    assert added == [("g-1", "support", "u-1"), ("g-9", "billing", "W-9")]
    assert identities["g-1"] == (
        "g-1",
        (("crm", "1"), ("support", "u-1")),
        {"email": "a@example.com"},
    )
    assert identities["g-9"] == ("g-9", (("billing", "W-9"),), {})
    assert identities["g-2"] == ("g-2", (("support", "5"),), {})


def test_a_report_says_how_many_records_were_rebuilt() -> None:
    report = RelinkReport(Plan.REBUILD, 1234, 2, 5000, 1.5)
    assert report.describe() == (
        "rebuilt the identity keys of 1,234 golden records (2 rows linked from applier "
        "ledgers, 5,000 changelog records read) in 1.5 s"
    )
    assert "nothing to rebuild" in RelinkReport(Plan.FRESH).describe()


def test_a_replayed_change_that_dedupe_no_longer_catches_merges_as_a_no_op() -> None:
    """Lost dedupe keys are harmless: a replay of a change already merged changes nothing,
    so nothing is written and nothing is emitted."""
    original = change("crm", "1", email="a@example.com", phone="+4930123")
    state = fold("g-1", [original], RULES)
    before = dumps(state)
    outcome = apply(state, original, RULES)  # the replay, same change id and order
    assert not outcome.state_changed and not outcome.new_version
    assert dumps(state) == before
