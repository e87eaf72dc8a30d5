"""The core pipeline on the real stack: three systems, one golden record, by the rules.

Each test runs a real `accord worker` process with topics, consumer groups and Redis keys
of its own, fed by the real Debezium connectors.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from streams.connect import ConnectClient
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.stack.process import wait_until
from streams.topics import RAW_TOPICS
from streams.workers import WorkerProcess
from tests.support import (
    TopicTail,
    accord,
    drained,
    isolated,
    latest_by_key,
    running_worker,
    without_appliers,
)

pytestmark = pytest.mark.e2e
BILLING_CONNECTOR = "accord-billing-source"


@pytest.fixture
def pipeline(connectors: AccordSettings) -> Iterator[tuple[AccordSettings, WorkerProcess]]:
    """A worker without appliers: these tests are about the merge, and an applier creating
    a row in a system the test is about to insert into would race the test."""
    settings = without_appliers(isolated(connectors))
    with running_worker(settings) as worker:
        yield settings, worker


def golden_with_email(records: list[Any], email: str) -> list[dict]:
    return [r for r in latest_by_key(records).values() if r["fields"]["email"] == email]


def audit_of(records: list[Any], golden_id: str, version: int) -> set[str]:
    return {
        r["field"]
        for r in records
        if r["golden_id"] == golden_id and r["golden_version"] == version
    }


def test_three_systems_become_one_golden_record_and_edits_move_only_their_fields(
    pipeline: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, _ = pipeline
    tag = uuid.uuid4().hex[:8]
    email = f"ada.{tag}@example.com"
    account_no = f"AC-{tag}"
    user_id = str(uuid.uuid4())
    golden = TopicTail(settings, settings.topics.golden)
    audit = TopicTail(settings, settings.topics.audit)
    client = ConnectClient(settings.connect)
    replay_from = client.offsets(BILLING_CONNECTOR)

    with postgres(settings, "crm") as conn:
        (crm_id,) = conn.execute(
            "INSERT INTO customers (first_name, last_name, email, phone, company, segment, "
            "country, marketing_opt_in) VALUES (' ada ', 'LOVELACE', %s, '020 7946 0142', "
            "'Engines (crm)', 'Enterprise', 'United Kingdom', true) RETURNING id",
            (f"  Ada.{tag}@Example.COM ",),
        ).fetchone()
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts (account_no, legal_name, contact_email, phone, tax_id, "
            "billing_street, billing_city, billing_postal_code, billing_country, currency, "
            "payment_terms, credit_limit, status) VALUES (%s, 'Analytical Engines Ltd', %s, "
            "'+44 20 7946 0999', %s, '12 St James Sq', 'London', 'SW1Y 4JH', 'GB', 'GBP', "
            "'net30', 1000.50, 'active')",
            (account_no, email.upper(), f"gb{tag}"),
        )
    with postgres(settings, "support") as conn:
        conn.execute(
            "INSERT INTO users (id, email, display_name, tier, locale) "
            "VALUES (%s, %s, 'Ada Lovelace', 'Premium', 'en_GB')",
            (user_id, email),
        )

    def merged(records: list[Any]) -> bool:
        found = golden_with_email(records, email)
        return len(found) == 1 and len(found[0]["links"]) == 3

    assert golden.wait_for(merged, 120), golden_with_email(golden.records, email)
    (record,) = golden_with_email(golden.records, email)
    assert record["active"] is True
    assert record["fields"] == {
        "first_name": "Ada",  # priority crm > support > billing
        "last_name": "Lovelace",
        "email": email,  # three messy spellings, one normalized address
        "phone": "+442079460999",  # lww: billing's is the latest non-null
        "company": "Analytical Engines Ltd",  # priority billing > crm
        "segment": "enterprise",  # owner crm
        "country": "GB",
        "marketing_opt_in": True,
        "tax_id": f"GB{tag.upper()}",
        "street": "12 St James Sq",
        "city": "London",
        "postal_code": "SW1Y 4JH",
        "currency": "GBP",
        "payment_terms": "NET30",
        "credit_limit": Decimal("1000.50"),
        "account_status": "active",
        "support_tier": "premium",  # owner support
        "locale": "en-GB",
    }
    assert sorted((link["system"], link["key"]) for link in record["links"]) == sorted(
        [("crm", str(crm_id)), ("billing", account_no), ("support", user_id)]
    )
    assert record["provenance"]["company"]["system"] == "billing"
    assert record["provenance"]["company"]["rule"] == "priority"
    golden_id = record["golden_id"]

    def next_version(expected: int) -> dict:
        assert golden.wait_for(
            lambda rs: latest_by_key(rs)[golden_id]["version"] >= expected, 90
        ), latest_by_key(golden.records)[golden_id]
        current = latest_by_key(golden.records)[golden_id]
        assert current["version"] == expected
        assert audit.wait_for(lambda rs: audit_of(rs, golden_id, expected), 30)
        return current

    version = record["version"]
    with postgres(settings, "crm") as conn:
        conn.execute("UPDATE customers SET phone = '020 7946 0111' WHERE id = %s", (crm_id,))
    version += 1
    assert next_version(version)["fields"]["phone"] == "+442079460111"
    assert audit_of(audit.records, golden_id, version) == {"phone"}

    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE accounts SET legal_name = 'Analytical Engines plc' WHERE account_no = %s",
            (account_no,),
        )
    version += 1
    assert next_version(version)["fields"]["company"] == "Analytical Engines plc"
    assert audit_of(audit.records, golden_id, version) == {"company"}

    with postgres(settings, "support") as conn:
        conn.execute("UPDATE users SET tier = 'enterprise' WHERE id = %s", (user_id,))
    version += 1
    assert next_version(version)["fields"]["support_tier"] == "enterprise"
    assert audit_of(audit.records, golden_id, version) == {"support_tier"}

    # A delete follows the policy (deactivate, as shipped): inactive, values kept.
    with postgres(settings, "support") as conn:
        conn.execute("DELETE FROM users WHERE id = %s", (user_id,))
    version += 1
    deactivated = next_version(version)
    assert deactivated["active"] is False
    assert deactivated["fields"]["support_tier"] == "enterprise"
    assert audit_of(audit.records, golden_id, version) == {"active"}

    # Replay: the billing connector is rewound to before this test's rows and emits
    # them again. Dedupe drops them: no new version, no new audit entry.
    raw_before = _raw_count(settings, account_no)
    client.rewind(BILLING_CONNECTOR, replay_from)
    assert wait_until(lambda: _raw_count(settings, account_no) >= 2 * raw_before, 90)
    assert wait_until(lambda: drained(settings, appliers=[]), 90)
    golden.read_to_end()
    audit.read_to_end()
    assert latest_by_key(golden.records)[golden_id]["version"] == version
    assert max(r["golden_version"] for r in audit.records if r["golden_id"] == golden_id) == version
    _assert_no_duplicates(golden.records, audit.records)


def _raw_count(settings: AccordSettings, account_no: str) -> int:
    """How many billing change events the raw topic holds for one account."""
    # The raw topic is the stack's own: it may hold poison that `make chaos` wrote.
    tail = TopicTail(settings, RAW_TOPICS["billing"], skip_undecodable=True)
    try:
        tail.read_to_end()
        return sum(
            1
            for r in tail.records
            if r and ((r.get("after") or r.get("before") or {}).get("account_no") == account_no)
        )
    finally:
        tail.close()


def _assert_no_duplicates(golden: list[Any], audit: list[Any]) -> None:
    versions = Counter((r["golden_id"], r["version"]) for r in golden if r)
    assert [k for k, n in versions.items() if n > 1] == []
    entries = Counter(r["audit_id"] for r in audit)
    assert [k for k, n in entries.items() if n > 1] == []


def _history(golden_id: str, golden: list[Any], audit: list[Any]) -> str:
    """Every version and audit entry of one record, for a failure message."""
    lines = [
        f"v{r['version']} company={r['fields']['company']} links={r['links']}"
        for r in golden
        if r and r["golden_id"] == golden_id
    ]
    lines += [
        f"audit v{r['golden_version']} {r['field']}: {r['before']} -> {r['after']} "
        f"({r['change_id']})"
        for r in audit
        if r["golden_id"] == golden_id
    ]
    return "\n".join(lines)


def test_invalid_records_go_to_the_dlq_with_every_reason_and_the_rest_flows(
    pipeline: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, _ = pipeline
    tag = uuid.uuid4().hex[:8]
    dlq = TopicTail(settings, settings.topics.dlq)
    golden = TopicTail(settings, settings.topics.golden)
    with postgres(settings, "crm") as conn:
        conn.execute(
            "INSERT INTO customers (email, country) VALUES (%s, 'GB')", (f"before-{tag}@x.io",)
        )
        (bad_id,) = conn.execute(
            "INSERT INTO customers (email, country) VALUES ('not-an-email', 'Atlantis') "
            "RETURNING id"
        ).fetchone()
        conn.execute(
            "INSERT INTO customers (email, country) VALUES (%s, 'GB')", (f"after-{tag}@x.io",)
        )
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts (account_no, contact_email, billing_country) "
            "VALUES (%s, %s, 'Narnia')",
            (f"BAD-{tag}", f"billing-{tag}@x.io"),
        )
        # An empty primary key: the row cannot be linked to anything. (An upsert, so that
        # a rerun on the same database changes the row again instead of failing.)
        cur.execute(
            "INSERT INTO accounts (account_no, contact_email) VALUES ('', %s) "
            "ON DUPLICATE KEY UPDATE contact_email = VALUES(contact_email)",
            (f"nokey-{tag}@x.io",),
        )

    assert dlq.wait_for(lambda rs: len(rs) >= 3, 90), dlq.records
    by_topic: dict[str, list[dict]] = {}
    for record in dlq.records:
        by_topic.setdefault(record["topic"], []).append(record)
    [crm] = by_topic[RAW_TOPICS["crm"]]
    assert crm["reason"] == "validation_failed"
    assert "email" in crm["detail"] and "Atlantis" in crm["detail"]
    assert crm["value"] and crm["value"][0] == 0  # the original wire-format bytes
    assert crm["offset"] >= 0 and crm["error_class"] == "ValidationFailed"
    billing = by_topic[RAW_TOPICS["billing"]]
    assert len(billing) == 2
    assert any("Narnia" in r["detail"] for r in billing)
    assert any("primary key column 'account_no' is missing" in r["detail"] for r in billing)
    assert str(bad_id) not in {link["key"] for r in golden.records for link in r["links"]}

    emails = {f"before-{tag}@x.io", f"after-{tag}@x.io"}
    assert golden.wait_for(
        lambda rs: emails <= {r["fields"]["email"] for r in latest_by_key(rs).values()}, 90
    )


def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    pipeline: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, worker = pipeline
    tag = uuid.uuid4().hex[:8]
    customers, edits = 30, 12
    golden = TopicTail(settings, settings.topics.golden)
    audit = TopicTail(settings, settings.topics.audit)
    with postgres(settings, "crm") as conn:
        ids = [
            conn.execute(
                "INSERT INTO customers (email, company, country) VALUES (%s, 'v0', 'US') "
                "RETURNING id",
                (f"kill-{tag}-{i}@example.com",),
            ).fetchone()[0]
            for i in range(customers)
        ]

    def edit() -> None:
        with postgres(settings, "crm") as conn:
            for round_ in range(1, edits + 1):
                for crm_id in ids:
                    conn.execute(
                        "UPDATE customers SET company = %s WHERE id = %s", (f"v{round_}", crm_id)
                    )

    writer = threading.Thread(target=edit)
    writer.start()
    # Kill once outputs are flowing, while edits are still being made and processed.
    assert golden.wait_for(lambda rs: len(rs) >= customers + 20, 120)
    worker.kill()
    writer.join(120)
    restart_log_from = worker.log.stat().st_size
    worker.start()

    def converged(records: list[Any]) -> bool:
        latest = [
            r
            for r in latest_by_key(records).values()
            if (r["fields"]["email"] or "").startswith(f"kill-{tag}")
        ]
        return len(latest) == customers and all(
            r["fields"]["company"] == f"v{edits}" for r in latest
        )

    assert golden.wait_for(converged, 180)
    # The kill left the crash marker, so the restart wiped RocksDB and rebuilt the table
    # from its changelog, in bulk (`streams.restore`) before Faust's replay.
    restart_log = worker.log.read_bytes()[restart_log_from:].decode(errors="replace")
    assert re.search(r"restored [1-9][\d,]* golden changelog records", restart_log), restart_log
    assert wait_until(lambda: drained(settings, appliers=[]), 90)
    golden.read_to_end()
    audit.read_to_end()
    _assert_no_duplicates(golden.records, audit.records)
    # Nothing lost: every version of every record was emitted, in order, once.
    ours = {
        r["golden_id"]
        for r in golden.records
        if (r["fields"]["email"] or "").startswith(f"kill-{tag}")
    }
    for golden_id in ours:
        versions = [r["version"] for r in golden.records if r["golden_id"] == golden_id]
        assert versions == list(range(1, len(versions) + 1)), versions
        company_history = [
            r["after"]
            for r in audit.records
            if r["golden_id"] == golden_id and r["field"] == "company"
        ]
        assert company_history == [f"v{i}" for i in range(edits + 1)], _history(
            golden_id, golden.records, audit.records
        )


def test_explain_names_the_rule_and_the_losing_value_of_a_conflict(
    pipeline: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, _ = pipeline
    tag = uuid.uuid4().hex[:8]
    email = f"explain-{tag}@example.com"
    golden = TopicTail(settings, settings.topics.golden)
    # The two rows' names differ (the conflict on first_name below): the same phone is
    # what tells the match policy they are one person (support's email is low trust).
    with postgres(settings, "crm") as conn:
        conn.execute(
            "INSERT INTO customers (first_name, email, country, phone) "
            "VALUES ('Ada', %s, 'GB', '020 7946 0000')",
            (email,),
        )
    with postgres(settings, "support") as conn:
        conn.execute(
            "INSERT INTO users (id, email, display_name, phone) "
            "VALUES (%s, %s, 'Augusta Lovelace', '+44 20 7946 0000')",
            (uuid.uuid4(), email),
        )
    assert golden.wait_for(lambda rs: len(golden_with_email(rs, email)) == 1, 90)
    # A conflict on phone (lww): CRM first, support a moment later; support wins.
    with postgres(settings, "crm") as conn:
        conn.execute("UPDATE customers SET phone = '020 7946 0000' WHERE email = %s", (email,))
    with postgres(settings, "support") as conn:
        conn.execute("UPDATE users SET phone = '+44 20 7946 1111' WHERE email = %s", (email,))

    def settled(records: list[Any]) -> bool:
        found = golden_with_email(records, email)
        return bool(found) and found[0]["fields"]["phone"] == "+442079461111"

    assert golden.wait_for(settled, 90)
    assert wait_until(lambda: drained(settings, appliers=[]), 90)

    result = accord(settings, "explain", email, "--json")
    assert result.returncode == 0, result.stderr
    fields = {f["name"]: f for f in json.loads(result.stdout)["fields"]}

    # The worker's own view of the same work: health and Prometheus counters.
    web = f"http://{settings.worker.web_host}:{settings.worker.web_port}"
    health = httpx.get(f"{web}/health", timeout=10).json()
    assert (health["ready"], health["problems"]) == (True, []), health
    metrics = httpx.get(f"{web}/metrics", timeout=10).text
    merged = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('accord_merge_changes_total{outcome="new_version"}')
    ]
    assert merged and merged[0] >= 3  # a create, a link, the winning phone edit
    phone = fields["phone"]
    assert (phone["value"], phone["system"], phone["rule"]) == ("+442079461111", "support", "lww")
    assert [(lost["system"], lost["value"], lost["why"]) for lost in phone["lost"]] == [
        ("crm", "+442079460000", "older")
    ]
    # CRM's value shows in the history only if it arrived before support's (two topics).
    last = phone["history"][-1]
    assert (last["after"], last["system"], last["rule"]) == ("+442079461111", "support", "lww")
    first = fields["first_name"]
    assert (first["value"], first["system"], first["rule"]) == ("Ada", "crm", "priority")
    assert [(lost["system"], lost["value"], lost["why"]) for lost in first["lost"]] == [
        ("support", "Augusta", "crm ranks above support")
    ]


def test_a_row_dated_in_the_future_is_clamped_and_loses_lww_to_a_later_edit(
    pipeline: tuple[AccordSettings, WorkerProcess],
) -> None:
    """Billing's `updated_at` (its `commit_time`) a day ahead would win `lww` for a day.
    Ingest clamps it to the capture time, flags it, and a later edit elsewhere wins.

    Other workers on the shared stack may create a support row for this customer too;
    it may join the record and win `phone` in its turn, so the assertions are about
    billing's row: clamped, flagged, and not the winner."""
    settings, _ = pipeline
    tag = uuid.uuid4().hex[:8]
    email = f"skew-{tag}@example.com"
    account_no = f"SK-{tag}"
    golden = TopicTail(settings, settings.topics.golden)
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts (account_no, legal_name, contact_email, phone, "
            "billing_country, updated_at) VALUES (%s, 'Skew Ltd', %s, '+44 20 7946 0001', "
            "'GB', CURRENT_TIMESTAMP(6) + INTERVAL 1 DAY)",
            (account_no, email),
        )

    def linked(*systems: str) -> Any:
        def check(records: list[Any]) -> bool:
            found = golden_with_email(records, email)
            return len(found) == 1 and set(systems) <= {
                link["system"] for link in found[0]["links"]
            }

        return check

    assert golden.wait_for(linked("billing"), 90), golden_with_email(golden.records, email)
    with postgres(settings, "crm") as conn:
        conn.execute(
            "INSERT INTO customers (first_name, email, phone, country) "
            "VALUES ('Ada', %s, '020 7946 0002', 'GB')",
            (email,),
        )
    assert golden.wait_for(linked("billing", "crm"), 90), golden_with_email(golden.records, email)
    assert wait_until(lambda: drained(settings, appliers=[]), 90)

    result = accord(settings, "explain", email, "--json")
    assert result.returncode == 0, result.stderr
    phone = {f["name"]: f for f in json.loads(result.stdout)["fields"]}["phone"]
    assert phone["system"] != "billing", phone  # a day ahead, it would have won
    lost = {(entry["system"], entry["value"]): entry for entry in phone["lost"]}
    billing = lost[("billing", "+442079460001")]
    assert billing["why"] == "older"
    assert billing["clamped_from"] is not None and billing["clamped_from"] > billing["source_time"]
    if phone["system"] == "crm":
        assert phone["value"] == "+442079460002"

    web = f"http://{settings.worker.web_host}:{settings.worker.web_port}"
    metrics = httpx.get(f"{web}/metrics", timeout=10).text
    clamped = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('accord_clock_skew_clamped_total{system="billing"}')
    ]
    assert clamped and clamped[0] >= 1
