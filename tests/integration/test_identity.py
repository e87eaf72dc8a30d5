"""IdentityResolver against the real Redis: xref, match rules, atomicity, rebuild."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streams.dedupe import RedisUnavailable
from streams.identity import IdentityResolver, MatchRule, golden_id_for
from streams.model import Change, Op, Value
from streams.settings import AccordSettings

pytestmark = pytest.mark.integration

RULES = (MatchRule("email"), MatchRule("tax_id", ("billing",)))


def change(system: str, key: str, op: Op = Op.UPSERT, **values: Value) -> Change:
    return Change(
        change_id=f"{system}:{key}:{uuid.uuid4().hex}",
        system=system,
        source_key=key,
        op=op,
        source_ts=1_700_000_000_000_000,
        position="lsn:00000000000000000001",
        values=values,
    )


@pytest.fixture
def client(stack: AccordSettings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis)
    yield client
    client.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    delete_prefix(client, prefix)


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def resolver(client: redis.Redis, prefix: str) -> IdentityResolver:
    return IdentityResolver(client, prefix, RULES)


def test_a_new_row_founds_a_deterministic_golden_record(resolver: IdentityResolver) -> None:
    [golden] = resolver.resolve([change("crm", "1", email="ada@example.com")])
    assert golden == golden_id_for("crm", "1")
    assert resolver.lookup("crm", "1") == golden
    assert resolver.links(golden) == [("crm", "1")]


def test_a_known_row_resolves_through_its_xref(resolver: IdentityResolver) -> None:
    [golden] = resolver.resolve([change("crm", "1", email="ada@example.com")])
    # Email changed, and the old one is not matched anymore: the xref still holds.
    assert resolver.resolve([change("crm", "1", email="ada@new.example")]) == [golden]
    assert resolver.resolve([change("crm", "1")]) == [golden]


def test_email_matches_across_systems(resolver: IdentityResolver) -> None:
    crm, support, billing = resolver.resolve(
        [
            change("crm", "1", email="ada@example.com"),
            change("support", "u-7", email="ada@example.com"),
            change("billing", "A-1", email="ada@example.com", tax_id="DE123"),
        ]
    )
    assert crm == support == billing == golden_id_for("crm", "1")
    assert resolver.links(crm) == [("billing", "A-1"), ("crm", "1"), ("support", "u-7")]


def test_tax_id_matches_billing_rows_only(resolver: IdentityResolver, client: redis.Redis) -> None:
    crm_first, billing_a, billing_b, crm_later = resolver.resolve(
        [
            change("crm", "1", tax_id="DE123"),  # CRM tax ids are neither indexed...
            change("billing", "A-1", tax_id="DE123"),
            change("billing", "A-2", tax_id="DE123"),
            change("crm", "2", tax_id="DE123"),  # ...nor matched
        ]
    )
    assert billing_a == billing_b == golden_id_for("billing", "A-1")
    assert crm_first == golden_id_for("crm", "1")
    assert crm_later == golden_id_for("crm", "2")
    assert client.get(resolver.match_key("tax_id", "DE123")) == billing_a.encode()


def test_the_first_rule_that_finds_a_record_wins(client: redis.Redis, prefix: str) -> None:
    by_email = IdentityResolver(client, prefix, RULES)
    by_tax_id = IdentityResolver(client, prefix, tuple(reversed(RULES)))
    email_owner, tax_owner = by_email.resolve(
        [change("crm", "1", email="ada@example.com"), change("billing", "A-1", tax_id="DE123")]
    )
    assert email_owner != tax_owner
    both = {"email": "ada@example.com", "tax_id": "DE123"}
    assert by_email.resolve([change("billing", "A-2", **both)]) == [email_owner]
    assert by_tax_id.resolve([change("billing", "A-3", **both)]) == [tax_owner]
    # A first rule whose value is not indexed yet does not stop the next one.
    assert by_email.resolve([change("billing", "A-4", email="x@example.com", tax_id="DE123")]) == [
        tax_owner
    ]


def test_empty_values_never_match(resolver: IdentityResolver) -> None:
    goldens = resolver.resolve(
        [change("crm", "1", email=""), change("crm", "2", email=""), change("crm", "3", email=None)]
    )
    assert goldens == [golden_id_for("crm", key) for key in ("1", "2", "3")]


def test_first_writer_wins_a_match_value(resolver: IdentityResolver, client: redis.Redis) -> None:
    ada, bob = resolver.resolve(
        [change("crm", "1", email="ada@example.com"), change("crm", "2", email="bob@example.com")]
    )
    # Bob's row takes Ada's address: it stays Bob's record and does not steal the index.
    assert resolver.resolve([change("crm", "2", email="ada@example.com")]) == [bob]
    assert client.get(resolver.match_key("email", "ada@example.com")) == ada.encode()
    assert resolver.resolve([change("support", "u-1", email="ada@example.com")]) == [ada]


def test_a_delete_resolves_through_the_xref_only(resolver: IdentityResolver) -> None:
    [golden] = resolver.resolve([change("crm", "1", email="ada@example.com")])
    unknown, known = resolver.resolve(
        [
            change("support", "u-1", Op.DELETE, email="ada@example.com"),
            change("crm", "1", Op.DELETE),
        ]
    )
    assert unknown is None
    assert known == golden
    assert resolver.lookup("support", "u-1") is None
    assert resolver.links(golden) == [("crm", "1")]


def test_a_linked_row_resolves_to_its_golden_record(resolver: IdentityResolver) -> None:
    ada, bob = resolver.resolve(
        [change("crm", "1", email="ada@example.com"), change("crm", "2", email="bob@example.com")]
    )
    # An applier created Ada in support; Debezium captures that row (Bob's email or not).
    resolver.link("support", "u-9", ada)
    assert resolver.resolve([change("support", "u-9", email="bob@example.com")]) == [ada]
    assert resolver.links(ada) == [("crm", "1"), ("support", "u-9")]
    # Relinking moves the row from one record's link set to the other's.
    resolver.link("support", "u-9", bob)
    assert resolver.lookup("support", "u-9") == bob
    assert resolver.links(ada) == [("crm", "1")]
    assert resolver.links(bob) == [("crm", "2"), ("support", "u-9")]


def test_keys_may_hold_colons_and_values_unicode(resolver: IdentityResolver) -> None:
    first, second = resolver.resolve(
        [
            change("crm", "tenant:42", email="zoë@exämple.com"),
            change("support", "a:b:c", email="zoë@exämple.com"),
        ]
    )
    assert first == second
    assert resolver.links(first) == [("crm", "tenant:42"), ("support", "a:b:c")]


def test_rebuild_after_losing_redis_restores_the_same_answers(
    client: redis.Redis, prefix: str, resolver: IdentityResolver
) -> None:
    rows = [
        change("crm", "1", email="ada@example.com"),
        change("support", "u-1", email="ada@example.com"),
        change("billing", "A-1", tax_id="DE123", email="ada.billing@example.com"),
        change("billing", "A-2", tax_id="DE123"),
        change("crm", "2", email="bob@example.com"),
        change("crm", "3", email="cy@example.com", tax_id="FR999"),
    ]
    goldens = resolver.resolve(rows)
    values = {
        goldens[0]: {"email": "ada@example.com"},
        goldens[2]: {"email": "ada.billing@example.com", "tax_id": "DE123"},
        goldens[4]: {"email": "bob@example.com"},
        goldens[5]: {"email": "cy@example.com", "tax_id": "FR999"},
    }
    records = [(g, resolver.links(g), v) for g, v in values.items()]
    before = {
        (row.system, row.source_key): resolver.lookup(row.system, row.source_key) for row in rows
    }

    delete_prefix(client, prefix)
    assert resolver.lookup("crm", "1") is None
    assert resolver.rebuild(iter(records), batch_size=3) == len(records)

    after = {
        (row.system, row.source_key): resolver.lookup(row.system, row.source_key) for row in rows
    }
    assert after == before
    assert [(g, resolver.links(g), v) for g, v in values.items()] == records
    # New rows match the rebuilt index as they would have matched the lost one.
    assert resolver.resolve(
        [
            change("support", "u-2", email="bob@example.com"),
            change("billing", "A-3", tax_id="DE123"),
            change("billing", "A-4", tax_id="FR999"),  # FR999 came only from a CRM row
        ]
    ) == [goldens[4], goldens[2], golden_id_for("billing", "A-4")]


def test_concurrent_resolvers_agree_on_one_golden_id(stack: AccordSettings, prefix: str) -> None:
    """Two workers see the same new customer from two systems at once: one record."""
    customers = 200
    start = threading.Barrier(2, timeout=30)
    results: dict[str, list[str | None]] = {}
    errors: list[BaseException] = []

    def worker(system: str) -> None:
        client = redis.Redis.from_url(stack.redis)
        resolver = IdentityResolver(client, prefix, RULES)
        resolved: list[str | None] = []
        try:
            for i in range(customers):
                start.wait()  # both threads race on every customer
                resolved += resolver.resolve([change(system, f"{system}-{i}", email=f"c{i}@x.io")])
        except BaseException as exc:
            errors.append(exc)
            start.abort()
        finally:
            client.close()
        results[system] = resolved

    threads = [threading.Thread(target=worker, args=(s,)) for s in ("crm", "support")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert results["crm"] == results["support"]
    assert len(set(results["crm"])) == customers


def test_one_round_trip_per_batch(stack: AccordSettings, prefix: str) -> None:
    sent = 0

    class Counting(redis.Connection):
        def send_packed_command(self, command: object, check_health: bool = True) -> None:
            nonlocal sent
            sent += 1
            super().send_packed_command(command, check_health)

    client = redis.Redis.from_url(stack.redis, connection_class=Counting)
    try:
        resolver = IdentityResolver(client, prefix, RULES)
        resolver.resolve([change("crm", "warm-up")])  # loads the script if Redis lacks it
        sent = 0
        batch = [change("crm", str(i), email=f"c{i % 50}@x.io") for i in range(500)]
        assert len(resolver.resolve(batch)) == 500
        assert sent == 1
        assert resolver.resolve([]) == []
        assert sent == 1
    finally:
        client.close()


def closed_port() -> int:
    """A loopback port nothing listens on: bound, never listened, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("call", "action"),
    [
        (lambda r: r.resolve([change("crm", "1")]), "resolving identities of 1 changes"),
        (lambda r: r.lookup("crm", "1"), "looking up crm:1"),
        (lambda r: r.link("crm", "1", "g"), "linking crm:1"),
        (lambda r: r.links("g"), "reading the links of g"),
        (lambda r: r.rebuild([("g", [("crm", "1")], {})]), "rebuilding identities"),
    ],
)
def test_redis_down_is_a_clear_error(
    call: Callable[[IdentityResolver], object], action: str
) -> None:
    client = redis.Redis(host="127.0.0.1", port=closed_port(), retry=Retry(NoBackoff(), 0))
    resolver = IdentityResolver(client, "test-down:", RULES)
    with pytest.raises(
        RedisUnavailable, match=f"Redis unavailable while {action}.*ConnectionError"
    ):
        call(resolver)
