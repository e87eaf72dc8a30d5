"""Poison at ingest on the real broker, registry and Redis: a raw record whose writer
schema the registry will not give (an unknown id, an HTML page with status 200, a schema
that does not parse) and one whose change the broker refuses are dead-lettered with
their original bytes; the records around them are processed and the batch committed. A
registry that cannot be reached still pauses the batch, dead-lettering nothing. A row
whose schema dropped a mapped column is synced, and the column reported."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from prometheus_client import REGISTRY

from streams.app import redis_client
from streams.codec import AvroCodec, SchemaCache, registry_fetcher
from streams.dedupe import Deduplicator
from streams.identity import IdentityResolver
from streams.ingest import IngestPipeline, RawDecoder
from streams.mapping import Mapper
from streams.missing_columns import (
    MissingColumns,
    MissingColumnSignal,
    missing_columns,
    read_missing_columns,
)
from streams.refusal import PRODUCE_REFUSED
from streams.registry import registry_codec
from streams.rules import load_rules
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests import vectors
from tests.integration.test_ingest_loop import (
    CREATES,
    RawTopics,
    _committed,
    _loop,
    _read_all,
    _run_until,
)
from tests.support import HTML_PAGE, RegistryProxy, Reply, free_port, isolated

pytestmark = pytest.mark.integration

GARBAGE_ID = 1_900_000_001  # the registry answers an HTML page with status 200
UNPARSEABLE_ID = 1_900_000_002  # the registry answers JSON whose schema is not Avro
UNKNOWN_IDS = [1_800_000_000 + i for i in range(20)]  # the registry answers 404


class Registry(RegistryProxy):
    """The real registry, but HTML for `GARBAGE_ID` and a schema that is not Avro for
    `UNPARSEABLE_ID`."""

    def answer(self, method: str, path: str) -> Reply | None:
        if f"/schemas/ids/{GARBAGE_ID}" in path:
            return HTML_PAGE
        if f"/schemas/ids/{UNPARSEABLE_ID}" in path:
            return (
                200,
                "application/json",
                json.dumps({"schema": '{"type": "record", "name": 1}'}).encode(),
            )
        return None


@pytest.fixture
def registry(stack: AccordSettings) -> Iterator[Registry]:
    proxy = Registry(stack.registry)
    yield proxy
    proxy.close()


def _pipeline(
    settings: AccordSettings, raw: RawTopics, client: SchemaRegistryClient, sleeps: list[float]
) -> IngestPipeline:
    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    store = redis_client(settings)
    worker = settings.worker
    return IngestPipeline(
        RawDecoder(AvroCodec(SchemaCache(registry_fetcher(client), sleep=sleep))),
        Mapper(raw.mappings),
        Deduplicator(store, worker.redis_prefix, worker.dedupe_ttl_s),
        IdentityResolver(
            store,
            worker.redis_prefix,
            load_rules(worker.rules_file).match,
            key_secret=settings.match_key_secret(),
        ),
    )


def _letters(settings: AccordSettings, raw: RawTopics) -> list[dict[str, Any]]:
    codec = registry_codec(settings)
    return [
        codec.decode(m.value()).value
        for m in _read_all(settings, settings.topics.dlq)
        if raw.prefix.encode() in m.key()
    ]


def _with_schema_id(schema_id: int) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + b"\x02\x04body"


def test_records_whose_schema_the_registry_will_not_give_are_dead_lettered(
    stack: AccordSettings, registry: Registry
) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)
    bad = [*UNKNOWN_IDS, GARBAGE_ID, UNPARSEABLE_ID]
    raw.write(CREATES[0])
    for schema_id in bad:
        raw.write("crm-u", value=_with_schema_id(schema_id))
    raw.write(CREATES[1])
    for schema_id in bad:  # each bad id a second time: not asked again
        raw.write("crm-u", value=_with_schema_id(schema_id))
    raw.write(CREATES[2])
    ends = raw.ends()

    sleeps: list[float] = []
    client = SchemaRegistryClient({"url": registry.url, "timeout": 10})
    loop = _loop(settings, raw, _pipeline(settings, raw, client, sleeps))
    try:
        _run_until(loop, lambda: _committed(settings, raw) == ends)
    finally:
        loop.close()

    assert len(_read_all(settings, settings.topics.changes)) == len(CREATES)
    letters = _letters(settings, raw)
    reasons = Counter(letter["reason"] for letter in letters)
    assert reasons == {
        "unknown_schema_id": 2 * len(UNKNOWN_IDS),
        "schema_unavailable": 2,
        "schema_unparseable": 2,
    }
    assert {letter["value"] for letter in letters} == {_with_schema_id(i) for i in bad}
    assert {letter["schema_id"] for letter in letters} == set(bad)
    # Each bad id was asked a bounded number of times, not once per record, and the
    # backoff was waited out once per batch, not once per id.
    attempts = settings.schemas.fetch_attempts
    assert all(1 <= registry.asked[i] <= attempts for i in bad)
    assert len(sleeps) <= (attempts - 1) * 2  # the records came in one or two batches
    assert len(sleeps) < len(bad)


def test_an_unreachable_registry_pauses_the_batch_and_dead_letters_nothing(
    stack: AccordSettings, registry: Registry
) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)
    for name in CREATES:
        raw.write(name)
    ends = raw.ends()

    nowhere = SchemaRegistryClient(
        {"url": f"http://127.0.0.1:{free_port()}", "timeout": 2, "max.retries": 0}
    )
    loop = _loop(settings, raw, _pipeline(settings, raw, nowhere, []))
    stop = threading.Event()
    try:
        assert wait_until(lambda: loop.step(stop) == 0 and loop.backoff_s >= 0.5, 60, 0)
        assert _committed(settings, raw) == {t: -1001 for t in ends}  # nothing committed
        back = SchemaRegistryClient({"url": registry.url, "timeout": 10})
        loop.pipeline = _pipeline(settings, raw, back, [])  # the registry is back
        _run_until(loop, lambda: _committed(settings, raw) == ends)
    finally:
        loop.close()
    assert len(_read_all(settings, settings.topics.changes)) == len(CREATES)
    assert _letters(settings, raw) == []


def _oversized(raw: RawTopics, name: str, name_bytes: int) -> bytes:
    """The captured create `name` with long names (within the mapping's length limits,
    over the changes topic's record limit), framed with the id of its schema registered
    under the test's topic."""
    vector = vectors.load(name)
    text = vector.fetch(int.from_bytes(vector.value[1:5], "big"))
    topic = raw.by_vector_topic[vector.topic]
    schema_id = raw.registry.register_schema(f"{topic}-value", Schema(text, "AVRO"))
    schema = parse_schema(json.loads(text))
    value = schemaless_reader(io.BytesIO(vector.value[5:]), schema, None)
    half = name_bytes // 2
    value["after"]["first_name"] = "Ada" + "x" * half
    value["after"]["last_name"] = "Lovelace" + "x" * half
    out = io.BytesIO(b"\x00" + struct.pack(">I", schema_id))
    out.seek(0, io.SEEK_END)
    schemaless_writer(out, schema, value)
    return out.getvalue()


def test_a_change_the_broker_refuses_dead_letters_its_raw_record_and_the_batch_goes_on(
    stack: AccordSettings,
) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)  # creates the test's accord.changes too
    admin = AdminClient(settings.kafka_config())
    limit = ConfigResource(
        ConfigResource.Type.TOPIC,
        settings.topics.changes,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "4000", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([limit]).values():
        future.result(30)

    raw.write("billing-c")
    big = _oversized(raw, "crm-c", 8000)  # its change is over the changes topic's limit
    raw.write("crm-c", value=big)
    raw.write("support-c")
    ends = raw.ends()

    loop = _loop(settings, raw, _pipeline(settings, raw, raw.registry, []))
    try:
        _run_until(loop, lambda: _committed(settings, raw) == ends)
    finally:
        loop.close()

    changes = _read_all(settings, settings.topics.changes)
    assert len(changes) == 2  # billing's and support's, sent again alone if refused with it
    letters = _letters(settings, raw)
    assert [letter["reason"] for letter in letters] == [PRODUCE_REFUSED]
    letter = letters[0]
    assert letter["value"] == big and letter["stage"] == "ingest"
    assert letter["topic"] == raw.by_vector_topic["crm.public.customers"]
    assert "MSG_SIZE_TOO_LARGE" in letter["detail"]


def test_a_mapped_column_the_source_schema_dropped_is_reported_and_the_row_synced(
    stack: AccordSettings,
) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)
    vector = vectors.load("crm-c")
    schema = json.loads(vector.fetch(int.from_bytes(vector.value[1:5], "big")))
    value = schemaless_reader(io.BytesIO(vector.value[5:]), parse_schema(schema), None)
    row_schema = schema["fields"][0]["type"][1]  # `before`'s type defines the row record
    row_schema["fields"] = [f for f in row_schema["fields"] if f["name"] != "company"]
    del value["after"]["company"]
    topic = raw.by_vector_topic[vector.topic]
    # A subject of its own: the evolved schema is registered whatever the compatibility.
    schema_id = raw.registry.register_schema(
        f"{topic}-evolved-value", Schema(json.dumps(schema), "AVRO")
    )
    out = io.BytesIO(b"\x00" + struct.pack(">I", schema_id))
    out.seek(0, io.SEEK_END)
    schemaless_writer(out, parse_schema(schema), value)
    raw.write("billing-c")
    raw.write("crm-c", value=out.getvalue())
    raw.write("support-c")
    ends = raw.ends()

    pipeline = _pipeline(settings, raw, raw.registry, [])
    store, prefix = redis_client(settings), settings.worker.redis_prefix
    pipeline.mapper = Mapper(raw.mappings, MissingColumns(MissingColumnSignal(store, prefix)))
    loop = _loop(settings, raw, pipeline)
    try:
        _run_until(loop, lambda: _committed(settings, raw) == ends)
    finally:
        loop.close()

    assert len(_read_all(settings, settings.topics.changes)) == 3  # synced, not dead-lettered
    assert _letters(settings, raw) == []
    labels = {"system": "crm", "column": "company"}
    assert REGISTRY.get_sample_value("accord_mapping_missing_columns", labels) == 1
    assert labels in missing_columns()
    # What `accord monitor`, a process of its own, reads.
    assert [(m.system, m.column) for m in read_missing_columns(store, prefix)] == [
        ("crm", "company")
    ]
