"""One typed settings object, read from the environment and an optional TOML file.

Precedence, highest first: explicit arguments, environment variables (``ACCORD_`` prefix,
``__`` between nested names, e.g. ``ACCORD_STACK__KAFKA_PORT=29092``), the config file
(``--config`` or ``ACCORD_CONFIG``, default ``./accord.toml`` when present), defaults.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streams.errors import ConfigError
from streams.settings_safety import UnsafeSettings, unsafe_settings, weak_settings

DEFAULT_CONFIG_FILE = Path("accord.toml")
KAFKA_NODE_PORT_STEP = 10  # broker N of the local stack: each Kafka port + 10 * (N - 1)


class StackSettings(BaseModel):
    """The local development stack: where it lives and which loopback ports it takes.

    Ports are deliberately not the services' defaults, so the stack never collides with
    a PostgreSQL, MariaDB or Redis that a package install started on this machine.
    """

    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Field(Path(".accord"), description="All state, logs and downloads.")
    host: str = "127.0.0.1"
    postgres_port: int = 15432
    mariadb_port: int = 13306
    redis_port: int = 16379
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    kafka_sasl_ssl_port: int = Field(
        19094, description="The broker's TLS + SASL/SCRAM listener (the stack makes its CA)."
    )
    kafka_scram_user: str = "accord"
    kafka_scram_password: SecretStr = SecretStr("accord-scram")
    registry_port: int = 18081
    registry_management_port: int = 18082
    connect_port: int = 18083
    kafka_brokers: int = Field(
        1,
        ge=1,
        le=5,
        description="Brokers of the local Kafka cluster (KRaft, each also a controller). "
        "Broker N (from 1) listens on each Kafka port + 10 * (N - 1); with 3, topics are "
        "replicated 3 times. Fixed once the cluster is made in state_dir.",
    )
    kafka_heap: str = "768m"
    connect_heap: str = "768m"
    registry_heap: str = "384m"
    connect_offset_flush_interval_ms: int = Field(
        5000,
        gt=0,
        description="How often Connect stores source offsets; a crash replays at most this "
        "much of the captured log (Debezium is at-least-once, Accord deduplicates).",
    )
    postgres_superuser_password: SecretStr = SecretStr("accord-postgres")
    mariadb_root_password: SecretStr = SecretStr("accord-root")
    startup_timeout_s: float = 240.0
    install_missing: bool = Field(
        True, description="Install missing Debian packages and Maven artifacts on `up`."
    )

    def kafka_node_ports(self, node: int) -> tuple[int, int, int]:
        """Broker `node`'s (from 1) plaintext, controller and TLS + SASL ports."""
        step = KAFKA_NODE_PORT_STEP * (node - 1)
        return (
            self.kafka_port + step,
            self.kafka_controller_port + step,
            self.kafka_sasl_ssl_port + step,
        )

    @model_validator(mode="after")
    def _distinct_kafka_ports(self) -> StackSettings:
        ports = [p for n in range(1, self.kafka_brokers + 1) for p in self.kafka_node_ports(n)]
        if len(set(ports)) != len(ports):
            raise ValueError(
                f"stack: the ports of {self.kafka_brokers} Kafka broker(s) overlap ({ports}); "
                f"broker N takes each Kafka port + {KAFKA_NODE_PORT_STEP} * (N - 1)"
            )
        return self


TlsMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]


class DatabaseTls(BaseModel):
    """TLS of every connection to one system's database: Accord's own (appliers, seeding,
    reconcile) and its Debezium connector's, which `accord connectors apply` configures from
    these (`streams.dbtls`). Modes are libpq's. The connector's files are read by the Kafka
    Connect worker, at these paths.
    """

    model_config = ConfigDict(extra="forbid")

    mode: TlsMode = Field(
        "prefer",
        description="disable; prefer (TLS when the server offers it, unchecked); require "
        "(TLS, unchecked); verify-ca (the certificate is signed by ca_file); verify-full "
        "(and names the host). A non-loopback host below verify-ca loads with a warning.",
    )
    ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) the server's certificate is checked against; unset, "
        "verify-full uses the system's CAs.",
    )
    cert_file: Path | None = Field(
        None, description="Client certificate (PEM) for a server that asks for one."
    )
    key_file: Path | None = Field(None, description="The client certificate's key (PEM).")
    connector_key_file: Path | None = Field(
        None,
        description="PostgreSQL sources: the client key as PKCS-8 DER for Debezium, whose "
        "JDBC driver reads no PEM key (needed with cert_file).",
    )
    truststore_file: Path | None = Field(
        None,
        description="MariaDB sources: ca_file as a PKCS-12 truststore for Debezium, which "
        "reads no PEM (needed with ca_file).",
    )
    truststore_password: SecretStr | None = None
    keystore_file: Path | None = Field(
        None,
        description="MariaDB sources: cert_file and key_file as a PKCS-12 keystore for "
        "Debezium (needed with cert_file).",
    )
    keystore_password: SecretStr | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DatabaseTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: cert_file and key_file go together")
        if self.cert_file is not None and self.mode in ("disable", "prefer"):
            raise ValueError(
                f"tls: a client certificate needs mode require or stricter, not {self.mode}"
            )
        if self.mode == "disable" and self.ca_file is not None:
            raise ValueError("tls: ca_file with mode disable: choose verify-full (or verify-ca)")
        if self.mode == "verify-ca" and self.ca_file is None:
            raise ValueError(
                "tls: verify-ca needs ca_file (against the system's CAs only verify-full, "
                "which checks the host name, means anything)"
            )
        return self


class SourceDatabase(BaseModel):
    """Credentials and TLS of one sample source system's database."""

    model_config = ConfigDict(extra="forbid")

    database: str
    host: str | None = Field(None, description="Defaults to the local stack's host.")
    port: int | None = Field(None, description="Defaults to the local stack's port.")
    app_user: str = "accord"
    app_password: SecretStr = SecretStr("accord")
    cdc_user: str = "debezium"
    cdc_password: SecretStr = SecretStr("debezium")
    tls: DatabaseTls = DatabaseTls()


class CrmDatabase(SourceDatabase):
    database: str = "crm"


class BillingDatabase(SourceDatabase):
    database: str = "billing"


class SupportDatabase(SourceDatabase):
    database: str = "support"


class TopicSettings(BaseModel):
    """Accord's own topics; tests give each run its own names."""

    model_config = ConfigDict(extra="forbid")

    changes: str = "accord.changes"
    golden: str = "accord.golden"
    audit: str = "accord.audit"
    dlq: str = "accord.dlq"
    review: str = "accord.review"  # held rows and review decisions (`streams.review`)
    sink_prefix: str = "accord.sink."

    def sink(self, system: str) -> str:
        return f"{self.sink_prefix}{system}"

    @classmethod
    def under(cls, prefix: str) -> TopicSettings:
        """`<prefix>.changes`, `<prefix>.golden`, ...: an app of its own beside others."""
        return cls(
            changes=f"{prefix}.changes",
            golden=f"{prefix}.golden",
            audit=f"{prefix}.audit",
            dlq=f"{prefix}.dlq",
            review=f"{prefix}.review",
            sink_prefix=f"{prefix}.sink.",
        )


class TopicDurability(BaseModel):
    """How one kind of Accord topic is kept: its copies, the copies a write needs, retention.

    None leaves a value to the cluster: replication `min(3, brokers)`, counted when the topic
    is made; `min.insync.replicas` 2 where replication is 3 or more, else the broker's;
    retention the broker's. An existing topic weaker than this is reported when the worker
    starts, and its configs (not its replication) are raised to these.
    """

    model_config = ConfigDict(extra="forbid")

    replication_factor: int | None = Field(
        None, ge=1, description="Copies of each partition; default min(3, brokers)."
    )
    min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="Copies that must hold a write before it is acknowledged (acks=all); "
        "default 2 where replication is 3 or more, else the broker's.",
    )
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    retention_ms: int | None = Field(
        None, ge=-1, description="-1 keeps records until an operator deletes them; None: broker's."
    )
    retention_bytes: int | None = Field(
        None, ge=-1, description="Per partition; -1 has no limit; None: the broker's."
    )


class CompactedTopic(TopicDurability):
    """The latest record of each key, kept until it is replaced or deleted."""

    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "compact"


class KeptTopic(TopicDurability):
    """Kept until an operator deletes it (dead letters, the audit trail)."""

    retention_ms: int | None = Field(-1, ge=-1)
    retention_bytes: int | None = Field(-1, ge=-1)


class DurabilitySettings(BaseModel):
    """Replication, acknowledgement and retention of each kind of topic Accord creates.

    E.g. ``ACCORD_DURABILITY__DLQ__RETENTION_MS=-1``. `source` is the raw topics the worker
    makes before a connector does (a connector makes them with the broker's defaults).
    """

    model_config = ConfigDict(extra="forbid")

    changes: TopicDurability = TopicDurability()
    changelog: CompactedTopic = CompactedTopic()
    golden: CompactedTopic = CompactedTopic()
    audit: KeptTopic = KeptTopic()
    dlq: KeptTopic = KeptTopic()
    review: CompactedTopic = CompactedTopic()  # the review queue: latest record per row
    sink: TopicDurability = TopicDurability()
    source: TopicDurability = TopicDurability()


class SchemaSettings(BaseModel):
    """Where canonical schemas live and how they are governed in the registry."""

    model_config = ConfigDict(extra="forbid")

    directory: Path = Path("schemas")
    default_compatibility: str = Field(
        "BACKWARD", description="Set on subjects `accord schemas push` creates."
    )
    auto_register: bool = Field(
        True, description="Workers register canonical schemas they write; off in production."
    )
    fetch_attempts: int = Field(
        4,
        ge=1,
        description="How often a writer schema id the registry does not give (unknown, a "
        "reply that is not a schema, a schema that does not parse) is asked before its "
        "messages are dead-lettered; the ids of one batch are asked together.",
    )
    fetch_backoff_s: float = Field(
        0.25, ge=0, description="First wait between those asks; it doubles after each."
    )
    failed_id_ttl_s: float = Field(
        60.0,
        gt=0,
        description="How long an id that failed is remembered: its messages are "
        "dead-lettered at once meanwhile, without asking the registry.",
    )


class WorkerSettings(BaseModel):
    """The stream worker: its Faust app, batching, state and Redis keys."""

    model_config = ConfigDict(extra="forbid")

    app_id: str = Field("accord", description="Faust app id: consumer group and topic prefix.")
    instance: str = Field(
        "1", description="Names this worker among several: its state folder, its emit producer."
    )
    partitions: int = Field(
        6, ge=1, description="Partitions of accord.changes and the golden table (fixed once made)."
    )
    batch_size: int = Field(500, ge=1, description="Most events one processing step takes.")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="Faust's guarantee. Accord's effects are idempotent and version-guarded, "
        "so at-least-once is enough (README, 'Faults and guarantees'). exactly_once is "
        "experimental: under the fault suite it lost a change and repeated thousands.",
    )
    session_timeout_s: float = Field(
        10.0,
        ge=6.0,
        description="How long a dead worker or applier keeps its partitions before the group "
        "hands them on (Kafka's session timeout; the broker's minimum is 6 s).",
    )
    batch_window_s: float = Field(0.05, gt=0, description="Longest wait to fill a batch.")
    rocksdb_cache_mb: int = Field(
        32,
        ge=1,
        description="RocksDB block cache of each golden table partition (RocksDB's default, "
        "2 GiB each, let a worker's memory grow with its state).",
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "lz4",
        description="Compression of the batches the worker writes to Kafka (changes, the "
        "golden table's changelog, golden, audit and sink events). zstd measured worse than "
        "lz4 in make bench (issue 8): a cold recovery of 1M states took 25.4 s against "
        "20.8, and on the few-kilobyte batches a worker writes zstd cost more CPU than lz4 "
        "(measured when aiokafka wrote the changelog).",
    )
    bulk_restore: bool = Field(
        True,
        description="Restore the golden table in bulk, straight from its changelog into "
        "RocksDB, before Faust's record-by-record replay (a new data dir, or one wiped "
        "after a crash): 1M states in 21 s instead of 145 s (make bench). Off: Faust "
        "replays everything.",
    )
    bulk_restore_min_records: int = Field(
        10_000,
        ge=0,
        description="How far a table partition must be behind its changelog to be "
        "restored in bulk; Faust replays smaller gaps.",
    )
    state_cache_size: int = Field(
        4096,
        ge=0,
        description="Golden states the merge keeps parsed between writes (about 11 KB each); "
        "0 parses every state it reads.",
    )
    max_record_bytes: int = Field(
        900_000,
        ge=16_384,
        description="Largest record the worker writes to Kafka, uncompressed: a golden state "
        "above it is not written and its change is dead-lettered (state_too_large); a dead "
        "letter above it is written truncated, with a SHA-256 of its value. Keep it below "
        "librdkafka's message.max.bytes and the topics' max.message.bytes (both about 1 MB "
        "by default).",
    )
    data_dir: Path | None = Field(None, description="RocksDB state; default <state_dir>/worker.")
    web_host: str = Field("127.0.0.1", description="Interface of the web server (metrics, health).")
    web_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the web server (metrics, health). None: 16066 for instance 1, "
        "16066 + n - 1 for a numeric instance n, 16066 for any other; 0: a free port, which "
        "the worker prints and writes to <data dir>.port.",
    )
    web_token: SecretStr | None = Field(
        None,
        description="Token for /status and /status.json (at least 16 characters): "
        "'Authorization: Bearer <token>', or /status?token=<token> once in a browser. "
        "Unset: those pages show counts and names only, no customer values.",
    )
    web_token_file: Path | None = Field(
        None, description="A file holding worker.web_token (a mounted secret); not both."
    )
    web_allowed_hosts: list[str] | None = Field(
        None,
        description="Host names the web port answers to, against DNS rebinding (any other "
        "Host header gets 403; IP addresses are always accepted). None: localhost, worker "
        "(the compose service Prometheus scrapes) and web_host.",
    )
    stall_after_s: float = Field(
        120.0,
        gt=0,
        description="/health turns not ready when ingest, merge or emit has records waiting "
        "and has moved none for this long.",
    )
    max_clock_skew_s: float = Field(
        300.0,
        ge=0,
        description="How far a change's commit time may be ahead of its capture time "
        "(Debezium's ts_ms) before ingest clamps it to the capture time, stores it clamped "
        "and flags it (accord_clock_skew_clamped_total, accord explain). A source clock "
        "running fast, or a commit_time column in the future, would otherwise win lww for "
        "good. 0 clamps any lead.",
    )
    redis_prefix: str = Field("accord:", description="Prefix of every Redis key Accord writes.")
    dedupe_ttl_s: int = Field(
        7 * 24 * 3600, gt=0, description="How long a change identity is remembered."
    )
    identity_check_s: float = Field(
        5.0,
        gt=0,
        description="How often the worker checks that Redis still holds its identity keys "
        "(their epoch key); lost ones are rebuilt from the golden changelog.",
    )
    sinks: list[str] | None = Field(
        None,
        description="Targets whose appliers run inside the worker: None runs every SQL target's, "
        "[] none (run `accord sink --target` instead).",
    )
    connector_watchdog: bool = Field(
        True, description="Restart failed source connector tasks, and hung ones (no heartbeat)."
    )
    connector_stall_s: float = Field(
        60.0, gt=0, description="A connector without a heartbeat this long is restarted."
    )
    status_interval_s: float = Field(
        5.0, gt=0, description="How often the status page and lag metrics are refreshed."
    )
    reconcile_interval_s: float = Field(
        900.0,
        ge=0,
        description="How often the worker reconciles every SQL target (report only, never "
        "repairs; shown on /status and as accord_reconcile_rows); 0 turns it off.",
    )
    rules_file: Path = Field(
        Path("connectors/survivorship.yaml"),
        description="Survivorship, match and delete rules.",
    )

    @property
    def port(self) -> int:
        """The web port this worker asks for: `web_port`, or the one its instance implies
        (`streams.workerhost.default_web_port`); 0 asks the OS for a free one."""
        from streams.workerhost import default_web_port

        return default_web_port(self.instance) if self.web_port is None else self.web_port

    @model_validator(mode="after")
    def _one_web_token(self) -> WorkerSettings:
        if self.web_token is not None and self.web_token_file is not None:
            raise ValueError("worker: set web_token or web_token_file, not both")
        return self

    def web_token_value(self) -> str | None:
        """The web token, from the setting or its file; None when neither is set."""
        return _secret(self.web_token, self.web_token_file, "worker.web_token")


def _secret(value: SecretStr | None, file: Path | None, name: str) -> str | None:
    """A secret from its setting or from a file (a mounted secret); never both."""
    if value is not None and file is not None:
        raise ConfigError(f"set {name} or {name}_file, not both")
    if file is None:
        return value.get_secret_value() if value is not None else None
    try:
        return file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{name}_file {file}: cannot read: {exc.strerror}") from exc


class IdentitySettings(BaseModel):
    """The secret Redis match key names are hashed with (`streams.matchkeys`).

    Every worker, applier and command of an app needs the same one. Changing it means
    re-keying (`accord identity rebuild --rekey`).
    """

    model_config = ConfigDict(extra="forbid")

    key_secret: SecretStr | None = Field(
        None,
        description="At least 16 characters. Unset: with Redis on loopback, one generated "
        "once in <state_dir>/identity-key-secret (mode 0600); with any other Redis the "
        "worker refuses to start.",
    )
    key_secret_file: Path | None = Field(
        None, description="A file holding identity.key_secret (a mounted secret); not both."
    )

    @model_validator(mode="after")
    def _one_key_secret(self) -> IdentitySettings:
        if self.key_secret is not None and self.key_secret_file is not None:
            raise ValueError("identity: set key_secret or key_secret_file, not both")
        return self

    def key_secret_value(self) -> str | None:
        """The configured secret, from the setting or its file; None when neither is set."""
        return _secret(self.key_secret, self.key_secret_file, "identity.key_secret")


class KafkaSecurity(BaseModel):
    """How every Kafka client of Accord authenticates: TLS and SASL, as librdkafka names them.

    Secrets come from the environment (``ACCORD_KAFKA_SECURITY__SASL_PASSWORD``) or a file
    (``...__SASL_PASSWORD_FILE``); they are never printed (settings show them as ``**********``).
    """

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) the broker's cert is checked against."
    )
    ssl_check_hostname: bool = Field(
        True, description="Check the broker's name against its certificate."
    )

    @model_validator(mode="after")
    def _complete(self) -> KafkaSecurity:
        if self.protocol.startswith("SASL") and not self.sasl_username:
            raise ValueError(f"kafka_security: {self.protocol} needs sasl_username")
        return self

    @property
    def uses_ssl(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL")

    def password(self) -> str | None:
        return _secret(self.sasl_password, self.sasl_password_file, "kafka_security.sasl_password")

    def librdkafka(self) -> dict[str, str]:
        config = {"security.protocol": self.protocol}
        if self.uses_sasl:
            config |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": self.sasl_username or "",
                "sasl.password": self.password() or "",
            }
        if self.uses_ssl:
            if self.ssl_ca_file is not None:
                config["ssl.ca.location"] = str(self.ssl_ca_file)
            if not self.ssl_check_hostname:
                config["ssl.endpoint.identification.algorithm"] = "none"
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        """For Faust's aiokafka clients, which take Python's SSL context."""
        if not self.uses_ssl:
            return None
        context = ssl.create_default_context(
            cafile=str(self.ssl_ca_file) if self.ssl_ca_file else None
        )
        context.check_hostname = self.ssl_check_hostname
        return context


class AccordSettings(BaseSettings):
    """Everything Accord reads from its environment, in one place."""

    # hide_input_in_errors: a mistyped secret setting must not echo its value.
    model_config = SettingsConfigDict(
        env_prefix="ACCORD_", env_nested_delimiter="__", extra="forbid", hide_input_in_errors=True
    )

    stack: StackSettings = StackSettings()
    crm: CrmDatabase = CrmDatabase()
    billing: BillingDatabase = BillingDatabase()
    support: SupportDatabase = SupportDatabase()
    topics: TopicSettings = TopicSettings()
    durability: DurabilitySettings = DurabilitySettings()
    schemas: SchemaSettings = SchemaSettings()
    worker: WorkerSettings = WorkerSettings()
    identity: IdentitySettings = IdentitySettings()
    connectors_dir: Path = Path("connectors")
    kafka_bootstrap: str | None = Field(None, description="Defaults to the local stack's broker.")
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible API; defaults to the local registry's ccompat."
    )
    connect_url: str | None = Field(None, description="Defaults to the local Kafka Connect.")
    redis_url: SecretStr | None = Field(
        None,
        description="Defaults to the local Redis. A secret: it may hold a password "
        "(redis://:password@host), which is then never printed; or use redis_password.",
    )
    kafka_security: KafkaSecurity = KafkaSecurity()
    redis_username: str | None = Field(None, description="Redis ACL user (default: none).")
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None
    registry_basic_auth: SecretStr | None = Field(
        None, description="'user:password' for the schema registry."
    )
    registry_basic_auth_file: Path | None = None
    connect_basic_auth: SecretStr | None = Field(
        None, description="'user:password' for Kafka Connect's REST API."
    )
    connect_basic_auth_file: Path | None = None
    redact_pii: bool = Field(
        True,
        description="Replace emails, phone numbers, names, addresses, tax ids and the rows "
        "database errors quote in log lines and error messages with placeholders (dead "
        "letters keep their original bytes).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("ACCORD_CONFIG", DEFAULT_CONFIG_FILE))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=config_file),
            file_secret_settings,
        )

    @property
    def kafka(self) -> str:
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        nodes = range(1, self.stack.kafka_brokers + 1)
        return ",".join(f"{self.stack.host}:{self.stack.kafka_node_ports(n)[0]}" for n in nodes)

    @property
    def registry(self) -> str:
        default = f"http://{self.stack.host}:{self.stack.registry_port}/apis/ccompat/v7"
        return self.schema_registry_url or default

    @property
    def connect(self) -> str:
        return self.connect_url or f"http://{self.stack.host}:{self.stack.connect_port}"

    @property
    def redis(self) -> str:
        """The Redis URL, password included if it holds one: never print it."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        return f"redis://{self.stack.host}:{self.stack.redis_port}/0"

    def kafka_config(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """librdkafka settings for one client: the brokers, security, then `extra`."""
        return {
            "bootstrap.servers": self.kafka,
            **self.kafka_security.librdkafka(),
            **(extra or {}),
        }

    def redis_credentials(self) -> dict[str, str]:
        password = _secret(self.redis_password, self.redis_password_file, "redis_password")
        credentials = {"username": self.redis_username, "password": password}
        return {name: value for name, value in credentials.items() if value is not None}

    def registry_auth(self) -> str | None:
        return _secret(
            self.registry_basic_auth, self.registry_basic_auth_file, "registry_basic_auth"
        )

    def connect_auth(self) -> tuple[str, str] | None:
        secret = _secret(
            self.connect_basic_auth, self.connect_basic_auth_file, "connect_basic_auth"
        )
        if secret is None:
            return None
        user, _, password = secret.partition(":")
        return user, password

    def match_key_secret(self) -> bytes:
        """The secret match keys are made with (`streams.matchkeys.key_secret`): the
        configured one, or for a loopback Redis one generated in the state dir; a
        `ConfigError` saying how to set one otherwise."""
        from streams.matchkeys import key_secret

        return key_secret(self.identity.key_secret_value(), self.redis, self.stack.state_dir)

    def source(self, system: str) -> SourceDatabase:
        if system not in ("crm", "billing", "support"):
            raise ConfigError(f"unknown system {system!r}; expected crm, billing or support")
        return getattr(self, system)

    @model_validator(mode="after")
    def _safe(self) -> AccordSettings:
        """Refuse what is unsafe for a non-loopback host (`streams.settings_safety`); the
        local stack's defaults on loopback pass. UnsafeSettings is not a ValueError, so
        pydantic passes it on as it is."""
        problems = unsafe_settings(self)
        if problems:
            raise UnsafeSettings(problems)
        return self


def load_settings(config_file: Path | None = None) -> AccordSettings:
    """Load settings; an explicitly named config file must exist."""
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        os.environ["ACCORD_CONFIG"] = str(config_file)
    try:
        settings = AccordSettings()
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    from streams.dbtls import tls_warnings

    for warning in (*weak_settings(settings), *tls_warnings(settings)):
        logging.getLogger(__name__).warning("%s", warning)
    return settings
