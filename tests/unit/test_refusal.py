"""Which produce errors refuse one record, and what the store holds after a refusal."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from confluent_kafka import KafkaError, KafkaException

from streams.refusal import (
    PRODUCE_REFUSED,
    STATE_TOO_LARGE,
    RefusedWrites,
    oversize,
    refusal_of,
)


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_TIMESTAMP,
    ],
)
def test_an_error_about_one_record_is_a_refusal_of_it(code: int) -> None:
    refusal = refusal_of(KafkaError(code))
    assert refusal is not None and refusal.reason == PRODUCE_REFUSED
    assert KafkaError(code).name() in refusal.detail
    assert refusal_of(KafkaException(KafkaError(code))) == refusal  # as produce() raises it


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError._FENCED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    ],
)
def test_errors_of_the_producer_or_cluster_are_not_refusals(code: int) -> None:
    assert refusal_of(KafkaError(code)) is None
    assert refusal_of(KafkaException(KafkaError(code))) is None


def test_a_fatal_producer_error_is_never_one_records_fault() -> None:
    assert refusal_of(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, fatal=True)) is None


def test_aiokafka_errors_are_classified_by_their_kafka_code() -> None:
    assert refusal_of(MessageSizeTooLargeError("too big")) is not None
    assert refusal_of(KafkaConnectionError("gone")) is None
    assert refusal_of(RuntimeError("cancelled")) is None
    assert refusal_of(None) is None


def test_a_state_above_the_limit_is_refused_before_producing() -> None:
    assert oversize(900_000, 900_000) is None
    refusal = oversize(900_001, 900_000)
    assert refusal is not None and refusal.reason == STATE_TOO_LARGE
    assert "900001" in refusal.detail and "worker.max_record_bytes" in refusal.detail


def test_a_refused_write_restores_the_state_it_was_made_over() -> None:
    writes = RefusedWrites()
    assert writes.refused(b"k", b"big", b"before", stored=b"big") == (True, b"before")
    assert writes.refused(b"n", b"big", None, stored=b"big") == (True, None)  # a new key
    assert len(writes) == 0


def test_a_later_write_over_a_refused_one_decides_and_falls_back_past_both() -> None:
    writes = RefusedWrites()
    # W1 (s1 over s0) is refused while W2 (s2 over s1) is in flight: keep s2 for now.
    assert writes.refused(b"k", b"s1", b"s0", stored=b"s2") == (False, None)
    # W2 is refused too: the store goes back to s0, the last state the changelog holds.
    assert writes.refused(b"k", b"s2", b"s1", stored=b"s2") == (True, b"s0")
    assert len(writes) == 0


def test_a_confirmed_later_write_ends_the_fallback() -> None:
    writes = RefusedWrites()
    writes.refused(b"k", b"s1", b"s0", stored=b"s2")
    writes.confirmed(b"k")  # s2 is on the changelog, with s1's change in it
    # A later refusal of s3 over s2 goes back to s2, not to s0.
    assert writes.refused(b"k", b"s3", b"s2", stored=b"s3") == (True, b"s2")
