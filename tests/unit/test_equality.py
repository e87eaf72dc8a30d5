"""One equality for "the target holds the golden value", shared by appliers and reconcile."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from streams import reconcile, sinks
from streams.equality import holds
from streams.mapping import load_mappings
from streams.projection import load_sinks

CONNECTORS = Path(__file__).resolve().parents[2] / "connectors"
ID = "2b1f0c52-3c0e-4b8e-9a55-0c6f3f1f2a10"


@pytest.mark.parametrize(
    ("current", "wanted"),
    [
        (None, None),
        (Decimal("1.50"), "1.5"),  # what sinks and reconcile used to disagree on
        (Decimal("1.50"), Decimal("1.5")),
        ("1.5", Decimal("1.50")),
        (1, "1"),
        (1.5, Decimal("1.50")),
        (Decimal("10"), 10),
        (True, True),
        (True, 1),
        (1, True),
        (False, "false"),
        ("t", True),
        (0, False),
        (dt.date(2024, 5, 1), "2024-05-01"),
        (dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC), "2024-05-01T10:00:00+00:00"),
        (dt.datetime(2024, 5, 1, 10), "2024-05-01T10:00:00Z"),  # naive: UTC
        (uuid.UUID(ID), ID.upper()),
        ("Ada", "Ada"),
        ("", ""),
    ],
)
def test_equal_values_across_driver_and_golden_types(current: Any, wanted: Any) -> None:
    assert holds(current, wanted) and holds(wanted, current)


@pytest.mark.parametrize(
    ("current", "wanted"),
    [
        (None, ""),  # an empty string is a value
        (None, False),
        (None, Decimal("0")),
        (Decimal("1.50"), "1.51"),
        (Decimal("1"), "one"),  # not a number: never equal to one
        ("NaN", Decimal("NaN")),
        (True, "maybe"),  # not a truth value: never equal to a bool
        (True, 0),
        (False, "true"),
        (dt.date(2024, 5, 1), "2024-05-02"),
        (dt.date(2024, 5, 1), "soon"),
        (uuid.UUID(ID), "not-a-uuid"),
        ("Ada", "Ada "),  # whitespace is data
        ("Ada", "ada"),  # and so is case
        ("1.50", "1.5"),  # text columns compare as text
    ],
)
def test_different_values_across_types(current: Any, wanted: Any) -> None:
    assert not holds(current, wanted) and not holds(wanted, current)


def test_appliers_and_reconcile_ask_the_one_function() -> None:
    assert sinks.holds is holds and reconcile.holds is holds
    assert not hasattr(sinks, "same") and not hasattr(reconcile, "_equal")


def test_reconcile_finds_no_drift_where_the_applier_would_write_nothing() -> None:
    """A row whose driver values differ in type only is in accord, for both sides."""
    spec = load_sinks(CONNECTORS)["crm"]
    mapping = load_mappings(CONNECTORS)["crm"]
    fields = {name: None for name in ("first_name", "last_name", "phone", "company",
                                      "segment", "country")}  # fmt: skip
    golden = {"g-1": {"active": True, "links": [{"system": "crm", "key": "7"}],
                      "fields": {**fields, "email": "ada@example.com",
                                 "marketing_opt_in": False}}}  # fmt: skip
    row = {**fields, "id": 7, "email": "ada@example.com", "marketing_opt_in": 0}
    card = reconcile.compare(spec, mapping, golden, {"7": row})
    assert (card.in_accord, card.drifted) == (1, 0), card.drifts
    wanted = spec.project(golden["g-1"]["fields"])
    assert all(holds(row.get(column), value) for column, value in wanted.items())
