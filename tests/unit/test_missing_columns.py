"""A mapped source column that the source's schema dropped: the rows still map, and the
absence is reported (gauge, counter, one warning per schema and column, /status)."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from streams.codec import AvroCodec, SchemaCache
from streams.debezium import EnvelopeReader, SourceChange
from streams.mapping import Mapped, Mapper, load_mappings
from streams.missing_columns import (
    FORGET_AFTER_S,
    REFRESH_S,
    MissingColumn,
    MissingColumns,
    MissingColumnSignal,
    missing_columns,
    read_missing_columns,
)
from tests import vectors

CONNECTORS = Path(__file__).resolve().parents[2] / "connectors"


def _vector(name: str) -> SourceChange:
    vector = vectors.load(name)
    codec = AvroCodec(SchemaCache(vector.fetch))
    key, value = codec.decode(vector.key), codec.decode(vector.value)
    return EnvelopeReader().unwrap(vector.topic, key.value, key.schema, value.value, value.schema)


@pytest.fixture
def crm() -> tuple[Mapper, str]:
    """A mapper over the shipped mappings, with crm renamed to a system of this test's own
    (the metrics are process-wide)."""
    system = f"crm-{uuid.uuid4().hex[:6]}"
    mappings = load_mappings(CONNECTORS)
    mappings = {**mappings, "crm": dataclasses.replace(mappings["crm"], system=system)}
    return Mapper(mappings, MissingColumns()), system


def _without(change: SourceChange, column: str) -> SourceChange:
    after = {k: v for k, v in (change.after or {}).items() if k != column}
    return dataclasses.replace(change, after=after)


def _gauge(system: str, column: str) -> float | None:
    return REGISTRY.get_sample_value(
        "accord_mapping_missing_columns", {"system": system, "column": column}
    )


def _rows(system: str, column: str) -> float:
    value = REGISTRY.get_sample_value(
        "accord_mapping_missing_column_rows_total", {"system": system, "column": column}
    )
    return value or 0.0


def test_a_dropped_optional_column_is_reported_and_the_row_still_maps(
    crm: tuple[Mapper, str], caplog: pytest.LogCaptureFixture
) -> None:
    mapper, system = crm
    created = _vector("crm-c")
    caplog.set_level(logging.WARNING, logger="streams.missing_columns")
    for _ in range(50):
        outcome = mapper.map(_without(created, "company"))
        assert isinstance(outcome, Mapped)  # not dead-lettered
        assert "company" not in outcome.change.values
        assert outcome.change.values["first_name"] == "Ada"  # the other fields keep syncing
    assert _gauge(system, "company") == 1
    assert _rows(system, "company") == 50
    assert {"system": system, "column": "company"} in missing_columns()
    warnings = [r for r in caplog.records if "'company'" in r.getMessage()]
    assert len(warnings) == 1 and system in warnings[0].getMessage()

    assert isinstance(mapper.map(created), Mapped)  # the column is back
    assert _gauge(system, "company") == 0
    assert {"system": system, "column": "company"} not in missing_columns()
    assert _rows(system, "company") == 50


def test_a_delete_or_a_mapper_without_a_tracker_reports_nothing(crm: tuple[Mapper, str]) -> None:
    mapper, system = crm
    deleted = _vector("crm-d")
    assert isinstance(mapper.map(deleted), Mapped)  # its before image may hold only the key
    assert _gauge(system, "company") is None
    untracked = Mapper(mapper.mappings)
    assert isinstance(untracked.map(_without(_vector("crm-c"), "company")), Mapped)
    assert _gauge(system, "company") is None and _rows(system, "company") == 0


def test_a_schema_flapping_back_and_forth_warns_once_per_schema(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = MissingColumns()
    system = f"s-{uuid.uuid4().hex[:6]}"
    caplog.set_level(logging.WARNING, logger="streams.missing_columns")
    for _ in range(10):
        tracker.observe(system, "t", ["a", "b"], {"a": 1})  # old schema without b
        tracker.observe(system, "t", ["a", "b"], {"a": 1, "b": 2})
    assert len(caplog.records) == 1
    assert _gauge(system, "b") == 0 and _rows(system, "b") == 10
    tracker.observe(system, "t", ["a", "b"], {"a": 1, "c": 3})  # another schema without b
    assert len(caplog.records) == 2 and _gauge(system, "b") == 1


class FakeHash:
    """The two hash commands the signal uses, on a dict."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.writes = 0

    def hset(self, key: str, field: str, value: str) -> None:
        self.writes += 1
        self.hashes.setdefault(key, {})[field] = value

    def hdel(self, key: str, field: str) -> None:
        self.writes += 1
        self.hashes.get(key, {}).pop(field, None)

    def hgetall(self, key: str) -> dict[str, str]:
        return dict(self.hashes.get(key, {}))


def test_a_missing_column_is_published_for_the_monitor_and_withdrawn_when_back() -> None:
    redis, clock = FakeHash(), [1000.0]
    tracker = MissingColumns(MissingColumnSignal(redis, "p:", clock=lambda: clock[0]))
    for _ in range(50):  # many rows without b in one minute: one write
        tracker.observe("crm", "t", ["a", "b"], {"a": 1})
    assert redis.writes == 1
    assert read_missing_columns(redis, "p:", now=clock[0]) == [MissingColumn("crm", "b", 1000.0)]
    clock[0] += REFRESH_S  # still missing a minute on: stamped again
    tracker.observe("crm", "t", ["a", "b"], {"a": 1})
    assert read_missing_columns(redis, "p:", now=clock[0])[0].last_seen == clock[0]
    # A stamp nobody refreshed for FORGET_AFTER_S is a worker gone, not a column missing.
    assert read_missing_columns(redis, "p:", now=clock[0] + FORGET_AFTER_S) == []
    tracker.observe("crm", "t", ["a", "b"], {"a": 1, "b": 2})  # back
    assert read_missing_columns(redis, "p:", now=clock[0]) == []


def test_a_redis_error_does_not_stop_the_mapping(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def hset(self, *_args: object) -> None:
            raise ConnectionError("redis down")

    tracker = MissingColumns(MissingColumnSignal(Broken(), "p:"))
    tracker.observe("crm", "t", ["a", "b"], {"a": 1})
    assert "could not publish the missing column crm:b" in caplog.text
