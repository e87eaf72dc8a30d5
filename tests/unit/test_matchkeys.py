"""Match key names: keyed hashes of the values (no personal data), their secret, and the
settings that give it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import redis

from streams import mapping
from streams.errors import ConfigError
from streams.identity import IdentityResolver, MatchRule, match_text
from streams.matchkeys import (
    GENERATED_SECRET_FILE,
    MatchKeys,
    glob_escape,
    is_loopback_redis,
    key_secret,
    match_digest,
)
from streams.settings import load_settings

SECRET = b"0123456789abcdef-test-secret"


def test_the_digest_is_stable_across_releases() -> None:
    # Pinned: key names in every deployed Redis depend on these exact bytes.
    assert match_digest(SECRET, "email", "ada@example.com") == (
        "_Lgb25qxqIaGDSrJrY7c7-5Ot7qDl_rIM092QGIDqDE"
    )
    assert match_digest(SECRET, "tax_id", "DE123456789") == (
        "b-hipWLNXDBhJv8tIT6rkA3vc3jBkuNrHY1QRfP2ikk"
    )


def test_the_digest_depends_on_secret_field_and_value() -> None:
    base = match_digest(SECRET, "email", "ada@example.com")
    assert match_digest(SECRET + b"x", "email", "ada@example.com") != base
    assert match_digest(SECRET, "tax_id", "ada@example.com") != base
    assert match_digest(SECRET, "email", "ada@example.org") != base
    # The field and value are separated: moving text across the boundary changes it.
    assert match_digest(SECRET, "a", "bc") != match_digest(SECRET, "ab", "c")


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        match_digest(b"", "email", "ada@example.com")


def test_key_names_carry_no_value() -> None:
    keys = MatchKeys("accord:", SECRET)
    name = keys.key("email", "ada@example.com")
    assert name == "accord:hmatch:email:" + match_digest(SECRET, "email", "ada@example.com")
    assert "ada" not in name and "example" not in name
    assert "DE123456789" not in keys.key("tax_id", "DE123456789")
    assert "DE123456789" in keys.legacy_key("tax_id", "DE123456789")


def test_values_mapping_normalized_alike_get_one_key() -> None:
    keys = MatchKeys("accord:", SECRET)
    spellings = ["Ada@Example.COM", "  ada@example.com ", "ADA@EXAMPLE.COM"]
    names = {keys.key("email", match_text(mapping.email(text)) or "") for text in spellings}
    assert names == {keys.key("email", "ada@example.com")}
    phones = ["+1 415 555 0142", "(415) 555-0142"]
    names = {keys.key("phone", match_text(mapping.phone(p, "US")) or "") for p in phones}
    assert names == {keys.key("phone", "+14155550142")}


def test_legacy_keys_parse_back_to_field_and_value() -> None:
    keys = MatchKeys("app:1:", SECRET)
    assert keys.parse_legacy("app:1:match:email:ada@example.com") == ("email", "ada@example.com")
    assert keys.parse_legacy("app:1:match:tax_id:DE:1:2") == ("tax_id", "DE:1:2")
    assert keys.parse_legacy("app:1:hmatch:email:abc") is None
    assert keys.parse_legacy("other:match:email:ada@example.com") is None
    assert keys.parse_legacy("app:1:match:email:") is None


def test_scan_patterns_take_the_prefix_literally() -> None:
    assert glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"
    keys = MatchKeys("t[1]:", SECRET)
    assert keys.legacy_pattern == "t\\[1\\]:match:*"
    assert keys.pattern == "t\\[1\\]:hmatch:*"


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("redis://127.0.0.1:16379/0", True),
        ("redis://localhost:6379", True),
        ("rediss://user:pw@[::1]:6379/0", True),
        ("unix:///run/redis.sock", True),
        ("redis://redis:6379/0", False),
        ("redis://10.0.0.5:6379/0", False),
        ("rediss://cache.example.com:6380", False),
    ],
)
def test_loopback_redis(url: str, loopback: bool) -> None:
    assert is_loopback_redis(url) is loopback


def test_a_configured_secret_is_used_as_given(tmp_path: Path) -> None:
    secret = "a-configured-secret-of-enough-length"
    assert key_secret(secret, "redis://redis:6379", tmp_path) == secret.encode()
    assert not (tmp_path / GENERATED_SECRET_FILE).exists()


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 16 characters"):
        key_secret("short", "redis://127.0.0.1:16379", tmp_path)


def test_loopback_redis_without_a_secret_generates_one_kept_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = key_secret(None, "redis://127.0.0.1:16379/0", state)
    path = state / GENERATED_SECRET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) >= 32
    assert key_secret(None, "redis://localhost:16379/0", state) == first  # a restart keeps it
    assert [p.name for p in state.iterdir()] == [GENERATED_SECRET_FILE]  # no temp left
    other = key_secret(None, "redis://127.0.0.1:16379/0", tmp_path / "elsewhere")
    assert other != first


def test_remote_redis_without_a_secret_refuses_saying_how_to_set_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as failure:
        key_secret(None, "redis://redis:6379/0", tmp_path)
    assert "ACCORD_IDENTITY__KEY_SECRET_FILE" in str(failure.value)
    assert "rekey" in str(failure.value)
    assert not (tmp_path / GENERATED_SECRET_FILE).exists()


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("ACCORD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("_clean_env")
def test_settings_give_the_secret_from_a_file_and_mask_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "key").write_text("from-a-mounted-secret-file\n")
    monkeypatch.setenv("ACCORD_IDENTITY__KEY_SECRET_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("ACCORD_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("ACCORD_REDIS_PASSWORD", "a-redis-password-of-its-own")
    assert load_settings().match_key_secret() == b"from-a-mounted-secret-file"
    monkeypatch.delenv("ACCORD_IDENTITY__KEY_SECRET_FILE")
    monkeypatch.setenv("ACCORD_IDENTITY__KEY_SECRET", "from-the-environment-1234")
    settings = load_settings()
    assert settings.match_key_secret() == b"from-the-environment-1234"
    assert "from-the-environment" not in repr(settings)


@pytest.mark.usefixtures("_clean_env")
def test_settings_refuse_the_secret_twice_and_a_remote_redis_without_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ACCORD_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("ACCORD_REDIS_PASSWORD", "a-redis-password-of-its-own")
    with pytest.raises(ConfigError, match=r"identity\.key_secret is not set"):
        load_settings().match_key_secret()
    monkeypatch.setenv("ACCORD_IDENTITY__KEY_SECRET", "from-the-environment-1234")
    monkeypatch.setenv("ACCORD_IDENTITY__KEY_SECRET_FILE", str(tmp_path / "key"))
    with pytest.raises(ConfigError, match="key_secret or key_secret_file, not both"):
        load_settings()


def test_a_resolver_with_match_rules_needs_a_secret() -> None:
    client = redis.Redis()  # never connected: construction talks to no server
    with pytest.raises(ConfigError, match="key secret"):
        IdentityResolver(client, "p:", (MatchRule("email"),))
    IdentityResolver(client, "p:", ())  # xref lookups and links need none
    resolver = IdentityResolver(client, "p:", (MatchRule("email"),), key_secret=SECRET)
    assert resolver.match_key("email", "a@b.c") == MatchKeys("p:", SECRET).key("email", "a@b.c")
