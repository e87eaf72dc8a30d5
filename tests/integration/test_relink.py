"""The identity epoch against the real Redis: the guard, the relinker and its lock.

Golden states come from in-memory sources here; tests/e2e/test_relink.py runs the whole
worker through a flush.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from pydantic import SecretStr

from streams.identity import IdentityLost, IdentityResolver, MatchRule
from streams.merge import GoldenState, dumps, fold
from streams.model import Change, Op, Value
from streams.relink import LOCK_KEY, LOST_REASON, Plan, Relinker, RelinkSources
from streams.rules import default_rules
from streams.settings import AccordSettings, IdentitySettings

pytestmark = pytest.mark.integration

RULES = (MatchRule("email"), MatchRule("tax_id", ("billing",)))
SECRET = b"integration-test-match-key-secret"
_positions = itertools.count(1)


def change(system: str, key: str, **values: Value) -> Change:
    position = next(_positions)
    return Change(
        change_id=f"{system}:{key}:{position}",
        system=system,
        source_key=key,
        op=Op.UPSERT,
        source_ts=position,
        position=f"{position:020d}",
        values=values,
    )


@pytest.fixture
def client(stack: AccordSettings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis)
    yield client
    client.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"test-relink-{uuid.uuid4().hex[:8]}:"
    yield prefix
    flush(client, prefix)


def flush(client: redis.Redis, prefix: str) -> None:
    """What FLUSHALL does to one app, without touching anyone else's keys."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


def keys(client: redis.Redis, prefix: str) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000)}


def test_a_guarded_resolve_or_link_creates_nothing_without_the_epoch(
    client: redis.Redis, prefix: str
) -> None:
    guarded = IdentityResolver(client, prefix, RULES, guarded=True, key_secret=SECRET)
    row = change("crm", "1", email="a@example.com")
    with pytest.raises(IdentityLost, match="ACCORD_IDENTITY_LOST"):
        guarded.resolve([row])
    with pytest.raises(IdentityLost):
        guarded.link("support", "u-1", "g-1")
    assert keys(client, prefix) == set()

    client.set(guarded.epoch_key, "now")
    (golden_id,) = guarded.resolve([row])
    guarded.link("support", "u-1", golden_id)
    assert guarded.lookup("crm", "1") == golden_id
    assert guarded.links(golden_id) == [("crm", "1"), ("support", "u-1")]
    # Unguarded (tools and tests on a private prefix): no epoch needed.
    other = f"{prefix}unguarded:"
    assert IdentityResolver(client, other, RULES, key_secret=SECRET).resolve([row]) == [golden_id]


def sources(states: list[GoldenState], ledger: list[tuple[str, str, str]]) -> RelinkSources:
    """A changelog holding `states`, and an applier ledger."""
    return RelinkSources(
        has_state=lambda: bool(states),
        changelog=lambda: [(s.golden_id.encode(), dumps(s)) for s in states],
        ledger=lambda: ledger,
    )


def relinker(
    client: redis.Redis, prefix: str, src: RelinkSources, every: int = 1000, interval_s: float = 5
) -> Relinker:
    resolver = IdentityResolver(client, prefix, RULES, guarded=True, key_secret=SECRET)
    return Relinker(
        client, resolver, src, {"email", "tax_id"}, "test-owner", interval_s, every=every
    )


def test_a_new_app_gets_its_epoch_and_nothing_else(client: redis.Redis, prefix: str) -> None:
    keeper = relinker(client, prefix, sources([], []))
    report = keeper.check()
    assert report is not None and report.plan is Plan.FRESH
    assert keys(client, prefix) == {f"{prefix}identity-epoch"}
    assert keeper.problem is None
    assert keeper.check().plan is Plan.INTACT  # type: ignore[union-attr]


def test_lost_keys_are_rebuilt_from_golden_states_and_ledgers(
    client: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    rules = default_rules()
    ada = fold(
        "g-ada",
        [
            change("crm", "1", email="ada@example.com"),
            change("support", "7", email="ada@example.com"),
        ],
        rules,
    )
    bob = fold("g-bob", [change("billing", "W-2", email="bob@example.com", tax_id="DE2")], rules)
    states = [ada, bob] + [
        fold(f"g-{n}", [change("crm", f"c{n}", email=f"{n}@example.com")], rules) for n in range(5)
    ]
    # Bob's billing row made a support row whose echo the merge has not seen yet.
    keeper = relinker(client, prefix, sources(states, [("g-bob", "support", "u-bob")]), every=2)
    resolver = keeper.resolver
    before = set(keys(client, prefix))
    assert before == set()

    caplog.set_level(logging.INFO, logger="streams.relink")
    with pytest.raises(IdentityLost):
        resolver.resolve([change("crm", "1", email="ada@example.com")])
    keeper.lost()
    assert keeper.problem == LOST_REASON
    report = keeper.check()
    assert report is not None and report.plan is Plan.REBUILD
    assert (report.golden_records, report.ledger_links, report.records_read) == (7, 1, 7)
    assert keeper.problem is None and keeper.rebuilds == 1
    assert client.exists(resolver.epoch_key)
    assert not client.exists(f"{prefix}{LOCK_KEY}")  # released
    assert "identity keys of 2 of 7 golden records written" in caplog.text
    assert "rebuilt the identity keys of 7 golden records" in caplog.text

    # The same answers as before the loss: no new golden id for a known row or customer.
    assert resolver.resolve(
        [
            change("support", "7", email="ada@example.com"),
            change("crm", "99", email="bob@example.com"),  # a new row of a known customer
            change("billing", "W-9", email="x@example.com", tax_id="DE2"),
        ]
    ) == ["g-ada", "g-bob", "g-bob"]
    assert resolver.lookup("support", "u-bob") == "g-bob"
    assert ("support", "u-bob") in resolver.links("g-bob")


def test_one_rebuild_at_a_time(client: redis.Redis, prefix: str) -> None:
    state = fold("g-1", [change("crm", "1", email="a@example.com")], default_rules())
    keeper = relinker(client, prefix, sources([state], []))
    client.set(f"{prefix}{LOCK_KEY}", "another-worker", px=60_000)
    assert keeper.check() is None  # another holds the lock: wait for it
    assert keeper.problem == LOST_REASON
    assert not client.exists(keeper.resolver.epoch_key)
    client.delete(f"{prefix}{LOCK_KEY}")
    assert keeper.check().plan is Plan.REBUILD  # type: ignore[union-attr]
    assert keeper.problem is None


def test_the_keeper_thread_notices_a_flush_and_rebuilds(client: redis.Redis, prefix: str) -> None:
    state = fold("g-1", [change("crm", "1", email="a@example.com")], default_rules())
    keeper = relinker(client, prefix, sources([state], []), interval_s=0.2)
    client.set(keeper.resolver.epoch_key, "before the flush")
    stop = threading.Event()
    thread = threading.Thread(target=keeper.run, args=(stop,), daemon=True)
    thread.start()
    try:
        flush(client, prefix)
        assert _poll(lambda: keeper.rebuilds == 1, 30), "no rebuild after the flush"
        assert keeper.resolver.lookup("crm", "1") == "g-1"
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def _poll(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)  # a poll interval, not a synchronisation
    return condition()


def test_accord_identity_rebuild_restores_links_from_the_changelog_and_ledgers(
    stack: AccordSettings, client: redis.Redis
) -> None:
    from confluent_kafka import Producer

    from streams.sources import postgres
    from streams.topology import changelog_topic, ensure_topics
    from tests.support import accord, isolated

    settings = isolated(stack)
    prefix = settings.worker.redis_prefix
    ensure_topics(settings)
    rules = default_rules()
    states = [
        fold(f"g-{n}-{prefix}", [change("crm", f"{prefix}{n}", email=f"{n}@{prefix}x")], rules)
        for n in range(3)
    ]
    producer = Producer(settings.kafka_config({"partitioner": "murmur2_random"}))
    for state in states:
        producer.produce(
            changelog_topic(settings), key=state.golden_id.encode(), value=dumps(state)
        )
    assert producer.flush(30) == 0
    # A support row an applier created for the first record, its echo not merged yet.
    created = str(uuid.uuid4())
    ledger = (
        "INSERT INTO accord_applied (app, golden_id, golden_version, event_id, op, "
        "target_key, source_ts_us, applied_at_us) VALUES (%s, %s, 1, %s, 'INSERT', %s, 0, 0)"
    )
    with postgres(settings, "support") as conn:
        conn.execute(ledger, (settings.worker.app_id, states[0].golden_id, created, created))
    resolver = IdentityResolver(
        client, prefix, RULES, guarded=True, key_secret=settings.match_key_secret()
    )
    try:
        result = accord(settings, "identity", "rebuild", "--yes")
        assert result.returncode == 0, result.stderr
        assert "rebuilt the identity keys of 3 golden records (1 rows linked" in result.stdout
        assert "workers hold ingest until the rebuild is done" in result.stderr
        assert client.exists(resolver.epoch_key)
        for state in states:
            (link,) = state.contributions.values()
            assert resolver.lookup(link.system, link.key) == state.golden_id
        assert resolver.lookup("support", created) == states[0].golden_id
        # The keys are whole again: a known customer keeps its golden id (a CRM row:
        # support's email alone would be reviewed under the match policy).
        again = change("crm", f"{prefix}new", email=f"1@{prefix}x")
        assert resolver.resolve([again]) == [states[1].golden_id]

        # Another key secret: refused until re-keyed, then every value is found again.
        secret = SecretStr("a-new-identity-key-secret-for-this-test")
        rekeyed = settings.model_copy(update={"identity": IdentitySettings(key_secret=secret)})
        refused = accord(rekeyed, "identity", "rebuild", "--yes")
        assert refused.returncode != 0
        assert "accord identity rebuild --rekey" in refused.stderr + refused.stdout
        assert client.exists(resolver.epoch_key)  # nothing was touched
        old_key = resolver.match_key("email", f"2@{prefix}x")
        result = accord(rekeyed, "identity", "rebuild", "--yes", "--rekey")
        assert result.returncode == 0, result.stderr
        assert not client.exists(old_key)
        renamed = IdentityResolver(
            client, prefix, RULES, guarded=True, key_secret=secret.get_secret_value().encode()
        )
        later = change("crm", f"{prefix}later", email=f"2@{prefix}x")
        assert renamed.resolve([later]) == [states[2].golden_id]
    finally:
        with postgres(settings, "support") as conn:
            conn.execute("DELETE FROM accord_applied WHERE app = %s", (settings.worker.app_id,))
        flush(client, prefix)
