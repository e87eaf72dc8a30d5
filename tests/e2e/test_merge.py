"""`accord merge` on the real stack: a customer known under two golden records (CRM with
one email, a support sign-up with another) becomes one. The survivor takes the other's
rows and recomputes its fields by the rules from all of them; the other becomes a
tombstone pointing at it on `accord.golden`; every target follows; a later edit of a
moved row reaches the survivor.

A real `accord worker` with its appliers, topics, groups and Redis keys of this test's
own, fed by the real Debezium connectors.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from streams.settings import AccordSettings
from streams.sources import postgres
from streams.stack.process import wait_until
from tests.support import TopicTail, accord, isolated, latest_by_key, running_worker

pytestmark = pytest.mark.e2e


def _linking(records: list[Any], link: str) -> dict | None:
    for record in latest_by_key(records).values():
        if link in {f"{x['system']}:{x['key']}" for x in record["links"]}:
            return record
    return None


def test_two_records_of_one_customer_merge_and_every_target_follows(
    connectors: AccordSettings,
) -> None:
    settings = isolated(connectors)
    tag = uuid.uuid4().hex[:8]
    crm_email, support_email = f"ada.{tag}@example.com", f"ada.l.{tag}@example.net"
    user_id = str(uuid.uuid4())
    with running_worker(settings):
        golden = TopicTail(settings, settings.topics.golden)
        with postgres(settings, "crm") as conn:
            (crm_id,) = conn.execute(
                "INSERT INTO customers (first_name, last_name, email, country) "
                "VALUES ('Ada', 'Lovelace', %s, 'United Kingdom') RETURNING id",
                (crm_email,),
            ).fetchone()
        crm_link, support_link = f"crm:{crm_id}", f"support:{user_id}"
        assert golden.wait_for(lambda rs: _linking(rs, crm_link) is not None, 120)
        with postgres(settings, "support") as conn:
            conn.execute(
                "INSERT INTO users (id, email, display_name, tier, locale) "
                "VALUES (%s, %s, 'Ada Lovelace', 'Premium', 'en-GB')",
                (user_id, support_email),
            )
        assert golden.wait_for(lambda rs: _linking(rs, support_link) is not None, 120)
        survivor = _linking(golden.records, crm_link)["golden_id"]
        loser = _linking(golden.records, support_link)["golden_id"]
        assert survivor != loser  # another email: nothing matched

        merged = accord(settings, "merge", survivor, loser, "--json")
        assert merged.returncode == 0, merged.stderr
        outcome = json.loads(merged.stdout)
        assert support_link in outcome["moved"] and outcome["by"]

        def tombstoned(records: list[Any]) -> bool:
            record = latest_by_key(records).get(loser)
            return bool(record) and record["merged_into"] == survivor

        def took_over(records: list[Any]) -> bool:
            record = latest_by_key(records).get(survivor)
            links = {f"{x['system']}:{x['key']}" for x in record["links"]} if record else set()
            return {crm_link, support_link} <= links

        assert golden.wait_for(tombstoned, 120), latest_by_key(golden.records).get(loser)
        assert golden.wait_for(took_over, 120), latest_by_key(golden.records).get(survivor)
        tombstone = latest_by_key(golden.records)[loser]
        assert tombstone["active"] is False and tombstone["links"] == []
        record = latest_by_key(golden.records)[survivor]
        assert record["active"] is True
        # Recomputed from all rows by the rules: support owns its tier and locale; the
        # email is the latest commit's (support's sign-up came after the CRM row).
        assert record["fields"]["support_tier"] == "premium"
        assert record["fields"]["locale"] == "en-GB"
        assert record["fields"]["email"] == support_email

        # Every target follows the survivor: CRM's row takes the email it lost.
        def crm_email_now() -> str | None:
            with postgres(settings, "crm") as conn:
                row = conn.execute(
                    "SELECT email FROM customers WHERE id = %s", (crm_id,)
                ).fetchone()
            return row[0] if row else None

        assert wait_until(lambda: crm_email_now() == support_email, 120), crm_email_now()

        # A later edit of the moved row reaches the survivor (its xref follows it).
        with postgres(settings, "support") as conn:
            conn.execute("UPDATE users SET tier = 'Enterprise' WHERE id = %s", (user_id,))

        def tier_is_enterprise(records: list[Any]) -> bool:
            record = latest_by_key(records).get(survivor)
            return bool(record) and record["fields"]["support_tier"] == "enterprise"

        assert golden.wait_for(tier_is_enterprise, 120)
        assert latest_by_key(golden.records)[loser]["merged_into"] == survivor
