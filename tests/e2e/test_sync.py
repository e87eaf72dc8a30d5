"""Two-way sync on the real stack: a random workload converges in every system, quietly.

A worker (ingest, merge, emit) and one applier process per system, with topics, groups
and Redis keys of this test's own, fed by the real Debezium connectors. The workload
mixes creates, updates, deletes, conflicting near-simultaneous edits of one customer in
two systems, a connector replay (duplicate deliveries) and an applier killed mid-stream.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from streams.connect import ConnectClient
from streams.mapping import load_mappings
from streams.projection import load_sinks
from streams.reconcile import compare, golden_records, target_rows
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.stack.process import ProcessSpec, read_pid, spawn, stop
from streams.topics import RAW_TOPICS
from streams.workers import applier_process
from tests.support import TopicTail, isolated, quiesced, running_worker, without_appliers

pytestmark = pytest.mark.e2e
SYSTEMS = ("crm", "billing", "support")
EDITS = 520


@pytest.fixture
def sync(connectors: AccordSettings) -> Iterator[tuple[AccordSettings, dict[str, ProcessSpec]]]:
    settings = without_appliers(isolated(connectors))
    with running_worker(settings):
        appliers = {target: applier_process(settings, target) for target in SYSTEMS}
        for spec in appliers.values():
            spawn(spec)
        try:
            yield settings, appliers
        finally:
            for spec in appliers.values():
                stop(spec, 30)


@dataclass
class Workload:
    """The rows this test made, and what it did to them."""

    settings: AccordSettings
    tag: str
    rng: random.Random
    rows: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SYSTEMS})
    counts: Counter = field(default_factory=Counter)
    serial: int = 0
    names: dict[str, str] = field(default_factory=dict)  # one name per customer (email)

    def email(self) -> str:
        self.serial += 1
        return f"u{self.serial}-{self.tag}@example.com"

    def create(self, system: str, email: str | None = None) -> str:
        email = email or self.email()
        # One person per address: support's emails are low trust, and its rows link by
        # the address only with the same name (the match policy).
        name = self.names.setdefault(
            email.lower(),
            self.rng.choice(["Ada Byron", "Alan Turing", "Grace Hopper", "Edsger Dijkstra"]),
        )
        first, last = name.split()
        if system == "billing":
            key = f"W-{self.tag}-{self.serial}"
            with mariadb(self.settings) as conn, conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO accounts (account_no, legal_name, contact_email, "
                    "billing_country) VALUES (%s, %s, %s, 'DE')",
                    (key, f"{last} GmbH", email.upper()),
                )
        elif system == "crm":
            with postgres(self.settings, "crm") as conn:
                (key,) = conn.execute(
                    "INSERT INTO customers (first_name, last_name, email, country) "
                    "VALUES (%s, %s, %s, 'Germany') RETURNING id",
                    (first, last, f" {email.title()} "),
                ).fetchone()
        else:
            with postgres(self.settings, "support") as conn:
                (key,) = conn.execute(
                    "INSERT INTO users (email, display_name, locale) "
                    "VALUES (%s, %s, 'de-DE') RETURNING id",
                    (email, name),
                ).fetchone()
        self.rows[system].append(str(key))
        self.counts[f"create:{system}"] += 1
        return str(key)

    def update(self, system: str, key: str, column: str, value: object) -> None:
        if system == "billing":
            with mariadb(self.settings) as conn, conn.cursor() as cur:
                cur.execute(
                    f"UPDATE accounts SET {column} = %s WHERE account_no = %s", (value, key)
                )
        else:
            table = {"crm": "customers", "support": "users"}[system]
            with postgres(self.settings, system) as conn:
                conn.execute(f"UPDATE {table} SET {column} = %s WHERE id = %s", (value, key))
        self.counts[f"update:{system}"] += 1

    def delete(self, system: str, key: str) -> None:
        if system == "billing":
            with mariadb(self.settings) as conn, conn.cursor() as cur:
                cur.execute("DELETE FROM accounts WHERE account_no = %s", (key,))
        else:
            table = {"crm": "customers", "support": "users"}[system]
            with postgres(self.settings, system) as conn:
                conn.execute(f"DELETE FROM {table} WHERE id = %s", (key,))
        self.rows[system].remove(key)
        self.counts[f"delete:{system}"] += 1

    def refresh(self) -> None:
        """Rows Accord created for our customers are ours to edit too."""
        pattern = f"%-{self.tag}@example.com"
        for system, query in (
            ("crm", "SELECT id FROM customers WHERE lower(trim(email)) LIKE %s"),
            ("support", "SELECT id FROM users WHERE lower(email) LIKE %s"),
        ):
            with postgres(self.settings, system) as conn:
                found = {str(r[0]) for r in conn.execute(query, (pattern,)).fetchall()}
            self.rows[system] = sorted(found | set(self.rows[system]) & found)

    def random_edit(self) -> None:
        roll = self.rng.random()
        system = self.rng.choice([s for s in SYSTEMS if self.rows[s]])
        key = self.rng.choice(self.rows[system])
        if roll < 0.08:
            self.create(self.rng.choice(["crm", "support"]))
        elif roll < 0.11 and len(self.rows[system]) > 5:
            self.delete(system, key)
        elif roll < 0.18:
            self.conflict()
        else:
            column, value = self.rng.choice(self.edits_for(system))
            self.update(system, key, column, value)

    def edits_for(self, system: str) -> list[tuple[str, object]]:
        n = self.rng.randrange(10_000)
        phone = f"+49 30 {self.rng.randrange(2, 10)}{n:04d}{self.rng.randrange(100):02d}"
        return {
            "crm": [("phone", phone), ("company", f"Firma {n}"), ("first_name", f"Name{n}")],
            "billing": [("phone", phone), ("legal_name", f"Firma {n} GmbH")],
            "support": [("phone", phone), ("display_name", f"Vorname{n} Nachname{n}")],
        }[system]

    def conflict(self) -> None:
        """The same customer's phone edited in CRM and support at the same moment."""
        pairs = self.linked_pairs()
        if not pairs:
            return
        crm_key, support_key = self.rng.choice(pairs)
        barrier = threading.Barrier(2)
        values = {"crm": self.edits_for("crm")[0][1], "support": self.edits_for("support")[0][1]}

        def edit(system: str, key: str) -> None:
            barrier.wait(10)
            self.update(system, key, "phone", values[system])

        threads = [
            threading.Thread(target=edit, args=("crm", crm_key)),
            threading.Thread(target=edit, args=("support", support_key)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.counts["conflicts"] += 1

    def linked_pairs(self) -> list[tuple[str, str]]:
        """(crm id, support id) of customers both systems hold, by email."""
        with postgres(self.settings, "crm") as conn:
            crm = dict(conn.execute(
                "SELECT lower(trim(email)), id::text FROM customers WHERE lower(trim(email)) "
                "LIKE %s", (f"%-{self.tag}@example.com",),
            ).fetchall())  # fmt: skip
        with postgres(self.settings, "support") as conn:
            support = dict(conn.execute(
                "SELECT lower(email), id::text FROM users WHERE lower(email) LIKE %s",
                (f"%-{self.tag}@example.com",),
            ).fetchall())  # fmt: skip
        return [(crm[e], support[e]) for e in crm.keys() & support.keys()]


def test_random_workload_converges_everywhere_and_quiesces(
    sync: tuple[AccordSettings, dict[str, ProcessSpec]],
) -> None:
    settings, appliers = sync
    tag = uuid.uuid4().hex[:8]
    load = Workload(settings, tag, random.Random(tag))
    client = ConnectClient(settings.connect)
    replay_from = client.offsets("accord-billing-source")
    changes = TopicTail(settings, settings.topics.changes)

    for i in range(30):  # customers in one, two or three systems, emails spelled apart
        email = load.email()
        for system in [s for s in SYSTEMS if load.rng.random() < 0.6] or ["crm"]:
            load.create(system, email if i % 2 else email.upper())
    for n in range(EDITS):
        if n % 50 == 0:
            load.refresh()
        if n == EDITS // 3:
            client.rewind("accord-billing-source", replay_from)  # duplicate deliveries
            load.counts["replays"] += 1
        if n == EDITS // 2:  # an applier dies mid-stream and comes back
            stop(replace(appliers["crm"], stop_signal=signal.SIGKILL), 30)
            assert read_pid(appliers["crm"]) is None
            spawn(appliers["crm"])
            load.counts["applier_kills"] += 1
        load.random_edit()

    topics = [
        *RAW_TOPICS.values(),
        settings.topics.changes,
        *(settings.topics.sink(s) for s in SYSTEMS),
    ]
    assert quiesced(settings, topics, timeout_s=300), "the systems never went quiet"

    # Every system holds exactly the projection of every golden record of ours.
    ours = _our_golden_records(settings, tag)
    assert len(ours) >= 30
    sinks, mappings = load_sinks(settings.connectors_dir), load_mappings(settings.connectors_dir)
    for target in SYSTEMS:
        rows = target_rows(settings, sinks[target])
        keys = {
            link["key"] for r in ours.values() for link in r["links"] if link["system"] == target
        }
        card = compare(
            sinks[target], mappings[target], ours, {k: rows[k] for k in keys & rows.keys()}
        )
        assert (card.drifted, card.missing) == (0, 0), card.as_dict()
        load.counts[f"in_accord:{target}"] = card.in_accord

    # At most one sink event per target per accepted change; each applied once.
    changes.read_to_end()
    accepted = len(changes.records)
    for target in SYSTEMS:
        events = TopicTail(settings, settings.topics.sink(target))
        events.read_to_end()
        load.counts[f"sink_events:{target}"] = len(events.records)
        assert len(events.records) <= accepted
        ledger = _ledger(settings, target)
        assert len(ledger) == len({row[0] for row in ledger}), "an event applied twice"
        load.counts[f"applied:{target}"] = len(ledger)
    load.counts["accepted_changes"] = accepted
    figures = dict(sorted(load.counts.items()))
    print("\nworkload:", figures)
    report = settings.stack.state_dir / "reports" / "sync-workload.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(figures, indent=2) + "\n")
    assert (
        sum(v for k, v in load.counts.items() if k.split(":")[0] in ("create", "update", "delete"))
        >= 500
    )


def _our_golden_records(settings: AccordSettings, tag: str) -> dict[str, dict[str, Any]]:
    return {
        golden_id: record
        for golden_id, record in golden_records(settings).items()
        if (record["fields"]["email"] or "").endswith(f"-{tag}@example.com")
    }


def _ledger(settings: AccordSettings, target: str) -> list[tuple]:
    query = "SELECT event_id, golden_id, golden_version FROM accord_applied WHERE app = %s"
    if target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(query, (settings.worker.app_id,))
            return list(cur.fetchall())
    with postgres(settings, target) as conn:
        return conn.execute(query, (settings.worker.app_id,)).fetchall()
