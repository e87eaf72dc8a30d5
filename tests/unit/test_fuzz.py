"""Fuzzing the codec and the mapping: whatever arrives ends processed or dead-lettered.

An exception that escapes `RawDecoder.decode` or `Mapper.map` would crash the worker (its
agents crash on the unexpected, by design); a mapped change that cannot be encoded for
`accord.changes` would do the same one step later. These properties feed them arbitrary
bytes, mutations of real Debezium messages, and arbitrary rows.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streams.codec import AvroCodec, SchemaCache
from streams.debezium import SourceChange, SourcePosition
from streams.dlq import DeadLetter
from streams.ingest import RawDecoder
from streams.mapping import Mapped, Mapper, Rejected, load_mappings
from streams.schemas import load_local
from tests import vectors

pytestmark = pytest.mark.property
ROOT = Path(__file__).resolve().parents[2]
VECTORS = [vectors.load(name) for name in vectors.names() if not name.endswith("tombstone")]
SCHEMAS: dict[int, str] = {k: v for vector in VECTORS for k, v in vector.schemas.items()}
MAPPER = Mapper(load_mappings(ROOT / "connectors"))
CHANGE_SCHEMA = parse_schema(load_local(ROOT / "schemas", "dev.accord.CustomerChange"))


Message = vectors.Message


def _fetch(schema_id: int) -> str:
    from streams.codec import SchemaNotFound

    if schema_id not in SCHEMAS:
        raise SchemaNotFound(f"no schema {schema_id}")
    return SCHEMAS[schema_id]


DECODER = RawDecoder(AvroCodec(SchemaCache(_fetch, backoff_s=0)))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes | None, bytes]:
    """A real captured message with bytes flipped, cut, inserted or spliced."""
    vector = draw(st.sampled_from(VECTORS))
    value = bytearray(vector.value or b"")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
        position = draw(st.integers(0, max(0, len(value) - 1)))
        if kind == "flip" and value:
            value[position] = draw(st.integers(0, 255))
        elif kind == "cut":
            value = value[:position]
        elif kind == "insert":
            value[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            other = draw(st.sampled_from(VECTORS)).value or b""
            value = value[:position] + other[position:]
    return vector.topic, vector.key, bytes(value)


def outcome_of(topic: str, key: bytes | None, value: bytes) -> str:
    decoded = DECODER.decode(Message(topic, key, value))
    if decoded is None:
        return "tombstone"
    if isinstance(decoded, DeadLetter):
        assert decoded.reason and decoded.value == value  # the original bytes, with a reason
        return "dead"
    assert isinstance(decoded, SourceChange)
    return map_and_encode(decoded)


def map_and_encode(change: SourceChange) -> str:
    mapped = MAPPER.map(change)
    if isinstance(mapped, Rejected):
        assert mapped.reasons
        return "rejected"
    assert isinstance(mapped, Mapped)
    record = mapped.change.with_golden_id("g").to_record()
    schemaless_writer(_Sink(), CHANGE_SCHEMA, record)  # must encode for accord.changes
    return "mapped"


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    topic=st.sampled_from(sorted({v.topic for v in VECTORS})),
    key=st.none() | st.binary(max_size=40),
    value=st.binary(max_size=300),
)
def test_arbitrary_bytes_are_processed_or_dead_lettered(
    topic: str, key: bytes | None, value: bytes
) -> None:
    outcome = outcome_of(topic, key, value)
    event(outcome)
    assert outcome in {"tombstone", "dead", "rejected", "mapped"}


@FUZZ
@given(message=mutated())
def test_mutated_debezium_messages_are_processed_or_dead_lettered(
    message: tuple[str, bytes | None, bytes],
) -> None:
    outcome = outcome_of(*message)
    event(outcome)
    assert outcome in {"tombstone", "dead", "rejected", "mapped"}


# Column values of any type a decoder could hand over, including wrong ones.
ANY_VALUE = (
    st.none()
    | st.text(max_size=40)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.decimals(
        allow_nan=False, allow_infinity=False, places=2, max_value=10**12, min_value=-(10**12)
    )
    | st.binary(max_size=10)
    | st.datetimes(timezones=st.just(dt.UTC))
)
COLUMNS = {
    mapping.topic: sorted(
        {spec.column for spec in mapping.fields.values()}
        | set(mapping.key)
        | ({mapping.commit_time} if mapping.commit_time else set())
    )
    for mapping in load_mappings(ROOT / "connectors").values()
}


@st.composite
def rows(draw: st.DrawFn) -> SourceChange:
    topic = draw(st.sampled_from(sorted(COLUMNS)))
    columns = COLUMNS[topic]
    row = {c: draw(ANY_VALUE) for c in columns if draw(st.booleans())}
    row |= {c: draw(st.text(max_size=12)) for c in draw(st.sets(st.sampled_from(columns)))}
    op = draw(st.sampled_from(["c", "u", "d", "r"]))
    key = {c: row.get(c, draw(st.text(max_size=8))) for c in columns[:1]}
    position = SourcePosition("x", "db", "t", 0, op == "r", lsn=draw(st.integers(0, 2**40)))
    before, after = (row, None) if op == "d" else (None, row)
    return SourceChange(topic, op, key, before, after, position, 0)


@FUZZ
@given(change=rows())
def test_arbitrary_rows_are_mapped_and_encodable_or_rejected_with_reasons(
    change: SourceChange,
) -> None:
    outcome = map_and_encode(change)
    event(outcome)
    assert outcome in {"rejected", "mapped"}


def test_the_fuzzers_reach_every_outcome() -> None:
    """A fuzzer that only ever dead-letters would prove nothing about the mapping."""
    seen = {outcome_of(v.topic, v.key, v.value or b"") for v in VECTORS} | {
        outcome_of(VECTORS[0].topic, None, b"\x00\x00")
    }
    assert {"mapped", "dead"} <= seen
