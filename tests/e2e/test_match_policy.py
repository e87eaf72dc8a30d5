"""Issue 21's stranger on the real stack: a support sign-up with a customer's email, but
another name and phone, is held for review; CRM and billing keep the customer's phone.

A real `accord worker` with its appliers, topics, groups and Redis keys of this test's
own, fed by the real Debezium connectors.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from streams.app import redis_client
from streams.identity import HoldReason, IdentityResolver
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.stack.process import wait_until
from streams.topics import RAW_TOPICS
from tests.support import TopicTail, accord, isolated, latest_by_key, quiesced, running_worker

pytestmark = pytest.mark.e2e

ADA_PHONE = "+442079460142"
STRANGER_PHONE = "+14155550199"


def _ada(records: list[Any], email: str) -> dict | None:
    found = [r for r in latest_by_key(records).values() if r["fields"]["email"] == email]
    return found[0] if len(found) == 1 else None


def _systems(record: dict | None) -> list[str]:
    return sorted(link["system"] for link in record["links"]) if record else []


def test_a_strangers_sign_up_is_held_for_review_and_changes_no_ones_phone(
    connectors: AccordSettings,
) -> None:
    settings = isolated(connectors)
    tag = uuid.uuid4().hex[:8]
    email = f"ada.{tag}@example.com"
    account_no = f"MP-{tag}"
    stranger = str(uuid.uuid4())
    with running_worker(settings):
        golden = TopicTail(settings, settings.topics.golden)
        with postgres(settings, "crm") as conn:
            (crm_id,) = conn.execute(
                "INSERT INTO customers (first_name, last_name, email, phone, country) "
                "VALUES ('Ada', 'Lovelace', %s, %s, 'United Kingdom') RETURNING id",
                (email, ADA_PHONE),
            ).fetchone()
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO accounts (account_no, legal_name, contact_email, phone, "
                "billing_country) VALUES (%s, 'Analytical Engines Ltd', %s, %s, 'GB')",
                (account_no, email, ADA_PHONE),
            )
        # Ada in CRM and billing, and the support row Accord makes for her.
        assert golden.wait_for(
            lambda rs: _systems(_ada(rs, email)) == ["billing", "crm", "support"], 120
        ), _ada(golden.records, email)
        record = _ada(golden.records, email)
        assert record is not None and record["fields"]["phone"] == ADA_PHONE
        golden_id = record["golden_id"]

        # The stranger signs up in support with Ada's address, upper-cased.
        with postgres(settings, "support") as conn:
            conn.execute(
                "INSERT INTO users (id, email, display_name, phone, locale) "
                "VALUES (%s, %s, 'Mallory Jones', %s, 'en-US')",
                (stranger, email.upper(), STRANGER_PHONE),
            )
        identity = IdentityResolver(redis_client(settings), settings.worker.redis_prefix, ())
        assert wait_until(lambda: identity.held("support", stranger) is not None, 90)
        topics = [
            *RAW_TOPICS.values(),
            settings.topics.changes,
            *(settings.topics.sink(s) for s in ("crm", "billing", "support")),
        ]
        assert quiesced(settings, topics, timeout_s=180), "the pipeline never went quiet"

        hold = identity.held("support", stranger)
        assert hold is not None and hold.reason is HoldReason.REVIEW
        assert hold.golden_id == golden_id and hold.scores is not None
        assert hold.scores["keys"] == {"email": "low"} and hold.scores["phone_equal"] is False
        assert identity.lookup("support", stranger) is None
        golden.poll()
        record = latest_by_key(golden.records)[golden_id]
        assert record["fields"]["phone"] == ADA_PHONE
        assert stranger not in {link["key"] for link in record["links"]}
        with postgres(settings, "crm") as conn:
            [(crm_phone,)] = conn.execute(
                "SELECT phone FROM customers WHERE id = %s", (crm_id,)
            ).fetchall()
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute("SELECT phone FROM accounts WHERE account_no = %s", (account_no,))
            [(billing_phone,)] = cur.fetchall()
        with postgres(settings, "support") as conn:
            [(stranger_phone, stranger_name)] = conn.execute(
                "SELECT phone, display_name FROM users WHERE id = %s", (stranger,)
            ).fetchall()
        assert (crm_phone, billing_phone) == (ADA_PHONE, ADA_PHONE)
        assert (stranger_phone, stranger_name) == (STRANGER_PHONE, "Mallory Jones")

        explained = accord(settings, "explain", f"support:{stranger}", "--json")
        assert explained.returncode == 0, explained.stderr
        [held] = json.loads(explained.stdout)["held"]
        assert (held["reason"], held["golden_id"]) == ("review", golden_id)
        assert "review band" in held["why"]
