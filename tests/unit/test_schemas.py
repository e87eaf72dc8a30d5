import json
from pathlib import Path

import pytest

from streams.errors import ConfigError
from streams.schemas import explain, field_diff, load_local, resolution_problems, subjects
from streams.settings import AccordSettings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"


@pytest.mark.parametrize("full_name", sorted(set(subjects(AccordSettings()).values())))
def test_every_subject_has_a_documented_schema(full_name: str) -> None:
    schema = load_local(SCHEMAS, full_name)
    assert schema["doc"]
    assert schema["name"] == full_name


def test_subjects_follow_the_topic_name_strategy() -> None:
    mapping = subjects(AccordSettings())
    assert mapping["accord.golden-value"] == "dev.accord.Customer"
    assert mapping["accord.changes-value"] == "dev.accord.CustomerChange"
    assert mapping["accord.dlq-value"] == "dev.accord.DeadLetter"
    assert mapping["accord.audit-value"] == "dev.accord.AuditEntry"
    assert mapping["accord.sink.billing-value"] == "dev.accord.SinkEvent"


def test_every_canonical_field_is_optional_so_adding_one_is_compatible() -> None:
    fields = json.loads((SCHEMAS / "dev.accord.CanonicalFields.avsc").read_text())["fields"]
    for spec in fields:
        assert spec["type"][0] == "null" and spec["default"] is None, spec["name"]
        assert spec["doc"], spec["name"]


def test_timestamps_and_money_use_logical_types() -> None:
    change = json.loads((SCHEMAS / "dev.accord.CustomerChange.avsc").read_text())
    by_name = {f["name"]: f["type"] for f in change["fields"]}
    assert by_name["source_ts"]["logicalType"] == "timestamp-micros"
    assert by_name["captured_at"]["logicalType"] == "timestamp-millis"
    fields = json.loads((SCHEMAS / "dev.accord.CanonicalFields.avsc").read_text())["fields"]
    credit = next(f for f in fields if f["name"] == "credit_limit")["type"][1]
    assert (credit["logicalType"], credit["precision"], credit["scale"]) == ("decimal", 12, 2)


def test_dead_letter_keeps_original_bytes_and_position() -> None:
    names = {f["name"] for f in load_local(SCHEMAS, "dev.accord.DeadLetter")["fields"]}
    assert {
        "key",
        "value",
        "topic",
        "partition",
        "offset",
        "schema_id",
        "reason",
        "error_class",
        "first_seen",
    } <= names


def test_bad_schema_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "dev.accord.Customer.avsc").write_text('{"type": "record", "name": ')
    with pytest.raises(ConfigError, match=r"dev.accord.Customer.avsc:1:\d+: invalid JSON"):
        load_local(tmp_path, "dev.accord.Customer")
    with pytest.raises(ConfigError, match="schema file not found"):
        load_local(tmp_path, "dev.accord.Nope")


V1 = {
    "type": "record",
    "name": "C",
    "fields": [{"name": "id", "type": "long"}, {"name": "note", "type": "string", "default": ""}],
}


def test_field_diff_names_each_change() -> None:
    new = {
        "type": "record",
        "name": "C",
        "fields": [{"name": "id", "type": "string"}, {"name": "tier", "type": "string"}],
    }
    assert field_diff(V1, new) == [
        "~ id: type long -> string",
        "+ tier: added (string) WITHOUT a default",
        "- note: removed (string, had a default)",
    ]


def test_backward_explanation_names_the_field_without_default() -> None:
    new = {**V1, "fields": [*V1["fields"], {"name": "tenant", "type": "string"}]}
    lines = explain("BACKWARD", [V1], new)
    assert any(
        "tenant" in line and "cannot read data written with version 1" in line for line in lines
    )


def test_forward_explanation_checks_old_readers() -> None:
    new = {**V1, "fields": [V1["fields"][0]]}  # drops `note`, which has a default: fine
    assert resolution_problems(new, V1) == []
    no_default = {**V1, "fields": [*V1["fields"], {"name": "x", "type": "int"}]}
    lines = explain("FORWARD", [no_default], V1)  # v1 readers need x; new data lacks it
    assert any("readers on version 1 cannot read new data" in line for line in lines)
