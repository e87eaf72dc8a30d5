"""Redis loses Accord's identity keys under a running worker: no twin golden records, no
twin rows, the edits made meanwhile arrive, and the worker says what it is doing.

A real worker (in-worker appliers) with topics, groups and Redis keys of this test's own,
fed by the real Debezium connectors. Only this test's Redis keys are deleted (what
FLUSHALL does to one app), never the shared Redis.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from streams.reconcile import golden_records
from streams.relink import LOCK_KEY, LOST_REASON, read_epoch
from streams.settings import AccordSettings
from streams.sources import postgres
from streams.topics import RAW_TOPICS
from tests.support import isolated, quiesced, running_worker

pytestmark = pytest.mark.e2e
TABLES = {"crm": "customers", "support": "users"}


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)  # a poll interval, not a synchronisation
    return condition()


def _digits(text: str | None) -> str:
    return "".join(c for c in text or "" if c.isdigit())


def ours(settings: AccordSettings, tag: str) -> dict[str, dict[str, Any]]:
    """This test's golden records (latest version each), by golden id."""
    return {
        golden_id: record
        for golden_id, record in golden_records(settings).items()
        if (record["fields"]["email"] or "").endswith(f"-{tag}@example.com")
    }


def rows(settings: AccordSettings, system: str, tag: str) -> list[tuple[str, str, Any, Any]]:
    """(email, key, phone, company or None) of every row of ours in a system."""
    company = "company" if system == "crm" else "NULL"
    with postgres(settings, system) as conn:
        return conn.execute(
            f"SELECT lower(trim(email)), id::text, phone, {company} FROM {TABLES[system]} "
            "WHERE lower(trim(email)) LIKE %s ORDER BY 1",
            (f"%-{tag}@example.com",),
        ).fetchall()


def linked(settings: AccordSettings, tag: str, emails: list[str]) -> bool:
    """Every customer has one golden record linking one CRM and one support row."""
    records = ours(settings, tag)
    by_email = {r["fields"]["email"]: r for r in records.values()}
    if len(records) != len(emails) or set(by_email) != set(emails):
        return False
    return all(
        sorted(link["system"] for link in r["links"]) == ["crm", "support"]
        for r in records.values()
    )


def test_a_flushed_redis_is_noticed_and_rebuilt_without_twins(connectors: AccordSettings) -> None:
    settings = isolated(connectors)
    tag = uuid.uuid4().hex[:8]
    emails = [f"c{n}-{tag}@example.com" for n in range(6)]
    topics = [*RAW_TOPICS.values(), settings.topics.changes]
    client = redis.Redis.from_url(settings.redis)
    prefix = settings.worker.redis_prefix
    with running_worker(settings) as worker:
        # Two customers in CRM and support at once (linked by email), two only in
        # support (Accord makes their CRM rows), two only in CRM (their support rows).
        for n, email in enumerate(emails):
            systems = [("crm", "support"), ("support",), ("crm",)][n % 3]
            if "crm" in systems:
                with postgres(settings, "crm") as conn:
                    conn.execute(
                        "INSERT INTO customers (first_name, last_name, email, country) "
                        "VALUES ('Ada', %s, %s, 'Germany')",
                        (f"Byron{n}", email),
                    )
            if "support" in systems:
                with postgres(settings, "support") as conn:
                    conn.execute(
                        "INSERT INTO users (email, display_name, locale) VALUES (%s, %s, 'de-DE')",
                        (email, f"Ada Byron{n}"),
                    )
        assert _wait(lambda: linked(settings, tag, emails), 240), ours(settings, tag)
        assert quiesced(settings, topics, timeout_s=180), "the pipeline never went quiet"
        before_ids = set(ours(settings, tag))
        before_rows = {system: rows(settings, system, tag) for system in TABLES}
        assert [len(before_rows[s]) for s in TABLES] == [6, 6]
        assert read_epoch(client, f"{prefix}identity-epoch")["how"] == "fresh"

        # The flush, with the rebuild lock held as if another worker were rebuilding, so
        # that the worker's state in between can be seen.
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        assert any(k.decode().startswith(f"{prefix}xref:") for k in keys)
        flush = client.pipeline(transaction=True)
        flush.delete(*keys)
        flush.set(f"{prefix}{LOCK_KEY}", "test-holds-it", px=120_000)
        flush.execute()

        # Every row edited meanwhile: the CRM phone, the support company is not a column,
        # so support edits the phone and CRM the company (both reach the golden record).
        for n, (_, key, _, _) in enumerate(before_rows["crm"]):
            with postgres(settings, "crm") as conn:
                conn.execute(
                    "UPDATE customers SET company = %s WHERE id = %s", (f"Firma {n} {tag}", key)
                )
        for n, (_, key, _, _) in enumerate(before_rows["support"]):
            with postgres(settings, "support") as conn:
                conn.execute(
                    "UPDATE users SET phone = %s WHERE id = %s", (f"+49 30 555{n:04d}", key)
                )

        def health() -> httpx.Response:
            return httpx.get(worker.health_url, timeout=5)

        assert _wait(lambda: health().status_code == 503, 60), health().text
        assert LOST_REASON in health().json()["problems"]
        assert _wait(lambda: "ingest paused until the identity keys are rebuilt"
                     in worker.log.read_text(), 60)  # fmt: skip
        assert not client.exists(f"{prefix}xref:crm:{before_rows['crm'][0][1]}")

        client.delete(f"{prefix}{LOCK_KEY}")  # the worker takes the lock and rebuilds
        assert _wait(lambda: health().status_code == 200, 120), health().text
        assert quiesced(settings, topics, timeout_s=180), "the pipeline never went quiet"

        def edits_arrived() -> bool:
            records = ours(settings, tag)
            return all(
                r["fields"]["company"] is not None
                and r["fields"]["company"].endswith(tag)
                and _digits(r["fields"]["phone"]).startswith("4930555")
                for r in records.values()
            )

        assert _wait(edits_arrived, 120), ours(settings, tag)
        after = ours(settings, tag)
        log = worker.log.read_text()

    # No new golden record: the same ids, each still linking one CRM and one support row.
    assert set(after) == before_ids
    for record in after.values():
        assert sorted(link["system"] for link in record["links"]) == ["crm", "support"]
    # No twin rows: the same rows in each system, one per customer, holding the edits.
    after_rows = {system: rows(settings, system, tag) for system in TABLES}
    for system in TABLES:
        assert [(e, k) for e, k, _, _ in after_rows[system]] == [
            (e, k) for e, k, _, _ in before_rows[system]
        ]
    assert all(_digits(phone).startswith("4930555") for _, _, phone, _ in after_rows["crm"])
    # The rebuild was logged with its count (other tests' rows are in this app too), and
    # stamped in the epoch.
    restored = re.findall(r"identity keys restored: rebuilt the identity keys of (\d+) ", log)
    assert len(restored) == 1 and int(restored[0]) >= 6, log[-3000:]
    epoch = read_epoch(client, f"{prefix}identity-epoch")
    assert epoch is not None and epoch["how"] == "rebuild"
    assert epoch["golden_records"] == int(restored[0])
    client.close()
