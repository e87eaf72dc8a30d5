"""TLS to the source and target databases: one `DatabaseTls` per system, as each client
names it.

The same settings (``crm.tls.*``, ``billing.tls.*``, ``support.tls.*``) configure Accord's
own connections (psycopg for PostgreSQL, PyMySQL for MariaDB: the appliers, seeding,
reconcile) and the system's Debezium connector, whose TLS properties `accord connectors
apply` adds to the connector file's. Modes are libpq's; each client gets the nearest it has:

=============  ==============  ===============  ======================  ==================
mode           psycopg         PyMySQL          Debezium PostgreSQL     Debezium MariaDB
=============  ==============  ===============  ======================  ==================
disable        disable         no TLS           disable                 disable
prefer         prefer          TLS if offered   prefer                  disable (no such)
require        require         TLS, unchecked   require                 trust
verify-ca      verify-ca       CA checked       verify-ca               verify-ca
verify-full    verify-full     CA and host      verify-full             verify-full
=============  ==============  ===============  ======================  ==================

Debezium's Java clients read no PEM key (PostgreSQL) and no PEM at all (MariaDB), so those
files have their own settings (connector_key_file, truststore_file, keystore_file); a
connector asked to use a CA or a client certificate without them is refused, never run
with less than asked. Keystore passwords reach the connector as ``${env:NAME}`` references
(`connector_env` gives their values to the Connect worker), like the database passwords.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from streams.errors import ConfigError
from streams.settings_safety import is_loopback

if TYPE_CHECKING:
    from streams.connect import ConnectorFile
    from streams.settings import AccordSettings, DatabaseTls

__all__ = [
    "CONNECTOR_TLS_KEYS",
    "connector_env",
    "debezium_properties",
    "is_tls_refusal",
    "psycopg_options",
    "pymysql_options",
    "tls_warning",
    "tls_warnings",
    "with_tls",
]

POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"
MARIADB_CONNECTORS = (
    "io.debezium.connector.mariadb.MariaDbConnector",
    "io.debezium.connector.mysql.MySqlConnector",
)
# The connector properties TLS settings own: a connector file must not set them too.
CONNECTOR_TLS_KEYS = frozenset(
    {
        "database.sslmode",
        "database.sslrootcert",
        "database.sslcert",
        "database.sslkey",
        "database.sslpassword",
        "database.sslfactory",
        "database.ssl.mode",
        "database.ssl.truststore",
        "database.ssl.truststore.password",
        "database.ssl.keystore",
        "database.ssl.keystore.password",
    }
)
MARIADB_MODES = {
    "disable": "disable",
    "prefer": "disable",  # the connector has no opportunistic mode
    "require": "trust",
    "verify-ca": "verify-ca",
    "verify-full": "verify-full",
}
VERIFYING = ("verify-ca", "verify-full")


def psycopg_options(tls: DatabaseTls) -> dict[str, str]:
    """libpq's connection parameters for `tls`. verify-full without ca_file checks the
    server against the system's CAs (``sslrootcert=system``, libpq 16 or later)."""
    options = {"sslmode": tls.mode}
    if tls.ca_file is not None:
        options["sslrootcert"] = str(tls.ca_file)
    elif tls.mode == "verify-full":
        options["sslrootcert"] = "system"
    if tls.cert_file is not None and tls.key_file is not None:
        options["sslcert"] = str(tls.cert_file)
        options["sslkey"] = str(tls.key_file)
    return options


def pymysql_options(tls: DatabaseTls) -> dict[str, Any]:
    """PyMySQL's keyword arguments for `tls`: an SSLContext whenever TLS is required
    (PyMySQL then refuses a server without TLS), none for prefer (PyMySQL's own default:
    TLS when the server offers it, unchecked). As libpq does, require with a ca_file
    checks the certificate's signature."""
    if tls.mode == "disable":
        return {"ssl_disabled": True}
    if tls.mode == "prefer":
        return {}
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    # MariaDB's generated certificates lack what Python's strict X.509 checks want;
    # PyMySQL relaxes the same flag for its own contexts.
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    context.check_hostname = tls.mode == "verify-full"
    verify = tls.mode in VERIFYING or tls.ca_file is not None
    context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return {"ssl": context}


def _env_prefix(system: str) -> str:
    return f"{system.upper()}_DB"


def debezium_properties(connector_class: str, tls: DatabaseTls, system: str) -> dict[str, str]:
    """The Debezium connector properties for `tls` (3.5: database.sslmode... for
    PostgreSQL, database.ssl.* for MariaDB and MySQL).

    Raises ConfigError when the connector cannot do what `tls` asks with the files given
    (a CA or client certificate without its Java-readable form), naming the setting.
    """
    if connector_class == POSTGRES_CONNECTOR:
        return _postgres_properties(tls, system)
    if connector_class in MARIADB_CONNECTORS:
        return _mariadb_properties(tls, system)
    raise ConfigError(f"{system}: no TLS mapping for connector class {connector_class}")


def _postgres_properties(tls: DatabaseTls, system: str) -> dict[str, str]:
    properties = {"database.sslmode": tls.mode}
    if tls.ca_file is not None:
        properties["database.sslrootcert"] = str(tls.ca_file)
    elif tls.mode == "verify-full":
        # pgjdbc's own default is ~/.postgresql/root.crt; this is the JVM's CAs.
        properties["database.sslfactory"] = "org.postgresql.ssl.DefaultJavaSSLFactory"
    if tls.cert_file is not None:
        if tls.connector_key_file is None:
            raise ConfigError(
                f"{system}.tls.cert_file is set but not {system}.tls.connector_key_file: "
                "Debezium's PostgreSQL connector reads the client key as PKCS-8 DER "
                "(openssl pkcs8 -topk8 -nocrypt -outform DER -in KEY.pem -out KEY.pk8)"
            )
        properties["database.sslcert"] = str(tls.cert_file)
        properties["database.sslkey"] = str(tls.connector_key_file)
    return properties


def _mariadb_properties(tls: DatabaseTls, system: str) -> dict[str, str]:
    properties = {"database.ssl.mode": MARIADB_MODES[tls.mode]}
    if tls.mode in ("disable", "prefer"):
        return properties
    if tls.ca_file is not None and tls.truststore_file is None:
        raise ConfigError(
            f"{system}.tls.ca_file is set but not {system}.tls.truststore_file: Debezium's "
            "MariaDB connector reads the CA from a PKCS-12 truststore (connectors/README.md, "
            "'TLS to the databases', shows how to make one)"
        )
    if tls.cert_file is not None and tls.keystore_file is None:
        raise ConfigError(
            f"{system}.tls.cert_file is set but not {system}.tls.keystore_file: Debezium's "
            "MariaDB connector reads the client certificate and key from a PKCS-12 keystore"
        )
    prefix = _env_prefix(system)
    for kind, store, password in (
        ("truststore", tls.truststore_file, tls.truststore_password),
        ("keystore", tls.keystore_file, tls.keystore_password),
    ):
        if store is None:
            continue
        properties[f"database.ssl.{kind}"] = str(store)
        if password is not None:
            properties[f"database.ssl.{kind}.password"] = (
                f"${{env:{prefix}_{kind.upper()}_PASSWORD}}"
            )
    return properties


def connector_env(settings: AccordSettings) -> dict[str, str]:
    """The Connect worker's environment for the keystore passwords that
    `debezium_properties` references (``BILLING_DB_TRUSTSTORE_PASSWORD``...)."""
    env = {}
    for system in ("crm", "billing", "support"):
        tls = settings.source(system).tls
        for kind, password in (
            ("TRUSTSTORE", tls.truststore_password),
            ("KEYSTORE", tls.keystore_password),
        ):
            if password is not None:
                env[f"{_env_prefix(system)}_{kind}_PASSWORD"] = password.get_secret_value()
    return env


def with_tls(connector: ConnectorFile, tls: DatabaseTls) -> ConnectorFile:
    """The connector with its TLS properties from `tls`. A connector file that sets one
    itself is refused: TLS is configured in one place, the settings."""
    from streams.connect import ConnectorFile

    own = sorted(CONNECTOR_TLS_KEYS & connector.config.keys())
    if own:
        raise ConfigError(
            f"connector {connector.name} sets {', '.join(own)}: TLS comes from the settings "
            f"({connector.system}.tls.*), remove them from its source.json"
        )
    properties = debezium_properties(connector.config["connector.class"], tls, connector.system)
    return ConnectorFile(connector.system, connector.name, {**connector.config, **properties})


def tls_warning(system: str, host: str, mode: str) -> str | None:
    """Why connecting to `host` with `mode` is weak, or None: a non-loopback host below
    verify-ca. Loopback never leaves the machine, so prefer is the right default there."""
    if is_loopback(host) or mode in VERIFYING:
        return None
    why = {
        "disable": "customer rows cross the network unencrypted",
        "prefer": "a server (or anyone between) that offers no TLS gets the rows unencrypted, "
        "and the server's certificate is not checked",
        "require": "the server's certificate is not checked: anyone between can read the rows",
    }[mode]
    return (
        f"{system}.tls.mode is {mode} for non-loopback host {host}: {why}; set "
        f"ACCORD_{system.upper()}__TLS__MODE=verify-full (and {system}.tls.ca_file)"
    )


def tls_warnings(settings: AccordSettings) -> list[str]:
    """`tls_warning` for each system's database."""
    warnings = []
    for system in ("crm", "billing", "support"):
        source = settings.source(system)
        warning = tls_warning(system, source.host or settings.stack.host, source.tls.mode)
        if warning is not None:
            warnings.append(warning)
    return warnings


# What libpq and Python's ssl (under PyMySQL) say when TLS refuses a connection.
_TLS_REFUSALS = (
    "certificate verify failed",  # the CA does not sign it, or (Python) another host name
    "does not match host name",  # libpq, verify-full: the certificate names another host
    "certificate file",  # libpq: a root or client certificate file missing or unreadable
    "private key file",  # libpq: the client key
    "server does not support ssl",  # libpq: require or stricter, a server without TLS
    "ssl is required but the server",  # PyMySQL: the same
    "may not be used with sslrootcert",  # libpq: sslrootcert=system below verify-full
)


def is_tls_refusal(exc: BaseException) -> bool:
    """Whether a connection failed because TLS refused it: a server certificate that does
    not verify, a certificate or key file that cannot be read, a server without TLS where
    it is required. Waiting does not fix these: the settings or the server must change."""
    text = str(exc).lower()
    return any(refusal in text for refusal in _TLS_REFUSALS)
