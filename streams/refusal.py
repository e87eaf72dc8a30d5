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

import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

log = logging.getLogger(__name__)

__all__ = [
    "PRODUCE_REFUSED",
    "RECORD_TOO_LARGE",
    "REFUSING_CODES",
    "STATE_TOO_LARGE",
    "Refusal",
    "RefusedWrites",
    "oversize",
    "record_limit",
    "refusal_of",
]

PRODUCE_REFUSED = "produce_refused"  # the broker or librdkafka refused the record itself
# A record batch's header and one record's framing and key: what a topic's
# max.message.bytes must hold besides the record's value.
BATCH_OVERHEAD = 1024

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
    return Refusal(
        reason,
        f"{what} of {size} bytes is above the {max_bytes} bytes the worker writes "
        "(worker.max_record_bytes, or less where the topic's max.message.bytes is)",
    )


def record_limit(kafka: dict[str, Any], topics: list[str], configured: int) -> int:
    """The largest value worth producing to every one of `topics`: `configured`
    (worker.max_record_bytes), or less where a topic's max.message.bytes is lower, so
    that an oversized record is refused before it is sent, alone, and never takes the
    records batched with it down with it. `configured` when the topics cannot be read.
    """
    admin = AdminClient(kafka)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, topic) for topic in topics]
    try:
        futures = admin.describe_configs(resources, request_timeout=10)
        limits = [int(f.result(10)["max.message.bytes"].value) for f in futures.values()]
    except (KafkaException, KeyError, ValueError, TypeError) as exc:
        log.warning("cannot read max.message.bytes of %s (%s): using %d bytes",
                    ", ".join(topics), exc, configured)  # fmt: skip
        return configured
    return min([configured, *(limit - BATCH_OVERHEAD for limit in limits)])


class RefusedWrites:
    """What a table's local store must hold again when a changelog write is refused.

    A refused state never reached the changelog, so the store goes back to the state the
    write was made over, which the changelog holds. The merge does not wait for a write
    before merging the next change of the key, so a later write may already be made
    over the refused state: the store then keeps that one, whose own report decides (if
    written, it carries the refused change's effects; if refused too, the store goes back
    past both, to the last state the changelog holds).
    """

    def __init__(self) -> None:
        # key -> (a refused state a later write was made over, the state before it)
        self._under: dict[bytes, tuple[bytes, bytes | None]] = {}

    def refused(
        self, key: bytes, refused: bytes, before: bytes | None, stored: bytes | None
    ) -> tuple[bool, bytes | None]:
        """`refused` was written over `before`; the store holds `stored` for `key`.
        Returns whether to restore now, and what (None: delete the key)."""
        under = self._under.pop(key, None)
        if under is not None and under[0] == before:
            before = under[1]  # made over a state that was refused itself
        if stored != refused:
            self._under[key] = (refused, before)
            return False, None
        return True, before

    def confirmed(self, key: bytes) -> None:
        """A write of `key` is confirmed: nothing refused lies under what the store holds."""
        if self._under:
            self._under.pop(key, None)

    def __len__(self) -> int:
        return len(self._under)
