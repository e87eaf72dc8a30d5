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
