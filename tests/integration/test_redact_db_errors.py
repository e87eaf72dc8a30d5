"""Errors from the real PostgreSQL and MariaDB, as psycopg/PyMySQL raise them and as the
appliers log them, lose the customer values they quote and keep the column names.

Temporary tables: no other test sees them and no connector captures them."""

from __future__ import annotations

import psycopg
import pymysql
import pytest

from streams.redact import redact
from streams.settings import AccordSettings
from streams.sinks import _db_error
from streams.sources import mariadb, postgres

pytestmark = pytest.mark.integration

VALUES = ("ada@example.com", "Lovelace", "Downing")


def _redacted(error: BaseException) -> list[str]:
    """The error as raised and as an applier's one line, each redacted, with a check
    that no customer value survived in either."""
    texts = [redact(str(error)), redact(_db_error(error))]
    for text in texts:
        assert not [value for value in VALUES if value in text], text
    return texts


def test_postgres_row_and_key_details_lose_their_values(stack: AccordSettings) -> None:
    with postgres(stack, "crm") as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE redact_probe (id int PRIMARY KEY, email text UNIQUE,"
            " first_name text CHECK (length(first_name) < 6), street varchar(8))"
        )
        cur.execute("INSERT INTO redact_probe VALUES (1, 'ada@example.com', 'Ada', 'x')")
        failing = {
            "unique": "INSERT INTO redact_probe VALUES (2, 'ada@example.com', 'Ada', 'x')",
            "check": "INSERT INTO redact_probe VALUES (3, 'b@x.io', 'Lovelace', 'Downing')",
            "length": "INSERT INTO redact_probe VALUES (4, 'c@x.io', 'Ada', 'Downing Street')",
        }
        errors = {}
        for name, statement in failing.items():
            with pytest.raises(psycopg.Error) as caught:
                cur.execute(statement)
            errors[name] = caught.value

    raised, logged = _redacted(errors["unique"])
    assert "DETAIL:  Key (email)=(<redacted>) already exists." in raised
    assert logged.endswith('"redact_probe_email_key" (Key (email)=(<redacted>) already exists.)')
    raised, logged = _redacted(errors["check"])
    assert "DETAIL:  Failing row contains (<redacted>)." in raised
    assert logged.endswith("(Failing row contains (<redacted>).)")
    raised, logged = _redacted(errors["length"])
    assert "value too long for type character varying(8)" in logged  # readable as it was


def test_mariadb_entries_and_values_lose_their_values(stack: AccordSettings) -> None:
    with mariadb(stack) as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = 'STRICT_ALL_TABLES'")
        cur.execute(
            "CREATE TEMPORARY TABLE redact_probe (id INT PRIMARY KEY,"
            " email VARCHAR(100) UNIQUE, age INT, street VARCHAR(8))"
        )
        cur.execute("INSERT INTO redact_probe VALUES (1, 'ada@example.com', 36, 'x')")
        failing = {
            "duplicate": "INSERT INTO redact_probe VALUES (2, 'ada@example.com', 36, 'x')",
            "too long": "INSERT INTO redact_probe VALUES (3, 'b@x.io', 36, 'Downing Street')",
            "not a number": "INSERT INTO redact_probe VALUES (4, 'c@x.io', 'Lovelace', 'x')",
            "syntax": "INSERT INTO redact_probe (id, street) VALUES (5 'Lovelace', 'Downing')",
        }
        errors = {}
        for name, statement in failing.items():
            with pytest.raises(pymysql.MySQLError) as caught:
                cur.execute(statement)
            errors[name] = caught.value

    _, logged = _redacted(errors["duplicate"])
    assert logged.startswith("IntegrityError [1062]: Duplicate entry '<redacted>' for key")
    _, logged = _redacted(errors["too long"])
    assert "Data too long for column 'street' at row 1" in logged  # the column is kept
    _, logged = _redacted(errors["not a number"])
    assert "Incorrect integer value: '<redacted>' for column" in logged and "age" in logged
    _, logged = _redacted(errors["syntax"])
    assert "near '<redacted>' at line 1" in logged
