import json
import struct
from decimal import Decimal

import pytest
from fastavro import parse_schema
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.codec import (
    AvroCodec,
    DecodeError,
    DecodeReason,
    RegistryUnavailable,
    SchemaCache,
    SchemaNotFound,
    schema_id_of,
)
from tests import vectors

CHANGES = [n for n in vectors.names() if not n.endswith("tombstone")]


def _codec(vector: vectors.Vector) -> AvroCodec:
    return AvroCodec(SchemaCache(vector.fetch, backoff_s=0))


@pytest.mark.parametrize("name", CHANGES)
def test_real_debezium_messages_decode_by_writer_schema_id(name: str) -> None:
    vector = vectors.load(name)
    decoded = _codec(vector).decode(vector.value)
    assert decoded.schema.schema_id == schema_id_of(vector.value)
    assert decoded.value["op"] == name.split("-")[1]
    assert decoded.value["source"]["db"] in ("crm", "billing", "support")


def test_decimal_logical_type_comes_back_as_decimal() -> None:
    vector = vectors.load("billing-c")
    assert _codec(vector).decode(vector.value).value["after"]["credit_limit"] == Decimal("12345.67")


def test_writer_schema_is_fetched_once() -> None:
    vector = vectors.load("crm-u")
    calls: list[int] = []

    def counting_fetch(schema_id: int) -> str:
        calls.append(schema_id)
        return vector.fetch(schema_id)

    codec = AvroCodec(SchemaCache(counting_fetch))
    for _ in range(5):
        codec.decode(vector.value)
    assert calls == [schema_id_of(vector.value)]


def test_encode_then_decode_round_trips() -> None:
    schema = {"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"}]}
    codec = AvroCodec(SchemaCache(lambda _id: json.dumps(schema)))
    payload = AvroCodec.encode({"n": 42}, 7, parse_schema(schema))
    assert payload[:5] == b"\x00\x00\x00\x00\x07"
    assert codec.decode(payload).value == {"n": 42}


# --------------------------------------------------------------------- dead-letter reasons

VALID = vectors.load("support-c")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", DecodeReason.TOO_SHORT),
        (b"\x00\x00\x00\x00\x05", DecodeReason.TOO_SHORT),
        (b"\x01" + VALID.value[1:], DecodeReason.BAD_MAGIC),
        (b"{" + VALID.value[1:], DecodeReason.BAD_MAGIC),
        (b"\x00" + struct.pack(">I", 999_999) + VALID.value[5:], DecodeReason.UNKNOWN_SCHEMA),
        (VALID.value[: len(VALID.value) // 2], DecodeReason.CORRUPT),
        (VALID.value + b"\x00\x01", DecodeReason.CORRUPT),
        (VALID.value[:5] + b"\xff" * 40, DecodeReason.CORRUPT),
    ],
    ids=[
        "empty",
        "header-only",
        "magic-1",
        "json",
        "unknown-id",
        "truncated",
        "trailing",
        "garbage-body",
    ],
)
def test_every_undecodable_payload_has_its_reason(payload: bytes, reason: DecodeReason) -> None:
    with pytest.raises(DecodeError) as failure:
        AvroCodec(SchemaCache(VALID.fetch, backoff_s=0)).decode(payload)
    assert failure.value.reason is reason
    assert failure.value.detail


def test_unknown_schema_is_asked_again_before_giving_up() -> None:
    asked: list[int] = []

    def lagging_registry(schema_id: int) -> str:
        asked.append(schema_id)
        if len(asked) < 3:
            raise SchemaNotFound("not yet")
        return VALID.fetch(schema_id)

    codec = AvroCodec(SchemaCache(lagging_registry, attempts=4, backoff_s=0))
    assert codec.decode(VALID.value).value["op"] == "c"
    assert len(asked) == 3


def test_registry_outage_is_not_a_decode_error() -> None:
    def down(_schema_id: int) -> str:
        raise RegistryUnavailable("connection refused")

    with pytest.raises(RegistryUnavailable):
        AvroCodec(SchemaCache(down)).decode(VALID.value)


# ---------------------------------------------------------------------- schema resolution

V1 = {
    "type": "record",
    "name": "Customer",
    "namespace": "t",
    "fields": [{"name": "id", "type": "long"}, {"name": "email", "type": "string"}],
}
V2 = {**V1, "fields": [*V1["fields"], {"name": "tier", "type": "string", "default": "free"}]}
INCOMPATIBLE = {**V1, "fields": [*V1["fields"], {"name": "tier", "type": "string"}]}


def _by_id(schema_id: int) -> str:
    return json.dumps({1: V1, 2: V2}[schema_id])


def test_newer_reader_fills_defaults_for_older_writer() -> None:
    payload = AvroCodec.encode({"id": 1, "email": "a@b.c"}, 1, parse_schema(V1))
    decoded = AvroCodec(SchemaCache(_by_id)).decode(payload, reader=V2)
    assert decoded.value == {"id": 1, "email": "a@b.c", "tier": "free"}


def test_older_reader_ignores_newer_writer_fields() -> None:
    payload = AvroCodec.encode({"id": 1, "email": "a@b.c", "tier": "gold"}, 2, parse_schema(V2))
    decoded = AvroCodec(SchemaCache(_by_id)).decode(payload, reader=V1)
    assert decoded.value == {"id": 1, "email": "a@b.c"}


def test_unresolvable_reader_is_its_own_reason() -> None:
    payload = AvroCodec.encode({"id": 1, "email": "a@b.c"}, 1, parse_schema(V1))
    with pytest.raises(DecodeError) as failure:
        AvroCodec(SchemaCache(_by_id)).decode(payload, reader=INCOMPATIBLE)
    assert failure.value.reason is DecodeReason.UNRESOLVABLE
    assert "tier" in failure.value.detail


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_fail_with_a_reason(payload: bytes) -> None:
    codec = AvroCodec(SchemaCache(VALID.fetch, attempts=1, backoff_s=0))
    try:
        codec.decode(payload)
    except DecodeError as failure:
        assert failure.reason in DecodeReason


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=120))
def test_corrupted_bodies_behind_a_valid_header_never_crash(body: bytes) -> None:
    codec = AvroCodec(SchemaCache(VALID.fetch, attempts=1, backoff_s=0))
    try:
        codec.decode(VALID.value[:5] + body)
    except DecodeError as failure:
        assert failure.reason is DecodeReason.CORRUPT


def test_an_id_found_missing_is_not_asked_again_for_a_while() -> None:
    asked: list[int] = []

    def empty_registry(schema_id: int) -> str:
        asked.append(schema_id)
        raise SchemaNotFound(f"no schema {schema_id}")

    cache = SchemaCache(empty_registry, attempts=3, backoff_s=0, missing_ttl_s=60)
    for _ in range(100):  # a flood of messages naming the same bogus id
        with pytest.raises(DecodeError) as caught:
            cache.get(1886349683)
        assert caught.value.reason is DecodeReason.UNKNOWN_SCHEMA
    assert asked == [1886349683] * 3
    expired = SchemaCache(empty_registry, attempts=1, backoff_s=0, missing_ttl_s=0)
    for _ in range(2):
        with pytest.raises(DecodeError):
            expired.get(7)
    assert asked[-2:] == [7, 7]  # after the ttl it is asked again
