"""Row changes in each sample system arrive on Kafka as Debezium envelopes, decoded
through the schema registry with confluent-kafka's AvroDeserializer."""

import uuid
from collections.abc import Callable
from decimal import Decimal

import pytest

from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.topics import RAW_TOPICS, DecodedMessage, RawTopicReader

pytestmark = pytest.mark.integration


def _crm(settings: AccordSettings, email: str) -> str:
    with postgres(settings, "crm") as conn:
        (key,) = conn.execute(
            "INSERT INTO customers (first_name, last_name, email, country, marketing_opt_in) "
            "VALUES ('Ada', 'Lovelace', %s, 'GB', true) RETURNING id",
            (email,),
        ).fetchone()
        conn.execute("UPDATE customers SET segment = 'enterprise' WHERE id = %s", (key,))
        conn.execute("DELETE FROM customers WHERE id = %s", (key,))
    return str(key)


def _billing(settings: AccordSettings, email: str) -> str:
    key = f"T-{uuid.uuid4().hex[:20]}"
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts (account_no, legal_name, contact_email, credit_limit, currency) "
            "VALUES (%s, 'Analytical Engines Ltd', %s, 1234.56, 'GBP')",
            (key, email),
        )
        cur.execute("UPDATE accounts SET status = 'suspended' WHERE account_no = %s", (key,))
        cur.execute("DELETE FROM accounts WHERE account_no = %s", (key,))
    return key


def _support(settings: AccordSettings, email: str) -> str:
    with postgres(settings, "support") as conn:
        (key,) = conn.execute(
            "INSERT INTO users (email, display_name) VALUES (%s, 'Ada L') RETURNING id", (email,)
        ).fetchone()
        conn.execute("UPDATE users SET tier = 'premium' WHERE id = %s", (key,))
        conn.execute("DELETE FROM users WHERE id = %s", (key,))
    return str(key)


CASES: dict[str, tuple[Callable[[AccordSettings, str], str], str, str, tuple[str, object]]] = {
    # system: (make changes, key column, email column, (column, value) set by the update)
    "crm": (_crm, "id", "email", ("segment", "enterprise")),
    "billing": (_billing, "account_no", "contact_email", ("status", "suspended")),
    "support": (_support, "id", "email", ("tier", "premium")),
}


@pytest.mark.parametrize("system", list(CASES))
def test_insert_update_delete_arrive_as_decoded_envelopes(
    connectors: AccordSettings, system: str
) -> None:
    make_changes, key_column, email_column, (updated_column, updated_value) = CASES[system]
    email = f"cdc-{uuid.uuid4().hex}@example.com"
    with RawTopicReader(connectors, [RAW_TOPICS[system]], from_beginning=False) as reader:
        reader.wait_assigned()
        key = make_changes(connectors, email)

        def ours(message: DecodedMessage) -> bool:
            return message.key is not None and str(message.key[key_column]) == key

        events: list[DecodedMessage] = []
        for message in reader.messages(timeout_s=90):
            if ours(message):
                events.append(message)
            if len(events) == 4:  # c, u, d and the delete's tombstone
                break

    assert [e.op for e in events] == ["c", "u", "d", None], f"got {[e.op for e in events]}"
    created, updated, deleted, tombstone = events
    assert all(e.schema_id and e.schema_id > 0 for e in events[:3])

    assert created.value["before"] is None
    assert created.value["after"][email_column] == email
    assert created.value["source"]["connector"] in ("postgresql", "mariadb")
    assert created.value["ts_ms"] >= created.value["source"]["ts_ms"]

    assert updated.value["before"][updated_column] != updated_value
    assert updated.value["after"][updated_column] == updated_value

    assert deleted.value["after"] is None
    assert deleted.value["before"][email_column] == email
    assert tombstone.value is None and tombstone.key == deleted.key

    if system == "billing":
        assert created.value["after"]["credit_limit"] == Decimal("1234.56")
        assert created.value["source"]["db"] == "billing"
