"""A source table gains a column while the consumer runs: both sides of the change
decode, the new column appears, nothing is lost, nothing restarts."""

import uuid

import pytest
from psycopg import sql

from streams.dlq import read_dead_letters
from streams.settings import AccordSettings
from streams.sources import postgres
from streams.stack.process import wait_until
from streams.topics import RAW_TOPICS
from tests.integration.conftest import running_consumer
from tests.support import end_offsets, isolated

pytestmark = pytest.mark.integration


def _dead_letters_since(settings: AccordSettings, starts: dict[tuple[str, int], int]) -> list[str]:
    letters = (stored.letter for stored in read_dead_letters(settings, topic=RAW_TOPICS["crm"]))
    return [
        f"{letter['partition']}:{letter['offset']} {letter['reason']}"
        for letter in letters
        if letter["offset"] >= starts.get((letter["topic"], letter["partition"]), 0)
    ]


def test_add_column_while_running(connectors: AccordSettings) -> None:
    settings = isolated(connectors)
    tag = uuid.uuid4().hex[:10]
    column = f"loyalty_{tag}"
    before_email, after_email = f"before-{tag}@example.com", f"after-{tag}@example.com"

    def emails(changes: list) -> dict:
        return {c.row.get("email"): c for c in changes}

    # The raw topic may hold older bad messages (the fault suite writes poison there):
    # only dead letters of messages written from here on count against this test.
    starts = end_offsets(settings, [RAW_TOPICS["crm"]])
    with running_consumer(settings, [RAW_TOPICS["crm"]]) as (_consumer, changes, thread):
        with postgres(settings, "crm") as conn:
            conn.execute("INSERT INTO customers (email) VALUES (%s)", (before_email,))
        assert wait_until(lambda: before_email in emails(changes), 90)
        schema_before = emails(changes)[before_email]
        try:
            with postgres(settings, "crm") as conn:
                conn.execute(
                    sql.SQL("ALTER TABLE customers ADD COLUMN {} text").format(
                        sql.Identifier(column)
                    )
                )
                conn.execute(
                    sql.SQL("INSERT INTO customers (email, {}) VALUES (%s, 'gold')").format(
                        sql.Identifier(column)
                    ),
                    (after_email,),
                )
            assert wait_until(lambda: after_email in emails(changes), 90)
        finally:
            with postgres(settings, "crm") as conn:
                conn.execute(
                    sql.SQL("ALTER TABLE customers DROP COLUMN IF EXISTS {}").format(
                        sql.Identifier(column)
                    )
                )
        assert thread.is_alive()
    assert _dead_letters_since(settings, starts) == []

    after = emails(changes)[after_email]
    assert after.row[column] == "gold"
    assert column not in schema_before.row
    assert schema_before.position.lsn < after.position.lsn
