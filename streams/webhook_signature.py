"""Webhook signatures: how Accord signs a delivery and how a receiver verifies it.

Each signed POST carries

    X-Accord-Timestamp: 1767225600                  # Unix seconds of this attempt
    X-Accord-Signature-V1: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>

The HMAC input is the timestamp header's exact text, a `.`, then the exact body bytes,
so neither the body nor the time can be changed without the secret; a receiver that
also refuses timestamps more than `TOLERANCE_S` (five minutes) from its own clock
refuses a captured request replayed later. Within that window a replay carries the
same body, and so the same signed `event_id`, which receivers deduplicate on anyway
(delivery is at least once). Entries in the signature header are comma-separated
`scheme=hex` pairs; any `v1` entry that matches is accepted, which leaves room for two
secrets during a rotation.

`legacy_signature: true` on a sink also sends the previous release's body-only
`X-Accord-Signature: sha256=<hex HMAC-SHA256(secret, body)>`, unchanged, so existing
receivers keep working while they move to v1. It is replayable and goes away in the
next release.

Standard library only, so a receiver can import or copy it (connectors/README.md,
"Webhooks").
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from streams.errors import AccordError

__all__ = [
    "LEGACY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE_S",
    "SignatureError",
    "legacy_signature",
    "sign_v1",
    "signature_headers",
    "verify",
]

TIMESTAMP_HEADER = "X-Accord-Timestamp"
SIGNATURE_HEADER = "X-Accord-Signature-V1"
LEGACY_HEADER = "X-Accord-Signature"
TOLERANCE_S = 300.0
SCHEME = "v1"


class SignatureError(AccordError):
    """A delivery that does not verify; `reason` says why (for the receiver's logs).

    Reasons: `missing` (no timestamp or signature header), `malformed` (a timestamp
    that is not Unix seconds, a signature without a v1 entry), `too_old` or `too_new`
    (outside the tolerance: a replay, or a clock far off), `mismatch` (another secret,
    or a body or timestamp changed on the way).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign_v1(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of `timestamp.body`: the value after `v1=`."""
    return hmac.new(_key(secret), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def legacy_signature(secret: str | bytes, body: bytes) -> str:
    """Hex HMAC-SHA256 of the body alone: the previous release's value after `sha256=`."""
    return hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def signature_headers(
    secret: str | bytes, body: bytes, now: float | None = None, legacy: bool = False
) -> dict[str, str]:
    """The timestamp and signature headers of one delivery attempt at `now`."""
    timestamp = str(int(time.time() if now is None else now))
    headers = {
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: f"{SCHEME}={sign_v1(secret, timestamp, body)}",
    }
    if legacy:
        headers[LEGACY_HEADER] = "sha256=" + legacy_signature(secret, body)
    return headers


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, its name matched case-insensitively as HTTP does."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> None:
    """Return if `body` (the raw request bytes) and its timestamp were signed with
    `secret` and the timestamp is within `tolerance_s` of `now` (default: the clock);
    raise `SignatureError` otherwise. Verify before parsing the body."""
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if not timestamp or not signature:
        raise SignatureError(
            "missing", f"no {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header: not signed"
        )
    if not timestamp.isascii() or not timestamp.isdigit():
        raise SignatureError("malformed", f"{TIMESTAMP_HEADER} is not Unix seconds")
    candidates = [
        value.strip()
        for scheme, _, value in (entry.strip().partition("=") for entry in signature.split(","))
        if scheme == SCHEME
    ]
    if not candidates:
        raise SignatureError("malformed", f"{SIGNATURE_HEADER} has no {SCHEME}= entry")
    age = (time.time() if now is None else now) - int(timestamp)
    if age > tolerance_s:
        raise SignatureError("too_old", f"timestamp {age:.0f} s old (tolerance {tolerance_s} s)")
    if -age > tolerance_s:
        raise SignatureError(
            "too_new", f"timestamp {-age:.0f} s in the future (tolerance {tolerance_s} s)"
        )
    expected = sign_v1(secret, timestamp, body).encode()
    # compare_digest on every candidate (bytes: any text is comparable), so the time
    # taken depends on neither the value nor which entry matched.
    if not sum(hmac.compare_digest(expected, c.encode()) for c in candidates):
        raise SignatureError("mismatch", "signature does not match the body and timestamp")
