"""Sink appliers: apply `accord.sink.<target>` events to each target, idempotently.

    accord.sink.<target> --SinkRunner--> SqlApplier (PostgreSQL, MariaDB) | WebhookApplier

Every applier has one interface, `apply(event) -> Outcome`, and the same guarantees:

- Version guard and ledger. An event whose `golden_version` is not newer than the last
  one applied for that golden record is skipped. SQL targets keep the ledger in their
  own database (`accord_applied`), written in the same transaction as the row change, so
  a change and its ledger row commit together or not at all, and applying one version
  twice violates the ledger's primary key. Webhook targets keep it in Redis.
- Only what differs is written. The row is read (`SELECT ... FOR UPDATE`) and only the
  columns whose value differs are updated; when none differs nothing is written, so an
  echo never produces a CDC event of its own and cannot loop.
- Keys of new rows are made before the insert and linked in the xref first, so the
  row's own CDC echo resolves to the same golden record, and a retry makes the same key.
- Transient failures (connection lost, timeouts, deadlocks, HTTP 408/429/5xx) retry the
  same event with exponential backoff and full jitter, reconnecting: indefinitely for SQL,
  up to a deadline for webhooks. Permanent failures (constraint violations, bad data,
  other HTTP 4xx) end as a failed `Outcome` that the runner dead-letters; it goes on.

`SinkRunner` is the Kafka glue: one consumer group per target, events applied in order,
offsets committed after each batch. Options and behaviour: connectors/README.md, "Sinks".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import httpx
import psycopg
import pymysql
import redis
from confluent_kafka import Consumer, KafkaException, Producer
from prometheus_client import Counter, Histogram

from streams import redact
from streams.codec import AvroCodec, DecodeError, RegistryUnavailable, SchemaCache, registry_fetcher
from streams.dedupe import RedisUnavailable, redis_errors
from streams.dlq import DeadLetter, DeadLetterWriter
from streams.errors import AccordError, ConfigError
from streams.identity import IdentityResolver
from streams.mapping import canonical_row, load_mappings
from streams.model import EPOCH
from streams.projection import KeyGeneration, SinkKind, SinkSpec, load_sinks
from streams.registry import registry_client
from streams.schemas import load_local
from streams.settings import AccordSettings
from streams.topics import first_offsets, next_offsets, usable
from streams.topology import sink_group

log = logging.getLogger(__name__)

APPLIED = Counter("accord_sink_applied_total", "Sink events applied", ["target", "op"])
SKIPPED = Counter(
    "accord_sink_skipped_total",
    "Sink events skipped (stale_version, no_row, no_change, delete_disabled, superseded, folded)",
    ["target", "reason"],
)
RETRIES = Counter("accord_sink_retries_total", "Transient sink failures retried", ["target"])
FAILED = Counter("accord_sink_failed_total", "Sink events that failed for good (DLQ)", ["target"])
LATENCY = Histogram(
    "accord_end_to_end_latency_seconds",
    "Source commit to target applied",
    ["target"],
    buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 300),
)

SINK_EVENT_SCHEMA = "dev.accord.SinkEvent"
LEDGER_TABLE = "accord_applied"
# Fixed forever: support rows Accord created carry keys derived from it.
SINK_KEY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:accord:sink-key")
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
WEBHOOK_DEADLINE_S = 300.0


class Status(StrEnum):
    APPLIED = "applied"
    SKIPPED = "skipped"
    FAILED = "failed"


class Action(StrEnum):
    """What an applied event did to its target row; the ledger's `op` column."""

    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    NOOP = "NOOP"  # the row already held every value: nothing written
    SUPERSEDED = "SUPERSEDED"  # the row changed since the event was planned: not written
    ADOPT = "ADOPT"  # a create found its row already there: touched so CDC reports it
    POST = "POST"  # webhook


@dataclass(frozen=True)
class Outcome:
    """What became of one event.

    `reason` says why an event was skipped (stale_version, no_row, no_change,
    delete_disabled) or failed (sink_rejected: permanent; sink_unavailable: a webhook
    still failing at its deadline). `error` is the failure to dead-letter.
    """

    status: Status
    reason: str | None = None
    target_key: str | None = None
    action: Action | None = None
    columns: tuple[str, ...] = ()  # columns written
    error: BaseException | None = None

    @property
    def detail(self) -> str:
        return str(self.error) if self.error is not None else ""


class TransientSinkError(AccordError):
    """Worth retrying: the target may accept the same event later."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentSinkError(AccordError):
    """The target refused the event and will refuse it again: dead-letter it."""


class Interrupted(AccordError):
    """Stopped while retrying; the event was not applied and its offset not committed."""


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class SinkEvent:
    """A decoded dev.accord.SinkEvent, with times as epoch microseconds."""

    event_id: str
    target: str
    op: str
    golden_id: str
    golden_version: int
    fields: Mapping[str, Any]
    changed: tuple[str, ...]
    target_key: str | None = None
    source_ts_us: int | None = None
    emitted_at_us: int | None = None
    expected: Mapping[str, Any] | None = None  # what the row held for the changed fields

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> SinkEvent:
        try:
            op = str(record.get("op") or "UPSERT")
            if op not in ("UPSERT", "DELETE"):
                raise ValueError(f"op must be UPSERT or DELETE, not {op!r}")
            key = record.get("target_key")
            return cls(
                event_id=str(record["event_id"]),
                target=str(record["target"]),
                op=op,
                golden_id=str(record["golden_id"]),
                golden_version=int(record["golden_version"]),
                fields=dict(record.get("fields") or {}),
                changed=tuple(record.get("changed") or ()),
                target_key=None if key is None else str(key),
                source_ts_us=_micros(record.get("source_ts")),
                emitted_at_us=_micros(record.get("emitted_at"), millis_if_int=True),
                expected=record.get("expected"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentSinkError(f"malformed sink event: {type(exc).__name__}: {exc}") from exc


def _micros(value: Any, millis_if_int: bool = False) -> int | None:
    """A decoded Avro timestamp (datetime, or a bare number) as epoch microseconds."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        delta = value - EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return int(value) * (1000 if millis_if_int else 1)


def _now_us() -> int:
    return time.time_ns() // 1000


# --------------------------------------------------------------------------- backoff


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base*2^n))."""

    def __init__(
        self,
        base_s: float = BACKOFF_BASE_S,
        cap_s: float = BACKOFF_CAP_S,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self._rng() * ceiling

    def reset(self) -> None:
        self.attempt = 0


# ---------------------------------------------------------------------- applier base


class Applier:
    """Apply one event, retrying transient failures; the common interface of appliers."""

    deadline_s: float | None = None  # None: retry transient failures indefinitely

    def __init__(self, spec: SinkSpec, backoff: Callable[[], Backoff] = Backoff) -> None:
        self.spec = spec
        self.target = spec.target
        self.retries = 0  # transient failures retried, for tests and logs
        self._backoff = backoff

    def apply(self, event: Mapping[str, Any], stop: threading.Event | None = None) -> Outcome:
        """Apply `event` (a decoded SinkEvent record) or say why not.

        Blocks while the target is unavailable; raises `Interrupted` if `stop` is set
        meanwhile (the event is then not applied: redeliver it).
        """
        try:
            parsed = SinkEvent.of(event)
            if parsed.target != self.target:
                raise PermanentSinkError(
                    f"event {parsed.event_id} is for target {parsed.target!r}, not {self.target!r}"
                )
        except PermanentSinkError as exc:
            return self._failed("sink_rejected", exc)
        backoff = self._backoff()
        started = time.monotonic()
        while True:
            try:
                outcome = self._attempt(parsed)
            except PermanentSinkError as exc:
                log.error("%s: event %s rejected: %s", self.target, parsed.event_id, exc)
                return self._failed("sink_rejected", exc)
            except TransientSinkError as exc:
                self.reset()
                delay = backoff.next_delay()
                if exc.retry_after_s is not None:
                    delay = max(delay, min(exc.retry_after_s, backoff.cap_s))
                elapsed = time.monotonic() - started
                if self.deadline_s is not None and elapsed + delay > self.deadline_s:
                    log.error(
                        "%s: event %s still failing after %.0fs, giving up: %s",
                        self.target,
                        parsed.event_id,
                        elapsed,
                        exc,
                    )
                    return self._failed("sink_unavailable", exc)
                self.retries += 1
                RETRIES.labels(self.target).inc()
                log.warning(
                    "%s: event %s failed (attempt %d), retrying in %.2fs: %s",
                    self.target,
                    parsed.event_id,
                    backoff.attempt,
                    delay,
                    exc,
                )
                if _wait(stop, delay):
                    raise Interrupted(
                        f"{self.target}: stopped while retrying event {parsed.event_id}"
                    ) from exc
                continue
            self._count(parsed, outcome)
            return outcome

    def _failed(self, reason: str, error: BaseException) -> Outcome:
        FAILED.labels(self.target).inc()
        return Outcome(Status.FAILED, reason, error=error)

    def _count(self, event: SinkEvent, outcome: Outcome) -> None:
        if outcome.status is Status.SKIPPED:
            SKIPPED.labels(self.target, outcome.reason or "").inc()
            return
        APPLIED.labels(self.target, event.op).inc()
        if event.source_ts_us is not None:
            LATENCY.labels(self.target).observe(max(0.0, (_now_us() - event.source_ts_us) / 1e6))

    def open(self, stop: threading.Event | None = None) -> None:
        """Get ready before the first event (connect, create the ledger), retrying while
        the target is unavailable; raises `Interrupted` if stopped meanwhile."""
        backoff = self._backoff()
        while True:
            try:
                self._open()
                return
            except TransientSinkError as exc:
                self.reset()
                delay = backoff.next_delay()
                self.retries += 1
                RETRIES.labels(self.target).inc()
                log.warning("%s: not ready, retrying in %.2fs: %s", self.target, delay, exc)
                if _wait(stop, delay):
                    raise Interrupted(f"{self.target}: stopped before it was ready") from exc

    def _open(self) -> None:
        """One try at `open`; raises TransientSinkError."""

    def _attempt(self, event: SinkEvent) -> Outcome:
        """One try: returns the outcome or raises Transient/PermanentSinkError."""
        raise NotImplementedError

    def reset(self) -> None:
        """Drop connections after a transient failure; the next attempt reconnects."""

    def close(self) -> None:
        self.reset()


def _wait(stop: threading.Event | None, seconds: float) -> bool:
    """Sleep, or wake early when stopped; True if stopped."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


def _skipped(reason: str, key: str | None = None) -> Outcome:
    return Outcome(Status.SKIPPED, reason, key)


# ------------------------------------------------------------------------------- SQL


class Dialect:
    """What differs between PostgreSQL and MariaDB; everything else is shared."""

    name = ""
    quote_char = '"'
    ledger_suffix = ""

    def quote(self, identifier: str) -> str:
        q = self.quote_char
        return q + identifier.replace(q, q + q) + q

    def connect(self, settings: AccordSettings, target: str) -> Any:
        raise NotImplementedError

    def session_setup(self) -> list[str]:
        return []

    def transaction(self, conn: Any) -> Any:
        """A context manager around one transaction: commit on success, else roll back."""
        raise NotImplementedError

    def last_version(self, cur: Any, app: str, golden_id: str, key: str) -> int | None:
        """Highest applied version of the golden record, serializing its appliers."""
        raise NotImplementedError

    def upsert(self, table: str, key: str, columns: Sequence[str]) -> str:
        raise NotImplementedError

    def columns(self, cur: Any, table: str) -> set[str] | None:
        """Column names of a table, or None when it does not exist."""
        raise NotImplementedError

    def is_transient(self, exc: Exception) -> bool:
        raise NotImplementedError

    def is_duplicate(self, exc: Exception) -> bool:
        raise NotImplementedError

    def ledger_ddl(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} ("
            "app varchar(128) NOT NULL, "
            "golden_id varchar(64) NOT NULL, golden_version bigint NOT NULL, "
            "event_id varchar(255) NOT NULL, op varchar(16) NOT NULL, "
            "target_key varchar(255) NOT NULL, source_ts_us bigint, "
            "applied_at_us bigint NOT NULL, "
            f"PRIMARY KEY (app, golden_id, target_key, golden_version)){self.ledger_suffix}"
        )


class PostgresDialect(Dialect):
    name = "postgresql"

    def __init__(self, system: str) -> None:
        self.system = system

    def connect(self, settings: AccordSettings, target: str) -> Any:
        from streams.sources import postgres

        return postgres(settings, self.system)

    def session_setup(self) -> list[str]:
        # A lock or statement stuck this long is a transient failure: retried.
        return ["SET lock_timeout = '10s'", "SET statement_timeout = '60s'"]

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            yield

    def last_version(self, cur: Any, app: str, golden_id: str, key: str) -> int | None:
        # Appliers of one golden record take turns (a rebalance can briefly run two).
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"{LEDGER_TABLE}:{app}:{golden_id}",),
        )
        cur.execute(
            f"SELECT max(golden_version) FROM {LEDGER_TABLE} "
            "WHERE app = %s AND golden_id = %s AND target_key = %s",
            (app, golden_id, key),
        )
        row = cur.fetchone()
        return None if row is None else row[0]

    def upsert(self, table: str, key: str, columns: Sequence[str]) -> str:
        names = [key, *columns]
        updates = ", ".join(f"{self.quote(c)} = EXCLUDED.{self.quote(c)}" for c in columns)
        return (
            f"INSERT INTO {self.quote(table)} ({', '.join(map(self.quote, names))}) "
            f"VALUES ({', '.join(['%s'] * len(names))}) "
            f"ON CONFLICT ({self.quote(key)}) DO UPDATE SET {updates}"
        )

    def columns(self, cur: Any, table: str) -> set[str] | None:
        cur.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s",
            (table,),
        )
        names = {row[0] for row in cur.fetchall()}
        return names or None

    def is_transient(self, exc: Exception) -> bool:
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return True  # an operator grants it; then the target catches up
        permanent = (
            psycopg.IntegrityError,
            psycopg.DataError,
            psycopg.ProgrammingError,
            psycopg.NotSupportedError,
        )
        return not isinstance(exc, permanent)

    def is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)


class MariaDialect(Dialect):
    name = "mariadb"
    quote_char = "`"
    ledger_suffix = " ENGINE=InnoDB"
    CHECK_CONSTRAINT_FAILED = 4025  # raised by pymysql as OperationalError

    def connect(self, settings: AccordSettings, target: str) -> Any:
        from streams.sources import mariadb

        return mariadb(settings)

    def session_setup(self) -> list[str]:
        return ["SET SESSION innodb_lock_wait_timeout = 10", "SET SESSION max_statement_time = 60"]

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        conn.begin()
        try:
            yield
        except BaseException:
            with suppress(Exception):  # a dead connection: the server rolled back
                conn.rollback()
            raise
        conn.commit()

    def last_version(self, cur: Any, app: str, golden_id: str, key: str) -> int | None:
        # A locking read: a concurrent applier of the same record waits (or deadlocks,
        # which is retried) instead of applying alongside.
        cur.execute(
            f"SELECT golden_version FROM {LEDGER_TABLE} WHERE app = %s AND golden_id = %s "
            "AND target_key = %s ORDER BY golden_version DESC LIMIT 1 FOR UPDATE",
            (app, golden_id, key),
        )
        row = cur.fetchone()
        return None if row is None else row[0]

    def upsert(self, table: str, key: str, columns: Sequence[str]) -> str:
        names = [key, *columns]
        updates = ", ".join(f"{self.quote(c)} = VALUES({self.quote(c)})" for c in columns)
        return (
            f"INSERT INTO {self.quote(table)} ({', '.join(map(self.quote, names))}) "
            f"VALUES ({', '.join(['%s'] * len(names))}) ON DUPLICATE KEY UPDATE {updates}"
        )

    def columns(self, cur: Any, table: str) -> set[str] | None:
        cur.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND table_name = %s",
            (table,),
        )
        names = {row[0] for row in cur.fetchall()}
        return names or None

    def is_transient(self, exc: Exception) -> bool:
        if isinstance(exc, pymysql.OperationalError):
            return not (exc.args and exc.args[0] == self.CHECK_CONSTRAINT_FAILED)
        permanent = (
            pymysql.IntegrityError,
            pymysql.DataError,
            pymysql.ProgrammingError,
            pymysql.NotSupportedError,
        )
        return not isinstance(exc, permanent)

    def is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, pymysql.IntegrityError) and bool(exc.args) and exc.args[0] == 1062


DIALECTS: dict[str, Callable[[], Dialect]] = {
    "crm": lambda: PostgresDialect("crm"),
    "support": lambda: PostgresDialect("support"),
    "billing": MariaDialect,
}
DB_ERRORS = (psycopg.Error, pymysql.MySQLError)


class _AlreadyApplied(Exception):
    """The ledger already holds this version: another applier got there first."""


class SqlApplier(Applier):
    """Applies events to a table of the target's own database, with the ledger beside it."""

    def __init__(
        self,
        settings: AccordSettings,
        spec: SinkSpec,
        identity: IdentityResolver,
        dialect: Dialect | None = None,
        connect: Callable[[], Any] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        super().__init__(spec, backoff)
        if spec.kind is not SinkKind.SQL or not spec.table or not spec.key_column:
            raise ConfigError(f"sink {spec.target!r}: not a SQL target with a table and key")
        if dialect is None:
            if spec.target not in DIALECTS:
                raise ConfigError(f"sink {spec.target!r}: no database known for this target")
            dialect = DIALECTS[spec.target]()
        if spec.key_generation is KeyGeneration.SEQUENCE and not isinstance(
            dialect, PostgresDialect
        ):
            raise ConfigError(f"sink {spec.target!r}: key.generate sequence needs PostgreSQL")
        self.dialect = dialect
        self.identity = identity
        self.app = settings.worker.app_id  # ledgers of several Accord apps share the table
        self.mapping = load_mappings(settings.connectors_dir).get(spec.target)
        self._connect = connect or (lambda: dialect.connect(settings, spec.target))
        self._conn: Any = None
        self._columns = [c.name for c in spec.columns]

    # -- connection ---------------------------------------------------------------------

    def connection(self) -> Any:
        """The open connection, (re)connecting and creating the ledger table if missing."""
        if self._conn is not None:
            return self._conn
        try:
            conn = self._connect()
        except DB_ERRORS as exc:
            raise TransientSinkError(f"cannot connect to {self.target}: {_db_error(exc)}") from exc
        try:
            with conn.cursor() as cur:
                for statement in self.dialect.session_setup():
                    cur.execute(statement)
                cur.execute(self.dialect.ledger_ddl())
                existing = self.dialect.columns(cur, self.spec.table)
        except DB_ERRORS as exc:
            _close(conn)
            raise TransientSinkError(f"setting up {self.target}: {_db_error(exc)}") from exc
        wanted = {self.spec.key_column, *self._columns}
        if existing is None or not wanted <= existing:
            _close(conn)
            missing = sorted(wanted - (existing or set()))
            raise ConfigError(
                f"sink {self.target!r}: table {self.spec.table!r} "
                + ("does not exist" if existing is None else f"has no column {', '.join(missing)}")
            )
        self._conn = conn
        return conn

    def _open(self) -> None:
        self.connection()

    def reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _close(conn)

    # -- one attempt --------------------------------------------------------------------

    def _attempt(self, event: SinkEvent) -> Outcome:
        conn = self.connection()
        try:
            with self.dialect.transaction(conn), conn.cursor() as cur:
                return self._apply(cur, event)
        except _AlreadyApplied:
            return _skipped("stale_version", event.target_key)
        except DB_ERRORS as exc:
            if self.dialect.is_transient(exc):
                raise TransientSinkError(f"{self.target}: {_db_error(exc)}") from exc
            raise PermanentSinkError(_db_error(exc)) from exc
        except RedisUnavailable as exc:
            raise TransientSinkError(str(exc)) from exc
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise PermanentSinkError(f"{type(exc).__name__}: {exc}") from exc

    def _apply(self, cur: Any, event: SinkEvent) -> Outcome:
        """Versions are guarded per target row: one revision may update several rows."""
        if event.op == "DELETE":
            return self._delete(cur, event)
        key, may_create = self._key(cur, event)
        if key is None:
            return _skipped("no_row")
        if self._stale(cur, event, key):
            return _skipped("stale_version", key)
        current = self._read(cur, key)
        wanted = self.spec.project(event.fields)
        if current is None:
            if not may_create:
                return _skipped("no_row", key)
            cur.execute(
                self.dialect.upsert(self.spec.table, self.spec.key_column, self._columns),
                (key, *(wanted[c] for c in self._columns)),
            )
            return self._done(cur, event, key, Action.INSERT, tuple(self._columns))
        if event.target_key is None:
            # A create that found its row already there: a row the golden record learned
            # of another way (a user made it, or Accord's state was reset). Its values are
            # not overwritten on the strength of a create; it is touched, so that it
            # reports itself through CDC and joins the record, whose next decisions
            # about it carry what it holds (compare-and-set below).
            cur.execute(
                f"UPDATE {self._table} SET {self._key_column} = {self._key_column} "
                f"WHERE {self._key_column} = %s",
                (key,),
            )
            return self._done(cur, event, key, Action.ADOPT, ())
        if event.expected is not None and self._changed_since(cur, key, event):
            # Compare-and-set: the row was edited after this event was planned. Writing
            # would overwrite that newer edit with an older decision; the edit is on its
            # way through CDC, and the merge decides again with it.
            return self._done(cur, event, key, Action.SUPERSEDED, (), Status.SKIPPED, "superseded")
        candidates = self.spec.columns_for(set(event.changed))
        differs = tuple(c.name for c in candidates if not same(current[c.name], wanted[c.name]))
        if not differs:
            return self._done(cur, event, key, Action.NOOP, (), Status.SKIPPED, "no_change")
        assignments = ", ".join(f"{self.dialect.quote(c)} = %s" for c in differs)
        cur.execute(
            f"UPDATE {self._table} SET {assignments} WHERE {self._key_column} = %s",
            (*(wanted[c] for c in differs), key),
        )
        return self._done(cur, event, key, Action.UPDATE, differs)

    def _delete(self, cur: Any, event: SinkEvent) -> Outcome:
        if not self.spec.delete:
            return _skipped("delete_disabled", event.target_key)
        key = event.target_key or self._linked(event.golden_id)
        if key is None:
            return _skipped("no_row")
        if self._stale(cur, event, key):
            return _skipped("stale_version", key)
        cur.execute(f"DELETE FROM {self._table} WHERE {self._key_column} = %s", (key,))
        if cur.rowcount == 0:
            return _skipped("no_row", key)
        return self._done(cur, event, key, Action.DELETE, ())

    def _changed_since(self, cur: Any, key: str, event: SinkEvent) -> bool:
        """Does the row, read through its own mapping, differ from what the merge saw?"""
        if self.mapping is None or event.expected is None:
            return False
        cur.execute(f"SELECT * FROM {self._table} WHERE {self._key_column} = %s", (key,))
        row = cur.fetchone()
        if row is None:
            return True
        columns = [d[0] for d in cur.description]
        current = canonical_row(self.mapping, key, dict(zip(columns, row, strict=True)))
        if current is None:
            return True  # the row does not pass its own mapping: not ours to overwrite
        return any(not same(current.get(f), event.expected.get(f)) for f in event.changed)

    def _stale(self, cur: Any, event: SinkEvent, key: str) -> bool:
        last = self.dialect.last_version(cur, self.app, event.golden_id, key)
        return last is not None and event.golden_version <= last

    def _key(self, cur: Any, event: SinkEvent) -> tuple[str | None, bool]:
        """The target row's key, and whether a missing row may be created.

        The event's key: the row existed when the event was planned, so if it is gone a
        user deleted it, and it is not brought back. Else the xref: a row an earlier
        attempt made the key of (and maybe inserted). Else, when the target may create
        rows, a new key, linked in the xref before anything is inserted.
        """
        if event.target_key is not None:
            return event.target_key, False
        key = self._linked(event.golden_id)
        if key is not None or not self.spec.create:
            return key, self.spec.create
        key = self._adoptable(cur, event) or self._new_key(cur, event.golden_id)
        self.identity.link(self.target, key, event.golden_id)
        return key, True

    def _adoptable(self, cur: Any, event: SinkEvent) -> str | None:
        """The one row the target holds with the golden values of `adopt_by`, if no other
        golden record links it: a row made in the target itself whose CDC has not reached
        the merge yet. Creating instead would duplicate the customer there."""
        if not self.spec.adopt_by:
            return None
        wanted = self.spec.project(event.fields)
        values = [wanted.get(column) for column in self.spec.adopt_by]
        if any(value is None for value in values):
            return None
        matches = " AND ".join(
            f"lower(trim({self.dialect.quote(column)})) = lower(trim(%s))"
            for column in self.spec.adopt_by
        )
        cur.execute(
            f"SELECT {self._key_column} FROM {self._table} WHERE {matches} LIMIT 2",
            tuple(str(value) for value in values),
        )
        rows = cur.fetchall()
        if len(rows) != 1:
            return None  # none, or several: which one is this customer is not ours to guess
        key = str(rows[0][0])
        owner = self.identity.lookup(self.target, key)
        return key if owner in (None, event.golden_id) else None

    def _linked(self, golden_id: str) -> str | None:
        keys = [key for system, key in self.identity.links(golden_id) if system == self.target]
        if len(keys) > 1:
            log.warning(
                "%s: golden record %s has %d rows here; writing to %s",
                self.target,
                golden_id,
                len(keys),
                keys[0],
            )
        return keys[0] if keys else None

    def _new_key(self, cur: Any, golden_id: str) -> str:
        generation = self.spec.key_generation
        if generation is KeyGeneration.SEQUENCE:
            # nextval is never rolled back: a retry after a failure finds the key in the
            # xref instead of taking another.
            cur.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, %s))",
                (self.spec.table, self.spec.key_column),
            )
            return str(cur.fetchone()[0])
        if generation is KeyGeneration.UUID:
            return str(uuid.uuid5(SINK_KEY_NAMESPACE, golden_id))
        if generation is KeyGeneration.TEMPLATE and self.spec.key_template:
            return self.spec.key_template.format(golden_id=golden_id)
        raise PermanentSinkError(f"sink {self.target!r}: no way to make keys (key.generate)")

    def _read(self, cur: Any, key: str) -> dict[str, Any] | None:
        columns = ", ".join(map(self.dialect.quote, self._columns))
        cur.execute(
            f"SELECT {columns} FROM {self._table} WHERE {self._key_column} = %s FOR UPDATE",
            (key,),
        )
        row = cur.fetchone()
        return None if row is None else dict(zip(self._columns, row, strict=True))

    def _done(
        self,
        cur: Any,
        event: SinkEvent,
        key: str,
        action: Action,
        columns: tuple[str, ...],
        status: Status = Status.APPLIED,
        reason: str | None = None,
    ) -> Outcome:
        """Write the ledger row, in the transaction of the row change."""
        try:
            cur.execute(
                f"INSERT INTO {LEDGER_TABLE} (app, golden_id, golden_version, event_id, op, "
                "target_key, source_ts_us, applied_at_us) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    self.app,
                    event.golden_id,
                    event.golden_version,
                    event.event_id,
                    action.value,
                    key,
                    event.source_ts_us,
                    _now_us(),
                ),
            )
        except DB_ERRORS as exc:
            if self.dialect.is_duplicate(exc):
                raise _AlreadyApplied() from exc
            raise
        return Outcome(status, reason, key, action, columns)

    @property
    def _table(self) -> str:
        return self.dialect.quote(self.spec.table or "")

    @property
    def _key_column(self) -> str:
        return self.dialect.quote(self.spec.key_column or "")


def same(current: Any, wanted: Any) -> bool:
    """Does a column's current value equal the wanted one, across driver types?

    Decimal vs numeric text, bool vs tinyint, uuid vs text: compared by value. None only
    equals None (an empty string is a value).
    """
    if current is None or wanted is None:
        return current is None and wanted is None
    if isinstance(current, bool) or isinstance(wanted, bool):
        return _as_bool(current) == _as_bool(wanted)
    if isinstance(current, (Decimal, int, float)) or isinstance(wanted, (Decimal, int, float)):
        try:
            return Decimal(str(current)) == Decimal(str(wanted))
        except InvalidOperation:
            return False
    return str(current) == str(wanted)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, Decimal)):
        return value != 0
    text = str(value).strip().lower()
    if text in ("1", "t", "true", "y", "yes", "on"):
        return True
    if text in ("0", "f", "false", "n", "no", "off"):
        return False
    return None


def _db_error(exc: BaseException) -> str:
    """A database error as one readable line: class, code and message."""
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        detail = f" ({diag.message_detail})" if diag.message_detail else ""
        message = (diag.message_primary or str(exc)).strip()
        return f"{type(exc).__name__}{code}: {message}{detail}"
    if isinstance(exc, pymysql.MySQLError) and len(exc.args) >= 2:
        return f"{type(exc).__name__} [{exc.args[0]}]: {exc.args[1]}"
    return f"{type(exc).__name__}: {exc}"


def _close(conn: Any) -> None:
    with suppress(Exception):  # closing a broken connection may fail; it is gone anyway
        conn.close()


# --------------------------------------------------------------------------- webhook

# KEYS: last-version key, log stream. ARGV: version, event id, golden id, op, status,
# applied at (us). Records the version and appends to the log only if it is newer.
RECORD_SCRIPT = """
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'event_id', ARGV[2], 'golden_id', ARGV[3],
  'golden_version', ARGV[1], 'op', ARGV[4], 'status', ARGV[5], 'applied_at_us', ARGV[6])
return 1
"""


class WebhookRejected(PermanentSinkError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class WebhookApplier(Applier):
    """POSTs each event as signed JSON; the ledger lives in Redis.

    Delivery is at least once: if the process dies after the receiver accepted an event
    but before Redis recorded it, the event is sent again with the same Idempotency-Key.
    """

    def __init__(
        self,
        spec: SinkSpec,
        client: redis.Redis,
        prefix: str,
        deadline_s: float = WEBHOOK_DEADLINE_S,
        http: httpx.Client | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        super().__init__(spec, backoff)
        if spec.kind is not SinkKind.WEBHOOK or not spec.url:
            raise ConfigError(f"sink {spec.target!r}: not a webhook target with a url")
        self.deadline_s = deadline_s
        self.url = spec.url
        self._redis = client
        self._prefix = prefix
        self._http = http or httpx.Client(timeout=spec.timeout_s, follow_redirects=False)
        self._record = client.register_script(RECORD_SCRIPT)

    def version_key(self, golden_id: str) -> str:
        return f"{self._prefix}sink:{self.target}:{golden_id}"

    @property
    def log_key(self) -> str:
        return f"{self._prefix}sinklog:{self.target}"

    def body(self, event: SinkEvent) -> bytes:
        """The exact bytes POSTed (and signed)."""
        emitted = event.emitted_at_us if event.emitted_at_us is not None else _now_us()
        document = {
            "event_id": event.event_id,
            "target": event.target,
            "op": event.op,
            "golden_id": event.golden_id,
            "golden_version": event.golden_version,
            "target_key": event.target_key,
            "fields": {k: _json_value(v) for k, v in self.spec.project(event.fields).items()},
            "changed": [name for name in event.changed if name in self.spec.fields],
            "emitted_at": (EPOCH + dt.timedelta(microseconds=emitted)).isoformat(
                timespec="milliseconds"
            ),
        }
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    def headers(self, event: SinkEvent, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": event.event_id,
            "X-Accord-Timestamp": str(int(time.time())),
        }
        secret = os.environ.get(self.spec.secret_env) if self.spec.secret_env else None
        if secret:
            headers["X-Accord-Signature"] = "sha256=" + sign(secret, body)
        return headers

    def _attempt(self, event: SinkEvent) -> Outcome:
        with _redis_transient(f"reading the last version of {event.golden_id}"):
            last = self._redis.get(self.version_key(event.golden_id))
        if last is not None and event.golden_version <= int(last):
            return _skipped("stale_version", event.target_key)
        if event.op == "DELETE" and not self.spec.delete:
            return _skipped("delete_disabled", event.target_key)
        body = self.body(event)
        try:
            response = self._http.post(self.url, content=body, headers=self.headers(event, body))
        except httpx.TransportError as exc:
            raise TransientSinkError(f"POST {self.url}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise TransientSinkError(
                f"POST {self.url}: HTTP {status}", _retry_after(response.headers.get("Retry-After"))
            )
        if not 200 <= status < 300:
            raise WebhookRejected(status, response.text[:1000])
        with _redis_transient(f"recording {event.event_id}"):
            recorded = self._record(
                keys=[self.version_key(event.golden_id), self.log_key],
                args=[
                    event.golden_version,
                    event.event_id,
                    event.golden_id,
                    event.op,
                    status,
                    _now_us(),
                ],
            )
        if not recorded:  # another applier recorded it meanwhile
            return _skipped("stale_version", event.target_key)
        return Outcome(Status.APPLIED, None, event.target_key, Action.POST, self.spec.fields)

    def close(self) -> None:
        self._http.close()


def sign(secret: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of the exact body bytes: the X-Accord-Signature after `sha256=`."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    return value


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to the backoff


@contextmanager
def _redis_transient(action: str) -> Iterator[None]:
    try:
        with redis_errors(action):
            yield
    except RedisUnavailable as exc:
        raise TransientSinkError(str(exc)) from exc


# ---------------------------------------------------------------------------- runner


@dataclass
class StepResult:
    consumed: int = 0
    applied: int = 0
    skipped: int = 0
    dead: int = 0
    retried: bool = False
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: StepResult) -> None:
        for name in ("consumed", "applied", "skipped", "dead"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count


def make_applier(
    settings: AccordSettings,
    spec: SinkSpec,
    client: redis.Redis | None = None,
    webhook_deadline_s: float = WEBHOOK_DEADLINE_S,
) -> Applier:
    """The applier a sink spec calls for."""
    if client is None:
        from streams.app import redis_client

        client = redis_client(settings)
    prefix = settings.worker.redis_prefix
    if spec.kind is SinkKind.WEBHOOK:
        return WebhookApplier(spec, client, prefix, deadline_s=webhook_deadline_s)
    return SqlApplier(settings, spec, IdentityResolver(client, prefix, (), guarded=True))


def sink_spec(settings: AccordSettings, target: str) -> SinkSpec:
    specs = load_sinks(settings.connectors_dir)
    if target not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise ConfigError(
            f"no sink for target {target!r} in {settings.connectors_dir}; "
            f"targets with a `sink:` section: {known}"
        )
    return specs[target]


class SinkRunner:
    """Consumes accord.sink.<target>, applies each event in order, commits per batch.

    Consumer group `{app_id}-sink-{target}`, auto-commit off. A batch's offsets are
    committed once every event in it was applied, skipped or dead-lettered (and the dead
    letters are on the broker). While an event is being retried nothing after it is
    applied and nothing is committed.
    """

    def __init__(
        self,
        settings: AccordSettings,
        target: str,
        spec: SinkSpec | None = None,
        applier: Applier | None = None,
        batch_size: int = 100,
    ) -> None:
        self.spec = spec or sink_spec(settings, target)
        self.target = target
        self.topic = settings.topics.sink(target)
        self.group_id = sink_group(settings, target)
        self.applier = applier or make_applier(settings, self.spec)
        registry = registry_client(settings)
        self.codec = AvroCodec(SchemaCache(registry_fetcher(registry)))
        self.reader = load_local(settings.schemas.directory, SINK_EVENT_SCHEMA)
        self.producer = Producer(
            settings.kafka_config({"enable.idempotence": True, "linger.ms": 5})
        )
        self.dlq = DeadLetterWriter(settings, registry, self.producer)
        self.consumer = Consumer(
            settings.kafka_config(
                {
                    "group.id": self.group_id,
                    "client.id": f"{self.group_id}-{settings.worker.instance}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "isolation.level": "read_committed",
                    "topic.metadata.refresh.interval.ms": 5000,
                    "session.timeout.ms": int(settings.worker.session_timeout_s * 1000),
                }
            )
        )
        self.consumer.subscribe([self.topic])
        self.batch_size = batch_size
        self.totals = StepResult()
        self.outcomes: list[Outcome] = []  # the last step's, in order
        self._stop = threading.Event()
        self._committed: dict[tuple[str, int], int] = {}

    def step(self, timeout_s: float = 1.0, stop: threading.Event | None = None) -> StepResult:
        """Apply one batch and commit it; returns what happened."""
        stop = stop or self._stop
        result = StepResult()
        self.outcomes = []
        messages = [m for m in self.consumer.consume(self.batch_size, timeout_s) if usable(m)]
        done: list[Any] = []
        superseded: dict[int, int] = {}
        registry_down = False
        try:
            records = [self._decode(message, result) for message in messages]
            superseded = coalesce(records)
            for index, (message, record) in enumerate(zip(messages, records, strict=True)):
                if index in superseded:
                    SKIPPED.labels(self.target, "folded").inc()
                    result.skipped += 1
                    result.reasons["folded"] = result.reasons.get("folded", 0) + 1
                elif record is not None:
                    self._handle(record, message, result, stop)
                done.append(message)
        except (Interrupted, RegistryUnavailable) as exc:
            log.warning("%s: batch interrupted, the rest is redelivered: %s", self.target, exc)
            result.retried = True
            registry_down = isinstance(exc, RegistryUnavailable)
            # A folded event is done only once the event it was folded into is applied.
            start = min([len(done), *(i for i, j in superseded.items() if j >= len(done))])
            done = done[:start]
            self._rewind(messages[start:])
        if done:
            self.dlq.flush()
            self._commit(done)
        elif not messages:
            self._commit_markers()
        result.consumed = len(done)
        self.totals.add(result)
        if registry_down:
            _wait(stop, 1.0)
        return result

    def _decode(self, message: Any, result: StepResult) -> dict[str, Any] | None:
        """The event, or None for a tombstone (nothing to apply) or an undecodable one
        (dead-lettered here)."""
        value = message.value()
        if value is None:
            return None
        try:
            return self.codec.decode(value, self.reader).value
        except DecodeError as exc:
            self.dlq.write(DeadLetter.of(message, exc.reason.value, exc, "sink"))
            result.dead += 1
            FAILED.labels(self.target).inc()
            return None

    def _handle(
        self, record: dict[str, Any], message: Any, result: StepResult, stop: threading.Event
    ) -> None:
        outcome = self.applier.apply(record, stop)
        self.outcomes.append(outcome)
        if outcome.status is Status.APPLIED:
            result.applied += 1
        elif outcome.status is Status.SKIPPED:
            result.skipped += 1
            reason = outcome.reason or ""
            result.reasons[reason] = result.reasons.get(reason, 0) + 1
        else:
            error = outcome.error or PermanentSinkError(outcome.reason or "failed")
            self.dlq.write(DeadLetter.of(message, outcome.reason or "sink_rejected", error, "sink"))
            result.dead += 1

    def _commit(self, messages: list[Any]) -> None:
        offsets = next_offsets(messages)
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self._committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})
        except KafkaException as exc:
            # Lost the partitions (e.g. a long retry outlived max.poll.interval.ms): the
            # next owner redelivers from the last commit and the ledger skips what was done.
            log.warning("%s: commit failed, events will be redelivered: %s", self.target, exc)

    def _commit_markers(self) -> None:
        """When idle, commit positions that moved past transaction markers only.

        The emitter writes sink events in transactions; each ends with a commit marker
        that a read-committed fetch skips without returning a message. Committing the
        position then keeps the group's lag at zero when all is applied, instead of one
        per partition forever.
        """
        assignment = self.consumer.assignment()
        if not assignment:
            return
        moved = [
            tp
            for tp in self.consumer.position(assignment)
            if tp.offset >= 0 and tp.offset > self._committed.get((tp.topic, tp.partition), -1)
        ]
        if moved:
            with suppress(KafkaException):
                self.consumer.commit(offsets=moved, asynchronous=False)
                self._committed.update({(tp.topic, tp.partition): tp.offset for tp in moved})

    def _rewind(self, messages: list[Any]) -> None:
        for tp in first_offsets(messages):
            try:
                self.consumer.seek(tp)
            except KafkaException as exc:
                log.warning(
                    "%s: cannot rewind %s[%d]: %s", self.target, tp.topic, tp.partition, exc
                )

    def run(self, stop: threading.Event) -> None:
        """Apply until `stop` is set."""
        try:
            self.applier.open(stop)
        except Interrupted:
            return
        while not stop.is_set():
            # consume() waits its whole timeout unless a full batch is there: keep it
            # short, or every event waits that long before it is applied.
            self.step(timeout_s=0.02, stop=stop)

    def close(self) -> None:
        self._stop.set()
        try:
            self.consumer.close()
        finally:
            self.producer.flush(10)
            self.applier.close()


def coalesce(records: list[dict[str, Any] | None]) -> dict[int, int]:
    """Which events a later one in the same batch makes redundant: {index: index of the
    event that carries its effect}.

    An applier that fell behind (a broker restart stalls its group) finds a row's
    revisions queued one after another. Applying each in turn writes values the golden
    record has long left behind, and their CDC echoes come back with fresh commit times;
    once more values have been sent than the merge remembers as echoes, a stale value
    could win last-writer-wins. So an update of an existing row is skipped when the next
    event for that row is also an update and changes every field it changes: that event
    writes newer values for all of them, and its compare-and-set already expects the row
    as it is (the skipped write was never made, so no echo of it reached the merge).
    """
    folded_into: dict[int, int] = {}
    last: dict[tuple[str, str, str], int] = {}
    for index, record in enumerate(records):
        if record is None:
            continue
        row = (str(record["target"]), str(record["golden_id"]), str(record.get("target_key")))
        previous = last.pop(row, None)
        if record.get("target_key") is None or str(record.get("op") or "UPSERT") != "UPSERT":
            continue  # creates and deletes are applied as they are, and end a run
        if previous is not None:
            earlier = records[previous]
            assert earlier is not None
            if set(earlier["changed"]) <= set(record["changed"]):
                folded_into[previous] = index
        last[row] = index
    # Follow chains to the event actually applied: 1 -> 2 -> 3 means 1 waits for 3.
    for index in sorted(folded_into, reverse=True):
        target = folded_into[index]
        folded_into[index] = folded_into.get(target, target)
    return folded_into


def run_sink(
    settings: AccordSettings,
    target: str,
    metrics_port: int | None = None,
    webhook_deadline_s: float = WEBHOOK_DEADLINE_S,
) -> None:
    """The `accord sink --target` command: apply until SIGINT or SIGTERM."""
    spec = sink_spec(settings, target)
    if settings.redact_pii:
        redact.install()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=settings.stack.host)
    applier = make_applier(settings, spec, webhook_deadline_s=webhook_deadline_s)
    runner = SinkRunner(settings, target, spec, applier)
    stop = threading.Event()

    def stopping(signum: int, _frame: Any) -> None:
        log.info("%s: stopping (signal %d)", target, signum)
        stop.set()

    previous = {s: signal.signal(s, stopping) for s in (signal.SIGINT, signal.SIGTERM)}
    log.info("%s: applying %s (group %s)", target, runner.topic, runner.group_id)
    try:
        runner.run(stop)
    finally:
        runner.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
