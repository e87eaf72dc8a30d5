"""Produce errors that refuse one record, as opposed to errors of the producer or cluster.

A record the broker (or librdkafka, before sending it) will never take, because it is
too large or invalid, is poison: producing it again fails the same way, and a worker
that crashes on it replays into the same crash after its restart. Such a record goes to
the DLQ with the reason below and its stage goes on. Every other produce error (a fatal
producer, a lost connection, a timeout, a missing permission) is about the producer or
the cluster, not the record: each stage keeps its own handling of those (retry, or stop
with the input uncommitted).
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException

__all__ = [
    "PRODUCE_REFUSED",
    "RECORD_TOO_LARGE",
    "REFUSING_CODES",
    "STATE_TOO_LARGE",
    "Refusal",
    "oversize",
    "refusal_of",
]

PRODUCE_REFUSED = "produce_refused"  # the broker or librdkafka refused the record itself
STATE_TOO_LARGE = "state_too_large"  # a golden state above worker.max_record_bytes
RECORD_TOO_LARGE = "record_too_large"  # an output record above worker.max_record_bytes

# Kafka's error codes that are about one record (the same numbers in librdkafka, which
# also raises MSG_SIZE_TOO_LARGE itself for a record above its message.max.bytes, and in
# aiokafka's `errno`).
REFUSING_CODES = frozenset(
    {
        KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.INVALID_RECORD,
    }
)


@dataclass(frozen=True)
class Refusal:
    """Why a record was refused: a dead letter's reason and detail."""

    reason: str
    detail: str


def refusal_of(error: BaseException | KafkaError | None) -> Refusal | None:
    """The refusal `error` stands for when it refuses only the record it reports on;
    None for any other error (or none), which the caller handles as before.

    Takes a confluent-kafka `KafkaError`, a `KafkaException` holding one, or an aiokafka
    broker error (its `errno`). A fatal producer error is never one record's fault.
    """
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        error = error.args[0]
    if isinstance(error, KafkaError):
        if error.fatal() or error.code() not in REFUSING_CODES:
            return None
        return Refusal(PRODUCE_REFUSED, f"{error.name()}: {error.str()}")
    code = getattr(error, "errno", None)
    if error is not None and code in REFUSING_CODES:
        return Refusal(PRODUCE_REFUSED, f"{type(error).__name__} (Kafka error {code}): {error}")
    return None


def oversize(
    size: int, max_bytes: int, what: str = "golden state", reason: str = STATE_TOO_LARGE
) -> Refusal | None:
    """A refusal, before producing, of a `what` of `size` bytes above `max_bytes`."""
    if size <= max_bytes:
        return None
    return Refusal(reason, f"{what} of {size} bytes is above worker.max_record_bytes ({max_bytes})")
