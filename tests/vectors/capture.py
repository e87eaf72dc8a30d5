"""Capture real Debezium messages from the running local stack as test vectors.

    .venv/bin/python tests/vectors/capture.py

Writes tests/vectors/debezium/<system>-<op>.json: the raw key and value bytes exactly as
Kafka delivered them, and every writer schema they reference, so unit tests decode real
wire data without a registry. Rerun after changing a connector or a source table.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer

from streams.connect import ConnectClient, load_connector
from streams.demo import apply_connectors
from streams.registry import registry_client
from streams.settings import load_settings
from streams.sources import mariadb, postgres
from streams.stack.process import wait_until
from streams.topics import RAW_TOPICS

OUT = Path(__file__).with_name("debezium")


def main() -> None:
    settings = load_settings()
    apply_connectors(settings)
    registry = registry_client(settings)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": f"vectors-{uuid.uuid4()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(list(RAW_TOPICS.values()))
    while not consumer.assignment():
        consumer.poll(0.2)
    tag = uuid.uuid4().hex[:8]
    with postgres(settings, "crm") as conn:
        (crm_id,) = conn.execute(
            "INSERT INTO customers (first_name, last_name, email, phone, company, segment, "
            "country, marketing_opt_in) VALUES ('Ada', 'Lovelace', %s, '+44 20 7946 0018', "
            "'Analytical Engines', 'enterprise', 'United Kingdom', true) RETURNING id",
            (f"Ada.Lovelace+{tag}@Example.COM",),
        ).fetchone()
        conn.execute(
            "UPDATE customers SET phone = '020 7946 0999', updated_at = now() WHERE id = %s",
            (crm_id,),
        )
        conn.execute("DELETE FROM customers WHERE id = %s", (crm_id,))
    account = f"VEC-{tag}"
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts VALUES (%s, 'Analytical Engines Ltd', %s, '+44 20 7946 0018', "
            "'GB123456789', '12 St James Sq', 'London', 'SW1Y 4JH', 'GB', 'GBP', 'NET30', "
            "12345.67, 'active', '2026-11-22 08:00:00.123456')",
            (account, f"ada+{tag}@example.com"),
        )
        cur.execute(
            "UPDATE accounts SET status = 'suspended', credit_limit = 0.5 WHERE account_no = %s",
            (account,),
        )
        cur.execute("DELETE FROM accounts WHERE account_no = %s", (account,))
    with postgres(settings, "support") as conn:
        (user_id,) = conn.execute(
            "INSERT INTO users (email, display_name, phone, tier, locale) VALUES "
            "(%s, 'Ada Lovelace', '020 7946 0018', 'premium', 'en-GB') RETURNING id",
            (f" ada+{tag}@example.com ",),
        ).fetchone()
        conn.execute(
            "UPDATE users SET tier = 'enterprise', updated_at = now() WHERE id = %s", (user_id,)
        )
        conn.execute("DELETE FROM users WHERE id = %s", (user_id,))

    keys = {"crm": str(crm_id), "billing": account, "support": str(user_id)}
    wanted = {(s, op) for s in RAW_TOPICS for op in ("c", "u", "d", "tombstone")}
    captured: dict[tuple[str, str], object] = {}
    deadline = time.monotonic() + 120
    topic_system = {t: s for s, t in RAW_TOPICS.items()}
    while wanted - captured.keys() and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        system = topic_system[message.topic()]
        if keys[system] not in repr(_decode_key(registry, message)):
            continue
        op = "tombstone" if message.value() is None else _op(registry, message)
        captured[(system, op)] = message
    consumer.close()
    missing = wanted - captured.keys()
    assert not missing, f"not captured: {missing}"
    for (system, op), message in captured.items():
        _write(registry, f"{system}-{op}", message)
    _capture_snapshot_read(settings, registry)
    print(f"wrote {len(list(OUT.glob('*.json')))} vectors to {OUT}")


def _decode_key(registry, message) -> dict:
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    return AvroDeserializer(registry)(
        message.key(), SerializationContext(message.topic(), MessageField.KEY)
    )


def _op(registry, message) -> str:
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    value = AvroDeserializer(registry)(
        message.value(), SerializationContext(message.topic(), MessageField.VALUE)
    )
    return value["op"]


def _schema_of(registry, payload: bytes | None) -> tuple[int | None, str | None]:
    if not payload:
        return None, None
    schema_id = int.from_bytes(payload[1:5], "big")
    return schema_id, registry.get_schema(schema_id).schema_str


def _write(registry, name: str, message) -> None:
    key_id, key_schema = _schema_of(registry, message.key())
    value_id, value_schema = _schema_of(registry, message.value())
    vector = {
        "topic": message.topic(),
        "key_hex": message.key().hex() if message.key() else None,
        "value_hex": message.value().hex() if message.value() else None,
        "schemas": {str(i): s for i, s in ((key_id, key_schema), (value_id, value_schema)) if i},
    }
    (OUT / f"{name}.json").write_text(json.dumps(vector, indent=1) + "\n")


def _capture_snapshot_read(settings, registry) -> None:
    """A snapshot read ('r') needs a connector that snapshots: a throwaway one."""
    connect = ConnectClient(settings.connect)
    base = load_connector(settings.connectors_dir, "crm")
    suffix = uuid.uuid4().hex[:6]
    name, prefix, slot = f"vectors-snapshot-{suffix}", f"vectors{suffix}", f"vectors_{suffix}"
    config = {
        **base.config,
        "topic.prefix": prefix,
        "slot.name": slot,
        "heartbeat.interval.ms": "0",
        "snapshot.mode": "initial",
    }
    from streams.connect import ConnectorFile

    connect.apply(ConnectorFile("crm", name, config))
    topic = f"{prefix}.public.customers"
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka,
            "group.id": f"vectors-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "topic.metadata.refresh.interval.ms": 1000,
        }
    )
    consumer.subscribe([topic])
    found = []

    def snapshot_row() -> bool:
        message = consumer.poll(0.5)
        if message is not None and not message.error() and message.value():
            found.append(message)
        return bool(found)

    try:
        assert wait_until(snapshot_row, 120), "no snapshot event"
        _write(registry, "crm-r", found[0])
    finally:
        consumer.close()
        connect.delete(name)
        wait_until(lambda: connect.state(name).state == "MISSING", 30)
        import psycopg

        cdc = settings.crm
        with psycopg.connect(
            host=settings.stack.host,
            port=settings.stack.postgres_port,
            user=cdc.cdc_user,
            password=cdc.cdc_password.get_secret_value(),
            dbname=cdc.database,
            autocommit=True,
        ) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND NOT active",
                (slot,),
            )


if __name__ == "__main__":
    main()
