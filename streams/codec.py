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
from collections.abc import Callable, Iterable
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
    SCHEMA_UNAVAILABLE = "schema_unavailable"  # the registry answered, not with a schema
    SCHEMA_UNPARSEABLE = "schema_unparseable"  # the schema text is not a valid Avro schema
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


class RegistryGarbage(Exception):
    """The registry answered, but not with a schema: an HTML page with status 200, a
    reply that is not JSON, an unexpected client error."""


@dataclass(frozen=True)
class WriterSchema:
    schema_id: int
    raw: dict[str, Any]  # as registered, with every extra attribute (connect.name, ...)
    parsed: Any  # fastavro's parsed form


SchemaFetcher = Callable[[int], str]

MAX_REMEMBERED_FAILURES = 10_000
SANE_REGISTRY_TRUSTED_S = 5.0  # how long a sane answer to the probe below is trusted


class SchemaCache:
    """Writer schemas by id, each fetched and parsed once.

    An id the registry does not know (404), answers garbage for, or whose schema does
    not parse is asked again a few times with backoff (`attempts`, waits of `backoff_s`
    doubling), because a registry can lag behind the producer that just registered an id
    or be briefly broken. After that it is a `DecodeError` (dead-letter the message), and
    the id is remembered as failed for `missing_ttl_s`: more messages with it are
    dead-lettered at once. `prefetch` asks for every id of a batch together, so a batch
    with many bad ids waits out the backoff once, not once per id. `RegistryUnavailable`
    (the registry cannot be reached) is never retried here nor remembered: the caller
    retries the whole batch later.
    """

    def __init__(
        self,
        fetch: SchemaFetcher,
        attempts: int = 4,
        backoff_s: float = 0.25,
        missing_ttl_s: float = 60.0,
        *,
        sleep: Callable[[float], Any] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._missing_ttl_s = missing_ttl_s
        self._sleep = sleep
        self._clock = clock
        self._schemas: dict[int, WriterSchema] = {}
        self._failed: dict[int, tuple[float, DecodeError]] = {}  # id -> (when, why)

    def get(self, schema_id: int) -> WriterSchema:
        """The writer schema; raises DecodeError or RegistryUnavailable."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        failed = self.prefetch((schema_id,))
        if schema_id in failed:
            raise failed[schema_id]
        return self._schemas[schema_id]

    def prefetch(self, schema_ids: Iterable[int]) -> dict[int, DecodeError]:
        """Fetch every id not known yet, retrying the failing ones together.

        Returns the ids that failed, with why (a remembered failure included); every
        other id is cached. Raises RegistryUnavailable when the registry cannot be reached.
        """
        remembered: dict[int, DecodeError] = {}
        pending: list[int] = []
        for schema_id in dict.fromkeys(schema_ids):
            if schema_id in self._schemas:
                continue
            error = self._remembered(schema_id)
            if error is not None:
                remembered[schema_id] = error
            else:
                pending.append(schema_id)
        failures: dict[int, DecodeError] = {}
        for attempt in range(self._attempts):
            if not pending:
                break
            if attempt:
                self._sleep(self._backoff_s * 2 ** (attempt - 1))
            failures = {}
            for schema_id in pending:
                try:
                    self._schemas[schema_id] = self._load(schema_id)
                except DecodeError as exc:
                    failures[schema_id] = exc
            pending = list(failures)
        for schema_id, error in failures.items():
            remembered[schema_id] = self._remember(schema_id, error)
        return remembered

    def _load(self, schema_id: int) -> WriterSchema:
        try:
            text = self._fetch(schema_id)
        except SchemaNotFound as exc:
            raise DecodeError(
                DecodeReason.UNKNOWN_SCHEMA,
                f"schema id {schema_id} is not in the registry ({exc})",
                schema_id,
            ) from exc
        except RegistryGarbage as exc:
            raise DecodeError(
                DecodeReason.SCHEMA_UNAVAILABLE,
                f"the registry answered no schema for id {schema_id}: {exc}",
                schema_id,
            ) from exc
        try:
            raw = json.loads(text)
            return WriterSchema(schema_id, raw, parse_schema(raw))
        except Exception as exc:  # json and fastavro raise many types on a bad schema
            raise DecodeError(
                DecodeReason.SCHEMA_UNPARSEABLE,
                f"schema id {schema_id} does not parse: {type(exc).__name__}: {exc}",
                schema_id,
            ) from exc

    def _remembered(self, schema_id: int) -> DecodeError | None:
        failed = self._failed.get(schema_id)
        if failed is None:
            return None
        when, error = failed
        if self._clock() - when >= self._missing_ttl_s:
            del self._failed[schema_id]
            return None
        # A fresh exception each time: one raised again and again would grow its traceback.
        return DecodeError(error.reason, error.detail, schema_id)

    def _remember(self, schema_id: int, error: DecodeError) -> DecodeError:
        if len(self._failed) >= MAX_REMEMBERED_FAILURES:  # bounded: forget the oldest
            self._failed.pop(next(iter(self._failed)))
        detail = (
            f"{error.detail} (asked {self._attempts} times; not asked again for "
            f"{self._missing_ttl_s:g}s)"
        )
        self._failed[schema_id] = (self._clock(), DecodeError(error.reason, detail, schema_id))
        return DecodeError(error.reason, detail, schema_id)

    def __len__(self) -> int:
        return len(self._schemas)


def registry_fetcher(client: Any) -> SchemaFetcher:
    """Adapt confluent-kafka's SchemaRegistryClient to a `SchemaFetcher`.

    Unreachable, a server error (5xx), refused credentials or rate limiting is
    `RegistryUnavailable` (an outage: retry the batch); a 404 in the registry's own
    error format is `SchemaNotFound`; any other answer is `RegistryGarbage`, unless the
    registry answers garbage to a plain question too (its global compatibility level):
    a registry behind a misrouted proxy or a captive portal is down, not a source of bad
    schemas, so that is `RegistryUnavailable` as well and no record is dead-lettered for it.
    """
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    transport_errors = _http_errors()

    def fetch(schema_id: int) -> str:
        try:
            text = client.get_schema(schema_id).schema_str
        except SchemaRegistryError as exc:
            status = exc.http_status_code
            if status >= 500 or status in (401, 403, 408, 429):
                raise RegistryUnavailable(
                    f"registry error for schema id {schema_id}: {exc}"
                ) from exc
            if status == 404 and exc.error_code != -1:  # -1: the body was not the registry's
                raise SchemaNotFound(str(exc)) from exc
            garbage = RegistryGarbage(f"status {status}: {str(exc)[:300]}")
        except transport_errors as exc:
            raise RegistryUnavailable(f"registry unreachable: {exc}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # 2xx, not a schema
            garbage = RegistryGarbage(f"{type(exc).__name__}: {str(exc)[:300]}")
        else:
            if isinstance(text, str):
                return text
            garbage = RegistryGarbage(f"the reply holds no schema text ({type(text).__name__})")
        if not answers_sanely():
            raise RegistryUnavailable(
                f"the registry answers garbage to every request, not only for schema id "
                f"{schema_id} ({garbage}); treated as an outage"
            )
        raise garbage

    sane_until = 0.0  # a sane answer stands for a while: a batch of bad ids asks once

    def answers_sanely() -> bool:
        nonlocal sane_until
        if time.monotonic() < sane_until:
            return True
        try:
            sane = isinstance(client.get_compatibility(), str)
        except Exception:
            return False
        if sane:
            sane_until = time.monotonic() + SANE_REGISTRY_TRUSTED_S
        return sane

    return fetch


def _http_errors() -> tuple[type[Exception], ...]:
    """The transport errors of the HTTP client the registry client uses: confluent-kafka
    prefers httpx2 when it is installed and falls back to httpx."""
    import httpx

    errors: list[type[Exception]] = [httpx.HTTPError]
    try:
        from confluent_kafka.schema_registry.common._httpx_compat import httpx as client_http
    except ImportError:  # an older confluent-kafka: plain httpx
        return tuple(errors)
    errors.append(client_http.HTTPError)
    return tuple(dict.fromkeys(errors))


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
