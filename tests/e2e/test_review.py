"""The review queue end to end on the real stack: a support sign-up with a role address is
held (written nowhere), and once an operator accepts it into the customer's record with
`accord review accept --golden`, its values merge and reach CRM."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from streams.app import redis_client
from streams.settings import AccordSettings
from streams.sources import postgres
from streams.stack.process import wait_until
from tests.support import TopicTail, accord, isolated, latest_by_key, running_worker

pytestmark = pytest.mark.e2e


@pytest.fixture
def app(connectors: AccordSettings) -> Iterator[AccordSettings]:
    """A worker with its appliers: CRM must receive what the accepted row brings."""
    settings = isolated(connectors)
    with running_worker(settings):
        yield settings


def _links(record: dict, user_id: str) -> bool:
    return {"system": "support", "key": user_id} in [
        {"system": link["system"], "key": link["key"]} for link in record.get("links") or []
    ]


def _web(settings: AccordSettings, path: str) -> str:
    url = f"http://{settings.worker.web_host}:{settings.worker.web_port}/{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _metric(settings: AccordSettings, name: str) -> float | None:
    for line in _web(settings, "metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _digits(value: Any) -> str:
    return re.sub(r"\D", "", str(value or ""))


def test_a_held_support_row_accepted_through_the_cli_reaches_crm(app: AccordSettings) -> None:
    settings = app
    tag = uuid.uuid4().hex[:8]
    email = f"grace.{tag}@example.com"
    golden = TopicTail(settings, settings.topics.golden)
    with postgres(settings, "crm") as conn:
        (crm_id,) = conn.execute(
            "INSERT INTO customers (first_name, last_name, email, phone, country) "
            "VALUES ('Grace', 'Hopper', %s, '020 7946 0111', 'United Kingdom') RETURNING id",
            (email,),
        ).fetchone()

    def customer(records: list[Any]) -> dict | None:
        found = [r for r in latest_by_key(records).values() if r["fields"]["email"] == email]
        return found[0] if found else None

    assert golden.wait_for(lambda records: customer(records) is not None, 120)
    golden_id = customer(golden.records)["golden_id"]

    # A sign-up in support whose only email is a role address: held, written nowhere.
    user_id = str(uuid.uuid4())
    role = f"info@{tag}.example"
    with postgres(settings, "support") as conn:
        conn.execute(
            "INSERT INTO users (id, email, display_name, phone, tier, locale) "
            "VALUES (%s, %s, 'Grace Hopper', '020 7946 0777', 'basic', 'en-GB')",
            (user_id, role),
        )
    client = redis_client(settings)
    held = f"{settings.worker.redis_prefix}held"
    assert wait_until(lambda: client.hexists(held, f"support:{user_id}"), 120, 0.5)
    listed = accord(settings, "review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [hold] = [h for h in json.loads(listed.stdout) if h["row"] == f"support:{user_id}"]
    assert hold["reason"] == "role_address"
    explained = accord(settings, "explain", f"support:{user_id}", "--json")
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout)["held"][0]["reason"] == "role_address"
    golden.poll()
    assert not any(_links(r, user_id) for r in golden.records if r is not None)

    # The status board counts it (no web token here: counts, never the row itself).
    def review_panel() -> dict:
        return json.loads(_web(settings, "status.json")).get("review") or {}

    assert wait_until(lambda: review_panel().get("by_reason", {}).get("role_address"), 60, 0.5)
    assert "holds" not in review_panel() and user_id not in _web(settings, "status.json")
    assert (_metric(settings, "accord_identity_held_rows") or 0) >= 1

    accepted = accord(
        settings, "review", "accept", f"support:{user_id}", "--golden", golden_id, "--json"
    )
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["replayed"] is True

    def merged(records: list[Any]) -> bool:
        record = latest_by_key(records).get(golden_id)
        return record is not None and _links(record, user_id)

    assert golden.wait_for(merged, 120), latest_by_key(golden.records).get(golden_id)

    def crm_phone() -> str:
        with postgres(settings, "crm") as conn:
            (phone,) = conn.execute(
                "SELECT phone FROM customers WHERE id = %s", (crm_id,)
            ).fetchone()
        return _digits(phone)

    # The accepted row's phone is the latest: lww carries it into CRM.
    assert wait_until(lambda: crm_phone().endswith("2079460777"), 120, 0.5), crm_phone()
    assert not client.hexists(held, f"support:{user_id}")
    accepted_metric = 'accord_review_decisions_total{decision="accept"}'
    assert wait_until(lambda: _metric(settings, accepted_metric) == 1.0, 60, 0.5)
    golden.close()
