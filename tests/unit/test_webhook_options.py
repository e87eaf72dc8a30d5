"""A webhook sink is signed and on https unless its sink.yaml says otherwise, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.errors import ConfigError
from streams.projection import DEFAULT_LOG_MAXLEN, OPTION_KINDS, SinkKind, load_sinks

HOOK = """\
sink:
  kind: webhook
  url: https://partner.example/hook
  fields: [email]
"""


def sinks_of(tmp_path: Path, text: str, name: str = "partner") -> dict:
    (tmp_path / name).mkdir()
    (tmp_path / name / "sink.yaml").write_text(text)
    return load_sinks(tmp_path)


def test_a_signed_https_webhook_has_secure_defaults(tmp_path: Path) -> None:
    spec = sinks_of(tmp_path, HOOK + "  secret_env: PARTNER_SECRET\n")["partner"]
    assert spec.secret_env == "PARTNER_SECRET"
    assert (spec.unsigned, spec.legacy_signature, spec.insecure_http) == (False, False, False)
    assert spec.log_maxlen == DEFAULT_LOG_MAXLEN == 100_000


def test_a_webhook_without_a_secret_is_an_error_naming_sink_and_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        sinks_of(tmp_path, HOOK)
    message = str(raised.value)
    assert "partner/sink.yaml:2: sink 'partner': a webhook needs `secret_env`" in message
    assert "or `unsigned: true`" in message


def test_unsigned_true_is_the_explicit_way_to_send_unsigned(tmp_path: Path) -> None:
    spec = sinks_of(tmp_path, HOOK + "  unsigned: true\n")["partner"]
    assert (spec.unsigned, spec.secret_env) == (True, None)


def test_a_plain_http_url_needs_insecure_http_even_on_loopback(tmp_path: Path) -> None:
    text = HOOK.replace("https://partner.example", "http://127.0.0.1:8080")
    with pytest.raises(ConfigError, match=r"sink.yaml:3: sink 'partner': url .* is plain http"):
        sinks_of(tmp_path, text + "  secret_env: PARTNER_SECRET\n")
    other = tmp_path / "other"
    other.mkdir()
    spec = sinks_of(other, text + "  secret_env: PARTNER_SECRET\n  insecure_http: true\n")[
        "partner"
    ]
    assert spec.insecure_http and spec.url == "http://127.0.0.1:8080/hook"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("  unsigned: true\n  secret_env: S\n", r"unsigned: true contradicts secret_env"),
        ("  unsigned: true\n  legacy_signature: true\n", r"legacy_signature needs a secret"),
        ("  secret_env: S\n  legacy_signature: yes please\n", r"legacy_signature must be true"),
        ("  secret_env: S\n  insecure_http: 1\n", r"insecure_http must be true or false"),
        ("  unsigned: 'true'\n", r"unsigned must be true or false"),
        ("  secret_env: ''\n", r"secret_env names an environment variable"),
        ("  secret_env: S\n  log_maxlen: 0\n", r"log_maxlen must be a positive whole number"),
        ("  secret_env: S\n  log_maxlen: 1.5\n", r"log_maxlen must be a positive whole number"),
        ("  secret_env: S\n  log_maxlen: true\n", r"log_maxlen must be a positive whole number"),
        ("  secret_env: S\n  unsinged: true\n", r"unknown option 'unsinged'.*'unsigned'"),
    ],
)
def test_option_mistakes_are_reported(tmp_path: Path, extra: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        sinks_of(tmp_path, HOOK + extra)


def test_legacy_signature_and_log_maxlen_are_read(tmp_path: Path) -> None:
    text = HOOK + "  secret_env: S\n  legacy_signature: true\n  log_maxlen: 500\n"
    spec = sinks_of(tmp_path, text)["partner"]
    assert (spec.legacy_signature, spec.log_maxlen) == (True, 500)


def test_webhook_options_belong_to_webhooks() -> None:
    for option in ("url", "secret_env", "unsigned", "legacy_signature", "insecure_http"):
        assert OPTION_KINDS[option] is SinkKind.WEBHOOK
    assert OPTION_KINDS["log_maxlen"] is SinkKind.WEBHOOK
    assert OPTION_KINDS["adopt_by"] is SinkKind.SQL


@pytest.mark.parametrize("option", ["unsigned: true", "log_maxlen: 10", "insecure_http: true"])
def test_a_sql_sink_refuses_webhook_options(tmp_path: Path, option: str) -> None:
    text = (
        "sink:\n  kind: sql\n  table: users\n  key: {column: id}\n  columns: {email: email}\n"
        f"  {option}\n"
    )
    name = option.split(":")[0]
    with pytest.raises(ConfigError, match=rf"mapping.yaml:6: sink: {name} applies to kind webhook"):
        (tmp_path / "crm").mkdir()
        (tmp_path / "crm" / "mapping.yaml").write_text(text)
        load_sinks(tmp_path)


def test_the_shipped_connectors_parse() -> None:
    load_sinks(Path(__file__).resolve().parents[2] / "connectors")
