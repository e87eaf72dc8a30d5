from pathlib import Path

import pytest

from streams.errors import ConfigError
from streams.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("ACCORD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_point_at_the_local_stack() -> None:
    settings = load_settings()
    assert settings.kafka == "127.0.0.1:19092"
    assert settings.registry == "http://127.0.0.1:18081/apis/ccompat/v7"
    assert settings.connect == "http://127.0.0.1:18083"
    assert settings.redis == "redis://127.0.0.1:16379/0"


def test_environment_overrides_nested_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_STACK__KAFKA_PORT", "29092")
    monkeypatch.setenv("ACCORD_CRM__APP_PASSWORD", "s3cret")
    settings = load_settings()
    assert settings.kafka == "127.0.0.1:29092"
    assert settings.crm.app_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_config_file_is_read_and_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "custom.toml"
    config.write_text("[stack]\nredis_port = 26379\nkafka_port = 1111\n")
    monkeypatch.setenv("ACCORD_STACK__KAFKA_PORT", "2222")
    # load_settings names the file in ACCORD_CONFIG for the processes it starts; this
    # undoes it after the test, or every later test would run on this file's ports.
    monkeypatch.setenv("ACCORD_CONFIG", str(config))
    settings = load_settings(config)
    assert settings.stack.redis_port == 26379
    assert settings.stack.kafka_port == 2222


def test_default_config_file_in_working_directory(tmp_path: Path) -> None:
    (tmp_path / "accord.toml").write_text('kafka_bootstrap = "broker:9092"\n')
    assert load_settings().kafka == "broker:9092"


def test_missing_explicit_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_unknown_setting_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "accord.toml").write_text("[stack]\nkafak_port = 1\n")
    with pytest.raises(ConfigError, match="kafak_port"):
        load_settings()


def test_unknown_system_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown system 'erp'"):
        load_settings().source("erp")


def test_kafka_security_from_the_environment_reaches_every_client_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    password = tmp_path / "kafka-password"
    password.write_text("scram-secret\n")  # a mounted secret ends with a newline
    monkeypatch.setenv("ACCORD_KAFKA_SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ACCORD_KAFKA_SECURITY__SASL_USERNAME", "accord")
    monkeypatch.setenv("ACCORD_KAFKA_SECURITY__SASL_PASSWORD_FILE", str(password))
    monkeypatch.setenv("ACCORD_KAFKA_SECURITY__SSL_CA_FILE", "/etc/accord/ca.pem")
    settings = load_settings()
    config = settings.kafka_config({"group.id": "g"})
    assert config == {
        "bootstrap.servers": "127.0.0.1:19092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "accord",
        "sasl.password": "scram-secret",
        "ssl.ca.location": "/etc/accord/ca.pem",
        "group.id": "g",
    }
    assert "scram-secret" not in repr(settings)


def test_plaintext_is_the_default_and_adds_no_credentials() -> None:
    assert load_settings().kafka_config() == {
        "bootstrap.servers": "127.0.0.1:19092",
        "security.protocol": "PLAINTEXT",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_SSL"}, "SASL_SSL needs sasl_username"),
        (
            {
                "ACCORD_KAFKA_SECURITY__SASL_PASSWORD": "a",
                "ACCORD_KAFKA_SECURITY__SASL_PASSWORD_FILE": "/run/secrets/b",
            },
            "sasl_password or sasl_password_file, not both",
        ),
        ({"ACCORD_KAFKA_SECURITY__PROTOCOL": "SASL_SSH"}, "SASL_SSL"),
    ],
)
def test_incomplete_security_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_a_missing_secret_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_REDIS_PASSWORD_FILE", "/nonexistent/redis-password")
    with pytest.raises(ConfigError, match="redis_password_file /nonexistent/redis-password"):
        load_settings().redis_credentials()


def test_redis_registry_and_connect_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "registry-auth").write_text("reader:r3g\n")
    monkeypatch.setenv("ACCORD_REDIS_USERNAME", "accord")
    monkeypatch.setenv("ACCORD_REDIS_PASSWORD", "r3dis")
    monkeypatch.setenv("ACCORD_REGISTRY_BASIC_AUTH_FILE", str(tmp_path / "registry-auth"))
    monkeypatch.setenv("ACCORD_CONNECT_BASIC_AUTH", "admin:c0nnect:with-colon")
    settings = load_settings()
    assert settings.redis_credentials() == {"username": "accord", "password": "r3dis"}
    assert settings.registry_auth() == "reader:r3g"
    assert settings.connect_auth() == ("admin", "c0nnect:with-colon")
    for secret in ("r3dis", "r3g", "c0nnect"):
        assert secret not in repr(settings)


def test_registry_and_connect_clients_send_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    import httpx

    from streams.connect import ConnectClient
    from streams.registry import registry_client

    monkeypatch.setenv("ACCORD_REGISTRY_BASIC_AUTH", "reader:r3g")
    monkeypatch.setenv("ACCORD_CONNECT_BASIC_AUTH", "admin:c0nnect")
    settings = load_settings()

    import httpx2  # the HTTP client confluent-kafka's registry client is built on

    def authorization(auth: httpx.Auth, request: httpx.Request) -> str:
        return next(auth.auth_flow(request)).headers["Authorization"]

    def basic(user_info: bytes) -> str:
        return "Basic " + base64.b64encode(user_info).decode()

    connect = ConnectClient.of(settings).http.auth
    assert authorization(connect, httpx.Request("GET", "http://127.0.0.1/")) == basic(
        b"admin:c0nnect"
    )
    registry = registry_client(settings)._rest_client.session.auth  # no public accessor
    assert authorization(registry, httpx2.Request("GET", "http://127.0.0.1/")) == basic(
        b"reader:r3g"
    )
