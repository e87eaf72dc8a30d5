"""RawDecoder on captured bytes. `Message` stands in for a Kafka message: plain data."""

import pytest

from streams.codec import AvroCodec, DecodeReason, SchemaCache
from streams.debezium import SourceChange
from streams.dlq import DeadLetter
from streams.ingest import NOT_AN_ENVELOPE, RawDecoder
from tests import vectors

Message = vectors.Message


def _decoder(vector: vectors.Vector) -> RawDecoder:
    return RawDecoder(AvroCodec(SchemaCache(vector.fetch, backoff_s=0)))


def test_a_valid_message_becomes_a_source_change() -> None:
    vector = vectors.load("billing-u")
    change = _decoder(vector).decode(Message(vector.topic, vector.key, vector.value))
    assert isinstance(change, SourceChange) and change.op == "u"


def test_a_tombstone_is_skipped() -> None:
    vector = vectors.load("crm-tombstone")
    assert _decoder(vector).decode(Message(vector.topic, vector.key, None)) is None


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda v: v[:3], DecodeReason.TOO_SHORT.value),
        (lambda v: b"\x07" + v[1:], DecodeReason.BAD_MAGIC.value),
        (lambda v: v[: len(v) - 9], DecodeReason.CORRUPT.value),
    ],
)
def test_a_refused_message_keeps_its_original_bytes(mangle, reason: str) -> None:
    vector = vectors.load("crm-c")
    bad = mangle(vector.value)
    letter = _decoder(vector).decode(Message(vector.topic, vector.key, bad))
    assert isinstance(letter, DeadLetter)
    assert (letter.value, letter.key) == (bad, vector.key)
    assert (letter.topic, letter.partition, letter.offset) == (vector.topic, 2, 41)
    assert letter.reason == reason and letter.stage == "decode" and letter.detail


def test_a_valid_avro_record_that_is_no_envelope_is_dead_lettered() -> None:
    vector = vectors.load("crm-c")
    key_only = vector.key  # a Debezium key is valid Avro, but not an envelope
    letter = _decoder(vector).decode(Message(vector.topic, vector.key, key_only))
    assert isinstance(letter, DeadLetter) and letter.reason == NOT_AN_ENVELOPE
