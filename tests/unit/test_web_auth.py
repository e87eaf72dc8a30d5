"""Who may see what on the worker's web port: token, cookie, Host allow-list, stripping
customer values out of the status board, the settings that configure them, and Faust's
own web views staying off."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import faust
import pytest

from streams.app import FAUST_VIEWS_OFF, _faust_views_off
from streams.errors import ConfigError
from streams.reconcile import Drift, Scorecard
from streams.settings import load_settings
from streams.web_auth import (
    COOKIE_NAME,
    VALUES_HIDDEN,
    Access,
    WebGuard,
    allowed_hosts,
    bearer_token,
    host_name,
    strip_values,
)

TOKEN = "s3cret-token-0123456789"


def guard(token: str | None = TOKEN, hosts: list[str] | None = None) -> WebGuard:
    return WebGuard.of(token, hosts, "127.0.0.1")


# ------------------------------------------------------------------- token and cookie


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (f"Bearer {TOKEN}", TOKEN),
        (f"bearer   {TOKEN} ", TOKEN),
        ("Bearer", None),
        ("Bearer ", None),
        (f"Basic {TOKEN}", None),
        (TOKEN, None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token_is_read_only_from_a_bearer_header(
    header: str | None, token: str | None
) -> None:
    assert bearer_token(header) == token


def test_the_configured_token_in_a_bearer_header_gives_full_access() -> None:
    assert guard().access(f"Bearer {TOKEN}", None) is Access.FULL


@pytest.mark.parametrize(
    ("authorization", "cookie"),
    [
        (None, None),
        ("Bearer wrong-token-0123456789", None),
        (f"Bearer {TOKEN}x", None),
        (f"Basic {TOKEN}", None),
        (None, TOKEN),  # the cookie holds a value derived from the token, not the token
        (None, "0" * 64),
    ],
)
def test_a_missing_or_wrong_token_is_denied_when_one_is_configured(
    authorization: str | None, cookie: str | None
) -> None:
    assert guard().access(authorization, cookie) is Access.DENIED


def test_without_a_configured_token_every_request_sees_no_values() -> None:
    open_ = guard(token=None)
    assert open_.access(None, None) is Access.NO_VALUES
    assert open_.access(f"Bearer {TOKEN}", None) is Access.NO_VALUES
    assert not open_.token_ok(TOKEN)
    assert not open_.token_ok("")


def test_the_cookie_is_derived_from_the_token_and_gives_full_access() -> None:
    web = guard()
    value = web.cookie_value()
    assert TOKEN not in value and len(value) == 64
    assert web.access(None, value) is Access.FULL
    # Another token (a rotated one) does not accept the old cookie.
    assert guard("another-token-0123456789").access(None, value) is Access.DENIED


def test_the_cookie_header_is_http_only_same_site_strict_for_the_whole_port() -> None:
    header = guard().set_cookie()
    name, _, rest = header.partition("=")
    attributes = [part.strip() for part in rest.split(";")]
    assert name == COOKIE_NAME
    assert attributes[0] == guard().cookie_value()
    assert {"Path=/", "HttpOnly", "SameSite=Strict"} <= set(attributes[1:])


def test_token_ok_compares_the_whole_token() -> None:
    web = guard()
    assert web.token_ok(TOKEN)
    assert not web.token_ok(TOKEN[:-1])
    assert not web.token_ok(TOKEN + "x")
    assert not web.token_ok(None)


def test_a_short_token_is_refused_with_how_to_make_one() -> None:
    with pytest.raises(ConfigError, match=r"fewer than 16.*secrets\.token_urlsafe"):
        guard("short")
    with pytest.raises(ConfigError, match="0 characters"):
        guard("")


# ------------------------------------------------------------------------ Host header


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:16066", "localhost"),
        ("Worker:16066", "worker"),
        ("worker.", "worker"),
        ("[::1]:16066", "::1"),
        ("[::1]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("evil.example.com:16066", "evil.example.com"),
    ],
)
def test_host_name_drops_port_brackets_case_and_final_dot(header: str, name: str) -> None:
    assert host_name(header) == name


def test_default_hosts_are_loopback_the_compose_service_and_the_bound_interface() -> None:
    assert allowed_hosts(None, "127.0.0.1") == {"127.0.0.1", "localhost", "::1", "worker"}
    assert "accord-1.internal" in allowed_hosts(None, "accord-1.internal")
    assert allowed_hosts(None, "0.0.0.0") == {"127.0.0.1", "localhost", "::1", "worker"}


def test_configured_hosts_replace_the_defaults() -> None:
    assert allowed_hosts(["Metrics.Example.com", " "], "127.0.0.1") == {"metrics.example.com"}


@pytest.mark.parametrize(
    "header",
    [
        "127.0.0.1:16066",
        "localhost:16066",
        "LOCALHOST",
        "worker:16066",  # Prometheus in compose
        "[::1]:16066",
        "10.1.2.3:16066",  # an address: a rebinding page's requests carry its own name
        "[fe80::1]:16066",
        None,  # no Host header: not a browser
        "",
    ],
)
def test_allowed_names_and_ip_addresses_pass_the_host_check(header: str | None) -> None:
    assert guard().host_ok(header)


@pytest.mark.parametrize(
    "header",
    [
        "evil.example.com:16066",
        "localhost.evil.example.com",
        "worker.evil.example.com:16066",
        "127.0.0.1.nip.io:16066",
        "[not-an-address]:16066",
    ],
)
def test_other_names_fail_the_host_check(header: str) -> None:
    assert not guard().host_ok(header)


def test_the_host_check_follows_the_configured_list() -> None:
    web = guard(hosts=["accord-worker.monitoring.svc"])
    assert web.host_ok("accord-worker.monitoring.svc:16066")
    assert not web.host_ok("worker:16066")
    assert web.host_ok("127.0.0.1:16066")  # addresses always


# ---------------------------------------------------------------- values off the board


def board() -> dict[str, Any]:
    """A status board dict as `StatusBoard.as_dict` makes it, with customer values in
    drift details, connector traces and error texts."""
    card = Scorecard("crm", checked=3, in_accord=1, drifted=1, missing=1, orphaned=1)
    card.drifts.append(Drift("g-1", "crm", "41", "email", "ada@example.com", "ada@old.example"))
    card.missing_ids.append("g-2")
    card.orphaned_keys.append("grace@example.com")
    return {
        "app_id": "accord",
        "up_since": 1.0,
        "snapshot": {
            "taken_at": 2.0,
            "topics": [{"topic": "accord.golden", "messages": 7, "rate_per_s": 0.5}],
            "groups": [{"group": "accord", "state": "Stable", "members": None, "lag": 4}],
            "connectors": [
                {
                    "name": "accord-crm",
                    "state": "FAILED",
                    "tasks": ["0:FAILED"],
                    "detail": "Failing row contains (41, Ada, Lovelace, ada@example.com)",
                }
            ],
            "slots": [],
            "dlq_size": 2,
            "dlq_growth_per_s": None,
            "paused": [{"target": "support", "reason": "refused ada@example.com", "since": 3}],
            "missing_columns": [{"system": "crm", "column": "phone"}],
        },
        "snapshot_error": None,
        "latency": {"support": {"count": 5, "p50": 0.1, "p95": 0.2, "p99": 0.3}},
        "missing_columns": [],
        "drift": {
            "finished_at": 4.0,
            "took_s": 0.5,
            "error": "crm: value 'ada@example.com' +44 20 7946 0958",
            "cards": [card.as_dict(details=10)],
        },
        "reconcile_interval_s": 900.0,
    }


def test_strip_values_leaves_no_customer_value_and_keeps_counts_lags_and_names() -> None:
    status = board()
    shown = strip_values(status)
    text = json.dumps(shown)
    for value in ("ada@example.com", "ada@old.example", "grace@example.com", "Lovelace"):
        assert value not in text
    assert "g-1" not in text and "g-2" not in text and "7946" not in text
    assert shown["drift"]["cards"] == [
        {
            "target": "crm",
            "checked": 3,
            "in_accord": 1,
            "drifted": 1,
            "missing": 1,
            "orphaned": 1,
            "repairs_requested": 0,
        }
    ]
    assert shown["snapshot"]["topics"] == status["snapshot"]["topics"]
    assert shown["snapshot"]["groups"] == status["snapshot"]["groups"]
    assert shown["snapshot"]["connectors"][0]["state"] == "FAILED"
    assert shown["snapshot"]["paused"][0]["target"] == "support"
    assert shown["latency"] == status["latency"]
    assert shown["values_hidden"] == VALUES_HIDDEN and "worker.web_token" in VALUES_HIDDEN
    # The board's own dict is untouched: a caller with the token still sees it whole.
    assert status["drift"]["cards"][0]["drifts"][0]["golden"] == "ada@example.com"


def test_strip_values_of_an_empty_board() -> None:
    status = {"app_id": "accord", "snapshot": None, "drift": None, "snapshot_error": "down"}
    assert strip_values(status) == {**status, "values_hidden": VALUES_HIDDEN}


# ------------------------------------------------------------------------- settings


def test_web_token_from_the_environment_or_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ACCORD_WORKER__WEB_TOKEN", TOKEN)
    settings = load_settings()
    assert settings.worker.web_token_value() == TOKEN
    assert TOKEN not in repr(settings)
    monkeypatch.delenv("ACCORD_WORKER__WEB_TOKEN")
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("ACCORD_WORKER__WEB_TOKEN_FILE", str(tmp_path / "token"))
    assert load_settings().worker.web_token_value() == TOKEN


def test_web_token_given_twice_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_WORKER__WEB_TOKEN", TOKEN)
    monkeypatch.setenv("ACCORD_WORKER__WEB_TOKEN_FILE", "/run/secrets/web-token")
    with pytest.raises(ConfigError, match="web_token or web_token_file, not both"):
        load_settings()


def test_no_web_token_and_default_hosts_by_default() -> None:
    worker = load_settings().worker
    assert worker.web_token_value() is None and worker.web_allowed_hosts is None


def test_allowed_hosts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_WORKER__WEB_ALLOWED_HOSTS", '["worker", "accord.internal"]')
    assert load_settings().worker.web_allowed_hosts == ["worker", "accord.internal"]


# ---------------------------------------------------------------- Faust's own views


def test_faust_serves_none_of_its_own_views_with_accords_arguments() -> None:
    app = faust.App("web-auth-test", **FAUST_VIEWS_OFF)
    enabled = [blueprint for _, blueprint in app.web._enabled_blueprints()]
    # Faust's stand-in index ({"status": "OK"}) only: no /table, /router, /graph, stats.
    assert enabled == ["faust.web.apps.production_index:blueprint"]
    _faust_views_off(app)  # does not raise


def test_an_environment_variable_that_turns_a_faust_view_on_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APP_WEB_TABLES_ENABLED", "true")
    app = faust.App("web-auth-test", **FAUST_VIEWS_OFF)  # the environment wins in Faust
    with pytest.raises(ConfigError, match="APP_WEB_TABLES_ENABLED"):
        _faust_views_off(app)


# ------------------------------------------------- the pages, on Faust's aiohttp app


def serve(token: str | None, status: dict[str, Any], *requests: Any) -> list[Any]:
    """Run Faust's aiohttp app with Accord's web arguments and status pages (plus a
    /health page) on a test server; each of `requests` is an async function of the
    client, and its result is returned."""
    from aiohttp.test_utils import TestClient, TestServer

    from streams.app import add_status_pages, faust_web_options

    web_guard = guard(token)
    app = faust.App(f"web-auth-{uuid.uuid4().hex[:6]}", **faust_web_options(web_guard))
    add_status_pages(app, web_guard, lambda: status)

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        return web.json({"ready": True})

    async def run() -> list[Any]:
        app.web.init_server()
        async with TestClient(TestServer(app.web.web_app)) as client:
            return [await request(client) for request in requests]

    return asyncio.run(run())


async def get(client: Any, path: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
    response = await client.get(path, allow_redirects=False, **kwargs)
    return response.status, dict(response.headers), await response.text()


def test_with_a_token_status_json_needs_it_and_then_shows_the_values() -> None:
    without, wrong, right = serve(
        TOKEN,
        board(),
        lambda c: get(c, "/status.json"),
        lambda c: get(c, "/status.json", headers={"Authorization": "Bearer wrong-one-0123456789"}),
        lambda c: get(c, "/status.json", headers={"Authorization": f"Bearer {TOKEN}"}),
    )
    for status, headers, body in (without, wrong):
        assert status == 401, body
        assert "ada@example.com" not in body and "worker.web_token" in json.loads(body)["detail"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, headers, body = right
    assert status == 200 and "ada@example.com" in body
    assert headers["Cache-Control"] == "no-store"


def test_the_token_in_the_url_sets_the_cookie_once_and_the_page_works_with_it() -> None:
    async def flow(client: Any) -> list[Any]:
        denied = await get(client, "/status")
        wrong = await get(client, "/status?token=wrong-one-0123456789")
        login = await client.get(f"/status?token={TOKEN}", allow_redirects=False)
        cookie = login.cookies[COOKIE_NAME]
        again = await get(client, "/status.json")  # the client keeps the cookie
        page = await get(client, "/status")
        return [denied, wrong, login.status, dict(login.headers), cookie, again, page]

    [denied, wrong, status, headers, cookie, again, page] = serve(TOKEN, board(), flow)[0]
    assert denied[0] == 401 and wrong[0] == 401
    assert status == 303 and headers["Location"] == "status"  # the token leaves the URL
    assert TOKEN not in headers["Set-Cookie"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert again[0] == 200 and "ada@example.com" in again[2]
    assert page[0] == 200 and "<title>Accord status</title>" in page[2]


def test_without_a_token_the_pages_show_no_values_and_say_how_to_set_one() -> None:
    page, data, url_token = serve(
        None,
        board(),
        lambda c: get(c, "/status"),
        lambda c: get(c, "/status.json"),
        lambda c: get(c, f"/status?token={TOKEN}"),
    )
    assert page[0] == 200
    assert data[0] == 200 and "ada@example.com" not in data[2]
    shown = json.loads(data[2])
    assert shown["values_hidden"] == VALUES_HIDDEN
    assert shown["drift"]["cards"][0]["drifted"] == 1
    assert url_token[0] == 303 and "Set-Cookie" not in url_token[1]


def test_faust_table_and_router_views_are_not_served() -> None:
    answers = serve(
        TOKEN,
        board(),
        *(
            (lambda c, p=path: get(c, p, headers={"Authorization": f"Bearer {TOKEN}"}))
            for path in ("/table/", "/table/golden/", "/table/golden/g-1/", "/router/", "/graph/")
        ),
    )
    assert [status for status, _, _ in answers] == [404] * 5


def test_a_foreign_host_is_refused_on_every_path_and_addresses_pass() -> None:
    evil = {"Host": "rebound.evil.example:16066"}
    answers = serve(
        None,
        board(),
        *(
            (lambda c, p=path: get(c, p, headers=evil))
            for path in ("/status", "/status.json", "/health", "/", "/table/golden/g-1/")
        ),
        lambda c: get(c, "/health", headers={"Host": "worker:16066"}),
        lambda c: get(c, "/health", headers={"Host": "10.0.0.7:16066"}),
    )
    for status, _, body in answers[:5]:
        assert status == 403 and "worker.web_allowed_hosts" in body
    assert [status for status, _, _ in answers[5:]] == [200, 200]
