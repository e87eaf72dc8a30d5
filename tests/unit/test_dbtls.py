"""TLS settings of the databases, as psycopg, PyMySQL and the Debezium connectors get them."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path

import psycopg
import pymysql
import pytest
from pydantic import SecretStr, ValidationError

from streams.connect import ConnectorFile
from streams.dbtls import (
    connector_env,
    debezium_properties,
    is_loopback,
    is_tls_refusal,
    psycopg_options,
    pymysql_options,
    tls_warning,
    tls_warnings,
    with_tls,
)
from streams.errors import ConfigError
from streams.settings import AccordSettings, DatabaseTls, load_settings
from streams.sinks import ErrorKind, mariadb_error_kind, pg_error_kind

PG = "io.debezium.connector.postgresql.PostgresConnector"
MARIADB = "io.debezium.connector.mariadb.MariaDbConnector"
CA = Path("/etc/accord/ca.pem")


def tls(**values: object) -> DatabaseTls:
    return DatabaseTls.model_validate(values)


# ------------------------------------------------------------------------ the settings


def test_the_default_is_prefer_with_no_files() -> None:
    settings = AccordSettings()
    for system in ("crm", "billing", "support"):
        assert settings.source(system).tls == DatabaseTls(mode="prefer")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_CRM__TLS__MODE", "verify-full")
    monkeypatch.setenv("ACCORD_CRM__TLS__CA_FILE", str(CA))
    settings = AccordSettings()
    assert settings.crm.tls.mode == "verify-full"
    assert settings.crm.tls.ca_file == CA
    assert settings.support.tls.mode == "prefer"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "require", "cert_file": "c.pem"}, "cert_file and key_file go together"),
        ({"mode": "require", "key_file": "k.pem"}, "cert_file and key_file go together"),
        (
            {"mode": "prefer", "cert_file": "c.pem", "key_file": "k.pem"},
            "needs mode require or stricter",
        ),
        ({"mode": "disable", "ca_file": "ca.pem"}, "ca_file with mode disable"),
        ({"mode": "verify-ca"}, "verify-ca needs ca_file"),
        ({"mode": "verify-everything"}, "mode"),
    ],
)
def test_inconsistent_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        tls(**values)


# ---------------------------------------------------------------------------- psycopg


def test_psycopg_gets_libpq_parameters() -> None:
    assert psycopg_options(tls()) == {"sslmode": "prefer"}
    assert psycopg_options(tls(mode="disable")) == {"sslmode": "disable"}
    assert psycopg_options(
        tls(mode="verify-full", ca_file=CA, cert_file="c.pem", key_file="k.pem")
    ) == {
        "sslmode": "verify-full",
        "sslrootcert": str(CA),
        "sslcert": "c.pem",
        "sslkey": "k.pem",
    }
    assert psycopg_options(tls(mode="verify-ca", ca_file=CA)) == {
        "sslmode": "verify-ca",
        "sslrootcert": str(CA),
    }


def test_psycopg_verify_full_without_a_ca_file_uses_the_system_cas() -> None:
    assert psycopg_options(tls(mode="verify-full")) == {
        "sslmode": "verify-full",
        "sslrootcert": "system",
    }


# ---------------------------------------------------------------------------- PyMySQL


def test_pymysql_disable_and_prefer() -> None:
    assert pymysql_options(tls(mode="disable")) == {"ssl_disabled": True}
    assert pymysql_options(tls(mode="prefer")) == {}  # PyMySQL's own: TLS when offered


def _context(options: dict[str, object]) -> ssl.SSLContext:
    context = options["ssl"]
    assert isinstance(context, ssl.SSLContext)
    return context


def test_pymysql_require_encrypts_without_checking() -> None:
    context = _context(pymysql_options(tls(mode="require")))
    assert context.verify_mode is ssl.CERT_NONE
    assert not context.check_hostname


def test_pymysql_verify_ca_checks_the_signature_not_the_name(stack_ca: Path) -> None:
    context = _context(pymysql_options(tls(mode="verify-ca", ca_file=stack_ca)))
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert not context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "Test CA"),),)]


def test_pymysql_verify_full_checks_the_name_too(stack_ca: Path) -> None:
    context = _context(pymysql_options(tls(mode="verify-full", ca_file=stack_ca)))
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_pymysql_require_with_a_ca_file_checks_it_as_libpq_does(stack_ca: Path) -> None:
    context = _context(pymysql_options(tls(mode="require", ca_file=stack_ca)))
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert not context.check_hostname


def test_pymysql_a_missing_ca_file_is_an_error_at_connect_time(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pymysql_options(tls(mode="verify-full", ca_file=tmp_path / "missing.pem"))


@pytest.fixture
def stack_ca(tmp_path: Path) -> Path:
    """A self-signed CA certificate named "Test CA" (openssl, as the local stack makes its)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=Test CA", "-keyout", "ca.key", "-out", "ca.pem"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    return tmp_path / "ca.pem"


# -------------------------------------------------------------- Debezium PostgreSQL


def test_postgres_connector_gets_libpq_style_properties() -> None:
    assert debezium_properties(PG, tls(), "crm") == {"database.sslmode": "prefer"}
    assert debezium_properties(
        PG,
        tls(
            mode="verify-full",
            ca_file=CA,
            cert_file="c.pem",
            key_file="k.pem",
            connector_key_file="k.pk8",
        ),
        "crm",
    ) == {
        "database.sslmode": "verify-full",
        "database.sslrootcert": str(CA),
        "database.sslcert": "c.pem",
        "database.sslkey": "k.pk8",
    }


def test_postgres_connector_verify_full_without_ca_file_uses_the_jvm_cas() -> None:
    assert debezium_properties(PG, tls(mode="verify-full"), "support") == {
        "database.sslmode": "verify-full",
        "database.sslfactory": "org.postgresql.ssl.DefaultJavaSSLFactory",
    }


def test_postgres_connector_refuses_a_client_cert_without_a_der_key() -> None:
    settings = tls(mode="verify-full", ca_file=CA, cert_file="c.pem", key_file="k.pem")
    with pytest.raises(ConfigError, match=r"crm\.tls\.connector_key_file.*PKCS-8 DER"):
        debezium_properties(PG, settings, "crm")


# ----------------------------------------------------------------- Debezium MariaDB


@pytest.mark.parametrize(
    ("mode", "connector_mode"),
    [("disable", "disable"), ("prefer", "disable"), ("require", "trust")],
)
def test_mariadb_connector_modes(mode: str, connector_mode: str) -> None:
    assert debezium_properties(MARIADB, tls(mode=mode), "billing") == {
        "database.ssl.mode": connector_mode
    }


def test_mariadb_connector_gets_stores_and_password_references() -> None:
    settings = tls(
        mode="verify-full",
        ca_file=CA,
        cert_file="c.pem",
        key_file="k.pem",
        truststore_file="/etc/accord/trust.p12",
        truststore_password="trust-secret",
        keystore_file="/etc/accord/client.p12",
        keystore_password="key-secret",
    )
    properties = debezium_properties(MARIADB, settings, "billing")
    assert properties == {
        "database.ssl.mode": "verify-full",
        "database.ssl.truststore": "/etc/accord/trust.p12",
        "database.ssl.truststore.password": "${env:BILLING_DB_TRUSTSTORE_PASSWORD}",
        "database.ssl.keystore": "/etc/accord/client.p12",
        "database.ssl.keystore.password": "${env:BILLING_DB_KEYSTORE_PASSWORD}",
    }
    assert "secret" not in str(properties)  # passwords reach Connect through its environment


def test_mariadb_connector_verify_ca_with_the_jvm_cas_needs_no_truststore() -> None:
    assert debezium_properties(MARIADB, tls(mode="verify-full"), "billing") == {
        "database.ssl.mode": "verify-full"
    }


def test_mariadb_connector_refuses_a_pem_ca_or_cert_without_stores() -> None:
    with pytest.raises(ConfigError, match=r"billing\.tls\.truststore_file"):
        debezium_properties(MARIADB, tls(mode="verify-ca", ca_file=CA), "billing")
    with pytest.raises(ConfigError, match=r"billing\.tls\.keystore_file"):
        debezium_properties(
            MARIADB, tls(mode="require", cert_file="c.pem", key_file="k.pem"), "billing"
        )


def test_an_unknown_connector_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="no TLS mapping"):
        debezium_properties("com.example.Other", tls(), "crm")


def test_connector_env_holds_only_the_passwords_given() -> None:
    settings = AccordSettings()
    assert connector_env(settings) == {}
    billing = settings.billing.model_copy(
        update={
            "tls": tls(
                mode="verify-ca",
                ca_file=CA,
                truststore_file="t.p12",
                truststore_password=SecretStr("trust-secret"),
            )
        }
    )
    settings = settings.model_copy(update={"billing": billing})
    assert connector_env(settings) == {"BILLING_DB_TRUSTSTORE_PASSWORD": "trust-secret"}


# ---------------------------------------------------------------- connector files


def connector_file(**extra: str) -> ConnectorFile:
    config = {"connector.class": PG, "database.dbname": "crm", **extra}
    return ConnectorFile("crm", "accord-crm-source", config)


def test_with_tls_adds_the_properties_and_keeps_the_file_s() -> None:
    applied = with_tls(connector_file(), tls(mode="verify-full", ca_file=CA))
    assert applied.config == {
        "connector.class": PG,
        "database.dbname": "crm",
        "database.sslmode": "verify-full",
        "database.sslrootcert": str(CA),
    }
    assert (applied.system, applied.name) == ("crm", "accord-crm-source")


def test_with_tls_refuses_a_file_that_sets_tls_itself() -> None:
    with pytest.raises(ConfigError, match=r"sets database\.sslmode.*crm\.tls"):
        with_tls(connector_file(**{"database.sslmode": "require"}), tls())


def test_the_shipped_connector_files_take_the_default_settings() -> None:
    from streams.connect import SYSTEMS, load_connector

    for system in SYSTEMS:
        connector = load_connector(Path("connectors"), system)
        applied = with_tls(connector, DatabaseTls())
        assert set(applied.config) - set(connector.config) in (
            {"database.sslmode"},
            {"database.ssl.mode"},
        )


# ------------------------------------------------------------------------ the check


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"])
def test_loopback_hosts_never_warn(host: str) -> None:
    assert is_loopback(host)
    for mode in ("disable", "prefer", "require"):
        assert tls_warning("crm", host, mode) is None


@pytest.mark.parametrize("mode", ["disable", "prefer", "require"])
def test_a_remote_host_below_verify_ca_warns(mode: str) -> None:
    warning = tls_warning("billing", "db.example.com", mode)
    assert warning is not None
    assert f"billing.tls.mode is {mode} for non-loopback host db.example.com" in warning
    assert "ACCORD_BILLING__TLS__MODE=verify-full" in warning


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_a_remote_host_verified_does_not_warn(mode: str) -> None:
    assert tls_warning("crm", "10.0.0.5", mode) is None


def test_load_settings_logs_the_warnings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ACCORD_SUPPORT__HOST", "postgres.internal")
    # Not the code's default passwords, which a non-loopback host may not use.
    monkeypatch.setenv("ACCORD_SUPPORT__APP_PASSWORD", "a-support-app-password")
    monkeypatch.setenv("ACCORD_SUPPORT__CDC_PASSWORD", "a-support-cdc-password")
    with caplog.at_level(logging.WARNING, logger="streams.settings"):
        settings = load_settings()
    assert tls_warnings(settings) == [
        tls_warning("support", "postgres.internal", "prefer"),
    ]
    assert any("support.tls.mode is prefer" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------ TLS refusals at connect


PG_REFUSALS = [
    'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
    "SSL error: certificate verify failed",
    'connection failed: server certificate for "db.example.com" does not match host name '
    '"10.0.0.5"',
    'connection failed: root certificate file "/etc/accord/ca.pem" does not exist',
    "connection failed: server does not support SSL, but SSL was required",
    'connection failed: could not load private key file "k.pem": No such file',
]


@pytest.mark.parametrize("message", PG_REFUSALS)
def test_a_tls_refusal_pauses_a_postgres_target(message: str) -> None:
    assert is_tls_refusal(psycopg.OperationalError(message))
    assert pg_error_kind(psycopg.OperationalError(message)) is ErrorKind.TARGET


@pytest.mark.parametrize(
    "error",
    [
        pymysql.OperationalError(
            2003,
            "Can't connect to MySQL server on '10.0.0.6' ([SSL: CERTIFICATE_VERIFY_FAILED] "
            "certificate verify failed: unable to get local issuer certificate (_ssl.c:1006))",
        ),
        pymysql.OperationalError(2026, "SSL is required but the server doesn't support it"),
    ],
)
def test_a_tls_refusal_pauses_a_mariadb_target(error: Exception) -> None:
    assert mariadb_error_kind(error) is ErrorKind.TARGET


def test_other_connection_failures_stay_transient() -> None:
    refused = "connection failed: Connection refused\n\tIs the server running on that host?"
    assert pg_error_kind(psycopg.OperationalError(refused)) is ErrorKind.TRANSIENT
    lost = pymysql.OperationalError(2003, "Can't connect to MySQL server on '10.0.0.6' (timed out)")
    assert mariadb_error_kind(lost) is ErrorKind.TRANSIENT


def test_a_row_error_quoting_tls_words_stays_the_row_s() -> None:
    error = pymysql.IntegrityError(1062, "Duplicate entry 'certificate verify failed' for key")
    assert mariadb_error_kind(error) is ErrorKind.ROW
