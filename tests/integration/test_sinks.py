"""Sink appliers against the real crm/support PostgreSQL and billing MariaDB tables, the
real Redis xref, and (for the runner) real Kafka: creates, partial updates, no-ops,
version guard, ledger, deletes, dead letters, outages, and restarts."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.app import redis_client
from streams.faust_codec import canonical_codec
from streams.identity import IdentityResolver
from streams.model import FIELDS, Change, Op
from streams.projection import load_sinks
from streams.registry import registry_client
from streams.settings import AccordSettings
from streams.sinks import (
    LEDGER_TABLE,
    SINK_KEY_NAMESPACE,
    Action,
    Interrupted,
    Outcome,
    RowReports,
    SinkRunner,
    SqlApplier,
    Status,
    TransientSinkError,
)
from streams.sources import mariadb, postgres
from streams.stack.process import wait_until
from tests.support import TopicTail, free_port, isolated

pytestmark = pytest.mark.integration

KEYS = {"crm": "id", "support": "id", "billing": "account_no"}
TABLES = {"crm": "customers", "support": "users", "billing": "accounts"}


# ---------------------------------------------------------------------------- helpers


def sink_event(
    target: str,
    golden_id: str,
    version: int,
    *,
    op: str = "UPSERT",
    target_key: str | None = None,
    changed: list[str] | None = None,
    expected: dict[str, Any] | None = None,
    **values: Any,
) -> dict[str, Any]:
    """A dev.accord.SinkEvent record as the emitter writes it (and the codec decodes it)."""
    now = dt.datetime.now(dt.UTC)
    return {
        "event_id": f"{target}:{golden_id}:{version}:{target_key or '+'}",
        "target": target,
        "op": op,
        "target_key": target_key,
        "golden_id": golden_id,
        "golden_version": version,
        "fields": {name: values.get(name) for name in FIELDS},
        "changed": list(values) if changed is None else changed,
        "caused_by": None,
        "emitted_at": now,
        "source_ts": now - dt.timedelta(milliseconds=30),
        "expected": None if expected is None else {n: expected.get(n) for n in FIELDS},
    }


def query(settings: AccordSettings, target: str, sql: str, params: tuple = ()) -> list[tuple]:
    if target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    with postgres(settings, target) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def row(settings: AccordSettings, target: str, key: str, *columns: str) -> dict | None:
    rows = query(
        settings,
        target,
        f"SELECT {', '.join(columns)} FROM {TABLES[target]} WHERE {KEYS[target]} = %s",
        (key,),
    )
    return dict(zip(columns, rows[0], strict=True)) if rows else None


def ledger(settings: AccordSettings, target: str, golden_id: str) -> list[tuple]:
    return query(
        settings,
        target,
        f"SELECT golden_version, op, target_key, event_id FROM {LEDGER_TABLE} "
        "WHERE golden_id = %s ORDER BY golden_version",
        (golden_id,),
    )


def xmin(settings: AccordSettings, target: str, key: str) -> int:
    """PostgreSQL's row version: changes with every write to the row, even a no-op one."""
    [(value,)] = query(
        settings, target, f"SELECT xmin::text FROM {TABLES[target]} WHERE id = %s", (key,)
    )
    return int(value)


class Env:
    """One test's isolated settings, Redis prefix, appliers and rows (removed afterwards)."""

    def __init__(self, settings: AccordSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.specs = load_sinks(settings.connectors_dir)
        self.identity = IdentityResolver(client, settings.worker.redis_prefix, ())
        self.rows: list[tuple[str, str]] = []
        self.golden: list[tuple[str, str]] = []
        self.appliers: list[SqlApplier] = []

    def applier(
        self,
        target: str,
        settings: AccordSettings | None = None,
        report: Callable[[Change], None] | None = None,
    ) -> SqlApplier:
        applier = SqlApplier(
            settings or self.settings, self.specs[target], self.identity, report=report
        )
        self.appliers.append(applier)
        return applier

    def golden_id(self, target: str) -> str:
        golden_id = str(uuid.uuid4())
        self.golden.append((target, golden_id))
        return golden_id

    def email(self) -> str:
        return f"sink-{uuid.uuid4().hex[:12]}@example.test"

    def insert(self, target: str, **columns: Any) -> str:
        """A row made in the target directly, as its own users would."""
        names = list(columns)
        placeholders = ", ".join(["%s"] * len(names))
        sql = f"INSERT INTO {TABLES[target]} ({', '.join(names)}) VALUES ({placeholders})"
        if target == "billing":
            query(self.settings, target, sql, tuple(columns.values()))
            key = str(columns["account_no"])
        else:
            [(key,)] = query(self.settings, target, sql + " RETURNING id", tuple(columns.values()))
            key = str(key)
        self.rows.append((target, key))
        return key

    def created(self, target: str, outcome: Outcome) -> None:
        assert outcome.target_key is not None
        self.rows.append((target, outcome.target_key))

    def cleanup(self) -> None:
        for applier in self.appliers:
            applier.close()
        for target, key in self.rows:
            query(
                self.settings,
                target,
                f"DELETE FROM {TABLES[target]} WHERE {KEYS[target]} = %s",
                (key,),
            )
        for target, golden_id in self.golden:
            query(
                self.settings,
                target,
                f"DELETE FROM {LEDGER_TABLE} WHERE golden_id = %s",
                (golden_id,),
            )
        keys = list(self.client.scan_iter(match=f"{self.settings.worker.redis_prefix}*"))
        if keys:
            self.client.delete(*keys)


@pytest.fixture
def env(stack: AccordSettings) -> Iterator[Env]:
    settings = isolated(stack)
    client = redis_client(settings)
    environment = Env(settings, client)
    yield environment
    environment.cleanup()
    client.close()


# ------------------------------------------------------------------------- creating


def test_a_create_in_crm_takes_a_sequence_key_linked_in_the_xref_before_the_insert(
    env: Env,
) -> None:
    settings, golden_id, email = env.settings, env.golden_id("crm"), env.email()
    applier = env.applier("crm")
    event = sink_event(
        "crm", golden_id, 1, first_name="Ada", last_name="Lovelace", email=email, country="GB"
    )
    outcomes: list[Outcome] = []
    # Hold the table in SHARE mode: the applier can take a key and link it, but its INSERT
    # waits, so what is visible meanwhile is exactly what happened before the insert.
    with postgres(settings, "crm") as blocker, blocker.transaction():
        blocker.execute("LOCK TABLE customers IN SHARE MODE")
        worker = threading.Thread(target=lambda: outcomes.append(applier.apply(event)))
        worker.start()
        assert wait_until(lambda: env.identity.links(golden_id) != [], 30)
        [(system, key)] = env.identity.links(golden_id)
        assert system == "crm" and env.identity.lookup("crm", key) == golden_id
        assert blocker.execute("SELECT 1 FROM customers WHERE id = %s", (key,)).fetchall() == []
        assert worker.is_alive()  # blocked on the insert
    worker.join(30)
    [outcome] = outcomes
    env.created("crm", outcome)
    assert (outcome.status, outcome.action, outcome.target_key) == (
        Status.APPLIED,
        Action.INSERT,
        key,
    )
    assert row(settings, "crm", key, "first_name", "last_name", "email", "country") == {
        "first_name": "Ada",
        "last_name": "Lovelace",
        "email": email,
        "country": "GB",
    }
    assert ledger(settings, "crm", golden_id) == [(1, "INSERT", key, event["event_id"])]


def test_a_create_in_support_takes_a_uuid5_key_of_the_golden_id(env: Env) -> None:
    settings, golden_id, email = env.settings, env.golden_id("support"), env.email()
    event = sink_event("support", golden_id, 3, first_name="Grace", last_name="Hopper", email=email)
    outcome = env.applier("support").apply(event)
    env.created("support", outcome)
    key = str(uuid.uuid5(SINK_KEY_NAMESPACE, golden_id))
    assert (outcome.status, outcome.action, outcome.target_key) == (
        Status.APPLIED,
        Action.INSERT,
        key,
    )
    assert env.identity.links(golden_id) == [("support", key)]
    assert row(settings, "support", key, "email", "display_name", "phone") == {
        "email": email,
        "display_name": "Grace Hopper",
        "phone": None,
    }


def test_a_create_reports_its_row_to_the_merge_before_the_insert_commits(env: Env) -> None:
    """The report names the created row by its key and says what its CDC echo will say;
    it is made while the insert is uncommitted, so no echo can arrive unexplained."""
    settings, golden_id = env.settings, env.golden_id("support")
    email = env.email().replace(".test", ".com")  # one support's mapping accepts
    reports: list[tuple[Change, dict | None]] = []

    def report(change: Change) -> None:  # what another session sees at that moment
        reports.append((change, row(settings, "support", change.source_key, "email")))

    event = sink_event("support", golden_id, 1, first_name="Grace", last_name="Hopper", email=email)
    outcome = env.applier("support", report=report).apply(event)
    env.created("support", outcome)
    [(change, visible)] = reports
    assert visible is None  # not committed yet
    assert (change.created, change.system, change.source_key, change.golden_id) == (
        True,
        "support",
        outcome.target_key,
        golden_id,
    )
    assert change.values == {"email": email, "first_name": "Grace", "last_name": "Hopper",
                             "phone": None}  # fmt: skip
    again = env.applier("support", report=report).apply(
        sink_event("support", golden_id, 2, email=email, phone="+441234")
    )
    assert again.action is Action.ADOPT
    [_, (adopted, _)] = reports  # a create that found the row reports it as adopted
    assert not adopted.created and adopted.source_key == outcome.target_key


def test_a_create_whose_report_cannot_be_sent_inserts_nothing(env: Env) -> None:
    settings, golden_id, email = env.settings, env.golden_id("support"), env.email()
    stop = threading.Event()

    def unreachable(change: Change) -> None:
        stop.set()  # give up after this attempt
        raise TransientSinkError("Kafka unreachable")

    applier = env.applier("support", report=unreachable)
    key = str(uuid.uuid5(SINK_KEY_NAMESPACE, golden_id))
    env.rows.append(("support", key))
    with pytest.raises(Interrupted):
        applier.apply(sink_event("support", golden_id, 1, email=email, first_name="Ada"), stop)
    assert row(settings, "support", key, "email") is None  # rolled back with the report
    assert ledger(settings, "support", golden_id) == []


def test_created_reports_reach_the_merge_s_topic_keyed_by_golden_id(env: Env) -> None:
    settings, golden_id = env.settings, str(uuid.uuid4())
    create_topics(settings, (settings.topics.changes, 1))
    report = Change("created:support:u-1:e-1", "support", "u-1", Op.UPSERT, 1_000, "",
                    {"email": "ada@example.com"}, golden_id=golden_id, created=True)  # fmt: skip
    RowReports(settings)(report)
    tail = TopicTail(settings, settings.topics.changes)
    assert wait_until(lambda: tail.poll() >= 0 and len(tail.records) == 1, 30)
    [record] = tail.records
    assert record is not None and Change.from_record(record) == report
    tail.close()
    delete_topics(settings, settings.topics.changes)


def test_a_second_create_finds_the_row_through_the_xref_and_only_adopts_it(env: Env) -> None:
    """A create never writes values into a row that exists, nor touches it (ADOPT): values
    follow in compare-and-set updates."""
    golden_id, email = env.golden_id("support"), env.email()
    applier = env.applier("support")
    created = applier.apply(sink_event("support", golden_id, 1, email=email, first_name="Ada"))
    env.created("support", created)
    before = xmin(env.settings, "support", created.target_key)
    again = applier.apply(sink_event("support", golden_id, 2, email=email, phone="+441234"))
    assert (again.status, again.target_key, again.action, again.columns) == (
        Status.APPLIED,
        created.target_key,
        Action.ADOPT,
        (),
    )
    assert xmin(env.settings, "support", created.target_key) == before  # not written at all
    assert row(env.settings, "support", created.target_key, "phone") == {"phone": None}
    assert (
        query(env.settings, "support", "SELECT count(*) FROM users WHERE email = %s", (email,))[0][
            0
        ]
        == 1
    )


def test_a_create_adopts_the_one_unlinked_row_the_target_holds_with_that_email(env: Env) -> None:
    """The row a user made in support, whose CDC has not linked it yet: no second row.
    Support's emails are low trust (the match policy): the name corroborates it (read
    through support's mapping, so the address must be one it accepts). It is not touched:
    a touch would report its values at Accord's commit time, newer than edits made
    elsewhere meanwhile. The merge hears of it with its own values and no claim to
    recency (support keeps no modification time)."""
    golden_id, email = env.golden_id("support"), env.email().replace(".test", ".com")
    theirs = env.insert("support", email=f"  {email.upper()} ", display_name="Ada Lovelace")
    before = xmin(env.settings, "support", theirs)
    reports: list[Change] = []
    outcome = env.applier("support", report=reports.append).apply(
        sink_event("support", golden_id, 1, email=email, first_name="Ada", last_name="Lovelace")
    )
    assert (outcome.status, outcome.action, outcome.target_key) == (
        Status.APPLIED,
        Action.ADOPT,
        theirs,
    )
    assert env.identity.links(golden_id) == [("support", theirs)]
    assert xmin(env.settings, "support", theirs) == before  # not touched
    [adopted] = reports
    assert (adopted.source_key, adopted.golden_id, adopted.source_ts) == (theirs, golden_id, 0)
    assert adopted.values["email"] == email and adopted.values["first_name"] == "Ada"
    assert row(env.settings, "support", theirs, "display_name") == {"display_name": "Ada Lovelace"}
    [(count,)] = query(
        env.settings,
        "support",
        "SELECT count(*) FROM users WHERE lower(trim(email)) = %s",
        (email,),
    )
    assert count == 1


def test_a_create_adopts_no_stranger_on_a_low_trust_email_and_makes_a_row_of_its_own(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A support row with the record's email but another name and phone (a stranger's
    sign-up, maybe held for review): the match policy does not link it on the email
    alone, so it is not adopted; the record gets a row of its own. CRM's email is
    trusted: there such a row is adopted. (Valid addresses, which the mappings accept,
    so workers of other tests on the shared stack may see these rows: each part uses
    its own address and applies at once.)"""
    values = {"first_name": "Ada", "last_name": "Lovelace", "phone": "+4420"}
    crm_golden, crm_email = env.golden_id("crm"), env.email().replace(".test", ".com")
    theirs = env.insert("crm", first_name="Mallory", last_name="Jones", email=crm_email)
    adopted = env.applier("crm").apply(sink_event("crm", crm_golden, 1, email=crm_email, **values))
    assert (adopted.action, adopted.target_key) == (Action.ADOPT, theirs)

    golden_id, email = env.golden_id("support"), env.email().replace(".test", ".com")
    stranger = env.insert("support", email=email, display_name="Mallory Jones", phone="+15550100")
    caplog.set_level(logging.WARNING, logger="streams.sinks")
    outcome = env.applier("support").apply(
        sink_event("support", golden_id, 1, email=email, **values)
    )
    env.created("support", outcome)
    assert outcome.action is Action.INSERT and outcome.target_key != stranger
    assert f"row {stranger} has the golden record's email but is not adopted" in caplog.text
    assert "match policy decision review" in caplog.text
    assert env.identity.lookup("support", stranger) is None
    assert env.identity.links(golden_id) == [("support", outcome.target_key)]
    assert row(env.settings, "support", stranger, "display_name", "phone") == {
        "display_name": "Mallory Jones",
        "phone": "+15550100",
    }


@pytest.mark.parametrize("other", ["linked to another golden record", "one of two"])
def test_a_create_adopts_no_row_another_record_holds_or_that_is_ambiguous(
    env: Env, other: str
) -> None:
    golden_id, email = env.golden_id("support"), env.email()
    first = env.insert("support", email=email)
    if other == "linked to another golden record":
        env.identity.link("support", first, env.golden_id("support"))
    else:
        env.insert("support", email=email.upper())
    outcome = env.applier("support").apply(sink_event("support", golden_id, 1, email=email))
    env.created("support", outcome)
    assert (outcome.action, outcome.target_key) == (
        Action.INSERT,
        str(uuid.uuid5(SINK_KEY_NAMESPACE, golden_id)),
    )


# ------------------------------------------------------------------------- updating


def test_an_update_writes_only_differing_columns_and_a_no_op_writes_nothing(env: Env) -> None:
    settings, golden_id, email = env.settings, env.golden_id("crm"), env.email()
    key = env.insert(
        "crm", first_name="Ada", last_name="Lovelace", email=email, phone="+4420", company="AE"
    )
    applier = env.applier("crm")
    before = xmin(settings, "crm", key)

    values = {
        "first_name": "Augusta",  # differs, but not among `changed`: left alone
        "last_name": "Lovelace",
        "email": email,
        "phone": "+4421",
        "company": "AE",
    }
    outcome = applier.apply(
        sink_event(
            "crm", golden_id, 7, target_key=key, changed=["email", "phone", "company"], **values
        )
    )
    assert (outcome.status, outcome.action, outcome.columns) == (
        Status.APPLIED,
        Action.UPDATE,
        ("phone",),
    )
    after = xmin(settings, "crm", key)
    assert after != before
    assert row(settings, "crm", key, "first_name", "phone", "company") == {
        "first_name": "Ada",
        "phone": "+4421",
        "company": "AE",
    }

    # The echo: the same values again, newer version. Nothing is written at all.
    echo = applier.apply(
        sink_event("crm", golden_id, 8, target_key=key, changed=["phone", "company"], **values)
    )
    assert (echo.status, echo.reason, echo.action, echo.columns) == (
        Status.SKIPPED,
        "no_change",
        Action.NOOP,
        (),
    )
    assert xmin(settings, "crm", key) == after
    assert [(v, op) for v, op, _, _ in ledger(settings, "crm", golden_id)] == [
        (7, "UPDATE"),
        (8, "NOOP"),
    ]


def test_an_update_planned_before_a_newer_edit_of_the_row_does_not_overwrite_it(
    env: Env,
) -> None:
    """Compare-and-set: the event says what the row held when it was planned."""
    # A deliverable-looking address: the row must pass its own mapping to be compared.
    settings, golden_id = env.settings, env.golden_id("crm")
    email = env.email().replace("@example.test", "@example.com")
    key = env.insert("crm", email=email, phone="+442079460001", country="GB")
    applier = env.applier("crm")
    planned_on = {"phone": "+442079460001"}
    query(settings, "crm", "UPDATE customers SET phone = '020 7946 0777' WHERE id = %s", (key,))
    stale = applier.apply(
        sink_event("crm", golden_id, 3, target_key=key, changed=["phone"],
                   expected=planned_on, email=email, phone="+442079460999")
    )  # fmt: skip
    assert (stale.status, stale.reason, stale.action) == (
        Status.SKIPPED, "superseded", Action.SUPERSEDED
    )  # fmt: skip
    assert row(settings, "crm", key, "phone") == {"phone": "020 7946 0777"}  # the user's edit
    # Planned on the row as it is now (in any spelling of the same number): it applies.
    fresh = applier.apply(
        sink_event("crm", golden_id, 4, target_key=key, changed=["phone"],
                   expected={"phone": "+442079460777"}, email=email, phone="+442079460999")
    )  # fmt: skip
    assert (fresh.status, fresh.action) == (Status.APPLIED, Action.UPDATE)
    assert row(settings, "crm", key, "phone") == {"phone": "+442079460999"}


def test_a_stale_version_is_skipped(env: Env) -> None:
    settings, golden_id = env.settings, env.golden_id("crm")
    key = env.insert("crm", email=env.email(), phone="+1000")
    applier = env.applier("crm")
    assert applier.apply(sink_event("crm", golden_id, 5, target_key=key, phone="+1005")).status is (
        Status.APPLIED
    )
    for version in (5, 4):
        stale = applier.apply(
            sink_event("crm", golden_id, version, target_key=key, phone=f"+100{version}0")
        )
        assert (stale.status, stale.reason) == (Status.SKIPPED, "stale_version")
    assert row(settings, "crm", key, "phone") == {"phone": "+1005"}
    assert [v for v, *_ in ledger(settings, "crm", golden_id)] == [5]


def test_the_same_event_applied_twice_is_applied_once(env: Env) -> None:
    settings, golden_id = env.settings, env.golden_id("support")
    event = sink_event("support", golden_id, 1, email=env.email(), first_name="Ada")
    first = env.applier("support").apply(event)
    env.created("support", first)
    # A second applier (another process after a rebalance) gets the same event.
    second = env.applier("support").apply(event)
    assert first.status is Status.APPLIED
    assert (second.status, second.reason) == (Status.SKIPPED, "stale_version")
    assert ledger(settings, "support", golden_id) == [
        (1, "INSERT", first.target_key, event["event_id"])
    ]


def test_a_delete_removes_the_row_once(env: Env) -> None:
    settings, golden_id = env.settings, env.golden_id("support")
    key = env.insert("support", email=env.email(), display_name="Ada L")
    applier = env.applier("support")
    deleted = applier.apply(
        sink_event("support", golden_id, 2, op="DELETE", target_key=key, changed=[])
    )
    assert (deleted.status, deleted.action) == (Status.APPLIED, Action.DELETE)
    assert row(settings, "support", key, "email") is None
    again = applier.apply(
        sink_event("support", golden_id, 3, op="DELETE", target_key=key, changed=[])
    )
    assert (again.status, again.reason) == (Status.SKIPPED, "no_row")
    # An update planned while the row still existed never brings it back.
    late = applier.apply(sink_event("support", golden_id, 4, target_key=key, phone="+1"))
    assert (late.status, late.reason) == (Status.SKIPPED, "no_row")
    assert row(settings, "support", key, "email") is None
    assert [(v, op) for v, op, _, _ in ledger(settings, "support", golden_id)] == [(2, "DELETE")]


# -------------------------------------------------------------------------- billing


def test_billing_updates_its_accounts_but_never_creates_one(env: Env) -> None:
    settings = env.settings
    account = f"T-{uuid.uuid4().hex[:16]}"
    env.insert("billing", account_no=account, contact_email=env.email(), legal_name="Old Ltd")
    applier = env.applier("billing")

    unknown = env.golden_id("billing")
    skipped = applier.apply(sink_event("billing", unknown, 1, email=env.email(), company="X"))
    assert (skipped.status, skipped.reason) == (Status.SKIPPED, "no_row")
    assert ledger(settings, "billing", unknown) == []
    assert env.identity.links(unknown) == []

    golden_id = env.golden_id("billing")
    env.identity.link("billing", account, golden_id)  # known through the xref only
    outcome = applier.apply(
        sink_event(
            "billing", golden_id, 4, target_key=account, company="New Ltd", country="GB", phone=None
        )
    )
    assert (outcome.status, outcome.target_key) == (Status.APPLIED, account)
    assert outcome.columns == ("legal_name", "billing_country")  # phone was null already
    assert row(settings, "billing", account, "legal_name", "billing_country", "phone") == {
        "legal_name": "New Ltd",
        "billing_country": "GB",
        "phone": None,
    }
    assert ledger(settings, "billing", golden_id) == [
        (4, "UPDATE", account, f"billing:{golden_id}:4:{account}")
    ]


def test_a_row_the_target_refuses_is_rejected_for_good(env: Env) -> None:
    outcome = env.applier("support").apply(
        sink_event("support", env.golden_id("support"), 1, target_key="not-a-uuid", phone="+1")
    )
    assert (outcome.status, outcome.reason) == (Status.FAILED, "sink_rejected")
    assert "InvalidTextRepresentation" in outcome.detail and "uuid" in outcome.detail


# ------------------------------------------------------------------ through Kafka


def create_topics(settings: AccordSettings, *topics: tuple[str, int]) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    futures = admin.create_topics([NewTopic(name, partitions, 1) for name, partitions in topics])
    for future in futures.values():
        future.result(30)


def delete_topics(settings: AccordSettings, *topics: str) -> None:
    AdminClient({"bootstrap.servers": settings.kafka}).delete_topics(list(topics))


def producer_for(settings: AccordSettings, topic: str) -> Callable[[list[dict[str, Any]]], None]:
    """Writes SinkEvents keyed by golden id, encoded with the registered schema."""
    codec = canonical_codec(settings, registry_client(settings), "dev.accord.SinkEvent", topic)
    producer = Producer({"bootstrap.servers": settings.kafka, "enable.idempotence": True})

    def produce(events: list[dict[str, Any]]) -> None:
        for event in events:
            producer.produce(topic, key=event["golden_id"].encode(), value=codec.dumps(event))
        assert producer.flush(30) == 0

    return produce


def run_until(runner: SinkRunner, condition: Callable[[], bool], timeout_s: float = 60) -> None:
    assert wait_until(lambda: runner.step(0.5) is not None and condition(), timeout_s, 0), (
        f"runner totals: {runner.totals}"
    )


def test_queued_updates_of_one_row_are_written_once_with_the_newest_values(env: Env) -> None:
    settings = env.settings
    topic = settings.topics.sink("billing")
    create_topics(settings, (topic, 3))
    account = f"T-{uuid.uuid4().hex[:16]}"
    env.insert("billing", account_no=account, contact_email=env.email(), phone="+4400")
    golden_id = env.golden_id("billing")
    queued = [
        sink_event("billing", golden_id, version, target_key=account, phone=f"+440{version}")
        for version in (1, 2, 3)
    ]
    producer_for(settings, topic)(queued)

    runner = SinkRunner(settings, "billing", applier=env.applier("billing"))
    try:
        run_until(runner, lambda: runner.totals.consumed == 3)
        assert runner.totals.applied == 1
        assert runner.totals.reasons.get("folded") == 2
        assert row(settings, "billing", account, "phone") == {"phone": "+4403"}
        assert [v for v, *_ in ledger(settings, "billing", golden_id)] == [3]
    finally:
        runner.close()


def test_a_refused_event_is_dead_lettered_and_the_next_one_applies(env: Env) -> None:
    settings = env.settings
    topic = settings.topics.sink("billing")
    create_topics(settings, (topic, 3), (settings.topics.dlq, 1))
    account = f"T-{uuid.uuid4().hex[:16]}"
    env.insert("billing", account_no=account, contact_email=env.email(), phone="+4400")
    golden_id = env.golden_id("billing")
    # It changes a field the next event leaves alone, so it is not folded into it.
    bad = sink_event(
        "billing", golden_id, 1, target_key=account, phone="+44" + "9" * 80, company="Acme"
    )
    good = sink_event("billing", golden_id, 2, target_key=account, phone="+4401")
    producer_for(settings, topic)([bad, good])

    runner = SinkRunner(settings, "billing", applier=env.applier("billing"))
    dlq = None
    try:
        run_until(runner, lambda: runner.totals.consumed == 2)
        assert (runner.totals.applied, runner.totals.dead) == (1, 1)
        assert row(settings, "billing", account, "phone") == {"phone": "+4401"}
        dlq = TopicTail(settings, settings.topics.dlq)
        assert dlq.wait_for(lambda records: len(records) == 1, 30)
        [letter] = dlq.records
        assert (letter["stage"], letter["reason"], letter["topic"]) == (
            "sink",
            "sink_rejected",
            topic,
        )
        assert "Data too long for column 'phone'" in letter["detail"]
        assert letter["error_class"] == "PermanentSinkError"
        assert letter["key"] == golden_id.encode()
        assert runner.codec.decode(letter["value"], runner.reader).value["golden_version"] == 1
        assert [v for v, *_ in ledger(settings, "billing", golden_id)] == [2]
    finally:
        runner.close()
        if dlq is not None:
            dlq.close()
        delete_topics(settings, topic, settings.topics.dlq)


def test_the_runner_applies_in_order_across_restarts_without_doubles_or_losses(
    env: Env,
) -> None:
    settings = env.settings
    topic = settings.topics.sink("support")
    create_topics(settings, (topic, 3), (settings.topics.dlq, 1))
    produce = producer_for(settings, topic)
    people = {env.golden_id("support"): env.email() for _ in range(6)}

    def versions(numbers: range) -> list[dict[str, Any]]:
        """A create, then updates of the row it made (support keys are uuid5 of the id)."""
        return [
            sink_event(
                "support",
                golden_id,
                n,
                target_key=None if n == 1 else str(uuid.uuid5(SINK_KEY_NAMESPACE, golden_id)),
                changed=["phone"] if n > 1 else None,
                first_name="Ada",
                email=email,
                phone=f"+44{n:04d}",
            )
            for n in numbers
            for golden_id, email in people.items()
        ]

    produce(versions(range(1, 4)))  # 18 events: a create and two updates per person
    first = SinkRunner(settings, "support", applier=env.applier("support"), batch_size=4)
    try:
        run_until(first, lambda: first.totals.consumed >= 8)
    finally:
        first.close()  # mid-way: some events are left for the next runner

    produce(versions(range(4, 6)))  # 12 more while no runner runs
    second = SinkRunner(settings, "support", applier=env.applier("support"), batch_size=7)
    stop = threading.Event()
    thread = threading.Thread(target=second.run, args=(stop,), daemon=True)
    thread.start()  # as `accord sink` runs it, until stopped
    try:
        assert wait_until(lambda: first.totals.consumed + second.totals.consumed == 30, 60)
        # Nothing committed was delivered again; queued updates of a row may be folded.
        assert set(second.totals.reasons) <= {"folded"}
        folded = first.totals.reasons.get("folded", 0) + second.totals.reasons.get("folded", 0)
        assert first.totals.applied + second.totals.applied + folded == 30
    finally:
        stop.set()
        thread.join(30)
        second.close()

    # A crash before commit, at worst: every offset back to the start. All is skipped.
    rewind(settings, second.group_id, topic)
    third = SinkRunner(settings, "support", applier=env.applier("support"), batch_size=50)
    try:
        run_until(third, lambda: third.totals.consumed == 30)
        assert set(third.totals.reasons) <= {"stale_version", "folded"}
        assert sum(third.totals.reasons.values()) == 30
        assert third.totals.applied == 0
    finally:
        third.close()

    for golden_id, email in people.items():
        rows = query(settings, "support", "SELECT id, phone FROM users WHERE email = %s", (email,))
        env.rows.extend(("support", str(key)) for key, _ in rows)
        assert [phone for _, phone in rows] == ["+440005"]
        [(key, _)] = rows
        assert env.identity.links(golden_id) == [("support", str(key))]
        # In order, none twice, ending at the last; folded revisions have no entry.
        applied = [(v, op) for v, op, _, _ in ledger(settings, "support", golden_id)]
        versions = [v for v, _ in applied]
        assert applied[0] == (1, "INSERT") and versions[-1] == 5
        assert versions == sorted(set(versions))
        assert {op for _, op in applied[1:]} <= {"UPDATE"}
    delete_topics(settings, topic, settings.topics.dlq)


def rewind(settings: AccordSettings, group_id: str, topic: str) -> None:
    consumer = Consumer({"bootstrap.servers": settings.kafka, "group.id": group_id})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.commit(
            offsets=[TopicPartition(topic, p, 0) for p in partitions], asynchronous=False
        )
    finally:
        consumer.close()


# -------------------------------------------------------------------------- outages


class Proxy:
    """A TCP forwarder on loopback, to take a database away and bring it back.

    `stop` cuts every open connection and refuses new ones; `start` accepts again.
    """

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() and stops listening
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def applying(applier: SqlApplier, event: dict[str, Any]) -> tuple[threading.Thread, list[Outcome]]:
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(applier.apply(event)), daemon=True)
    thread.start()
    return thread, outcomes


@pytest.mark.parametrize("target", ["crm", "billing"])
def test_an_unreachable_database_gets_the_event_once_it_is_back(env: Env, target: str) -> None:
    settings = env.settings
    stack = settings.stack
    real_port = stack.mariadb_port if target == "billing" else stack.postgres_port
    proxy = Proxy(real_port)
    port_setting = "mariadb_port" if target == "billing" else "postgres_port"
    through = settings.model_copy(
        update={"stack": stack.model_copy(update={port_setting: proxy.port})}
    )
    if target == "billing":
        key = f"T-{uuid.uuid4().hex[:16]}"
        env.insert("billing", account_no=key, contact_email=env.email(), phone="+4400")
    else:
        key = env.insert("crm", email=env.email(), phone="+4400")
    golden_id = env.golden_id(target)
    applier = env.applier(target, through)
    try:
        # Down from the start: connections are refused, the event waits and retries.
        thread, outcomes = applying(
            applier, sink_event(target, golden_id, 1, target_key=key, phone="+4401")
        )
        assert wait_until(lambda: applier.retries >= 2, 60)
        assert row(settings, target, key, "phone") == {"phone": "+4400"}
        proxy.start()
        thread.join(60)
        assert [o.status for o in outcomes] == [Status.APPLIED]
        assert row(settings, target, key, "phone") == {"phone": "+4401"}

        # Lost mid-way: the open connection is cut, then refused, then back.
        proxy.stop()
        retries = applier.retries
        thread, outcomes = applying(
            applier, sink_event(target, golden_id, 2, target_key=key, phone="+4402")
        )
        assert wait_until(lambda: applier.retries >= retries + 2, 60)
        proxy.start()
        thread.join(60)
        assert [o.status for o in outcomes] == [Status.APPLIED]
        assert row(settings, target, key, "phone") == {"phone": "+4402"}
        assert [v for v, *_ in ledger(settings, target, golden_id)] == [1, 2]
    finally:
        applier.close()
        proxy.stop()
