"""What an applier reports of a row it creates: what the row's CDC echo will say."""

from __future__ import annotations

from pathlib import Path

from streams.mapping import load_mappings
from streams.projection import load_sinks
from streams.sinks import created_values

CONNECTORS = Path(__file__).resolve().parents[2] / "connectors"
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
