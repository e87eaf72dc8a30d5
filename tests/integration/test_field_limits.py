"""A value too big for its field, on the real broker, registry and Redis: the worker's
ingest loop dead-letters that one record (reason field_too_long, its original bytes
kept) and the rows next to it flow on."""

from __future__ import annotations

import io
import json

import pytest
from confluent_kafka.schema_registry import Schema
from fastavro import parse_schema, schemaless_reader

from streams.app import redis_client
from streams.codec import AvroCodec
from streams.dlq import read_dead_letters
from streams.settings import AccordSettings
from tests import vectors
from tests.integration.test_ingest_loop import (
    RawTopics,
    _committed,
    _loop,
    _pipeline,
    _read_all,
    _run_until,
)
from tests.support import isolated

pytestmark = pytest.mark.integration


def _with_display_name(raw: RawTopics, name: str, display_name: str) -> bytes:
    """The captured support vector `name` with another display_name, in the schema
    registered for this test's copy of the support topic."""
    vector = vectors.load(name)
    text = vector.schemas[int.from_bytes(vector.value[1:5], "big")]
    schema = parse_schema(json.loads(text))
    envelope = schemaless_reader(io.BytesIO(vector.value[5:]), schema, schema)
    envelope["after"]["display_name"] = display_name
    topic = raw.by_vector_topic[vector.topic]
    schema_id = raw.registry.register_schema(f"{topic}-value", Schema(text, "AVRO"))
    return AvroCodec.encode(envelope, schema_id, schema)


def test_a_400_kb_display_name_is_dead_lettered_and_its_neighbours_flow(
    stack: AccordSettings,
) -> None:
    settings = isolated(stack)
    raw = RawTopics(settings)
    support = raw.by_vector_topic[vectors.load("support-c").topic]
    huge = _with_display_name(raw, "support-c", "Zq" + "x" * 399_998)
    raw.write("support-c")  # an ordinary user before it...
    raw.write("support-c", value=huge)
    raw.write("support-u")  # ...and after it, on the same partition
    raw.write("crm-c")
    raw.write("billing-c")
    ends = raw.ends()

    loop = _loop(settings, raw, _pipeline(settings, raw, redis_client(settings)))
    try:
        _run_until(loop, lambda: _committed(settings, raw) == ends)
    finally:
        loop.close()

    changes = _read_all(settings, settings.topics.changes)
    assert len(changes) == 4  # support-c, support-u, crm-c, billing-c: only the huge one stops
    assert max(len(m.value()) for m in changes) < 2_000

    letters = read_dead_letters(settings, topic=support)
    assert len(letters) == 1
    letter = letters[0].letter
    assert (letter["reason"], letter["stage"]) == ("field_too_long", "map")
    assert (letter["partition"], letter["offset"]) == (0, 1)  # the second message
    assert letter["value"] == huge  # the original bytes, for `accord dlq replay` after a fix
    assert letter["detail"] == (
        "support record rejected: [first_name] field_too_long: first_name (from column "
        "display_name) is 400,000 characters; the limit is 4,096 (the default cap of 4,096: "
        "no target column bounds it); on_too_long: truncate in the mapping would keep the "
        "record, cut to the limit"
    )
