"""Confluent wire-format Avro: decode by the writer's schema id, encode with a registered id.

Wire format: magic byte 0, a 4-byte big-endian schema id, then Avro binary. Writer
schemas are fetched from the registry once and kept parsed; decoding resolves to a
reader schema when one is given. Every way a payload can fail has a named reason, so a
consumer can dead-letter it and go on.
"""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")  # magic byte, schema id


class DecodeReason(StrEnum):
    """Why a payload could not be decoded; the `reason` of its dead letter."""

    TOO_SHORT = "payload_too_short"
    BAD_MAGIC = "bad_magic_byte"
    UNKNOWN_SCHEMA = "unknown_schema_id"
    CORRUPT = "corrupt_avro"
    UNRESOLVABLE = "schema_not_resolvable"


class DecodeError(Exception):
    """A payload that will never decode, whatever we retry: it belongs in the DLQ."""

    def __init__(self, reason: DecodeReason, detail: str, schema_id: int | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.schema_id = schema_id


class RegistryUnavailable(Exception):
    """The registry could not be asked. Transient: retry, never dead-letter."""


class SchemaNotFound(Exception):
    """The registry answered that no schema has this id."""


@dataclass(frozen=True)
class WriterSchema:
    schema_id: int
    raw: dict[str, Any]  # as registered, with every extra attribute (connect.name, ...)
    parsed: Any  # fastavro's parsed form


SchemaFetcher = Callable[[int], str]


class SchemaCache:
    """Writer schemas by id, each fetched once.

    An unknown id is asked again a few times with backoff, because a registry can lag
    behind the producer that just registered it; after that it is a decode error, and the
    id is remembered as missing for `missing_ttl_s`, so that a flood of messages with the
    same bogus id is dead-lettered at full speed instead of waiting out the backoff each.
    """

    def __init__(
        self,
        fetch: SchemaFetcher,
        attempts: int = 4,
        backoff_s: float = 0.25,
        missing_ttl_s: float = 60.0,
    ) -> None:
        self._fetch = fetch
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._missing_ttl_s = missing_ttl_s
        self._schemas: dict[int, WriterSchema] = {}
        self._missing: dict[int, float] = {}  # id -> when it was last found missing

    def get(self, schema_id: int) -> WriterSchema:
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        missing_since = self._missing.get(schema_id)
        if missing_since is not None and time.monotonic() - missing_since < self._missing_ttl_s:
            raise DecodeError(
                DecodeReason.UNKNOWN_SCHEMA,
                f"schema id {schema_id} is not in the registry (asked {self._attempts} times "
                f"less than {self._missing_ttl_s:.0f}s ago)",
                schema_id,
            )
        for attempt in range(self._attempts):
            try:
                text = self._fetch(schema_id)
                break
            except SchemaNotFound:
                if attempt + 1 == self._attempts:
                    if len(self._missing) > 10_000:  # bounded: forget the oldest
                        self._missing.pop(next(iter(self._missing)))
                    self._missing[schema_id] = time.monotonic()
                    raise DecodeError(
                        DecodeReason.UNKNOWN_SCHEMA,
                        f"schema id {schema_id} is not in the registry "
                        f"(asked {self._attempts} times)",
                        schema_id,
                    ) from None
                time.sleep(self._backoff_s * 2**attempt)
        raw = json.loads(text)
        schema = WriterSchema(schema_id, raw, parse_schema(raw))
        self._schemas[schema_id] = schema
        return schema

    def __len__(self) -> int:
        return len(self._schemas)


def registry_fetcher(client: Any) -> SchemaFetcher:
    """Adapt confluent-kafka's SchemaRegistryClient to a `SchemaFetcher`."""
    import httpx
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    def fetch(schema_id: int) -> str:
        try:
            return client.get_schema(schema_id).schema_str
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise SchemaNotFound(str(exc)) from exc
            raise RegistryUnavailable(f"registry error for schema id {schema_id}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"registry unreachable: {exc}") from exc

    return fetch


@dataclass(frozen=True)
class Decoded:
    schema: WriterSchema
    value: Any


def schema_id_of(payload: bytes | None) -> int | None:
    """The schema id in a wire-format header, or None when there is no valid header."""
    if payload is None or len(payload) <= HEADER.size or payload[0] != MAGIC_BYTE:
        return None
    return HEADER.unpack_from(payload)[1]


class AvroCodec:
    """Decode and encode Confluent wire-format Avro with cached, parsed schemas."""

    def __init__(self, schemas: SchemaCache) -> None:
        self.schemas = schemas
        self._readers: dict[str, Any] = {}
        self._readers_by_id: dict[int, tuple[dict[str, Any], Any]] = {}

    def decode(self, payload: bytes, reader: dict[str, Any] | None = None) -> Decoded:
        """Raises DecodeError (dead-letter it) or RegistryUnavailable (retry later)."""
        if len(payload) <= HEADER.size:
            raise DecodeError(
                DecodeReason.TOO_SHORT,
                f"{len(payload)} bytes; a wire-format message has at least {HEADER.size + 1}",
            )
        magic, schema_id = HEADER.unpack_from(payload)
        if magic != MAGIC_BYTE:
            raise DecodeError(DecodeReason.BAD_MAGIC, f"first byte is {payload[0]:#04x}, not 0x00")
        writer = self.schemas.get(schema_id)
        stream = io.BytesIO(payload)
        stream.seek(HEADER.size)
        try:
            value = schemaless_reader(stream, writer.parsed, self._reader(reader))
        except SchemaResolutionError as exc:
            raise DecodeError(DecodeReason.UNRESOLVABLE, str(exc), schema_id) from exc
        except Exception as exc:  # fastavro raises many types on bad bytes
            raise DecodeError(
                DecodeReason.CORRUPT,
                f"{type(exc).__name__}: {exc} (schema id {schema_id})",
                schema_id,
            ) from exc
        if stream.tell() != len(payload):
            raise DecodeError(
                DecodeReason.CORRUPT,
                f"{len(payload) - stream.tell()} bytes left over after the record "
                f"(schema id {schema_id})",
                schema_id,
            )
        return Decoded(writer, value)

    def _reader(self, reader: dict[str, Any] | None) -> Any:
        if reader is None:
            return None
        # Callers pass the same reader object every time: look it up by identity first,
        # since serializing it for the key cost more than decoding the message.
        known = self._readers_by_id.get(id(reader))
        if known is not None and known[0] is reader:
            return known[1]
        key = json.dumps(reader, sort_keys=True)
        if key not in self._readers:
            self._readers[key] = parse_schema(reader)
        self._readers_by_id[id(reader)] = (reader, self._readers[key])
        return self._readers[key]

    @staticmethod
    def encode(value: Any, schema_id: int, parsed_schema: Any) -> bytes:
        out = io.BytesIO()
        out.write(HEADER.pack(MAGIC_BYTE, schema_id))
        schemaless_writer(out, parsed_schema, value)
        return out.getvalue()
