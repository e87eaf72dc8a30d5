import datetime as dt
import uuid
from decimal import Decimal

import pytest

from streams.codec import AvroCodec, SchemaCache
from streams.debezium import CONVERTERS, EnvelopeError, EnvelopeReader, SourceChange, plan_row
from tests import vectors


def _change(name: str) -> SourceChange:
    vector = vectors.load(name)
    codec = AvroCodec(SchemaCache(vector.fetch))
    key, value = codec.decode(vector.key), codec.decode(vector.value)
    return EnvelopeReader().unwrap(vector.topic, key.value, key.schema, value.value, value.schema)


def test_create_update_delete_from_postgres() -> None:
    created, updated, deleted = _change("crm-c"), _change("crm-u"), _change("crm-d")
    assert (created.op, updated.op, deleted.op) == ("c", "u", "d")
    assert created.before is None and deleted.after is None
    assert created.key == updated.key == deleted.key
    assert updated.before["phone"] != updated.after["phone"]
    assert deleted.row["email"] == created.row["email"]
    assert created.position.lsn < updated.position.lsn < deleted.position.lsn
    assert created.position.identity.startswith("lsn:")
    assert not created.position.snapshot


def test_snapshot_read_is_flagged() -> None:
    read = _change("crm-r")
    assert read.op == "r" and read.position.snapshot and read.before is None


def test_mariadb_types_and_binlog_position() -> None:
    created, updated = _change("billing-c"), _change("billing-u")
    assert created.after["credit_limit"] == Decimal("12345.67")
    assert updated.after["credit_limit"] == Decimal("0.50")
    assert created.after["status"] == "active" and updated.after["status"] == "suspended"
    assert created.after["updated_at"] == dt.datetime(2026, 11, 22, 8, 0, 0, 123456, dt.UTC)
    assert created.position.binlog_file and created.position.identity.startswith("binlog:")
    assert created.identity != updated.identity


def test_uuid_keys_and_zoned_timestamps() -> None:
    created = _change("support-c")
    assert isinstance(created.key["id"], uuid.UUID)
    assert created.after["updated_at"].tzinfo is not None
    assert created.position.commit_ts_us > 1_700_000_000_000_000


def test_identity_is_stable_across_decodes() -> None:
    assert _change("support-u").identity == _change("support-u").identity


@pytest.mark.parametrize(
    ("connect_name", "raw", "expected"),
    [
        ("io.debezium.time.Date", 20_414, dt.date(2025, 11, 22)),
        ("io.debezium.time.MicroTimestamp", 1_000_001, dt.datetime(1970, 1, 1, 0, 0, 1, 1)),
        ("io.debezium.time.Timestamp", 1_500, dt.datetime(1970, 1, 1, 0, 0, 1, 500_000)),
        ("io.debezium.time.MicroTime", 3_600_000_001, dt.time(1, 0, 0, 1)),
        ("io.debezium.data.EnumSet", "a,b", ["a", "b"]),
        (
            "io.debezium.data.VariableScaleDecimal",
            {"scale": 3, "value": b"\x30\x39"},
            Decimal("12.345"),
        ),
    ],
)
def test_debezium_semantic_types(connect_name: str, raw: object, expected: object) -> None:
    assert CONVERTERS[connect_name](raw) == expected


def test_decimal_without_logical_type_uses_connect_scale() -> None:
    plan = plan_row(
        {
            "fields": [
                {
                    "name": "amount",
                    "type": [
                        "null",
                        {
                            "type": "bytes",
                            "connect.name": "org.apache.kafka.connect.data.Decimal",
                            "connect.parameters": {"scale": "2"},
                        },
                    ],
                }
            ]
        }
    )
    assert plan["amount"](b"\x04\xd2") == Decimal("12.34")


def test_a_record_that_is_not_an_envelope_is_refused() -> None:
    vector = vectors.load("crm-c")
    schema = AvroCodec(SchemaCache(vector.fetch)).decode(vector.value).schema
    with pytest.raises(EnvelopeError, match="not a Debezium envelope"):
        EnvelopeReader().unwrap("t", {}, None, {"id": 1}, schema)
