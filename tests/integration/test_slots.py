"""Replication slot safety on the real stack: heartbeats keep an idle source's slot moving,
and a lost slot has a way back (`accord connectors resnapshot`) that loses no change."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from streams.connect import ConnectClient, load_connector
from streams.settings import AccordSettings
from streams.sources import postgres
from streams.stack.manager import Stack
from streams.stack.process import wait_until
from tests.support import accord

pytestmark = pytest.mark.integration


def _superuser(settings: AccordSettings, dbname: str):
    return Stack(settings).components["postgres"].connect(dbname)


def _confirmed_past(settings: AccordSettings, slot: str, lsn: str) -> bool:
    with _superuser(settings, "postgres") as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (lsn, slot),
        ).fetchone()
    return bool(row and row[0])


def test_an_idle_sources_slot_moves_past_wal_written_elsewhere(
    connectors: AccordSettings,
) -> None:
    """Another database fills the WAL while crm and support see no change: without
    `heartbeat.action.query` their slots would hold all of it back."""
    filler = f"wal_filler_{uuid.uuid4().hex[:8]}"
    with _superuser(connectors, "postgres") as conn:
        conn.execute(f"CREATE TABLE {filler} (id int, pad text)")
        conn.execute(
            f"INSERT INTO {filler} SELECT n, repeat('x', 200) FROM generate_series(1, 50000) n"
        )
        (written_to,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        conn.execute(f"DROP TABLE {filler}")
    for system in ("crm", "support"):
        slot = load_connector(connectors.connectors_dir, system).config["slot.name"]
        # heartbeat.interval.ms is 10 s and Connect flushes offsets every 5 s
        assert wait_until(lambda slot=slot: _confirmed_past(connectors, slot, written_to), 90), (
            f"slot {slot} still holds WAL from before {written_to}"
        )


@pytest.fixture
def own_crm_connector(connectors: AccordSettings, tmp_path: Path) -> Iterator[AccordSettings]:
    """The crm connector under a name, topic prefix and slot of this test's own, so that
    dropping its slot and re-snapshotting it touches nothing another test reads."""
    run = uuid.uuid4().hex[:8]
    copy = tmp_path / "connectors"
    shutil.copytree(connectors.connectors_dir, copy)
    source = copy / "crm" / "source.json"
    document = json.loads(source.read_text())
    document["name"] = f"accord-crm-slot-{run}"
    document["config"].update({"topic.prefix": f"slot{run}", "slot.name": f"accord_slot_{run}"})
    source.write_text(json.dumps(document))
    settings = connectors.model_copy(update={"connectors_dir": copy})
    connector = load_connector(copy, "crm")
    client = ConnectClient(settings.connect)
    client.apply(connector)
    assert wait_until(lambda: client.state(connector.name).running, 90)
    yield settings
    client.delete(connector.name)
    slot = connector.config["slot.name"]
    wait_until(lambda: not _slot(settings, slot)["active"], 30)
    with _superuser(settings, "postgres") as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active",
            (slot,),
        )
    AdminClient({"bootstrap.servers": settings.kafka}).delete_topics(
        [f"slot{run}.public.customers"]
    )


def _slot(settings: AccordSettings, slot: str) -> dict[str, object]:
    with _superuser(settings, "postgres") as conn:
        row = conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return {"exists": row is not None, "active": bool(row and row[0])}


class Captured:
    """Everything the connector wrote to its topic so far (Avro strings are plain UTF-8)."""

    def __init__(self, settings: AccordSettings, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka,
                "group.id": f"slot-test-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                # The connector makes its topic with its first record, maybe after this
                # subscribes: look for it every second, not every five minutes.
                "topic.metadata.refresh.interval.ms": 1000,
            }
        )
        self.consumer.subscribe([topic])
        self.values: list[bytes] = []

    def holds(self, text: str) -> bool:
        for message in self.consumer.consume(500, timeout=0.5):
            if message.error() is None and message.value() is not None:
                self.values.append(message.value())
        return any(text.encode() in value for value in self.values)

    def close(self) -> None:
        self.consumer.close()


def _insert(settings: AccordSettings, email: str) -> None:
    with postgres(settings, "crm") as conn:
        conn.execute(
            "INSERT INTO customers (first_name, last_name, email) VALUES ('Slot', 'Test', %s)",
            (email,),
        )


def test_a_lost_slot_is_recovered_by_a_resnapshot(own_crm_connector: AccordSettings) -> None:
    settings = own_crm_connector
    connector = load_connector(settings.connectors_dir, "crm")
    slot = connector.config["slot.name"]
    client = ConnectClient(settings.connect)
    captured = Captured(settings, f"{connector.config['topic.prefix']}.public.customers")
    tag = uuid.uuid4().hex[:8]
    try:
        _insert(settings, f"before-{tag}@example.com")
        assert wait_until(lambda: captured.holds(f"before-{tag}@"), 60)

        # The slot is lost while the connector is down (a DBA drops it, or PostgreSQL
        # invalidates it past max_slot_wal_keep_size); a change lands in the gap.
        client.stop(connector.name)
        assert wait_until(lambda: client.state(connector.name).state == "STOPPED", 60)
        assert wait_until(lambda: not _slot(settings, slot)["active"], 60)
        with _superuser(settings, "postgres") as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        _insert(settings, f"gap-{tag}@example.com")

        report = accord(settings, "monitor", "--once", "--json", "--interval", "0.2")
        assert report.returncode == 0, report.stderr
        [shown] = [s for s in json.loads(report.stdout)["slots"] if s["slot"] == slot]
        assert shown["wal_status"] == "missing"

        # Resuming alone does not paper over the gap: Debezium finds its position gone
        # and fails the task, and the connector stays down until it is re-snapshotted.
        client.resume(connector.name)

        def failed_for_the_lost_position() -> bool:
            state = client.state(connector.name)
            return state.tasks == ["FAILED"] and "no longer available" in (state.trace or "")

        assert wait_until(failed_for_the_lost_position, 60)
        assert not captured.holds(f"gap-{tag}@")

        result = accord(settings, "connectors", "resnapshot", "crm", "--yes")
        assert result.returncode == 0, result.stderr
        assert "snapshot running" in result.stdout
        assert wait_until(lambda: captured.holds(f"gap-{tag}@"), 90)
        assert _slot(settings, slot) == {"exists": True, "active": True}
        _insert(settings, f"after-{tag}@example.com")  # and it streams on from the new slot
        assert wait_until(lambda: captured.holds(f"after-{tag}@"), 60)
    finally:
        captured.close()
