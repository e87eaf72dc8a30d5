"""Sink failures classified by code (row, target-wide, transient), and what an applier
does with each: dead-letter the event, pause on it, or retry it."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pymysql
import pytest
from prometheus_client import REGISTRY
from pymysql import err as pymysql_err

from streams.sinks import (
    Applier,
    Backoff,
    ErrorKind,
    Interrupted,
    Outcome,
    PermanentSinkError,
    SinkEvent,
    Status,
    TargetSinkError,
    TransientSinkError,
    mariadb_error_kind,
    pg_error_kind,
)

ROW, TARGET, TRANSIENT = ErrorKind.ROW, ErrorKind.TARGET, ErrorKind.TRANSIENT


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.errors.UniqueViolation, ROW),
        (psycopg.errors.CheckViolation, ROW),
        (psycopg.errors.NotNullViolation, ROW),
        (psycopg.errors.ForeignKeyViolation, ROW),
        (psycopg.errors.StringDataRightTruncation, ROW),  # 22001: too long
        (psycopg.errors.InvalidTextRepresentation, ROW),  # 22P02: not a uuid
        (psycopg.errors.NumericValueOutOfRange, ROW),
        (psycopg.errors.InvalidDatetimeFormat, ROW),
        (psycopg.errors.RaiseException, ROW),  # a trigger refused the row
        (psycopg.errors.UndefinedTable, TARGET),  # 42P01
        (psycopg.errors.UndefinedColumn, TARGET),  # 42703: a renamed or dropped column
        (psycopg.errors.InsufficientPrivilege, TARGET),  # 42501
        (psycopg.errors.InvalidPassword, TARGET),  # 28P01
        (psycopg.errors.InvalidAuthorizationSpecification, TARGET),  # 28000
        (psycopg.errors.InvalidCatalogName, TARGET),  # no such database
        (psycopg.errors.DatatypeMismatch, TARGET),  # a column's type changed
        (psycopg.errors.SerializationFailure, TRANSIENT),  # 40001
        (psycopg.errors.DeadlockDetected, TRANSIENT),  # 40P01
        (psycopg.errors.LockNotAvailable, TRANSIENT),  # lock_timeout
        (psycopg.errors.QueryCanceled, TRANSIENT),  # statement_timeout
        (psycopg.errors.AdminShutdown, TRANSIENT),
        (psycopg.errors.TooManyConnections, TRANSIENT),
        (psycopg.errors.ReadOnlySqlTransaction, TRANSIENT),  # a standby, mid-failover
    ],
)
def test_postgresql_errors_are_classified_by_sqlstate(error: type, kind: ErrorKind) -> None:
    assert pg_error_kind(error("message")) is kind


def test_a_postgresql_error_without_sqlstate_is_a_lost_connection() -> None:
    assert pg_error_kind(psycopg.OperationalError("server closed the connection")) is TRANSIENT
    assert pg_error_kind(psycopg.InterfaceError("the connection is closed")) is TRANSIENT


def test_an_unknown_postgresql_sqlstate_pauses_the_target_rather_than_losing_the_event() -> None:
    assert pg_error_kind(psycopg.errors.lookup("XX000")("internal error")) is TARGET


def mysql_error(code: int, message: str = "message") -> pymysql.MySQLError:
    """The exception PyMySQL raises for a server error number (its own class mapping)."""
    cls = pymysql_err.error_map.get(code, pymysql.InternalError if code < 1000 else None)
    return (cls or pymysql.OperationalError)(code, message)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (1062, ROW),  # duplicate entry
        (1406, ROW),  # data too long
        (1048, ROW),  # cannot be null
        (1452, ROW),  # foreign key
        (1264, ROW),  # out of range
        (1366, ROW),  # incorrect value
        (4025, ROW),  # check constraint (an OperationalError in PyMySQL)
        (1054, TARGET),  # unknown column: was retried as transient, forever
        (1146, TARGET),  # no such table
        (1142, TARGET),  # command denied on the table
        (1143, TARGET),  # command denied on a column
        (1044, TARGET),  # access denied to the database
        (1045, TARGET),  # login refused
        (1205, TRANSIENT),  # lock wait timeout
        (1213, TRANSIENT),  # deadlock
        (1969, TRANSIENT),  # max_statement_time
        (2003, TRANSIENT),  # cannot connect
        (2006, TRANSIENT),  # gone away
        (2013, TRANSIENT),  # lost connection
    ],
)
def test_mariadb_errors_are_classified_by_number(code: int, kind: ErrorKind) -> None:
    assert mariadb_error_kind(mysql_error(code)) is kind


def test_an_unknown_mariadb_number_is_judged_by_pymysql_class() -> None:
    assert mariadb_error_kind(pymysql.DataError(1999, "bad value")) is ROW
    assert mariadb_error_kind(pymysql.IntegrityError(1999, "constraint")) is ROW
    assert mariadb_error_kind(pymysql.OperationalError(1999, "a server error")) is TARGET
    assert mariadb_error_kind(pymysql.OperationalError(2099, "a client error")) is TRANSIENT
    assert mariadb_error_kind(pymysql.InterfaceError(0, "")) is TRANSIENT


# ------------------------------------------------------------------------ applier


class Scripted(Applier):
    """An applier whose attempts raise or return what the test lists, in turn."""

    def __init__(self, script: list[BaseException | Outcome], target: str = "unit-t") -> None:
        from streams.projection import SinkKind, SinkSpec

        spec = SinkSpec(target=target, kind=SinkKind.WEBHOOK, columns=())
        instant = lambda: Backoff(0.001, 0.001)  # noqa: E731
        super().__init__(spec, backoff=instant, pause_backoff=instant)
        self.script = list(script)
        self.resets = 0
        self.paused_during: list[bool] = []

    def _attempt(self, event: SinkEvent) -> Outcome:
        self.paused_during.append(self.pause.current is not None)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    def reset(self) -> None:
        self.resets += 1


def event(target: str = "unit-t") -> dict[str, Any]:
    return {"event_id": "e1", "target": target, "golden_id": "g1", "golden_version": 1}


def paused_gauge(target: str) -> float | None:
    return REGISTRY.get_sample_value("accord_sink_paused", {"target": target})


def test_a_target_wide_error_pauses_on_the_event_until_the_target_answers() -> None:
    applied = Outcome(Status.APPLIED)
    applier = Scripted(
        [
            TargetSinkError("table 'accounts' has no column phone"),
            TransientSinkError("connection lost"),  # still paused: it did not answer
            TargetSinkError("table 'accounts' has no column phone"),
            applied,
        ],
        target="unit-pause",
    )
    assert paused_gauge("unit-pause") == 0
    assert applier.apply(event("unit-pause")) is applied
    # Never dead-lettered nor skipped: the same event was tried until it applied.
    assert applier.script == [] and applier.resets == 3
    assert applier.paused_during == [False, True, True, True]
    assert applier.pause.current is None and paused_gauge("unit-pause") == 0


def test_a_pause_is_reported_once_with_its_reason_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[float | None, str | None]] = []

    class Watching(Scripted):
        def _attempt(self, event: SinkEvent) -> Outcome:
            current = self.pause.current
            seen.append((paused_gauge("unit-seen"), current and current.reason))
            return super()._attempt(event)

    failure = TargetSinkError('permission denied for table users (user "ada@example.com")')
    applier = Watching([failure, failure, Outcome(Status.APPLIED)], target="unit-seen")
    with caplog.at_level("INFO", logger="streams.sinks"):
        applier.apply(event("unit-seen"))
    reason = 'permission denied for table users (user "<email>")'
    assert seen == [(0, None), (1, reason), (1, reason)]
    lines = [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert [line.split(":")[1].strip() for line in lines] == ["paused", "resumed after 0s paused"]
    assert "ada@example.com" not in " ".join(lines)


def test_a_row_error_dead_letters_the_event_and_ends_a_pause() -> None:
    rejected = PermanentSinkError("IntegrityError [1062]: Duplicate entry")
    applier = Scripted([TargetSinkError("no table"), rejected], target="unit-row")
    outcome = applier.apply(event("unit-row"))
    assert (outcome.status, outcome.reason, outcome.error) == (
        Status.FAILED,
        "sink_rejected",
        rejected,
    )
    assert applier.pause.current is None and paused_gauge("unit-row") == 0


def test_an_unexpected_error_pauses_instead_of_ending_the_applier() -> None:
    applier = Scripted([RuntimeError("a bug"), Outcome(Status.APPLIED)], target="unit-bug")
    assert applier.apply(event("unit-bug")).status is Status.APPLIED
    assert applier.paused_during == [False, True]


def test_a_paused_applier_stops_when_told_without_applying_the_event() -> None:
    stop = threading.Event()

    class Stopping(Scripted):
        def _attempt(self, event: SinkEvent) -> Outcome:
            stop.set()  # the worker stops while the target is broken
            raise TargetSinkError("no column phone")

    applier = Stopping([], target="unit-stop")
    with pytest.raises(Interrupted):
        applier.apply(event("unit-stop"), stop)
    assert paused_gauge("unit-stop") == 1  # still paused: nothing was applied


def test_opening_a_broken_target_pauses_until_it_opens() -> None:
    attempts: list[int] = []

    class Opening(Scripted):
        def _open(self) -> None:
            attempts.append(1)
            if len(attempts) < 3:
                raise TargetSinkError("table 'customers' does not exist")

    applier = Opening([], target="unit-open")
    applier.open(threading.Event())
    assert len(attempts) == 3 and paused_gauge("unit-open") == 0
