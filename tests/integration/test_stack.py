"""The real stack: every component healthy and configured as the data path needs."""

import json
import subprocess
import sys
import uuid

import pytest
from confluent_kafka.schema_registry import Schema

from streams.registry import registry_client
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres

pytestmark = pytest.mark.integration


def test_status_json_reports_every_component_healthy(stack: AccordSettings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "stack", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = {c["name"]: c for c in report["components"]}
    assert set(names) == {"postgres", "mariadb", "redis", "kafka", "registry", "connect"}
    assert report["healthy"] and all(c["healthy"] and c["pid"] for c in names.values())
    assert names["kafka"]["version"].startswith("4.")
    assert "debezium 3." in names["connect"]["version"]
    assert "apicurio-registry 3." in names["registry"]["version"]


def test_postgres_is_ready_for_logical_decoding(stack: AccordSettings) -> None:
    with postgres(stack, "crm") as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        tables = conn.execute(
            "SELECT pubname, tablename FROM pg_publication_tables ORDER BY 1, 2"
        ).fetchall()
    assert tables == [("accord_crm", "accord_heartbeat"), ("accord_crm", "customers")]


def test_mariadb_writes_a_row_binlog_with_gtids(stack: AccordSettings) -> None:
    with mariadb(stack) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@gtid_strict_mode")
        assert cur.fetchone() == (1, "ROW", "FULL", 1)
        cur.execute("SHOW COLUMNS FROM accounts LIKE 'status'")
        assert cur.fetchone()[1] == "enum('active','suspended','closed')"


def test_registry_speaks_the_confluent_api(stack: AccordSettings) -> None:
    client = registry_client(stack)
    subject = f"accord-test-{uuid.uuid4().hex[:8]}-value"
    schema = Schema(
        json.dumps(
            {
                "type": "record",
                "name": "Probe",
                "namespace": "accord.test",
                "fields": [{"name": "id", "type": "string"}],
            }
        ),
        "AVRO",
    )
    schema_id = client.register_schema(subject, schema)
    assert json.loads(client.get_schema(schema_id).schema_str)["name"] == "Probe"
    assert client.get_latest_version(subject).schema_id == schema_id
    assert subject in client.get_subjects()
    client.delete_subject(subject)
