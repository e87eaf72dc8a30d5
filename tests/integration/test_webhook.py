"""The webhook applier against a real HTTP server on loopback, with the real Redis ledger
and (for dead letters) real Kafka: retries, signatures, rejections, replays, the capped
log. The receiver verifies every request as connectors/README.md tells receivers to
(`streams.webhook_signature.verify`), on a clock the test can move."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streams.app import redis_client
from streams.faust_codec import canonical_codec
from streams.model import FIELDS
from streams.projection import SinkSpec, parse_sink
from streams.registry import registry_client
from streams.settings import AccordSettings
from streams.sinks import Backoff, SinkRunner, Status, WebhookApplier
from streams.stack.process import wait_until
from streams.webhook_signature import SIGNATURE_HEADER, SignatureError, verify
from tests.support import TopicTail, isolated

pytestmark = pytest.mark.integration

SECRET_ENV = "ACCORD_TEST_WEBHOOK_SECRET"
SECRET = "correct horse battery staple"
TARGET = "hooks"


@dataclass
class Receiver:
    """A webhook endpoint that verifies each request's signature on its clock (401 with
    the reason when it does not verify; unsigned requests only when `signed` is off),
    then answers with scripted statuses, then 200."""

    statuses: list[tuple[int, str]] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # idempotency keys it processed
    refused: list[str] = field(default_factory=list)  # reasons of requests that failed
    url: str = ""
    signed: bool = True
    clock: Callable[[], float] = time.time

    def answer(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        self.requests.append((headers, body))
        if self.signed:
            try:
                verify(SECRET, headers, body, now=self.clock())
            except SignatureError as exc:
                self.refused.append(exc.reason)
                return 401, f"signature: {exc.reason}"
        status, text = self.statuses.pop(0) if self.statuses else (200, "ok")
        if status == 200 and headers["Idempotency-Key"] not in self.accepted:
            self.accepted.append(headers["Idempotency-Key"])
        return status, text


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status, text = state.answer(dict(self.headers.items()), body)
            payload = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/accord"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(stack: AccordSettings) -> Iterator[AccordSettings]:
    settings = isolated(stack)
    yield settings
    client = redis.Redis.from_url(settings.redis)
    keys = list(client.scan_iter(match=f"{settings.worker.redis_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def spec(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> SinkSpec:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return spec_of(receiver, secret_env=SECRET_ENV)


def spec_of(receiver: Receiver, **options: Any) -> SinkSpec:
    raw = {
        "kind": "webhook",
        "url": receiver.url,
        "insecure_http": True,  # the receiver is on loopback, without a certificate
        "fields": ["email", "phone", "credit_limit", "marketing_opt_in"],
        "timeout_s": 5,
    }
    return parse_sink(TARGET, raw | options, Path("connectors/hooks/sink.yaml"))


def applier_for(settings: AccordSettings, spec: SinkSpec, **options: Any) -> WebhookApplier:
    return WebhookApplier(spec, redis_client(settings), settings.worker.redis_prefix, **options)


def sink_event(golden_id: str, version: int, **values: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "event_id": f"{TARGET}:{golden_id}:{version}:+",
        "target": TARGET,
        "op": "UPSERT",
        "target_key": None,
        "golden_id": golden_id,
        "golden_version": version,
        "fields": {name: values.get(name) for name in FIELDS},
        "changed": list(values),
        "caused_by": None,
        "emitted_at": now,
        "source_ts": now,
    }


def test_a_flaky_receiver_gets_the_event_exactly_once(
    env: AccordSettings, spec: SinkSpec, receiver: Receiver
) -> None:
    receiver.statuses = [(503, "busy")] * 3
    applier = applier_for(env, spec)
    golden_id = str(uuid.uuid4())
    event = sink_event(
        golden_id,
        4,
        email="ada@example.test",
        credit_limit=Decimal("1234.50"),
        marketing_opt_in=True,
        company="not sent",  # not among the target's fields
    )
    try:
        outcome = applier.apply(event)
    finally:
        applier.close()

    assert outcome.status is Status.APPLIED
    assert applier.retries == 3
    assert len(receiver.requests) == 4
    assert {h["Idempotency-Key"] for h, _ in receiver.requests} == {event["event_id"]}
    assert receiver.refused == []  # every attempt verified, each with its own timestamp
    assert "X-Accord-Signature" not in receiver.requests[0][0]  # legacy_signature is off
    assert receiver.accepted == [event["event_id"]]
    headers, body = receiver.requests[-1]
    assert headers["Content-Type"] == "application/json"
    assert int(headers["X-Accord-Timestamp"]) > 0
    document = json.loads(body)
    assert document == {
        "event_id": event["event_id"],
        "target": TARGET,
        "op": "UPSERT",
        "golden_id": golden_id,
        "golden_version": 4,
        "target_key": None,
        "fields": {
            "email": "ada@example.test",
            "phone": None,
            "credit_limit": "1234.50",
            "marketing_opt_in": True,
        },
        "changed": ["email", "credit_limit", "marketing_opt_in"],  # not company
        "emitted_at": document["emitted_at"],
    }
    assert dt.datetime.fromisoformat(document["emitted_at"]).tzinfo is not None

    client = redis.Redis.from_url(env.redis, decode_responses=True)
    prefix = env.worker.redis_prefix
    assert client.get(f"{prefix}sink:{TARGET}:{golden_id}") == "4"
    log = client.xrange(f"{prefix}sinklog:{TARGET}")
    assert [entry["event_id"] for _, entry in log] == [event["event_id"]]
    client.close()


def test_a_replayed_event_is_skipped(
    env: AccordSettings, spec: SinkSpec, receiver: Receiver
) -> None:
    applier = applier_for(env, spec)
    golden_id = str(uuid.uuid4())
    try:
        first = applier.apply(sink_event(golden_id, 2, email="ada@example.test"))
        replay = applier.apply(sink_event(golden_id, 2, email="ada@example.test"))
        older = applier.apply(sink_event(golden_id, 1, email="old@example.test"))
    finally:
        applier.close()
    assert first.status is Status.APPLIED
    assert [(o.status, o.reason) for o in (replay, older)] == [
        (Status.SKIPPED, "stale_version")
    ] * 2
    assert len(receiver.requests) == 1


def test_a_captured_request_replayed_six_minutes_later_is_refused(
    env: AccordSettings, spec: SinkSpec, receiver: Receiver
) -> None:
    applier = applier_for(env, spec)
    event = sink_event(str(uuid.uuid4()), 1, email="ada@example.test")
    try:
        assert applier.apply(event).status is Status.APPLIED
    finally:
        applier.close()
    [(headers, body)] = receiver.requests
    assert headers[SIGNATURE_HEADER].startswith("v1=")

    later = int(headers["X-Accord-Timestamp"]) + 6 * 60
    receiver.clock = lambda: later

    def replay(headers: dict[str, str]) -> int:
        return httpx.post(receiver.url, content=body, headers=headers, timeout=5).status_code

    assert replay(headers) == 401  # the same bytes and headers, six minutes later
    assert replay({**headers, "X-Accord-Timestamp": str(later)}) == 401  # a fresh time
    assert receiver.refused == ["too_old", "mismatch"]
    assert receiver.accepted == [event["event_id"]]  # once, by the applier


def test_legacy_signature_keeps_the_previous_receivers_working(
    env: AccordSettings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    spec = spec_of(receiver, secret_env=SECRET_ENV, legacy_signature=True)
    applier = applier_for(env, spec)
    try:
        outcome = applier.apply(sink_event(str(uuid.uuid4()), 1, email="ada@example.test"))
    finally:
        applier.close()
    assert outcome.status is Status.APPLIED
    [(headers, body)] = receiver.requests
    # The previous release's receiver example, verbatim: the body-only HMAC.
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Accord-Signature"], expected)
    assert receiver.refused == []  # and v1 beside it


def test_an_unsigned_sink_sends_no_signature(
    env: AccordSettings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    receiver.signed = False
    applier = applier_for(env, spec_of(receiver, unsigned=True))
    try:
        outcome = applier.apply(sink_event(str(uuid.uuid4()), 1, email="ada@example.test"))
    finally:
        applier.close()
    assert outcome.status is Status.APPLIED
    [(headers, _)] = receiver.requests
    assert SIGNATURE_HEADER not in headers and "X-Accord-Signature" not in headers


def test_the_log_of_applied_events_stays_capped(
    env: AccordSettings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    cap, events = 5, 300
    applier = applier_for(env, spec_of(receiver, secret_env=SECRET_ENV, log_maxlen=cap))
    golden_id = str(uuid.uuid4())
    try:
        for version in range(1, events + 1):
            event = sink_event(golden_id, version, email=f"v{version}@example.test")
            assert applier.apply(event).status is Status.APPLIED
    finally:
        applier.close()
    client = redis.Redis.from_url(env.redis, decode_responses=True)
    try:
        log = f"{env.worker.redis_prefix}sinklog:{TARGET}"
        # MAXLEN ~ trims whole nodes of the stream: at most one node over the cap.
        try:
            node = int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])
        except redis.ResponseError:  # CONFIG refused to this user: Redis's default
            node = 100
        length = client.xlen(log)
        assert cap <= length <= cap + node < events
        [(_, newest)] = client.xrevrange(log, count=1)
        assert newest["event_id"] == f"{TARGET}:{golden_id}:{events}:+"
    finally:
        client.close()


def test_a_receiver_down_past_the_deadline_fails_the_event(
    env: AccordSettings, spec: SinkSpec, receiver: Receiver
) -> None:
    receiver.statuses = [(503, "down")] * 1000
    applier = applier_for(env, spec, deadline_s=1.0, backoff=lambda: Backoff(base_s=0.05))
    try:
        outcome = applier.apply(sink_event(str(uuid.uuid4()), 1, email="ada@example.test"))
    finally:
        applier.close()
    assert (outcome.status, outcome.reason) == (Status.FAILED, "sink_unavailable")
    assert "HTTP 503" in outcome.detail
    assert len(receiver.requests) >= 2


def test_a_rejected_event_is_dead_lettered_with_status_and_body(
    env: AccordSettings, spec: SinkSpec, receiver: Receiver
) -> None:
    receiver.statuses = [(400, "email: not a valid address")]
    topic = env.topics.sink(TARGET)
    admin = AdminClient({"bootstrap.servers": env.kafka})
    for future in admin.create_topics(
        [NewTopic(topic, 3, 1), NewTopic(env.topics.dlq, 1, 1)]
    ).values():
        future.result(30)
    codec = canonical_codec(env, registry_client(env), "dev.accord.SinkEvent", topic)
    producer = Producer({"bootstrap.servers": env.kafka})
    golden_id = str(uuid.uuid4())
    for event in (
        sink_event(golden_id, 1, email="not an address"),
        sink_event(golden_id, 2, email="ada@example.test"),
    ):
        producer.produce(topic, key=golden_id.encode(), value=codec.dumps(event))
    assert producer.flush(30) == 0

    runner = SinkRunner(env, TARGET, spec=spec, applier=applier_for(env, spec))
    dlq = None
    try:
        assert wait_until(
            lambda: runner.step(0.5) is not None and runner.totals.consumed == 2, 60, 0
        )
        assert (runner.totals.applied, runner.totals.dead) == (1, 1)
        assert receiver.accepted == [f"{TARGET}:{golden_id}:2:+"]
        dlq = TopicTail(env, env.topics.dlq)
        assert dlq.wait_for(lambda records: len(records) == 1, 30)
        [letter] = dlq.records
        assert (letter["stage"], letter["reason"], letter["error_class"]) == (
            "sink",
            "sink_rejected",
            "WebhookRejected",
        )
        assert letter["detail"] == "HTTP 400: email: not a valid address"
        assert letter["key"] == golden_id.encode()
    finally:
        runner.close()
        if dlq is not None:
            dlq.close()
        admin.delete_topics([topic, env.topics.dlq])
