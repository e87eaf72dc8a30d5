"""Settings refuse what is unsafe for a non-loopback host, and never show a secret."""

from __future__ import annotations

import logging
import os
import sys
import types
import typing
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from streams.errors import ConfigError
from streams.settings import (
    AccordSettings,
    KafkaSecurity,
    StackSettings,
    WorkerSettings,
    _secret,
    load_settings,
)
from streams.settings_safety import (
    UnsafeSettings,
    bootstrap_hosts,
    default_secrets,
    is_loopback,
    secrets_given_twice,
    url_host,
)
from streams.stack.process import spawn
from streams.workers import WorkerProcess, worker_env


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("ACCORD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _load(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> AccordSettings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def _refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> UnsafeSettings:
    with pytest.raises(UnsafeSettings) as refused:
        _load(monkeypatch, env)
    return refused.value


# ------------------------------------------------------------------ the pure parts


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost", "localhost.",
     "::ffff:127.0.0.1"],
)  # fmt: skip
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "::", "10.0.0.5", "128.0.0.1", "192.168.1.1", "fe80::1%eth0", "db.example.com",
     "localhost.example.com", "postgres", ""],
)  # fmt: skip
def test_every_other_host_is_remote(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize(
    ("bootstrap", "hosts"),
    [
        ("127.0.0.1:19092", ["127.0.0.1"]),
        ("k1:9092, k2:9092,", ["k1", "k2"]),
        ("[::1]:9092,[2001:db8::1]:9093", ["::1", "2001:db8::1"]),
        ("SASL_SSL://kafka.internal:9094", ["kafka.internal"]),
        ("kafka", ["kafka"]),
    ],
)
def test_bootstrap_hosts(bootstrap: str, hosts: list[str]) -> None:
    assert bootstrap_hosts(bootstrap) == hosts


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("redis://:pw@cache.internal:6379/0", "cache.internal"),
        ("rediss://user:pw@[::1]:6380", "::1"),
        ("unix:///run/redis.sock", "localhost"),
        ("http://127.0.0.1:18081/apis/ccompat/v7", "127.0.0.1"),
        ("http://[::1", ""),  # does not parse: judged as remote
    ],
)
def test_url_host(url: str, host: str) -> None:
    assert url_host(url) == host


def test_the_code_s_default_passwords_are_known() -> None:
    assert {"accord-postgres", "accord-root", "accord", "debezium", "accord-scram"} <= (
        default_secrets(AccordSettings)
    )


class _Section(BaseModel):
    token: SecretStr | None = None
    token_file: Path | None = None


class _Root(BaseModel):
    section: _Section = _Section()
    password: SecretStr | None = None
    password_file: Path | None = None


def test_any_secret_and_its_file_given_together_are_found_in_any_section() -> None:
    """By name, so pairs added later (e.g. a token in the worker's section) are refused."""
    both = _Root(
        section=_Section(token=SecretStr("t"), token_file=Path("/t")),
        password=SecretStr("p"),
        password_file=Path("/p"),
    )
    assert secrets_given_twice(both) == [
        "section: set token or token_file, not both "
        "(ACCORD_SECTION__TOKEN or ACCORD_SECTION__TOKEN_FILE)",
        "set password or password_file, not both (ACCORD_PASSWORD or ACCORD_PASSWORD_FILE)",
    ]
    assert secrets_given_twice(_Root(password_file=Path("/p"))) == []


def test_a_secret_and_its_file_are_refused_where_they_are_read_too() -> None:
    with pytest.raises(ConfigError, match="set redis_password or redis_password_file, not both"):
        _secret(SecretStr("a"), Path("/run/secrets/b"), "redis_password")


# --------------------------------------------------------- loopback keeps working


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"ACCORD_STACK__HOST": "::1"},
        {"ACCORD_STACK__HOST": "localhost"},
        {"ACCORD_STACK__HOST": "127.0.0.2", "ACCORD_CRM__HOST": "localhost"},
        {
            "ACCORD_KAFKA_BOOTSTRAP": "[::1]:19092,localhost:19102",
            "ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_PLAINTEXT",
            "ACCORD_KAFKA_SECURITY__SASL_MECHANISM": "PLAIN",
            "ACCORD_KAFKA_SECURITY__SASL_USERNAME": "accord",
            "ACCORD_KAFKA_SECURITY__SASL_PASSWORD": "accord-scram",
        },
        {"ACCORD_REDIS_URL": "redis://127.0.0.1:16379/0", "ACCORD_REGISTRY_BASIC_AUTH": "u:"},
    ],
)
def test_loopback_takes_the_local_stack_s_defaults(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    _load(monkeypatch, env)  # raises UnsafeSettings if refused


def test_remote_hosts_with_their_own_secrets_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "kafka-password").write_text("k-s3cret\n")
    env = {"ACCORD_STACK__HOST": "10.0.0.5"}
    for name in ("POSTGRES_SUPERUSER_PASSWORD", "MARIADB_ROOT_PASSWORD", "KAFKA_SCRAM_PASSWORD"):
        env[f"ACCORD_STACK__{name}"] = f"{name.lower()}-s3cret"
    for system in ("CRM", "BILLING", "SUPPORT"):
        env[f"ACCORD_{system}__HOST"] = "db.internal"
        env[f"ACCORD_{system}__APP_PASSWORD"] = f"{system}-app-s3cret"
        env[f"ACCORD_{system}__CDC_PASSWORD"] = f"{system}-cdc-s3cret"
    settings = _load(
        monkeypatch,
        env
        | {
            "ACCORD_KAFKA_BOOTSTRAP": "kafka-1.internal:9094,kafka-2.internal:9094",
            "ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_SSL",
            "ACCORD_KAFKA_SECURITY__SASL_MECHANISM": "PLAIN",  # PLAIN is fine over TLS
            "ACCORD_KAFKA_SECURITY__SASL_USERNAME": "accord",
            "ACCORD_KAFKA_SECURITY__SASL_PASSWORD_FILE": str(tmp_path / "kafka-password"),
            "ACCORD_REDIS_URL": "rediss://cache.internal:6380/0",
            "ACCORD_REDIS_PASSWORD": "r-s3cret",
            "ACCORD_SCHEMA_REGISTRY_URL": "https://registry.internal/apis/ccompat/v7",
            "ACCORD_REGISTRY_BASIC_AUTH": "reader:g-s3cret",
            "ACCORD_CONNECT_URL": "http://connect.internal:8083",  # no auth: allowed
        },
    )
    assert settings.kafka_security.password() == "k-s3cret"


# -------------------------------------------------------------- what is refused

REMOTE_SASL = {
    "ACCORD_KAFKA_BOOTSTRAP": "127.0.0.1:19092,kafka.internal:9094",
    "ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_SSL",
    "ACCORD_KAFKA_SECURITY__SASL_USERNAME": "accord",
}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"ACCORD_CRM__HOST": "db.example.com"},
            "crm.app_password is a default in the code (the local stack's password), for "
            "non-loopback host db.example.com: set ACCORD_CRM__APP_PASSWORD",
        ),
        (
            {"ACCORD_BILLING__HOST": "10.1.2.3", "ACCORD_BILLING__APP_PASSWORD": "good-one"},
            "billing.cdc_password is a default in the code",
        ),
        (
            {"ACCORD_SUPPORT__HOST": "::", "ACCORD_SUPPORT__APP_PASSWORD": ""},
            "support.app_password is empty, for non-loopback host ::",
        ),
        (
            {"ACCORD_STACK__HOST": "0.0.0.0"},
            "stack.postgres_superuser_password is a default in the code",
        ),
        ({"ACCORD_STACK__HOST": "0.0.0.0"}, "stack.mariadb_root_password is a default"),
        (
            {"ACCORD_STACK__HOST": "192.168.1.20"},
            "stack.kafka_scram_password is a default in the code (the local stack's "
            "password), for non-loopback host 192.168.1.20: set "
            "ACCORD_STACK__KAFKA_SCRAM_PASSWORD",
        ),
        (
            REMOTE_SASL,
            "kafka_security.sasl_password is not set, for non-loopback host kafka.internal: "
            "put it in a file named by ACCORD_KAFKA_SECURITY__SASL_PASSWORD_FILE "
            "(or set ACCORD_KAFKA_SECURITY__SASL_PASSWORD)",
        ),
        (
            REMOTE_SASL | {"ACCORD_KAFKA_SECURITY__SASL_PASSWORD": ""},
            "kafka_security.sasl_password is empty",
        ),
        (
            REMOTE_SASL | {"ACCORD_KAFKA_SECURITY__SASL_PASSWORD": "accord-scram"},
            "kafka_security.sasl_password is a default in the code",
        ),
        (
            REMOTE_SASL
            | {
                "ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_PLAINTEXT",
                "ACCORD_KAFKA_SECURITY__SASL_MECHANISM": "PLAIN",
                "ACCORD_KAFKA_SECURITY__SASL_PASSWORD": "good-one",
            },
            "kafka_security: SASL PLAIN over SASL_PLAINTEXT sends the password in clear to "
            "non-loopback host kafka.internal: set protocol SASL_SSL "
            "(ACCORD_KAFKA_SECURITY__PROTOCOL) or a SCRAM sasl_mechanism",
        ),
        (
            {"ACCORD_REDIS_URL": "redis://redis:6379/0"},
            "redis_password is not set, for non-loopback host redis: put it in a file named "
            "by ACCORD_REDIS_PASSWORD_FILE (or set ACCORD_REDIS_PASSWORD)",
        ),
        (
            {"ACCORD_REDIS_URL": "redis://cache.internal/0", "ACCORD_REDIS_PASSWORD": ""},
            "redis_password is empty",
        ),
        (
            {"ACCORD_REDIS_URL": "redis://:accord-root@cache.internal/0"},
            "redis_password is a default in the code",
        ),
        (
            {
                "ACCORD_SCHEMA_REGISTRY_URL": "http://registry:8080/apis/ccompat/v7",
                "ACCORD_REGISTRY_BASIC_AUTH": "reader:good-one",
            },
            "registry_basic_auth would be sent in clear to non-loopback host registry: use an "
            "https schema_registry_url (ACCORD_SCHEMA_REGISTRY_URL)",
        ),
        (
            {
                "ACCORD_SCHEMA_REGISTRY_URL": "https://registry.internal/apis/ccompat/v7",
                "ACCORD_REGISTRY_BASIC_AUTH": "reader:",
            },
            "registry_basic_auth is empty",
        ),
        (
            {
                "ACCORD_CONNECT_URL": "https://connect.internal",
                "ACCORD_CONNECT_BASIC_AUTH": "admin:debezium",
            },
            "connect_basic_auth is a default in the code",
        ),
        (
            {"ACCORD_CONNECT_URL": "http://connect:8083", "ACCORD_CONNECT_BASIC_AUTH": "a:b"},
            "connect_basic_auth would be sent in clear",
        ),
    ],
)
def test_unsafe_settings_for_a_non_loopback_host_are_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    refused = _refused(monkeypatch, env)
    assert message in str(refused)
    assert all("ACCORD_" in problem for problem in refused.problems)  # each says how to fix
    secrets = [v for k, v in env.items() if v and ("PASSWORD" in k or k.endswith(("AUTH", "URL")))]
    assert not [secret for secret in secrets if secret in str(refused)]


@pytest.mark.parametrize(
    "setting",
    [
        "kafka_security.sasl_password",
        "redis_password",
        "registry_basic_auth",
        "connect_basic_auth",
    ],
)
@pytest.mark.parametrize("host", ["127.0.0.1", "remote.example.com"])
def test_a_secret_given_inline_and_as_a_file_is_refused_everywhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setting: str, host: str
) -> None:
    (tmp_path / "secret").write_text("from-a-file:x\n")
    env = {
        "ACCORD_KAFKA_BOOTSTRAP": f"{host}:9092",
        "ACCORD_REDIS_URL": f"redis://{host}:6379/0",
        "ACCORD_SCHEMA_REGISTRY_URL": f"https://{host}/apis/ccompat/v7",
        "ACCORD_CONNECT_URL": f"https://{host}:8083",
    }
    if setting.startswith("kafka_security"):
        env |= REMOTE_SASL | {"ACCORD_KAFKA_BOOTSTRAP": f"{host}:9092"}
    variable = "ACCORD_" + setting.upper().replace(".", "__")
    env |= {variable: "inline:y", f"{variable}_FILE": str(tmp_path / "secret")}
    refused = _refused(monkeypatch, env)
    section, _, name = setting.rpartition(".")
    form = f"set {name} or {name}_file, not both ({variable} or {variable}_FILE)"
    assert refused.problems[0] == (f"{section}: {form}" if section else form)


def test_a_password_in_redis_url_and_in_redis_password_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = _refused(
        monkeypatch,
        {"ACCORD_REDIS_URL": "redis://:url-pw-9f1@127.0.0.1/0", "ACCORD_REDIS_PASSWORD": "other"},
    )
    assert "redis_url holds a password and redis_password" in str(refused)
    assert "url-pw-9f1" not in str(refused)


@pytest.mark.parametrize(
    ("setting", "url", "auth"),
    [
        ("SCHEMA_REGISTRY_URL", "http://reader:reg-pw-4c2@127.0.0.1:18081/", "registry_basic_auth"),
        ("CONNECT_URL", "https://admin:con-pw-4c2@connect.internal", "connect_basic_auth"),
    ],
)
def test_a_password_inside_a_registry_or_connect_url_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, setting: str, url: str, auth: str
) -> None:
    refused = _refused(monkeypatch, {f"ACCORD_{setting}": url})
    assert f"{setting.lower()} holds a password, which would be printed" in str(refused)
    assert f"as {auth} (ACCORD_{auth.upper()}_FILE" in str(refused)
    assert "pw-4c2" not in str(refused)


def test_scram_over_plaintext_to_a_remote_broker_loads_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env = REMOTE_SASL | {
        "ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_PLAINTEXT",
        "ACCORD_KAFKA_SECURITY__SASL_PASSWORD": "scram-9d3",
    }
    with caplog.at_level(logging.WARNING, logger="streams.settings"):
        _load(monkeypatch, env)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "SCRAM-SHA-512 over SASL_PLAINTEXT to non-loopback host kafka.internal" in warning
    assert "scram-9d3" not in warning


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("redis://:redis-pw-5a1@cache.internal:6379/0", True),
        ("rediss://:redis-pw-5a1@cache.internal:6380/0", False),
        ("redis://:redis-pw-5a1@127.0.0.1:16379/0", False),
    ],
)
def test_a_redis_password_without_tls_to_a_remote_host_loads_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, url: str, warned: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="streams.settings"):
        _load(monkeypatch, {"ACCORD_REDIS_URL": url})
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == (
        [
            "redis_url: the Redis password crosses the network in clear to non-loopback "
            "host cache.internal; use a rediss:// URL (ACCORD_REDIS_URL) off a private network"
        ]
        if warned
        else []
    )


def test_an_unreadable_secret_file_for_a_remote_host_is_an_error_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="redis_password_file /nonexistent/pw: cannot read"):
        env = {"ACCORD_REDIS_URL": "redis://cache", "ACCORD_REDIS_PASSWORD_FILE": "/nonexistent/pw"}
        _load(monkeypatch, env)


# ------------------------------------------------------------ secrets stay masked


def test_a_password_in_redis_url_is_used_but_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis://worker:url-pw-7e4@cache.internal:6379/0"
    settings = _load(monkeypatch, {"ACCORD_REDIS_URL": url})
    assert settings.redis == url  # what the clients connect with
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "url-pw-7e4" not in shown
    # A worker started by accord gets it in its environment, which is never printed.
    assert worker_env(settings)["ACCORD_REDIS_URL"] == url


def test_every_secret_is_masked_in_repr_and_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {
        "ACCORD_STACK__POSTGRES_SUPERUSER_PASSWORD": "sec-pg-super",
        "ACCORD_STACK__MARIADB_ROOT_PASSWORD": "sec-maria-root",
        "ACCORD_STACK__KAFKA_SCRAM_PASSWORD": "sec-scram",
        "ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_SSL",
        "ACCORD_KAFKA_SECURITY__SASL_USERNAME": "accord",
        "ACCORD_KAFKA_SECURITY__SASL_PASSWORD": "sec-sasl",
        "ACCORD_REDIS_URL": "redis://:sec-redis-url@127.0.0.1:16379/1",
        "ACCORD_REGISTRY_BASIC_AUTH": "reader:sec-registry",
        "ACCORD_CONNECT_BASIC_AUTH": "admin:sec-connect",
    }
    for system in ("CRM", "BILLING", "SUPPORT"):
        env[f"ACCORD_{system}__APP_PASSWORD"] = f"sec-{system.lower()}-app"
        env[f"ACCORD_{system}__CDC_PASSWORD"] = f"sec-{system.lower()}-cdc"
    settings = _load(monkeypatch, env)
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "sec-" not in shown


def _secret_named(name: str) -> bool:
    words = ("password", "secret", "token", "basic_auth")
    return any(word in name for word in words) and not name.endswith(("_file", "_env"))


def _is_secret_type(annotation: object) -> bool:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return all(_is_secret_type(a) for a in typing.get_args(annotation) if a is not type(None))
    return annotation is SecretStr


def _secret_fields(model: type[BaseModel], path: str = "") -> list[tuple[str, object]]:
    found = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _secret_fields(field.annotation, f"{path}{name}.")
        elif _secret_named(name):
            found.append((path + name, field.annotation))
    return found


def test_every_secret_setting_is_a_secret_type() -> None:
    """Checked by name over every section, so a secret added later is held to it too."""
    fields = dict(_secret_fields(AccordSettings))
    assert {
        "stack.postgres_superuser_password",
        "crm.cdc_password",
        "kafka_security.sasl_password",
        "registry_basic_auth",
    } <= set(fields)
    assert _is_secret_type(AccordSettings.model_fields["redis_url"].annotation)  # may hold one
    plain = [name for name, annotation in fields.items() if not _is_secret_type(annotation)]
    assert plain == []


def test_a_mistyped_secret_setting_does_not_echo_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCORD_KAFKA_SECURITY__SASL_PASWORD", "typo-s3cret")
    with pytest.raises(ConfigError, match="sasl_pasword") as failed:
        load_settings()
    assert "typo-s3cret" not in str(failed.value)


def test_a_worker_started_by_accord_gets_its_secrets_in_its_environment_not_its_log(
    tmp_path: Path,
) -> None:
    """worker_env -> a real child process -> load_settings: the secrets arrive, and even
    the child printing its settings shows none of them."""
    url = "redis://:env-url-3b8@127.0.0.1:16379/0"
    settings = AccordSettings(
        stack=StackSettings(state_dir=tmp_path),
        worker=WorkerSettings(app_id="unit-secret-env", web_port=0),
        redis_url=SecretStr(url),
        kafka_security=KafkaSecurity(
            protocol="SASL_SSL", sasl_username="accord", sasl_password=SecretStr("env-sasl-3b8")
        ),
    )
    process = WorkerProcess(settings)
    code = (
        "from streams.settings import load_settings\n"
        "s = load_settings()\n"
        "print(repr(s))\n"
        f"print('redis url arrived:', s.redis == {url!r})\n"
        "print('sasl password arrived:', s.kafka_security.password() == 'env-sasl-3b8')\n"
    )
    root = Path(__file__).resolve().parents[2]
    process.spec = replace(process.spec, argv=[sys.executable, "-c", code], cwd=root)
    pid = spawn(process.spec)
    _, status = os.waitpid(pid, 0)
    log = process.log.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, log
    assert "redis url arrived: True" in log
    assert "sasl password arrived: True" in log
    assert "env-url-3b8" not in log
    assert "env-sasl-3b8" not in log
