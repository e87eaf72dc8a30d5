"""Canonical Avro records as a Faust codec, so agents receive and send plain records.

    codec = canonical_codec(settings, registry, "dev.accord.CustomerChange", "accord.changes")
    topic = app.topic("accord.changes", value_serializer=codec)

Raw Debezium topics are consumed as bytes and decoded by `streams.ingest.RawDecoder`
instead: a codec cannot dead-letter what it fails to decode.
"""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro import parse_schema
from faust.serializers.codecs import Codec

from streams.codec import AvroCodec, SchemaCache, registry_fetcher, schema_id_of
from streams.schemas import load_local
from streams.settings import AccordSettings


class AvroRecordCodec(Codec):
    """Encodes with one registered schema; decodes by whatever schema id wrote it."""

    def __init__(self, codec: AvroCodec, schema_id: int, schema: dict[str, Any]) -> None:
        super().__init__()
        self.codec = codec
        self.schema_id = schema_id
        self.schema = schema
        self._parsed = parse_schema(schema)

    def _dumps(self, obj: Any) -> bytes:
        return AvroCodec.encode(obj, self.schema_id, self._parsed)

    def _loads(self, s: bytes) -> Any:
        # Written with our own schema (the usual case): nothing to resolve, and fastavro
        # reads a third faster without a reader schema.
        reader = None if schema_id_of(s) == self.schema_id else self.schema
        return self.codec.decode(s, reader).value  # resolved to the schema we know


def canonical_codec(
    settings: AccordSettings, registry: SchemaRegistryClient, full_name: str, topic: str
) -> AvroRecordCodec:
    schema = load_local(settings.schemas.directory, full_name)
    subject = f"{topic}-value"
    if settings.schemas.auto_register:
        schema_id = registry.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
    else:
        schema_id = registry.get_latest_version(subject).schema_id
    return AvroRecordCodec(AvroCodec(SchemaCache(registry_fetcher(registry))), schema_id, schema)
