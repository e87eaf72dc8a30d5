"""Webhook signatures: what Accord sends verifies, and nothing changed or replayed does."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest

from streams.errors import ConfigError
from streams.projection import SinkSpec, parse_sink
from streams.sinks import SinkEvent, WebhookApplier
from streams.webhook_signature import (
    LEGACY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    signature_headers,
    verify,
)

SECRET = "s3cret-of-the-partner"
BODY = b'{"event_id":"partner:g1:3:+","fields":{"email":"ada@example.com"}}'
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def reason(headers: dict[str, str], body: bytes = BODY, now: float = NOW, **kw: Any) -> str:
    with pytest.raises(SignatureError) as raised:
        verify(SECRET, headers, body, now=now, **kw)
    return raised.value.reason


def test_the_v1_signature_is_hmac_of_timestamp_dot_body() -> None:
    headers = signature_headers(SECRET, BODY, now=NOW + 0.9)
    expected = hmac.new(SECRET.encode(), b"1767225600." + BODY, hashlib.sha256).hexdigest()
    assert headers == {TIMESTAMP_HEADER: "1767225600", SIGNATURE_HEADER: f"v1={expected}"}


def test_a_valid_delivery_verifies_within_the_tolerance_either_way() -> None:
    headers = signature_headers(SECRET, BODY, now=NOW)
    verify(SECRET, headers, BODY, now=NOW)
    verify(SECRET, headers, BODY, now=NOW + 300)
    verify(SECRET, headers, BODY, now=NOW - 300)
    verify(SECRET.encode(), {k.lower(): v for k, v in headers.items()}, BODY, now=NOW)


def test_a_tampered_body_is_rejected() -> None:
    headers = signature_headers(SECRET, BODY, now=NOW)
    assert reason(headers, BODY.replace(b"ada@", b"eve@")) == "mismatch"


def test_a_tampered_timestamp_is_rejected() -> None:
    headers = signature_headers(SECRET, BODY, now=NOW)
    # A replay with a fresh timestamp: within the tolerance, but the signature covers it.
    assert reason({**headers, TIMESTAMP_HEADER: str(int(NOW) + 60)}, now=NOW + 60) == "mismatch"


def test_another_secret_is_rejected() -> None:
    headers = signature_headers("another secret", BODY, now=NOW)
    assert reason(headers) == "mismatch"


def test_a_replay_older_than_five_minutes_is_rejected() -> None:
    headers = signature_headers(SECRET, BODY, now=NOW)
    assert reason(headers, now=NOW + 301) == "too_old"
    assert reason(headers, now=NOW + 360) == "too_old"
    assert reason(headers, now=NOW + 30, tolerance_s=10) == "too_old"


def test_a_timestamp_too_far_in_the_future_is_rejected() -> None:
    headers = signature_headers(SECRET, BODY, now=NOW + 301)
    assert reason(headers, now=NOW) == "too_new"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing"),
        ({TIMESTAMP_HEADER: "1767225600"}, "missing"),
        ({SIGNATURE_HEADER: "v1=00"}, "missing"),
        ({TIMESTAMP_HEADER: "-1767225600", SIGNATURE_HEADER: "v1=00"}, "malformed"),
        ({TIMESTAMP_HEADER: "1767225600.5", SIGNATURE_HEADER: "v1=00"}, "malformed"),
        ({TIMESTAMP_HEADER: "1767225600", SIGNATURE_HEADER: "sha256=00"}, "malformed"),
        ({TIMESTAMP_HEADER: "1767225600", SIGNATURE_HEADER: "v1=ünïcode"}, "mismatch"),
    ],
)
def test_missing_or_malformed_headers_are_rejected(headers: dict[str, str], why: str) -> None:
    assert reason(headers) == why


def test_the_legacy_body_only_signature_is_not_accepted_as_v1() -> None:
    headers = signature_headers(SECRET, BODY, now=NOW, legacy=True)
    legacy = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    assert headers[LEGACY_HEADER] == f"sha256={legacy}"
    assert reason({**headers, SIGNATURE_HEADER: f"v1={legacy}"}) == "mismatch"


def test_any_matching_v1_entry_is_accepted_for_a_secret_rotation() -> None:
    old = signature_headers("old secret", BODY, now=NOW)[SIGNATURE_HEADER]
    new = signature_headers(SECRET, BODY, now=NOW)[SIGNATURE_HEADER]
    verify(SECRET, {TIMESTAMP_HEADER: "1767225600", SIGNATURE_HEADER: f"{old}, {new}"}, BODY, NOW)


# -- the applier's headers ----------------------------------------------------------------

SECRET_ENV = "ACCORD_UNIT_WEBHOOK_SECRET"


def spec_of(**options: Any) -> SinkSpec:
    raw = {"kind": "webhook", "url": "https://partner.example/hook", "fields": ["email"]}
    return parse_sink("partner", raw | options, Path("connectors/partner/sink.yaml"))


def event() -> SinkEvent:
    return SinkEvent.of(
        {
            "event_id": "partner:g1:3:+",
            "target": "partner",
            "op": "UPSERT",
            "golden_id": "g1",
            "golden_version": 3,
            "fields": {"email": "ada@example.com"},
            "changed": ["email"],
        }
    )


def test_the_applier_signs_what_it_posts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    applier = WebhookApplier(spec_of(secret_env=SECRET_ENV), MagicMock(), "t:")
    body = applier.body(event())
    headers = applier.headers(event(), body, now=NOW)
    assert headers["Idempotency-Key"] == "partner:g1:3:+"
    assert LEGACY_HEADER not in headers
    verify(SECRET, headers, body, now=NOW + 1)
    assert reason(headers, body, now=NOW + 6 * 60) == "too_old"  # the same request, later


def test_legacy_signature_sends_the_old_header_beside_v1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    spec = spec_of(secret_env=SECRET_ENV, legacy_signature=True)
    applier = WebhookApplier(spec, MagicMock(), "t:")
    body = applier.body(event())
    headers = applier.headers(event(), body, now=NOW)
    verify(SECRET, headers, body, now=NOW)
    # Exactly what the previous release's receivers compare against.
    legacy = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers[LEGACY_HEADER] == legacy


def test_an_unsigned_sink_sends_no_signature() -> None:
    applier = WebhookApplier(spec_of(unsigned=True), MagicMock(), "t:")
    headers = applier.headers(event(), b"{}", now=NOW)
    assert SIGNATURE_HEADER not in headers and LEGACY_HEADER not in headers
    assert headers[TIMESTAMP_HEADER] == "1767225600"


@pytest.mark.parametrize("value", [None, ""])
def test_a_secret_env_unset_or_empty_stops_the_applier(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(SECRET_ENV, raising=False)
    else:
        monkeypatch.setenv(SECRET_ENV, value)
    with pytest.raises(ConfigError, match=rf"sink 'partner': secret_env '{SECRET_ENV}' is unset"):
        WebhookApplier(spec_of(secret_env=SECRET_ENV), MagicMock(), "t:")


# -- the receiver example in connectors/README.md -----------------------------------------


def readme_receiver(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The README's `verified` function, executed as documented."""
    readme = (Path(__file__).resolve().parents[2] / "connectors" / "README.md").read_text()
    [block] = [b for b in readme.split("```python\n")[1:] if "def verified(" in b]
    namespace: dict[str, Any] = {}
    exec(compile(block.split("```")[0], "connectors/README.md", "exec"), namespace)
    monkeypatch.setenv("ACCORD_PARTNER_WEBHOOK_SECRET", SECRET)
    return namespace


def test_the_documented_receiver_accepts_a_delivery_and_refuses_a_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = readme_receiver(monkeypatch)
    now = [NOW]
    monkeypatch.setattr(receiver["time"], "time", lambda: now[0])
    headers = signature_headers(SECRET, BODY, now=NOW, legacy=True)
    timestamp, signature = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    verified = receiver["verified"]
    assert verified(BODY, timestamp, signature)
    assert not verified(BODY + b" ", timestamp, signature)
    assert not verified(BODY, str(int(NOW) + 1), signature)
    assert not verified(BODY, timestamp, headers[LEGACY_HEADER])
    assert not verified(BODY, None, signature)
    now[0] = NOW + 6 * 60  # the same request, six minutes later
    assert not verified(BODY, timestamp, signature)


def test_a_spec_made_in_code_is_held_to_the_same_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    signed = spec_of(secret_env=SECRET_ENV)
    plain = SinkSpec(**{**signed.__dict__, "url": "http://partner.example/hook"})
    with pytest.raises(ConfigError, match=r"sink 'partner': url is not https"):
        WebhookApplier(plain, MagicMock(), "t:")
    no_secret = SinkSpec(**{**signed.__dict__, "secret_env": None})
    with pytest.raises(ConfigError, match=r"sink 'partner': needs secret_env, or unsigned"):
        WebhookApplier(no_secret, MagicMock(), "t:")
