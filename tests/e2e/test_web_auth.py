"""The worker's web port on the real stack: no customer data without the token.

A billing account is made through the pipeline, then its contact email and phone are
changed behind the binlog (nothing corrects them): the worker's scheduled reconcile finds
the drift, with the golden and the target values. Those values, and the golden record
itself, must reach only a caller with `worker.web_token`; /health and /metrics stay open
and carry none of them; a foreign Host header is refused.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from streams.settings import AccordSettings
from streams.sources import mariadb
from streams.stack.process import wait_until
from streams.web_auth import COOKIE_NAME, VALUES_HIDDEN
from streams.workers import WorkerProcess
from tests.e2e.test_reconcile import edit_behind_the_binlog
from tests.support import TopicTail, drained, isolated, latest_by_key, running_worker

pytestmark = pytest.mark.e2e
TOKEN = secrets.token_urlsafe(32)


def with_worker(settings: AccordSettings, **update: Any) -> AccordSettings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=update)})


@pytest.fixture
def worker(connectors: AccordSettings) -> Iterator[tuple[AccordSettings, WorkerProcess]]:
    """A worker with a web token, whose board refreshes every second and that reconciles
    every 3 seconds."""
    settings = with_worker(
        isolated(connectors),
        web_token=SecretStr(TOKEN),
        status_interval_s=1.0,
        reconcile_interval_s=3.0,
    )
    with running_worker(settings) as process:
        yield settings, process


def url(settings: AccordSettings, path: str) -> str:
    return f"http://{settings.worker.web_host}:{settings.worker.web_port}{path}"


def get(settings: AccordSettings, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url(settings, path), timeout=10, **kwargs)


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def billing_drifts(response: httpx.Response) -> list[dict[str, Any]]:
    if response.status_code != 200 or not response.json().get("drift"):
        return []
    cards = {card["target"]: card for card in response.json()["drift"]["cards"]}
    return cards.get("billing", {}).get("drifts", [])


def test_the_web_port_serves_customer_values_only_with_the_token(
    worker: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, process = worker
    tag = uuid.uuid4().hex[:8]
    account_no, email, changed = f"W-{tag}", f"web-{tag}@example.com", f"moved-{tag}@example.org"
    golden = TopicTail(settings, settings.topics.golden)
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts (account_no, legal_name, contact_email, phone, "
            "billing_country) VALUES (%s, 'Acme Ltd', %s, '+44 20 7946 0958', 'GB')",
            (account_no, email),
        )

    def ours(records: list[Any]) -> list[dict[str, Any]]:
        return [r for r in latest_by_key(records).values() if r["fields"]["email"] == email]

    assert golden.wait_for(lambda records: bool(ours(records)), 120)
    [record] = ours(golden.records)
    golden_id, phone = record["golden_id"], record["fields"]["phone"]
    assert phone, record
    assert wait_until(lambda: drained(settings), 90)
    edit_behind_the_binlog(
        settings,
        "UPDATE accounts SET contact_email = %s, phone = '+44 20 7946 0111' WHERE account_no = %s",
        changed,
        account_no,
    )

    # With the token: the drift, values and all, once the scheduled reconcile saw it.
    def drift_seen() -> bool:
        drifts = billing_drifts(get(settings, "/status.json", headers=BEARER))
        return any(d["key"] == account_no and d["field"] == "contact_email" for d in drifts)

    assert wait_until(drift_seen, 120)
    full = get(settings, "/status.json", headers=BEARER)
    assert email in full.text and changed in full.text and golden_id in full.text
    secret_values = (email, changed, phone, golden_id)

    # Faust's table view would serve the golden record: it is not there, token or not.
    for headers in ({}, BEARER):
        for path in (f"/table/golden/{golden_id}/", "/table/golden/", "/table/", "/router/"):
            answer = get(settings, path, headers=headers)
            assert answer.status_code == 404, (path, answer.text)
            assert not any(value in answer.text for value in secret_values)

    # Without the token, or with a wrong one: 401, saying how, and no value.
    for headers in ({}, {"Authorization": "Bearer not-the-token-0123456789"}):
        for path in ("/status.json", "/status"):
            answer = get(settings, path, headers=headers)
            assert answer.status_code == 401, (path, answer.text)
            assert "worker.web_token" in answer.json()["detail"]
            assert not any(value in answer.text for value in secret_values)
    assert get(settings, "/status?token=not-the-token-0123456789").status_code == 401

    # A browser: the token once in the URL sets the session cookie and leaves the URL.
    login = get(settings, f"/status?token={TOKEN}")
    assert login.status_code == 303 and login.headers["location"] == "status"
    [morsel] = SimpleCookie(login.headers["set-cookie"]).values()
    assert morsel.key == COOKIE_NAME and TOKEN not in morsel.value
    assert morsel["httponly"] and morsel["samesite"] == "Strict"
    cookie = {COOKIE_NAME: morsel.value}
    page = get(settings, "/status", cookies=cookie)
    assert page.status_code == 200 and "<title>Accord status</title>" in page.text
    by_cookie = get(settings, "/status.json", cookies=cookie)
    assert by_cookie.status_code == 200 and email in by_cookie.text

    # Open pages: no token needed, and no customer value in them.
    health, metrics = get(settings, "/health"), get(settings, "/metrics")
    assert health.status_code == 200 and health.json()["ready"], health.text
    assert metrics.status_code == 200 and "accord_reconcile_rows" in metrics.text
    for answer in (health, metrics):
        assert not any(value in answer.text for value in secret_values)

    # DNS rebinding: a page under another name reaches the port, and is refused.
    rebound = {"Host": f"rebound.evil.example:{settings.worker.web_port}"}
    for path in ("/status.json", "/status", "/health", "/metrics", "/"):
        answer = get(settings, path, headers={**rebound, **BEARER})
        assert answer.status_code == 403, (path, answer.text)
        assert not any(value in answer.text for value in secret_values)
    # The compose service name Prometheus scrapes is one the worker answers to.
    scraped = get(settings, "/metrics", headers={"Host": f"worker:{settings.worker.web_port}"})
    assert scraped.status_code == 200

    # The same worker without a token: /status.json shows counts, lags and names only.
    process.stop()
    open_settings = with_worker(settings, web_token=None)
    open_worker = WorkerProcess(open_settings)
    open_worker.start()
    try:

        def drift_counted() -> bool:
            answer = get(open_settings, "/status.json")
            drift = answer.json().get("drift") if answer.status_code == 200 else None
            cards = {card["target"]: card for card in (drift or {}).get("cards", [])}
            return cards.get("billing", {}).get("drifted", 0) >= 1

        assert wait_until(drift_counted, 120)
        stripped = get(open_settings, "/status.json")
        assert stripped.json()["values_hidden"] == VALUES_HIDDEN
        assert stripped.json()["snapshot"]["groups"], stripped.text  # lags stay
        assert not any(value in stripped.text for value in secret_values)
        assert get(open_settings, f"/table/golden/{golden_id}/").status_code == 404
    finally:
        open_worker.stop()
