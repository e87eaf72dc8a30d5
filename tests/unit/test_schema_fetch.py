"""Writer schemas the registry will not give: bounded retry shared by a batch, a negative
cache with a TTL, and the registry's answers told apart (outage, unknown id, garbage)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaError
from confluent_kafka.schema_registry.common._httpx_compat import httpx as client_httpx
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams.codec import (
    AvroCodec,
    DecodeError,
    DecodeReason,
    RegistryGarbage,
    RegistryUnavailable,
    SchemaCache,
    SchemaNotFound,
    registry_fetcher,
)
from streams.ingest import RawDecoder
from streams.refusal import refusal_of
from tests import vectors

SCHEMA = json.dumps({"type": "record", "name": "R", "fields": [{"name": "a", "type": "long"}]})


class FakeClock:
    """Time that passes only when the cache sleeps or the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class Registry:
    """A fake fetcher: answers per id, recording every question."""

    def __init__(self, answers: dict[int, Any]) -> None:
        self.answers = answers
        self.asked: list[int] = []

    def __call__(self, schema_id: int) -> str:
        self.asked.append(schema_id)
        answer = self.answers.get(schema_id, SchemaNotFound(f"no schema {schema_id}"))
        if callable(answer):
            answer = answer()
        if isinstance(answer, Exception):
            raise answer
        return answer


def _cache(registry: Registry, clock: FakeClock, **kwargs: Any) -> SchemaCache:
    return SchemaCache(registry, sleep=clock.sleep, clock=clock, **kwargs)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (SchemaNotFound("404"), DecodeReason.UNKNOWN_SCHEMA),
        (RegistryGarbage("<html>"), DecodeReason.SCHEMA_UNAVAILABLE),
        ("<html>oops</html>", DecodeReason.SCHEMA_UNPARSEABLE),
        ('{"type": "record", "name": "R", "fields": "nope"}', DecodeReason.SCHEMA_UNPARSEABLE),
    ],
)
def test_a_bad_id_is_asked_a_few_times_then_is_a_decode_error(answer: Any, reason: Any) -> None:
    registry, clock = Registry({9: answer}), FakeClock()
    cache = _cache(registry, clock, attempts=4, backoff_s=0.25)
    with pytest.raises(DecodeError) as caught:
        cache.get(9)
    assert caught.value.reason is reason and caught.value.schema_id == 9
    assert registry.asked == [9] * 4
    assert clock.slept == [0.25, 0.5, 1.0]  # a few tries within a few seconds


def test_a_registry_briefly_broken_costs_no_record() -> None:
    replies = iter([RegistryGarbage("<html>"), "not json", SCHEMA])
    registry, clock = Registry({5: lambda: next(replies)}), FakeClock()
    schema = _cache(registry, clock, attempts=4).get(5)
    assert schema.raw["name"] == "R"
    assert registry.asked == [5, 5, 5]


def test_a_batch_of_distinct_bad_ids_waits_out_the_backoff_once() -> None:
    registry, clock = Registry({1: SCHEMA}), FakeClock()
    cache = _cache(registry, clock, attempts=4, backoff_s=0.25)
    bad = list(range(100, 150))
    failed = cache.prefetch([1, *bad, *bad])
    assert sorted(failed) == bad
    assert all(e.reason is DecodeReason.UNKNOWN_SCHEMA for e in failed.values())
    assert sum(clock.slept) == pytest.approx(1.75)  # once for 50 ids, not 50 times
    assert registry.asked.count(1) == 1 and registry.asked.count(100) == 4
    assert cache.get(1).raw["name"] == "R"


def test_a_failed_id_is_remembered_until_its_ttl_runs_out() -> None:
    registry, clock = Registry({}), FakeClock()
    cache = _cache(registry, clock, attempts=3, backoff_s=0.1, missing_ttl_s=60)
    for _ in range(1000):  # a flood of messages naming the same bogus id
        with pytest.raises(DecodeError) as caught:
            cache.get(77)
        assert caught.value.reason is DecodeReason.UNKNOWN_SCHEMA
        assert "not asked again for 60s" in caught.value.detail
    assert registry.asked == [77] * 3 and len(clock.slept) == 2  # no wait after the first
    clock.now += 60
    registry.answers[77] = SCHEMA  # registered meanwhile
    assert cache.get(77).raw["name"] == "R"
    assert registry.asked == [77] * 4


def test_an_outage_is_neither_retried_here_nor_remembered() -> None:
    registry, clock = Registry({3: RegistryUnavailable("connection refused")}), FakeClock()
    cache = _cache(registry, clock)
    for _ in range(2):
        with pytest.raises(RegistryUnavailable):
            cache.get(3)
    assert registry.asked == [3, 3] and clock.slept == []
    registry.answers[3] = SCHEMA  # the registry is back: nothing was held against the id
    assert cache.get(3).schema_id == 3


def test_the_decoder_prefetches_key_and_value_ids_of_a_batch() -> None:
    vector = vectors.load("crm-c")
    asked: list[int] = []

    def fetch(schema_id: int) -> str:
        asked.append(schema_id)
        return vector.fetch(schema_id)

    decoder = RawDecoder(AvroCodec(SchemaCache(fetch)))
    message = vectors.Message(vector.topic, vector.key, vector.value)
    decoder.prefetch([message, message])
    ids = {int.from_bytes(p[1:5], "big") for p in (vector.key, vector.value)}
    assert sorted(asked) == sorted(ids)
    decoder.decode(message)
    assert sorted(asked) == sorted(ids)  # decoding asked nothing more


# ------------------------------------------------------------ the registry's answers


class Client:
    """A registry client whose schema lookup has `outcome`; `sane`: whether it answers a
    plain question (its compatibility level) sanely."""

    def __init__(self, outcome: Any, sane: bool = True) -> None:
        self.outcome = outcome
        self.sane = sane

    def get_schema(self, _schema_id: int) -> Any:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def get_compatibility(self) -> str:
        if not self.sane:
            raise json.JSONDecodeError("Expecting value", "<html>", 0)
        return "BACKWARD"


class Answer:
    def __init__(self, schema_str: Any) -> None:
        self.schema_str = schema_str


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (SchemaRegistryError(404, 40403, "Schema 9 not found."), SchemaNotFound),
        (SchemaRegistryError(404, -1, "Unknown Schema Registry Error: <html>"), RegistryGarbage),
        (SchemaRegistryError(400, -1, "Unknown Schema Registry Error: <html>"), RegistryGarbage),
        (SchemaRegistryError(503, -1, "Unknown Schema Registry Error"), RegistryUnavailable),
        (SchemaRegistryError(500, 50001, "boom"), RegistryUnavailable),
        (SchemaRegistryError(401, 40101, "unauthorized"), RegistryUnavailable),
        (httpx.ConnectError("connection refused"), RegistryUnavailable),
        (client_httpx.ConnectError("connection refused"), RegistryUnavailable),  # httpx2
        (json.JSONDecodeError("Expecting value", "<html>", 0), RegistryGarbage),  # 200, HTML
        (KeyError("schema"), RegistryGarbage),
        (Answer(None), RegistryGarbage),
    ],
)
def test_the_fetcher_tells_an_outage_from_an_unknown_id_from_garbage(
    outcome: Any, expected: type[Exception]
) -> None:
    with pytest.raises(expected):
        registry_fetcher(Client(outcome))(9)


@pytest.mark.parametrize(
    "outcome",
    [
        SchemaRegistryError(404, -1, "Unknown Schema Registry Error: <html>"),
        json.JSONDecodeError("Expecting value", "<html>", 0),
        Answer(None),
    ],
)
def test_garbage_for_every_question_is_an_outage_not_a_bad_schema(outcome: Any) -> None:
    """A registry behind a misrouted proxy answers HTML to everything: records must wait
    for it (the batch is read again), not be dead-lettered as bad schemas."""
    with pytest.raises(RegistryUnavailable, match="garbage to every request"):
        registry_fetcher(Client(outcome, sane=False))(9)


def test_a_batch_of_bad_ids_probes_the_registry_once() -> None:
    """The sanity probe answers for the registry, not for one id: a batch of 50 ids it
    answers garbage for costs one extra request, not 50."""
    probes: list[str] = []

    class Counting(Client):
        def get_compatibility(self) -> str:
            probes.append("compatibility")
            return super().get_compatibility()

    fetch = registry_fetcher(Counting(Answer(None)))
    for schema_id in range(50):
        with pytest.raises(RegistryGarbage):
            fetch(schema_id)
    assert probes == ["compatibility"]


def test_the_fetcher_returns_the_schema_text() -> None:
    assert registry_fetcher(Client(Answer(SCHEMA)))(9) == SCHEMA


# ------------------------------------------------------------- produce refusals


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), True),
        (KafkaError(KafkaError.INVALID_RECORD), True),
        (KafkaError(KafkaError.RECORD_LIST_TOO_LARGE), True),
        (KafkaError(KafkaError._MSG_TIMED_OUT), False),
        (KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION), False),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), False),
        (KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), False),
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, fatal=True), False),
    ],
)
def test_only_a_refusal_of_the_record_itself_dead_letters_it(
    error: KafkaError, refused: bool
) -> None:
    assert (refusal_of(error) is not None) is refused
