"""A broken target pauses only itself: a column renamed under a running applier, on the
real PostgreSQL and MariaDB, with real Kafka and Redis.

Each test works on its own copy of the target table (not captured by Debezium), so the
sample databases' tables, which other tests use, are never altered.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pymysql
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from streams.app import redis_client
from streams.identity import IdentityResolver
from streams.monitor import Monitor
from streams.projection import load_sinks
from streams.settings import AccordSettings
from streams.sinks import (
    LEDGER_TABLE,
    Backoff,
    ErrorKind,
    PauseReport,
    SinkRunner,
    SqlApplier,
    mariadb_error_kind,
    pause_key,
    pg_error_kind,
    read_pauses,
)
from streams.sources import mariadb, postgres
from streams.stack.process import wait_until
from tests.integration.test_sinks import (
    create_topics,
    delete_topics,
    producer_for,
    query,
    sink_event,
)
from tests.support import end_offsets, isolated

pytestmark = pytest.mark.integration

KEY = {"support": "id", "billing": "account_no"}
ORIGINAL = {"support": "users", "billing": "accounts"}


@dataclass
class Target:
    """One test's copy of a target table, its settings, topics and Redis keys."""

    settings: AccordSettings
    name: str  # the target: support (PostgreSQL) or billing (MariaDB)
    table: str
    client: redis.Redis

    @property
    def topic(self) -> str:
        return self.settings.topics.sink(self.name)

    def sql(self, statement: str, params: tuple = ()) -> list[tuple]:
        return query(self.settings, self.name, statement, params)

    def insert(self, phone: str) -> str:
        key = str(uuid.uuid4()) if self.name == "support" else f"T-{uuid.uuid4().hex[:16]}"
        self.sql(
            f"INSERT INTO {self.table} ({KEY[self.name]}, phone) VALUES (%s, %s)", (key, phone)
        )
        return key

    def rename(self, column: str, to: str) -> None:
        self.sql(f"ALTER TABLE {self.table} RENAME COLUMN {column} TO {to}")

    def phones(self, keys: list[str], column: str = "phone") -> list[str]:
        found = dict(self.sql(f"SELECT {KEY[self.name]}, {column} FROM {self.table}"))
        return [found[key] if self.name == "billing" else found[uuid.UUID(key)] for key in keys]

    def applied(self, golden_id: str) -> list[int]:
        rows = self.sql(
            f"SELECT golden_version FROM {LEDGER_TABLE} WHERE app = %s AND golden_id = %s "
            "ORDER BY golden_version",
            (self.settings.worker.app_id, golden_id),
        )
        return [version for (version,) in rows]

    def committed(self, group: str) -> int:
        reader = Consumer(self.settings.kafka_config({"group.id": group}))
        try:
            [tp] = reader.committed([TopicPartition(self.topic, 0)], timeout=10)
            return tp.offset
        finally:
            reader.close()

    def dead_letters(self) -> int:
        return sum(end_offsets(self.settings, [self.settings.topics.dlq]).values())


@contextmanager
def made_target(stack: AccordSettings, name: str) -> Iterator[Target]:
    """A copy of `name`'s table, with this test's own topics and Redis keys; all removed
    afterwards."""
    settings = isolated(stack)
    table = f"accord_pause_{uuid.uuid4().hex[:8]}"
    client = redis_client(settings)
    copy = (
        f"CREATE TABLE {table} (LIKE {ORIGINAL[name]} INCLUDING ALL)"
        if name == "support"
        else f"CREATE TABLE {table} LIKE {ORIGINAL[name]}"
    )
    query(settings, name, copy)
    created = Target(settings, name, table, client)
    create_topics(settings, (created.topic, 1), (settings.topics.dlq, 1))
    try:
        yield created
    finally:
        delete_topics(settings, created.topic, settings.topics.dlq)
        query(settings, name, f"DROP TABLE IF EXISTS {table}")
        query(
            settings,
            name,
            f"DELETE FROM {LEDGER_TABLE} WHERE app = %s",
            (settings.worker.app_id,),
        )
        keys = list(client.scan_iter(match=f"{settings.worker.redis_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(params=["support", "billing"])
def target(request: pytest.FixtureRequest, stack: AccordSettings) -> Iterator[Target]:
    with made_target(stack, request.param) as created:
        yield created


def paused_gauge(target: str) -> float | None:
    return REGISTRY.get_sample_value("accord_sink_paused", {"target": target})


def running(target: Target) -> tuple[SinkRunner, threading.Event, threading.Thread]:
    """The target's runner on its own thread, as the worker runs it, pausing fast."""
    settings, prefix = target.settings, target.settings.worker.redis_prefix
    spec = replace(load_sinks(settings.connectors_dir)[target.name], table=target.table)
    applier = SqlApplier(
        settings,
        spec,
        IdentityResolver(target.client, prefix, ()),
        pause=PauseReport(target.name, target.client, prefix),
        pause_backoff=lambda: Backoff(0.05, 0.5),
    )
    runner = SinkRunner(settings, target.name, spec, applier)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), name="test-applier", daemon=True)
    thread.start()
    return runner, stop, thread


def refused(target: Target, key: str) -> dict[str, Any]:
    """An event the target refuses for its values alone (row-permanent)."""
    if target.name == "support":  # not a uuid: InvalidTextRepresentation (22P02)
        return sink_event("support", str(uuid.uuid4()), 1, target_key="not-a-uuid", phone="+1")
    # Longer than varchar(64): data too long (1406)
    return sink_event("billing", str(uuid.uuid4()), 1, target_key=key, phone="+44" + "9" * 80)


def test_a_renamed_column_pauses_the_target_and_it_catches_up_once_renamed_back(
    target: Target,
) -> None:
    produce = producer_for(target.settings, target.topic)
    keys = [target.insert("+4400") for _ in range(3)]
    golden = [str(uuid.uuid4()) for _ in keys]

    def events(version: int) -> list[dict[str, Any]]:
        phone = f"+440{version}"
        return [
            sink_event(target.name, g, version, target_key=k, phone=phone)
            for g, k in zip(golden, keys, strict=True)
        ]

    runner, stop, thread = running(target)
    try:
        # Working: a row the target refuses is dead-lettered alone, the rest applies.
        produce([refused(target, keys[0]), *events(1)])
        assert wait_until(
            lambda: target.phones(keys) == ["+4401"] * 3 and target.committed(runner.group_id) == 4,
            60,
        ), runner.totals
        assert target.dead_letters() == 1 and paused_gauge(target.name) == 0

        # Broken: a column the sink writes is renamed. The applier pauses on the event.
        target.rename("phone", "phone_renamed")
        produce(events(2))
        signal = pause_key(target.settings.worker.redis_prefix, target.name)
        assert wait_until(
            lambda: paused_gauge(target.name) == 1 and target.client.exists(signal), 60
        ), runner.totals
        [pause] = read_pauses(target.client, target.settings.worker.redis_prefix, [target.name])
        assert "phone" in pause.reason and pause.since > 0
        retries = runner.applier.retries
        assert wait_until(lambda: runner.applier.retries >= retries + 3, 60)  # it keeps trying
        assert thread.is_alive()
        # Nothing dead-lettered, skipped, applied or committed past the event.
        assert target.dead_letters() == 1
        assert target.committed(runner.group_id) == 4
        assert target.phones(keys, "phone_renamed") == ["+4401"] * 3
        assert runner.totals.skipped == 0
        snapshot = Monitor(target.settings, members=False)
        try:
            shown = snapshot.snapshot(connectors=False, slots=False).paused
        finally:
            snapshot.close()
        assert [p.target for p in shown] == [target.name] and "phone" in shown[0].reason

        # Fixed: it resumes by itself and applies everything, nothing lost or twice.
        target.rename("phone_renamed", "phone")
        assert wait_until(
            lambda: target.phones(keys) == ["+4402"] * 3 and target.committed(runner.group_id) == 7,
            90,
        ), runner.totals
        assert paused_gauge(target.name) == 0 and not target.client.exists(signal)
        assert [target.applied(g) for g in golden] == [[1, 2]] * 3
        assert target.dead_letters() == 1
        assert (runner.totals.applied, runner.totals.dead) == (6, 1)
    finally:
        stop.set()
        thread.join(30)
        runner.close()


def test_while_one_target_is_paused_another_applies_its_events(stack: AccordSettings) -> None:
    with made_target(stack, "billing") as broken, made_target(stack, "support") as working:
        broken_keys = [broken.insert("+4400")]
        working_keys = [working.insert("+4400") for _ in range(2)]
        broken.rename("phone", "phone_renamed")
        runners = [running(broken), running(working)]
        try:
            producer_for(broken.settings, broken.topic)(
                [sink_event("billing", str(uuid.uuid4()), 1, target_key=broken_keys[0], phone="+1")]
            )
            assert wait_until(lambda: paused_gauge("billing") == 1, 60)
            producer_for(working.settings, working.topic)(
                [
                    sink_event("support", str(uuid.uuid4()), 1, target_key=key, phone="+4401")
                    for key in working_keys
                ]
            )
            assert wait_until(lambda: working.phones(working_keys) == ["+4401"] * 2, 60)
            assert paused_gauge("support") == 0 and paused_gauge("billing") == 1
            assert broken.committed(runners[0][0].group_id) < 0  # nothing committed there
            assert all(thread.is_alive() for _, _, thread in runners)
        finally:
            for runner, stop, thread in runners:
                stop.set()
                thread.join(30)
                runner.close()


def test_a_missing_column_is_target_wide_on_both_databases(stack: AccordSettings) -> None:
    """The real servers' errors for a column that is not there: no longer transient
    (MariaDB's 1054 was retried as such, reconnecting straight into it)."""
    with mariadb(stack) as conn, conn.cursor() as cur:
        with pytest.raises(pymysql.MySQLError) as maria:
            cur.execute("SELECT no_such_column FROM accounts LIMIT 1")
        with pytest.raises(pymysql.MySQLError) as maria_table:
            cur.execute("SELECT 1 FROM no_such_table_of_accord")
    assert maria.value.args[0] == 1054 and maria_table.value.args[0] == 1146
    assert mariadb_error_kind(maria.value) is ErrorKind.TARGET
    assert mariadb_error_kind(maria_table.value) is ErrorKind.TARGET
    with postgres(stack, "support") as conn:
        with pytest.raises(Exception) as pg:
            conn.execute("SELECT no_such_column FROM users LIMIT 1")
        with pytest.raises(Exception) as pg_value:
            conn.execute("SELECT 'not-a-uuid'::uuid")
    assert pg_error_kind(pg.value) is ErrorKind.TARGET
    assert pg_error_kind(pg_value.value) is ErrorKind.ROW
