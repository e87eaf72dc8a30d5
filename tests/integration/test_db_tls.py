"""TLS to the databases against the local stack's PostgreSQL, which serves a certificate
signed by the stack's CA: the crm applier writes over verify-full and its connection is
encrypted; a wrong CA or a host name the certificate does not name is refused; the crm
Debezium connector's TLS properties connect (Connect's validation, nothing created)."""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from streams.app import redis_client
from streams.connect import ConnectClient, ConnectorFile, load_connector
from streams.dbtls import psycopg_options, with_tls
from streams.identity import IdentityResolver
from streams.model import FIELDS
from streams.projection import load_sinks
from streams.settings import AccordSettings, DatabaseTls
from streams.sinks import LEDGER_TABLE, SqlApplier, Status, TargetSinkError
from streams.sources import postgres
from streams.stack.components import StackPaths
from tests.support import isolated

pytestmark = pytest.mark.integration


def stack_ca(settings: AccordSettings) -> Path:
    """The local stack's CA certificate, which signs its PostgreSQL's (and broker's)."""
    return StackPaths(settings.stack.state_dir.resolve()).home("kafka") / "tls" / "ca.pem"


def with_crm_tls(settings: AccordSettings, tls: DatabaseTls) -> AccordSettings:
    return settings.model_copy(update={"crm": settings.crm.model_copy(update={"tls": tls})})


def sink_event(golden_id: str, email: str) -> dict[str, Any]:
    """A create of a crm customer, as the emitter writes it."""
    now = dt.datetime.now(dt.UTC)
    values = {"first_name": "Ada", "last_name": "Lovelace", "email": email}
    return {
        "event_id": f"crm:{golden_id}:1:+",
        "target": "crm",
        "op": "UPSERT",
        "target_key": None,
        "golden_id": golden_id,
        "golden_version": 1,
        "fields": {name: values.get(name) for name in FIELDS},
        "changed": list(values),
        "caused_by": None,
        "emitted_at": now,
        "source_ts": now,
        "expected": None,
    }


@pytest.fixture
def verified(stack: AccordSettings) -> AccordSettings:
    """This test's settings, with crm reached over verify-full against the stack's CA."""
    ca = stack_ca(stack)
    assert ca.is_file(), f"the local stack has no CA at {ca}: run `accord stack up`"
    with postgres(stack, "crm") as conn:  # prefer: TLS if the server offers it
        served = conn.execute("SHOW ssl").fetchone()
    assert served == ("on",), (
        "the stack's PostgreSQL serves no TLS: it was started before `accord stack up` "
        "configured TLS; run `accord stack up`, which restarts it with TLS"
    )
    return isolated(with_crm_tls(stack, DatabaseTls(mode="verify-full", ca_file=ca)))


@pytest.fixture
def applier(verified: AccordSettings) -> Iterator[SqlApplier]:
    client = redis_client(verified)
    identity = IdentityResolver(client, verified.worker.redis_prefix, ())
    applier = SqlApplier(verified, load_sinks(verified.connectors_dir)["crm"], identity)
    yield applier
    applier.close()
    keys = list(client.scan_iter(match=f"{verified.worker.redis_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_an_applier_writes_over_verify_full_on_an_encrypted_connection(
    verified: AccordSettings, applier: SqlApplier
) -> None:
    golden_id, email = str(uuid.uuid4()), f"tls-{uuid.uuid4().hex[:12]}@example.test"
    outcome = applier.apply(sink_event(golden_id, email))
    try:
        assert outcome.status is Status.APPLIED, outcome
        ssl, version = (
            applier.connection()
            .execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetchone()
        )
        assert ssl is True and version.startswith("TLSv1."), (ssl, version)
        with postgres(verified, "crm") as conn:
            rows = conn.execute(
                "SELECT email FROM customers WHERE id = %s", (int(outcome.target_key),)
            ).fetchall()
        assert rows == [(email,)]
    finally:
        with postgres(verified, "crm") as conn:
            conn.execute(f"DELETE FROM {LEDGER_TABLE} WHERE golden_id = %s", (golden_id,))
            if outcome.target_key is not None:
                conn.execute("DELETE FROM customers WHERE id = %s", (int(outcome.target_key),))


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA that did not sign the stack's PostgreSQL certificate."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=Another CA", "-keyout", "ca.key", "-out", "ca.pem"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    return tmp_path / "ca.pem"


def test_a_wrong_ca_is_refused_and_pauses_the_target(
    verified: AccordSettings, other_ca: Path
) -> None:
    wrong = with_crm_tls(verified, DatabaseTls(mode="verify-full", ca_file=other_ca))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        postgres(wrong, "crm")
    client = redis_client(wrong)
    identity = IdentityResolver(client, wrong.worker.redis_prefix, ())
    applier = SqlApplier(wrong, load_sinks(wrong.connectors_dir)["crm"], identity)
    try:
        with pytest.raises(TargetSinkError, match=r"cannot connect to crm: .*certificate verify"):
            applier.connection()
    finally:
        applier.close()
        client.close()


def test_verify_full_refuses_a_host_name_the_certificate_does_not_name(
    verified: AccordSettings,
) -> None:
    source = verified.crm
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(
            host="db.elsewhere.example",  # the name checked; hostaddr is where it connects
            hostaddr=verified.stack.host,
            port=verified.stack.postgres_port,
            user=source.app_user,
            password=source.app_password.get_secret_value(),
            dbname=source.database,
            connect_timeout=5,
            **psycopg_options(source.tls),
        )


def test_verify_ca_accepts_the_stack_s_certificate_under_any_name(
    verified: AccordSettings,
) -> None:
    source = verified.crm
    tls = source.tls.model_copy(update={"mode": "verify-ca"})
    with psycopg.connect(
        host="db.elsewhere.example",
        hostaddr=verified.stack.host,
        port=verified.stack.postgres_port,
        user=source.app_user,
        password=source.app_password.get_secret_value(),
        dbname=source.database,
        connect_timeout=5,
        **psycopg_options(tls),
    ) as conn:
        [(ssl,)] = conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchall()
    assert ssl is True


def connector_to(settings: AccordSettings, tls: DatabaseTls) -> ConnectorFile:
    """The crm connector file with `tls`, reaching the stack's PostgreSQL by literal values
    (the file's ${env:...} name the Connect worker's own database)."""
    source = settings.crm
    connector = with_tls(load_connector(settings.connectors_dir, "crm"), tls)
    return replace(
        connector,
        name=f"test-tls-{uuid.uuid4().hex[:8]}",
        config={
            **connector.config,
            "database.hostname": settings.stack.host,
            "database.port": str(settings.stack.postgres_port),
            "database.user": source.cdc_user,
            "database.password": source.cdc_password.get_secret_value(),
        },
    )


def test_the_crm_connector_connects_over_verify_full_and_refuses_a_wrong_ca(
    verified: AccordSettings, other_ca: Path
) -> None:
    """Debezium checks a config by connecting to the database; nothing is created."""
    client = ConnectClient.of(verified)
    try:
        assert client.validate(connector_to(verified, verified.crm.tls)) == []
        wrong = DatabaseTls(mode="verify-full", ca_file=other_ca)
        [problem] = client.validate(connector_to(verified, wrong))
        assert "SSL error: PKIX path" in problem, problem  # Java: not signed by the CA
    finally:
        client.http.close()
