"""What an applier reports to the merge of a row it creates (what the row's CDC echo will
say) or adopts (its own values, with its own commit time)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from streams.mapping import load_mappings
from streams.merge import apply, fold
from streams.model import Op
from streams.projection import load_sinks
from streams.rules import default_rules
from streams.sinks import adoption, created_values
from tests.unit.test_merge import change

CONNECTORS = Path(__file__).resolve().parents[2] / "connectors"
RULES = default_rules()
GOLDEN = {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace",
          "phone": "+442079460001", "company": "Analytical Engines"}  # fmt: skip


def test_a_created_row_is_reported_as_its_mapping_will_read_it_back() -> None:
    spec = load_sinks(CONNECTORS)["support"]
    wanted = spec.project(GOLDEN)
    assert wanted["display_name"] == "Ada Lovelace"  # one column made of two fields
    values = created_values(spec, load_mappings(CONNECTORS)["support"], "u-1", wanted, GOLDEN)
    # The echo comes back through support's mapping, which splits the display name.
    assert values == {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace",
                      "phone": "+442079460001"}  # fmt: skip


def test_without_a_mapping_the_targets_golden_fields_are_reported() -> None:
    spec = load_sinks(CONNECTORS)["crm"]
    values = created_values(spec, None, "7", spec.project(GOLDEN), GOLDEN)
    assert values == {name: GOLDEN.get(name) for name in spec.fields}
    assert "company" in values and "tax_id" not in values  # the target's fields only


# -- an adopted row: its own values, its own commit time ----------------------------------

NOW_US = 1_800_000_000_000_000


def test_an_adopted_row_joins_with_its_own_values_and_no_claim_to_recency() -> None:
    """Support keeps no modification time: its values lose `lww` to any timed edit."""
    row = {"id": "u-1", "email": " Ada@Example.com ", "display_name": "Ada L.", "phone": None}
    change = adoption(load_mappings(CONNECTORS)["support"], "u-1", row, "g-1", NOW_US)
    assert change is not None
    assert (change.system, change.source_key, change.golden_id, change.op) == (
        "support",
        "u-1",
        "g-1",
        Op.UPSERT,
    )
    assert change.values["email"] == "ada@example.com" and change.values["first_name"] == "Ada"
    assert change.source_ts == 0 and change.clamped_from is None and not change.created


def test_an_adopted_row_with_a_modification_time_keeps_it() -> None:
    mapping = load_mappings(CONNECTORS)["billing"]
    edited = dt.datetime(2026, 1, 2, 3, 4, 5, 678901)  # MariaDB: naive, UTC
    row = {"account_no": "AC-1", "contact_email": "ada@example.com", "legal_name": "Ada Ltd",
           "billing_country": "GB", "currency": "GBP", "updated_at": edited}  # fmt: skip
    change = adoption(mapping, "AC-1", row, "g-1", NOW_US, max_skew_us=300_000_000)
    assert change is not None
    assert change.source_ts == int(edited.replace(tzinfo=dt.UTC).timestamp() * 1_000_000)
    future = {**row, "updated_at": dt.datetime(2099, 1, 1)}
    clamped = adoption(mapping, "AC-1", future, "g-1", NOW_US, max_skew_us=300_000_000)
    assert clamped is not None and clamped.source_ts == NOW_US
    assert clamped.clamped_from == int(dt.datetime(2099, 1, 1, tzinfo=dt.UTC).timestamp() * 1e6)


def test_an_adopted_row_does_not_beat_an_older_edit_made_elsewhere() -> None:
    """The row's email is older than billing's edit; Accord adopts the row later. Under
    `lww` billing's edit stands: adopting is not editing."""
    billing_edit = change("billing", key="AC-1", ts=2_000, email="new@example.com")
    row = {"id": "u-1", "email": "old@example.com", "display_name": "Ada L."}
    adopted = adoption(load_mappings(CONNECTORS)["support"], "u-1", row, "g-1", NOW_US)
    assert adopted is not None
    state = fold("g-1", [billing_edit, adopted], RULES)
    assert state.values()["email"] == "new@example.com"
    assert "support:u-1" in state.contributions  # linked, with what it holds
    # Its own insert, when its CDC arrives, carries its real (older) commit time.
    insert = change("support", key="u-1", ts=1_000, email="old@example.com")
    apply(state, insert, RULES)
    assert state.values()["email"] == "new@example.com"
    assert state.contributions["support:u-1"].cells["email"].order[0] == 1_000
