"""Who may see what on the worker's web port: the pure decisions `streams.app` wires in.

- `/health` and `/metrics` are open (Prometheus convention) and carry no personal data.
- `/status` and `/status.json` show customer values (drift values, golden ids, target
  keys, error texts) only to a caller with `worker.web_token`: an `Authorization: Bearer`
  header, or the cookie `/status?token=…` sets once. Without a configured token they
  show counts, lags and names only (`strip_values`); with one, a caller without it gets
  401.
- Every page checks the Host header against an allow-list (`WebGuard.host_ok`), so a
  web page that rebinds its own DNS name to the worker's address cannot read it through
  a visitor's browser. An IP address in the Host header is always accepted: a rebinding
  page's requests carry its own name, never an address; and a client that sends no Host
  is no browser.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import Any

from streams.errors import ConfigError
from streams.redact import redact

__all__ = [
    "COOKIE_NAME",
    "DEFAULT_HOSTS",
    "MIN_TOKEN_CHARS",
    "VALUES_HIDDEN",
    "Access",
    "WebGuard",
    "allowed_hosts",
    "bearer_token",
    "host_name",
    "strip_values",
]

COOKIE_NAME = "accord_status"
MIN_TOKEN_CHARS = 16
# The default allow-list: loopback names, and `worker`, the compose service Prometheus scrapes.
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1", "worker")
WILDCARD_BINDS = {"", "0.0.0.0", "::"}  # interfaces, not names a client would send
VALUES_HIDDEN = (
    "customer values are hidden: set worker.web_token (ACCORD_WORKER__WEB_TOKEN or "
    "ACCORD_WORKER__WEB_TOKEN_FILE) and open /status?token=<token>, or send "
    "'Authorization: Bearer <token>'"
)
# The numbers of a reconcile scorecard: what a caller without the token sees of a card.
CARD_COUNTS = (
    "target",
    "checked",
    "in_accord",
    "drifted",
    "missing",
    "orphaned",
    "repairs_requested",
)


class Access(Enum):
    """What a request to a values page may see."""

    FULL = "full"  # the configured token was given
    NO_VALUES = "no_values"  # no token is configured: counts and names only
    DENIED = "denied"  # a token is configured and the request lacks it: 401


def host_name(header: str) -> str:
    """The host part of a Host header, lower case, without port, brackets or final dot:
    `[::1]:16066` -> `::1`, `Worker.:16066` -> `worker`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header[1:]
    if header.count(":") == 1:  # name:port; more colons is a bare IPv6 address
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def allowed_hosts(configured: list[str] | None, web_host: str) -> frozenset[str]:
    """The host names to answer to: `configured` (`worker.web_allowed_hosts`) or, when
    None, `DEFAULT_HOSTS` and the interface the worker binds (unless a wildcard)."""
    names = list(DEFAULT_HOSTS) if configured is None else list(configured)
    if configured is None and web_host.strip() not in WILDCARD_BINDS:
        names.append(web_host)
    return frozenset(host_name(name) for name in names if name.strip())


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for any other."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class WebGuard:
    """The worker's token (None: not configured) and the Host names it answers to."""

    token: str | None
    hosts: frozenset[str]

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"worker.web_token has {len(self.token)} characters, fewer than "
                f"{MIN_TOKEN_CHARS}: make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )

    @classmethod
    def of(cls, token: str | None, configured_hosts: list[str] | None, web_host: str) -> WebGuard:
        return cls(token, allowed_hosts(configured_hosts, web_host))

    def host_ok(self, header: str | None) -> bool:
        """True for a request whose Host header names an allowed host or an IP address,
        or that has no Host header (not a browser)."""
        if header is None or not header.strip():
            return True
        name = host_name(header)
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def token_ok(self, given: str | None) -> bool:
        """True when a token is configured and `given` is it (constant-time compare)."""
        return self.token is not None and given is not None and _equal(given, self.token)

    def cookie_value(self) -> str:
        """The cookie `/status?token=` sets: derived from the token, so the cookie store
        never holds the token itself, and a new token ends every session."""
        if self.token is None:
            raise ValueError("no token configured: no cookie to set")
        return hmac.new(self.token.encode(), b"accord status cookie", hashlib.sha256).hexdigest()

    def set_cookie(self) -> str:
        """The Set-Cookie header value for a browser that showed the token: for this
        session, unreadable to scripts, never sent by other sites' requests."""
        return f"{COOKIE_NAME}={self.cookie_value()}; Path=/; HttpOnly; SameSite=Strict"

    def access(self, authorization: str | None, cookie: str | None) -> Access:
        """What a request with these `Authorization` header and cookie may see."""
        if self.token is None:
            return Access.NO_VALUES
        if self.token_ok(bearer_token(authorization)):
            return Access.FULL
        if cookie is not None and _equal(cookie, self.cookie_value()):
            return Access.FULL
        return Access.DENIED


def strip_values(status: dict[str, Any]) -> dict[str, Any]:
    """`status` (the status board's dict) without customer values, for a caller without
    the token: each scorecard keeps only its counts (no drift values, golden ids or
    target keys), connector traces go, error texts are redacted, the review panel keeps
    its counts but not its held rows; topics, groups, lags and counts stay.
    `values_hidden` says how to see the rest. `status` is not changed."""
    shown = copy.deepcopy(status)
    shown["values_hidden"] = VALUES_HIDDEN
    if shown.get("snapshot_error"):
        shown["snapshot_error"] = redact(shown["snapshot_error"])
    drift = shown.get("drift")
    if drift:
        if drift.get("error"):
            drift["error"] = redact(drift["error"])
        drift["cards"] = [
            {name: card[name] for name in CARD_COUNTS if name in card}
            for card in drift.get("cards") or []
        ]
    review = shown.get("review")
    if review:  # counts per reason, ages and decisions; no rows, ids or match values
        review.pop("holds", None)
    if shown.get("review_error"):
        shown["review_error"] = redact(shown["review_error"])
    snapshot = shown.get("snapshot")
    if snapshot:
        for connector in snapshot.get("connectors") or []:
            connector["detail"] = None
        for paused in snapshot.get("paused") or []:
            if paused.get("reason"):
                paused["reason"] = redact(paused["reason"])
    return shown
