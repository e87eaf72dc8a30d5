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
- A failure is one of three kinds, read from the database's error code (`ErrorKind`,
  `pg_error_kind`, `mariadb_error_kind`):
  * row-permanent (a constraint or value error on this event's row; other HTTP 4xx): a
    failed `Outcome` that the runner dead-letters; it goes on with the next event;
  * target-wide (a missing table or column, a permission or login refused; HTTP 401,
    403, 404, 407, 410): the applier pauses on the event. It neither dead-letters nor
    skips it, so nothing after it is applied or committed, and retries it with backoff
    (up to `PAUSE_BACKOFF_CAP_S` apart) until the target is fixed, then catches up by
    itself. `PauseReport` makes the pause visible: the `accord_sink_paused{target}`
    gauge, one log line when it pauses and one when it resumes, and a Redis key that
    `accord monitor` and `/status` read;
  * transient (connection lost, timeouts, deadlocks; HTTP 408/429/5xx): the same event
    is retried with exponential backoff and full jitter, reconnecting: indefinitely for
    SQL, up to a deadline for webhooks.
  Nothing one event raises ends the applier: the worker, its other stages and the other
  targets go on.

`SinkRunner` is the Kafka glue: one consumer group per target, events applied in order,
offsets committed after each batch. Options and behaviour: connectors/README.md, "Sinks".
"""

from __future__ import annotations

import datetime as dt
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
from decimal import Decimal
from enum import StrEnum
from typing import Any

import httpx
import psycopg
import pymysql
import redis
from confluent_kafka import Consumer, KafkaException, Producer
from prometheus_client import Counter, Gauge, Histogram

from streams import redact, webhook_signature
from streams.codec import AvroCodec, DecodeError, RegistryUnavailable, SchemaCache, registry_fetcher
from streams.dbtls import is_tls_refusal
from streams.dedupe import RedisUnavailable, redis_errors
from streams.dlq import DeadLetter, DeadLetterWriter
from streams.equality import holds
from streams.errors import AccordError, ConfigError
from streams.identity import SCORED, IdentityResolver
from streams.mapping import canonical_row, clamp_commit_time, load_mappings
from streams.matchpolicy import Decision, MatchSide, Trust, decide, score
from streams.model import EPOCH, Change, Op
from streams.projection import KeyGeneration, SinkKind, SinkSpec, load_sinks
from streams.registry import registry_client
from streams.rules import load_rules
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
PAUSED = Gauge(
    "accord_sink_paused",
    "1 while a target's applier is paused on a target-wide error (missing table or "
    "column, permission, login); its reason is in `accord monitor` and /status",
    ["target"],
)
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
# A paused target is retried at most this far apart: catching up starts within it once
# the target is fixed, without hammering a database that refuses every statement.
PAUSE_BACKOFF_BASE_S = 1.0
PAUSE_BACKOFF_CAP_S = 30.0
# The Redis signal of a pause outlives a few retries, so it stays while the applier is
# paused and vanishes on its own when the applier is gone (stopped, crashed, moved).
PAUSE_SIGNAL_TTL_S = 3 * PAUSE_BACKOFF_CAP_S


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


class TargetSinkError(AccordError):
    """The target as a whole refuses (a missing table or column, a permission or login
    refused): every event would fail alike until an operator fixes it. Pause on it."""


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


# ------------------------------------------------------------------------- pauses


@dataclass(frozen=True)
class Pause:
    """A target's applier paused on a target-wide error since `since` (epoch seconds)."""

    target: str
    reason: str
    since: float


def pause_key(prefix: str, target: str) -> str:
    """The Redis key that says a target is paused: a hash of `reason` and `since`."""
    return f"{prefix}sink-paused:{target}"


class PauseReport:
    """Makes one target's pause visible, wherever its applier runs.

    `paused` on every failed try of a paused target, `refresh` while it waits, `resumed`
    once the target answers again. The gauge `accord_sink_paused{target}` and one log
    line each way come from this process; the Redis key (with `client`) is for readers
    in other processes: `accord monitor` and the worker's status board, since an applier
    may run as `accord sink` on its own. The key expires `PAUSE_SIGNAL_TTL_S` after the
    last refresh, so an applier that dies paused leaves no stale signal behind. Redis
    errors here are logged and ignored: reporting a pause must not stop the retries.
    """

    def __init__(self, target: str, client: redis.Redis | None = None, prefix: str = "") -> None:
        self.target = target
        self.key = pause_key(prefix, target)
        self.current: Pause | None = None
        self._client = client
        PAUSED.labels(target).set(0)

    def paused(self, reason: str) -> None:
        reason = redact.redact(reason)[:500]
        if self.current is None:
            self.current = Pause(self.target, reason, time.time())
            PAUSED.labels(self.target).set(1)
            log.error(
                "%s: paused: %s (the event is kept and retried until the target is fixed; "
                "nothing later is applied meanwhile)",
                self.target,
                reason,
            )
        elif reason != self.current.reason:
            self.current = Pause(self.target, reason, self.current.since)
        self._publish()

    def refresh(self) -> None:
        if self.current is not None:
            self._publish()

    def resumed(self) -> None:
        if self.current is None:
            return
        since, self.current = self.current.since, None
        PAUSED.labels(self.target).set(0)
        log.warning("%s: resumed after %.0fs paused", self.target, time.time() - since)
        if self._client is not None:
            try:
                self._client.delete(self.key)
            except redis.RedisError as exc:
                log.warning("%s: cannot clear the pause signal in Redis: %s", self.target, exc)

    def _publish(self) -> None:
        if self._client is None or self.current is None:
            return
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(
                self.key, mapping={"reason": self.current.reason, "since": self.current.since}
            )
            pipe.expire(self.key, int(PAUSE_SIGNAL_TTL_S))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("%s: cannot publish the pause signal in Redis: %s", self.target, exc)


def read_pauses(client: redis.Redis, prefix: str, targets: Sequence[str]) -> list[Pause]:
    """The targets whose appliers say they are paused, from their Redis signals."""
    pipe = client.pipeline(transaction=False)
    for target in targets:
        pipe.hgetall(pause_key(prefix, target))
    pauses = []
    for target, fields in zip(targets, pipe.execute(), strict=True):
        if fields:
            text = {_text(k): _text(v) for k, v in fields.items()}
            pauses.append(Pause(target, text.get("reason", ""), float(text.get("since") or 0)))
    return pauses


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------- applier base


class Applier:
    """Apply one event, retrying transient failures; the common interface of appliers."""

    deadline_s: float | None = None  # None: retry transient failures indefinitely

    def __init__(
        self,
        spec: SinkSpec,
        backoff: Callable[[], Backoff] = Backoff,
        pause: PauseReport | None = None,
        pause_backoff: Callable[[], Backoff] | None = None,
    ) -> None:
        self.spec = spec
        self.target = spec.target
        self.retries = 0  # transient failures retried, for tests and logs
        self.pause = pause or PauseReport(spec.target)
        self._backoff = backoff
        self._pause_backoff = pause_backoff or (
            lambda: Backoff(PAUSE_BACKOFF_BASE_S, PAUSE_BACKOFF_CAP_S)
        )

    def apply(self, event: Mapping[str, Any], stop: threading.Event | None = None) -> Outcome:
        """Apply `event` (a decoded SinkEvent record) or say why not.

        Blocks while the target is unavailable or paused; raises `Interrupted` if `stop`
        is set meanwhile (the event is then not applied: redeliver it). Raises nothing
        else: an unexpected error pauses the target like a target-wide one.
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
        paused = self._pause_backoff()
        started = time.monotonic()
        while True:
            try:
                outcome = self._attempt(parsed)
            except PermanentSinkError as exc:
                self.pause.resumed()  # the target answered: it is working again
                log.error("%s: event %s rejected: %s", self.target, parsed.event_id, exc)
                return self._failed("sink_rejected", exc)
            except Exception as exc:  # transient, target-wide, or unforeseen
                if isinstance(exc, TransientSinkError):
                    delay = self._transient(exc, backoff, parsed, started)
                    if delay is None:
                        return self._failed("sink_unavailable", exc)
                else:
                    delay = self._paused(exc, paused, f"event {parsed.event_id}")
                if _wait(stop, delay):
                    raise Interrupted(
                        f"{self.target}: stopped while retrying event {parsed.event_id}"
                    ) from exc
                continue
            self.pause.resumed()
            self._count(parsed, outcome)
            return outcome

    def _transient(
        self, exc: TransientSinkError, backoff: Backoff, event: SinkEvent, started: float
    ) -> float | None:
        """After a transient failure: how long to wait, or None past the deadline."""
        self.reset()
        self.pause.refresh()  # a paused target stays paused until it answers
        delay = backoff.next_delay()
        if exc.retry_after_s is not None:
            delay = max(delay, min(exc.retry_after_s, backoff.cap_s))
        elapsed = time.monotonic() - started
        if self.deadline_s is not None and elapsed + delay > self.deadline_s:
            log.error(
                "%s: event %s still failing after %.0fs, giving up: %s",
                self.target,
                event.event_id,
                elapsed,
                exc,
            )
            return None
        self.retries += 1
        RETRIES.labels(self.target).inc()
        log.warning(
            "%s: event %s failed (attempt %d), retrying in %.2fs: %s",
            self.target,
            event.event_id,
            backoff.attempt,
            delay,
            exc,
        )
        return delay

    def _paused(self, exc: Exception, backoff: Backoff, what: str) -> float:
        """After a target-wide (or unexpected) failure: pause, and how long to wait."""
        self.reset()
        if isinstance(exc, TargetSinkError):
            reason = str(exc)
        else:  # a bug or a state nobody foresaw: keep the event, say so, retry
            log.error("%s: unexpected error on %s", self.target, what, exc_info=exc)
            reason = f"unexpected {type(exc).__name__}: {exc}"
        self.pause.paused(reason)
        self.retries += 1
        RETRIES.labels(self.target).inc()
        delay = backoff.next_delay()
        log.debug("%s: paused on %s, retrying in %.2fs: %s", self.target, what, delay, reason)
        return delay

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
        paused = self._pause_backoff()
        while True:
            try:
                self._open()
                self.pause.resumed()
                return
            except TransientSinkError as exc:
                self.reset()
                self.pause.refresh()
                delay = backoff.next_delay()
                self.retries += 1
                RETRIES.labels(self.target).inc()
                log.warning("%s: not ready, retrying in %.2fs: %s", self.target, delay, exc)
            except Exception as exc:  # target-wide, or unforeseen: paused until it opens
                delay = self._paused(exc, paused, "opening")
            if _wait(stop, delay):
                raise Interrupted(f"{self.target}: stopped before it was ready")

    def _open(self) -> None:
        """One try at `open`; raises TransientSinkError or TargetSinkError."""

    def _attempt(self, event: SinkEvent) -> Outcome:
        """One try: returns the outcome or raises Transient/Permanent/TargetSinkError."""
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


# ------------------------------------------------------------------- error kinds


class ErrorKind(StrEnum):
    """What a database error says about the event and the target."""

    ROW = "row"  # this event's values: dead-letter the event, go on with the next
    TARGET = "target"  # the target as a whole (schema, permission, login): pause
    TRANSIENT = "transient"  # may pass by itself (connection, timeout, deadlock): retry


_ROW, _TARGET, _TRANSIENT = ErrorKind.ROW, ErrorKind.TARGET, ErrorKind.TRANSIENT

# PostgreSQL SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html):
# a code listed here decides; else its class, the first two characters.
PG_CODES: dict[str, ErrorKind] = {
    "42P01": _TARGET,  # undefined_table
    "42703": _TARGET,  # undefined_column
    "42501": _TARGET,  # insufficient_privilege
    "40001": _TRANSIENT,  # serialization_failure
    "40P01": _TRANSIENT,  # deadlock_detected
    "55P03": _TRANSIENT,  # lock_not_available: lock_timeout
    "57014": _TRANSIENT,  # query_canceled: statement_timeout
}
PG_CLASSES: dict[str, ErrorKind] = {
    "22": _ROW,  # data exception: too long (22001), bad text (22P02), out of range (22003)
    "23": _ROW,  # integrity constraint: unique, check, not-null, foreign key
    "P0": _ROW,  # raised by a trigger (RAISE EXCEPTION): it refused this row
    "28": _TARGET,  # invalid authorization: password (28P01) or role (28000) refused
    "3D": _TARGET,  # invalid catalog name: no such database
    "3F": _TARGET,  # invalid schema name
    "42": _TARGET,  # syntax or access rule: the statement no longer fits the table
    "0A": _TARGET,  # feature not supported
    "08": _TRANSIENT,  # connection exception
    "25": _TRANSIENT,  # invalid transaction state, e.g. read-only during a failover
    "40": _TRANSIENT,  # transaction rollback
    "53": _TRANSIENT,  # insufficient resources: disk full, too many connections
    "55": _TRANSIENT,  # object not in prerequisite state: a lock held elsewhere
    "57": _TRANSIENT,  # operator intervention: shutdown, cannot connect now
    "58": _TRANSIENT,  # system error: I/O
}

# MariaDB error numbers (https://mariadb.com/kb/en/mariadb-error-code-reference/); the
# 2000s are the client's own (no connection).
MARIADB_CODES: dict[int, ErrorKind] = {
    1048: _ROW,  # column cannot be null
    1062: _ROW,  # duplicate entry
    1216: _ROW,  # foreign key: no parent row
    1217: _ROW,  # foreign key: a child row exists
    1451: _ROW,  # foreign key: a child row exists
    1452: _ROW,  # foreign key: no parent row
    1264: _ROW,  # value out of range
    1690: _ROW,  # value out of range
    1265: _ROW,  # data truncated
    1292: _ROW,  # incorrect value, truncated
    1366: _ROW,  # incorrect value for the column
    1367: _ROW,  # illegal value
    1411: _ROW,  # incorrect value for a function
    1364: _ROW,  # field has no default value
    1406: _ROW,  # data too long
    3819: _ROW,  # check constraint (MySQL's number)
    4025: _ROW,  # check constraint
    1054: _TARGET,  # unknown column
    1146: _TARGET,  # table does not exist
    1109: _TARGET,  # unknown table
    1049: _TARGET,  # unknown database
    1044: _TARGET,  # access denied to the database
    1045: _TARGET,  # access denied for the user: login refused
    1142: _TARGET,  # command denied on the table
    1143: _TARGET,  # command denied on a column
    1227: _TARGET,  # a privilege is missing
    1370: _TARGET,  # execute denied
    1064: _TARGET,  # syntax error: the statement no longer fits the table
    1205: _TRANSIENT,  # lock wait timeout
    1213: _TRANSIENT,  # deadlock
    1040: _TRANSIENT,  # too many connections
    1053: _TRANSIENT,  # server shutting down
    1290: _TRANSIENT,  # read-only server, e.g. during a failover
    1792: _TRANSIENT,  # read-only transaction
    1317: _TRANSIENT,  # query interrupted
    1927: _TRANSIENT,  # connection killed
    1969: _TRANSIENT,  # max_statement_time exceeded
    1158: _TRANSIENT,  # network read error
    1159: _TRANSIENT,  # network read timeout
    1160: _TRANSIENT,  # network write error
    1161: _TRANSIENT,  # network write timeout
    2002: _TRANSIENT,  # cannot connect (socket)
    2003: _TRANSIENT,  # cannot connect
    2006: _TRANSIENT,  # server has gone away
    2013: _TRANSIENT,  # lost connection during a query
    2055: _TRANSIENT,  # lost connection
}


def pg_error_kind(exc: BaseException) -> ErrorKind:
    """The kind of a psycopg error, by SQLSTATE.

    No SQLSTATE: the client failed to reach or keep the server (transient), unless TLS
    refused the connection (the target's: its certificate or the TLS settings). A SQLSTATE
    in neither table pauses the target: the retry goes on, and an operator sees why.
    """
    state = getattr(exc, "sqlstate", None)
    if not state:
        return _TARGET if is_tls_refusal(exc) else _TRANSIENT
    return PG_CODES.get(state) or PG_CLASSES.get(state[:2], _TARGET)


def mariadb_error_kind(exc: BaseException) -> ErrorKind:
    """The kind of a PyMySQL error, by MariaDB error number.

    A number in no table is judged by PyMySQL's class: IntegrityError and DataError are
    the row's; ProgrammingError, NotSupportedError and other server errors pause the
    target; an error without a number (the connection) is transient, unless TLS refused it.
    """
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if (not code or code >= 2000) and is_tls_refusal(exc):
        return _TARGET
    if code in MARIADB_CODES:
        return MARIADB_CODES[code]
    if isinstance(exc, (pymysql.IntegrityError, pymysql.DataError)):
        return _ROW
    if not code or code >= 2000 or isinstance(exc, pymysql.InterfaceError):
        return _TRANSIENT
    return _TARGET


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

    def error_kind(self, exc: BaseException) -> ErrorKind:
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

    def error_kind(self, exc: BaseException) -> ErrorKind:
        return pg_error_kind(exc)

    def is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)


class MariaDialect(Dialect):
    name = "mariadb"
    quote_char = "`"
    ledger_suffix = " ENGINE=InnoDB"

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

    def error_kind(self, exc: BaseException) -> ErrorKind:
        return mariadb_error_kind(exc)

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
        pause: PauseReport | None = None,
        pause_backoff: Callable[[], Backoff] | None = None,
        report: Callable[[Change], None] | None = None,
    ) -> None:
        super().__init__(spec, backoff, pause, pause_backoff)
        # Tells the merge of the rows a create makes or adopts (`RowReports`); None: nobody
        # listens (an adopted row then joins by its own CDC only).
        self.report = report
        self._max_skew_us = int(settings.worker.max_clock_skew_s * 1_000_000)
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
        """The open connection, (re)connecting and creating the ledger table if missing.

        Raises TargetSinkError when the table is missing or lacks a configured column, or
        the login or a privilege is refused; TransientSinkError when the database cannot
        be reached.
        """
        if self._conn is not None:
            return self._conn
        try:
            conn = self._connect()
        except DB_ERRORS as exc:
            raise self._error(exc, f"cannot connect to {self.target}: ") from exc
        try:
            with conn.cursor() as cur:
                for statement in self.dialect.session_setup():
                    cur.execute(statement)
                cur.execute(self.dialect.ledger_ddl())
                existing = self.dialect.columns(cur, self.spec.table)
        except DB_ERRORS as exc:
            _close(conn)
            raise self._error(exc, f"setting up {self.target}: ") from exc
        wanted = {self.spec.key_column, *self._columns}
        if existing is None or not wanted <= existing:
            _close(conn)
            missing = sorted(wanted - (existing or set()))
            raise TargetSinkError(
                f"table {self.spec.table!r} "
                + ("does not exist" if existing is None else f"has no column {', '.join(missing)}")
            )
        self._conn = conn
        return conn

    def _error(self, exc: BaseException, context: str = "") -> AccordError:
        """A database error as the sink error of its kind. With `context` (connecting,
        setting up) no event's row is involved: what is not transient is the target's."""
        kind = self.dialect.error_kind(exc)
        if kind is ErrorKind.TRANSIENT:
            return TransientSinkError(f"{context or self.target + ': '}{_db_error(exc)}")
        if kind is ErrorKind.ROW and not context:
            return PermanentSinkError(_db_error(exc))
        return TargetSinkError(context + _db_error(exc))

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
            raise self._error(exc) from exc
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
            self._report_created(event, key, wanted)
            return self._done(cur, event, key, Action.INSERT, tuple(self._columns))
        if event.target_key is None:
            # A create that found its row already there: a row the golden record learned
            # of another way (a user made it, or Accord's state was reset). Its values are
            # not overwritten on the strength of a create, nor is it touched: a touch would
            # report its values at Accord's commit time, to win `lww` against older edits
            # made elsewhere. The merge is told of it with its own commit time instead
            # (`adoption`), and decides about it from what it holds (compare-and-set below).
            self._report_adopted(cur, event, key)
            return self._done(cur, event, key, Action.ADOPT, ())
        if event.expected is not None and self._changed_since(cur, key, event):
            # Compare-and-set: the row was edited after this event was planned. Writing
            # would overwrite that newer edit with an older decision; the edit is on its
            # way through CDC, and the merge decides again with it.
            return self._done(cur, event, key, Action.SUPERSEDED, (), Status.SKIPPED, "superseded")
        candidates = self.spec.columns_for(set(event.changed))
        differs = tuple(c.name for c in candidates if not holds(current[c.name], wanted[c.name]))
        if not differs:
            return self._done(cur, event, key, Action.NOOP, (), Status.SKIPPED, "no_change")
        assignments = ", ".join(f"{self.dialect.quote(c)} = %s" for c in differs)
        cur.execute(
            f"UPDATE {self._table} SET {assignments} WHERE {self._key_column} = %s",
            (*(wanted[c] for c in differs), key),
        )
        return self._done(cur, event, key, Action.UPDATE, differs)

    def _report_created(self, event: SinkEvent, key: str, wanted: dict[str, Any]) -> None:
        """Tell the merge, before the insert commits, which row it makes and with what.

        The row's CDC echo then reads as Accord's own write by its key, which only this
        insert carries: a row someone else makes with the same values still competes.
        Reported first, so no echo can come back unexplained; a report whose insert then
        fails names a row that never appears (a retry reuses the key, see `_key`).
        """
        if self.report is None:
            return
        values = created_values(self.spec, self.mapping, key, wanted, event.fields)
        now_us = _now_us()
        self.report(
            Change(
                change_id=f"created:{self.target}:{key}:{event.event_id}",
                system=self.target,
                source_key=key,
                op=Op.UPSERT,
                source_ts=event.source_ts_us or now_us,
                position="",
                values=values,
                golden_id=event.golden_id,
                captured_at_ms=now_us // 1000,
                created=True,
            )
        )

    def _report_adopted(self, cur: Any, event: SinkEvent, key: str) -> None:
        """Tell the merge, before the adoption commits, what the adopted row holds."""
        if self.report is None or self.mapping is None:
            return
        cur.execute(f"SELECT * FROM {self._table} WHERE {self._key_column} = %s", (key,))
        found = cur.fetchone()
        if found is None:
            return
        columns = [d[0] for d in cur.description]
        row = dict(zip(columns, found, strict=True))
        change = adoption(self.mapping, key, row, event.golden_id, _now_us(), self._max_skew_us)
        if change is not None:
            self.report(change)

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
        return any(not holds(current.get(f), event.expected.get(f)) for f in event.changed)

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
        golden record links it and the match policy would link it: a row made in the
        target itself whose CDC has not reached the merge yet. Creating instead would
        duplicate the customer there."""
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
        if owner == event.golden_id:
            return key
        if owner is not None or not self._policy_adopts(cur, key, event):
            return None
        return key

    def _policy_adopts(self, cur: Any, key: str, event: SinkEvent) -> bool:
        """Whether the match policy links the row `adopt_by` found to the record.

        Adopting is a link made by the `adopt_by` fields, so it passes the same policy as
        ingest (`streams.matchpolicy`): a field the target is trusted on adopts alone; a
        low-trust one (support's self-service emails) needs the row's own name or phone,
        read through the target's mapping, to corroborate the record's. Otherwise the row
        is left alone (it is someone else's, or a review will tell) and the record gets a
        row of its own, as when no row matches.
        """
        policy = self.identity.policy.matching
        names = [
            column.fields[0]
            for column in self.spec.columns
            if column.name in self.spec.adopt_by and len(column.fields) == 1
        ]
        trust = [policy.trust_of(self.target, name) for name in names]
        if Trust.TRUSTED in trust:
            return True
        if not any(trust) or self.mapping is None:
            self._refuse_adoption(key, Decision.NEW, "the target may not link on it")
            return False
        cur.execute(f"SELECT * FROM {self._table} WHERE {self._key_column} = %s", (key,))
        row = cur.fetchone()
        values = None
        if row is not None:
            columns = [d[0] for d in cur.description]
            values = canonical_row(self.mapping, key, dict(zip(columns, row, strict=True)))
        if values is None:
            return False
        digests = {name: "adopt_by" for name in names}
        record = MatchSide.of("", event.fields, {})
        result = score(policy, MatchSide.of(self.target, values, digests), names, [record])
        decision = decide(policy.scoring, result)
        SCORED.labels(self.target, decision.value).inc()
        if decision is Decision.LINK:
            return True
        self._refuse_adoption(key, decision, f"scored {result.total:.3f}")
        return False

    def _refuse_adoption(self, key: str, decision: Decision, why: str) -> None:
        log.warning(
            "%s: row %s has the golden record's %s but is not adopted (%s; match policy "
            "decision %s): a row of its own is created",
            self.target,
            key,
            ", ".join(self.spec.adopt_by),
            why,
            decision.value,
        )

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


def created_values(
    spec: SinkSpec,
    mapping: Any,
    key: str,
    wanted: Mapping[str, Any],
    fields: Mapping[str, Any],
) -> dict[str, Any]:
    """What the row an applier inserts will say through CDC: the columns it writes read
    through the system's own mapping (a lossy round trip reads as the echo will). Without
    a mapping that reads them, the golden values of the target's fields."""
    if mapping is not None:
        row = {**wanted, **dict(zip(mapping.key, key.split("|"), strict=False))}
        values = canonical_row(mapping, key, row)
        if values is not None:
            return values
    return {name: fields.get(name) for name in spec.fields}


def adoption(
    mapping: Any,
    key: str,
    row: Mapping[str, Any],
    golden_id: str,
    now_us: int,
    max_skew_us: int | None = None,
) -> Change | None:
    """The change that joins an adopted row to its golden record, with its own values and
    its own commit time; None if the row fails its mapping's hard rules.

    The row's own commit time is its mapping's `commit_time` column when it has one, else
    unknown: 0, so its values fill fields no other row has but lose `lww` to every edit
    with a time. Either way the row's own CDC changes (its insert, if still on its way,
    and later edits) carry their real commit times and supersede these values. A
    `commit_time` more than `max_skew_us` ahead of now is clamped to now and flagged, as
    ingest does.
    """
    values = canonical_row(mapping, key, row)
    if values is None:
        return None
    commit_us = 0
    stamp = row.get(mapping.commit_time) if mapping.commit_time else None
    if isinstance(stamp, dt.datetime):
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.UTC)
        commit_us = max(0, int(stamp.timestamp() * 1_000_000))
    commit_us, clamped_from = clamp_commit_time(commit_us, now_us, max_skew_us)
    return Change(
        change_id=f"adopted:{mapping.system}:{key}:{golden_id}",
        system=mapping.system,
        source_key=key,
        op=Op.UPSERT,
        source_ts=commit_us,
        position="",
        values=values,
        golden_id=golden_id,
        captured_at_ms=now_us // 1000,
        clamped_from=clamped_from,
    )


class RowReports:
    """Sends appliers' reports of the rows they create or adopt to the merge's input topic.

    Keyed by golden id (murmur2, as Faust partitions), so a report meets its record's
    state in order with the record's changes. Each report is on the broker before it
    returns: the insert or adoption it announces commits only after. Unreachable Kafka is a
    transient failure: the event is retried, the insert rolled back meanwhile.
    """

    def __init__(self, settings: AccordSettings, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.topic = settings.topics.changes
        self.timeout_s = timeout_s
        self._producer: Producer | None = None
        self._codec: Any = None

    def __call__(self, change: Change) -> None:
        from streams.faust_codec import canonical_codec

        if self._producer is None:
            try:
                self._codec = canonical_codec(
                    self.settings,
                    registry_client(self.settings),
                    "dev.accord.CustomerChange",
                    self.topic,
                )
            except Exception as exc:  # the registry down or refusing: try again later
                raise TransientSinkError(f"schema of {self.topic}: {exc}") from exc
            self._producer = Producer(
                self.settings.kafka_config(
                    {"enable.idempotence": True, "partitioner": "murmur2_random"}
                )
            )
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        self._producer.produce(
            self.topic,
            key=(change.golden_id or "").encode(),
            value=self._codec.dumps(change.to_record()),
            on_delivery=delivered,
        )
        if self._producer.flush(self.timeout_s) or failures:
            raise TransientSinkError(
                f"report of row {change.link} not delivered to {self.topic}: "
                f"{'; '.join(failures) or 'timed out'}"
            )


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
# applied at (us), the log's MAXLEN. Records the version and appends to the log only if
# it is newer; the log keeps about MAXLEN entries (`~`: Redis trims whole nodes, so it
# may hold up to one node, `stream-node-max-entries`, more).
RECORD_SCRIPT = """
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'event_id', ARGV[2],
  'golden_id', ARGV[3], 'golden_version', ARGV[1], 'op', ARGV[4], 'status', ARGV[5],
  'applied_at_us', ARGV[6])
return 1
"""


# Refused for every event alike (login, permission, no such endpoint): pause.
WEBHOOK_TARGET_WIDE = frozenset({401, 403, 404, 407, 410})


class WebhookRejected(PermanentSinkError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class WebhookApplier(Applier):
    """POSTs each event as signed JSON; the ledger lives in Redis.

    Delivery is at least once: if the process dies after the receiver accepted an event
    but before Redis recorded it, the event is sent again with the same Idempotency-Key.
    Signing: `streams.webhook_signature` (timestamp and body). The secret is read once,
    here: a sink whose `secret_env` is unset or empty does not start, since it would
    send requests its receiver cannot verify.
    """

    def __init__(
        self,
        spec: SinkSpec,
        client: redis.Redis,
        prefix: str,
        deadline_s: float = WEBHOOK_DEADLINE_S,
        http: httpx.Client | None = None,
        backoff: Callable[[], Backoff] = Backoff,
        pause_backoff: Callable[[], Backoff] | None = None,
    ) -> None:
        super().__init__(spec, backoff, PauseReport(spec.target, client, prefix), pause_backoff)
        if spec.kind is not SinkKind.WEBHOOK or not spec.url:
            raise ConfigError(f"sink {spec.target!r}: not a webhook target with a url")
        if not spec.url.startswith("https://") and not spec.insecure_http:
            raise ConfigError(f"sink {spec.target!r}: url is not https (see insecure_http)")
        self.deadline_s = deadline_s
        self.url = spec.url
        self._secret = _webhook_secret(spec)
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

    def headers(self, event: SinkEvent, body: bytes, now: float | None = None) -> dict[str, str]:
        """The headers of one attempt at `now` (default: the clock); signed unless the
        sink is `unsigned: true`."""
        now = time.time() if now is None else now
        headers = {"Content-Type": "application/json", "Idempotency-Key": event.event_id}
        if self._secret is None:
            headers[webhook_signature.TIMESTAMP_HEADER] = str(int(now))
            return headers
        return headers | webhook_signature.signature_headers(
            self._secret, body, now, legacy=self.spec.legacy_signature
        )

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
        if status in WEBHOOK_TARGET_WIDE:
            raise TargetSinkError(f"POST {self.url}: HTTP {status}: {response.text[:200]}")
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
                    self.spec.log_maxlen,
                ],
            )
        if not recorded:  # another applier recorded it meanwhile
            return _skipped("stale_version", event.target_key)
        return Outcome(Status.APPLIED, None, event.target_key, Action.POST, self.spec.fields)

    def close(self) -> None:
        self._http.close()


def _webhook_secret(spec: SinkSpec) -> str | None:
    """The sink's HMAC secret from its `secret_env`; None for an `unsigned: true` sink."""
    if spec.unsigned:
        log.warning("sink %r: unsigned: true, its requests carry no signature", spec.target)
        return None
    if not spec.secret_env:
        raise ConfigError(f"sink {spec.target!r}: needs secret_env, or unsigned: true")
    secret = os.environ.get(spec.secret_env)
    if not secret:
        raise ConfigError(
            f"sink {spec.target!r}: secret_env {spec.secret_env!r} is unset or empty; set it "
            "to the receiver's shared secret (or make the sink `unsigned: true`)"
        )
    if spec.legacy_signature:
        log.warning(
            "sink %r: legacy_signature: true also sends the body-only X-Accord-Signature, "
            "which a captured request can replay; turn it off once the receiver verifies v1",
            spec.target,
        )
    return secret


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
    pause = PauseReport(spec.target, client, prefix)
    policy = load_rules(settings.worker.rules_file).identity
    identity = IdentityResolver(client, prefix, (), policy, guarded=True)
    return SqlApplier(settings, spec, identity, pause=pause, report=RowReports(settings))


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
        back_off = False
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
        except Exception as exc:  # nothing one batch raises ends the applier
            if isinstance(exc, (Interrupted, RegistryUnavailable)):
                log.warning("%s: batch interrupted, the rest is redelivered: %s", self.target, exc)
            else:
                log.exception("%s: batch failed, the rest is redelivered", self.target)
            result.retried = True
            back_off = not isinstance(exc, Interrupted)  # before reading the batch again
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
        if back_off:
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
