"""IdentityResolver against the real Redis: xref, match rules, atomicity, rebuild."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from streams.dedupe import RedisUnavailable
from streams.identity import (
    HoldReason,
    IdentityPolicy,
    IdentityResolver,
    MatchRule,
    golden_id_for,
)
from streams.matchkeys import MatchKeys, MatchKeySecretChanged, migrate_legacy_keys
from streams.matchpolicy import MatchPolicy
from streams.model import SYSTEMS, Change, Op, Value
from streams.settings import AccordSettings

pytestmark = pytest.mark.integration

RULES = (MatchRule("email"), MatchRule("tax_id", ("billing",)))
SECRET = b"integration-test-match-key-secret"
# The mechanics of matching (xrefs, first writer wins, the cap, role addresses, rebuild)
# are tested with every system trusted on every rule, as identity matched before match
# policies; the policy's own tests below use the shipped default (support's email: low).
TRUST_ALL = MatchPolicy(trust={})
TRUSTING = IdentityPolicy(matching=TRUST_ALL)


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
    return IdentityResolver(
        client, prefix, RULES, IdentityPolicy(matching=TRUST_ALL), key_secret=SECRET
    )


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
    by_email = IdentityResolver(client, prefix, RULES, key_secret=SECRET)
    by_tax_id = IdentityResolver(client, prefix, tuple(reversed(RULES)), key_secret=SECRET)
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
    """Two workers see the same new customer from two systems at once: one record. Under
    the default policy, so whichever comes second is scored (support's email is low
    trust, corroborated by the name) and applied only if its candidate still holds."""
    customers = 200
    start = threading.Barrier(2, timeout=30)
    results: dict[str, list[str | None]] = {}
    errors: list[BaseException] = []

    def worker(system: str) -> None:
        client = redis.Redis.from_url(stack.redis)
        resolver = IdentityResolver(client, prefix, RULES, key_secret=SECRET)
        resolved: list[str | None] = []
        try:
            for i in range(customers):
                start.wait()  # both threads race on every customer
                row = change(
                    system, f"{system}-{i}", email=f"c{i}@x.io", first_name="Ada", last_name=f"L{i}"
                )
                resolved += resolver.resolve([row])
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


def test_one_round_trip_per_batch_two_with_candidates_to_score(
    stack: AccordSettings, prefix: str
) -> None:
    sent = 0

    class Counting(redis.Connection):
        def send_packed_command(self, command: object, check_health: bool = True) -> None:
            nonlocal sent
            sent += 1
            super().send_packed_command(command, check_health)

    client = redis.Redis.from_url(stack.redis, connection_class=Counting)
    try:
        resolver = IdentityResolver(client, prefix, RULES, key_secret=SECRET)
        resolver.resolve([change("crm", "warm-up")])  # loads the script if Redis lacks it
        sent = 0
        batch = [change("crm", str(i), email=f"c{i}@x.io") for i in range(500)]
        assert len(resolver.resolve(batch)) == 500
        assert sent == 1  # no candidates: nothing to score
        assert len(resolver.resolve(batch)) == 500
        assert sent == 2  # known rows: their xrefs
        sent = 0
        batch = [change("crm", str(i), email=f"c{i % 50}@x.io") for i in range(500, 1000)]
        assert len(set(resolver.resolve(batch))) == 50
        assert sent == 2  # 450 rows scored against their candidates: one more round
        assert resolver.resolve([]) == []
        assert sent == 2
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
        # A resolver with match rules first checks its key secret (once, then resolves).
        (lambda r: r.resolve([change("crm", "1")]), "checking the identity key secret"),
        (lambda r: r.lookup("crm", "1"), "looking up crm:1"),
        (lambda r: r.link("crm", "1", "g"), "linking crm:1"),
        (lambda r: r.links("g"), "reading the links of g"),
        (lambda r: r.rebuild([("g", [("crm", "1")], {})]), "checking the identity key secret"),
    ],
)
def test_redis_down_is_a_clear_error(
    call: Callable[[IdentityResolver], object], action: str
) -> None:
    client = redis.Redis(host="127.0.0.1", port=closed_port(), retry=Retry(NoBackoff(), 0))
    resolver = IdentityResolver(client, "test-down:", RULES, key_secret=SECRET)
    with pytest.raises(
        RedisUnavailable, match=f"Redis unavailable while {action}.*ConnectionError"
    ):
        call(resolver)


# -- holds: the cap on rows per record, and role addresses ----------------------------------


def capped(client: redis.Redis, prefix: str, cap: int = 20) -> IdentityResolver:
    return IdentityResolver(
        client,
        prefix,
        RULES,
        IdentityPolicy(max_rows_per_record=cap, matching=TRUST_ALL),
        key_secret=SECRET,
    )


def link_sets(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}links:*", count=1000))


def test_sixty_rows_sharing_an_email_link_twenty_and_hold_forty(
    client: redis.Redis, prefix: str
) -> None:
    resolver = capped(client, prefix, cap=20)
    systems = ("crm", "support", "billing")
    rows = [change(systems[i % 3], f"r{i}", email="ada@example.com") for i in range(60)]
    results = []
    for start in range(0, 60, 7):  # batches that straddle the cap
        batch = resolver.resolve_batch(rows[start : start + 7])
        results += batch.results
    golden = golden_id_for("crm", "r0")
    assert [r.golden_id for r in results[:20]] == [golden] * 20
    assert all(r.golden_id is None and r.hold is not None for r in results[20:])
    assert len(resolver.links(golden)) == 20
    assert batch.held_rows == 40
    holds = resolver.holds()
    assert len(holds) == 40
    assert {(h.reason, h.golden_id, h.rows, h.cap) for h in holds} == {
        (HoldReason.MAX_ROWS, golden, 20, 20)
    }
    assert {h.match for h in holds} == {("email", "ada@example.com")}
    held = rows[45]
    assert resolver.lookup(held.system, held.source_key) is None  # no xref: no golden id
    assert resolver.held(held.system, held.source_key) is not None
    assert resolver.held("crm", "r0") is None


def test_two_hundred_rows_sharing_a_role_address_are_all_held(
    client: redis.Redis, prefix: str
) -> None:
    resolver = capped(client, prefix)
    spellings = ("info@acme.example", "INFO@acme.example", " info+eu@acme.example ")
    rows = [change("support", f"u-{i}", email=spellings[i % 3]) for i in range(200)]
    batch = resolver.resolve_batch(rows)
    assert [r.golden_id for r in batch.results] == [None] * 200
    assert {r.hold.reason for r in batch.results if r.hold} == {HoldReason.ROLE_ADDRESS}
    assert batch.held_rows == 200
    assert link_sets(client, prefix) == []  # not one golden record, so nothing to send
    assert list(client.scan_iter(match=f"{prefix}xref:*")) == []
    assert list(client.scan_iter(match=f"{prefix}hmatch:*")) == []  # never indexed
    # A later row with the same address is held too: nothing was indexed for it.
    [later] = resolver.resolve_batch([change("crm", "9", email="info@acme.example")]).results
    assert later.hold is not None and later.hold.reason is HoldReason.ROLE_ADDRESS


def test_a_role_address_row_whose_tax_id_matches_links_normally(
    client: redis.Redis, prefix: str
) -> None:
    resolver = capped(client, prefix)
    [acme] = resolver.resolve([change("billing", "A-1", email="ada@acme.example", tax_id="DE1")])
    role = {"email": "billing@acme.example"}
    by_tax_id, unknown_tax_id, crm = resolver.resolve_batch(
        [
            change("billing", "A-2", tax_id="DE1", **role),
            change("billing", "A-3", tax_id="DE9", **role),  # a new tax id: only the role
            change("crm", "7", **role),
        ]
    ).results
    assert by_tax_id.golden_id == acme
    assert unknown_tax_id.hold is not None and unknown_tax_id.hold.golden_id is None
    assert unknown_tax_id.hold.reason is HoldReason.ROLE_ADDRESS
    assert crm.hold is not None
    assert resolver.links(acme) == [("billing", "A-1"), ("billing", "A-2")]
    # A linked row that takes a role address stays linked, and does not index it.
    assert resolver.resolve([change("billing", "A-1", email="info@acme.example")]) == [acme]
    assert client.get(resolver.match_key("email", "info@acme.example")) is None
    assert client.get(resolver.match_key("tax_id", "DE9")) is None  # held rows index nothing


def test_a_held_row_stays_held_until_its_delete_releases_it(
    client: redis.Redis, prefix: str
) -> None:
    resolver = capped(client, prefix)
    [ada] = resolver.resolve([change("crm", "1", email="ada@example.com")])
    [first] = resolver.resolve_batch([change("support", "u-1", email="info@example.com")]).results
    assert first.hold is not None and first.hold.updates == 0
    # Its user puts in a personal address that matches Ada: still held, not linked.
    [again] = resolver.resolve_batch([change("support", "u-1", email="ada@example.com")]).results
    assert again.hold is not None and again.hold.updates == 1
    assert again.hold.since_ms == first.hold.since_ms
    assert again.hold.reason is HoldReason.ROLE_ADDRESS
    assert resolver.links(ada) == [("crm", "1")]

    released, unknown = resolver.resolve_batch(
        [change("support", "u-1", Op.DELETE), change("support", "u-2", Op.DELETE)]
    ).results
    assert released.released and released.golden_id is None and released.hold is None
    assert not unknown.released and unknown.golden_id is None
    assert resolver.held("support", "u-1") is None
    assert resolver.resolve_batch([]).held_rows == 0
    # Written again after its delete, it is a new row: it matches as any other.
    assert resolver.resolve([change("support", "u-1", email="ada@example.com")]) == [ada]


def test_a_held_row_an_applier_links_is_no_longer_held(client: redis.Redis, prefix: str) -> None:
    resolver = capped(client, prefix)
    [ada] = resolver.resolve([change("crm", "1", email="ada@example.com")])
    resolver.resolve([change("support", "u-1", email="support@example.com")])
    resolver.link("support", "u-1", ada)  # the applier adopted the row for Ada
    assert resolver.held("support", "u-1") is None
    assert resolver.resolve([change("support", "u-1", email="support@example.com")]) == [ada]


def test_racing_workers_never_pass_the_cap(stack: AccordSettings, prefix: str) -> None:
    """Two workers each link rows sharing one email at the same moments: 20 in all."""
    start = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def worker(system: str) -> None:
        client = redis.Redis.from_url(stack.redis)
        resolver = capped(client, prefix, cap=20)
        try:
            for i in range(0, 60, 3):
                start.wait()
                resolver.resolve(
                    [
                        change(system, f"{system}-{j}", email="ada@example.com")
                        for j in range(i, i + 3)
                    ]
                )
        except BaseException as exc:
            errors.append(exc)
            start.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in ("crm", "support")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    client = redis.Redis.from_url(stack.redis)
    try:
        resolver = capped(client, prefix)
        [golden] = {resolver.lookup("crm", "crm-0"), resolver.lookup("support", "support-0")}
        assert golden is not None
        assert len(resolver.links(golden)) == 20
        assert len(resolver.holds()) == 100
    finally:
        client.close()


@settings(max_examples=25, deadline=None)
@given(
    cap=st.integers(1, 12),
    arrivals=st.lists(
        st.tuples(st.sampled_from(SYSTEMS), st.integers(0, 30)), min_size=1, max_size=40
    ),
    batch_size=st.integers(1, 8),
)
def test_the_cap_holds_for_any_arrival_order(
    stack: AccordSettings,
    cap: int,
    arrivals: list[tuple[str, int]],
    batch_size: int,
) -> None:
    """Rows sharing one email, in any order and batching, rows arriving again included:
    the record links min(rows, cap) distinct rows; every other row is held, none lost."""
    client = redis.Redis.from_url(stack.redis)
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    try:
        resolver = capped(client, prefix, cap=cap)
        changes = [
            change(system, str(key), email="Ada@Example.com" if key % 2 else "ada@example.com")
            for system, key in arrivals
        ]
        for start in range(0, len(changes), batch_size):
            resolver.resolve(changes[start : start + batch_size])
        rows = {(c.system, c.source_key, c.values["email"]) for c in changes}
        for address in {"ada@example.com", "Ada@Example.com"}:  # matched exactly: two records
            sharing = {(s, k) for s, k, e in rows if e == address}
            golden = next((g for s, k in sharing if (g := resolver.lookup(s, k)) is not None), None)
            linked = set(resolver.links(golden)) if golden else set()
            held = {(h.system, h.key) for h in resolver.holds() if h.match == ("email", address)}
            assert linked | held == sharing
            assert not linked & held
            assert len(linked) == min(len(sharing), cap)
    finally:
        delete_prefix(client, prefix)
        client.close()


# -- match keys: hashed names, migration of the clear-text ones of earlier versions ---------


def write_legacy(client: redis.Redis, prefix: str, golden_id: str, rows: list[Change]) -> None:
    """What a worker of an earlier version left for these rows of one golden record:
    xrefs, the link set, and clear-text match keys `<prefix>match:{field}:{value}`."""
    for row in rows:
        client.set(f"{prefix}xref:{row.link}", golden_id)
        client.sadd(f"{prefix}links:{golden_id}", row.link)
        for field, value in row.values.items():
            if field == "email" or (field == "tax_id" and row.system == "billing"):
                client.set(f"{prefix}match:{field}:{value}", golden_id, nx=True)


def keyspace(client: redis.Redis, prefix: str) -> dict[bytes, object]:
    """Every key of the prefix with its value (strings, sets and hashes)."""
    found: dict[bytes, object] = {}
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        kind = client.type(key)
        if kind == b"string":
            found[key] = client.get(key)
        elif kind == b"hash":  # match profiles
            found[key] = client.hgetall(key)
        else:
            found[key] = sorted(client.smembers(key))
    return found


def test_clear_text_match_keys_migrate_to_hashes_keeping_every_golden_id(
    client: redis.Redis, prefix: str
) -> None:
    ada = change("crm", "1", email="ada@example.com")
    acme = change("billing", "A-1", email="ap@acme.example", tax_id="DE123456789")
    bob = change("crm", "2", email="bob@example.com")
    write_legacy(client, prefix, golden_id_for("crm", "1"), [ada])
    write_legacy(client, prefix, golden_id_for("billing", "A-1"), [acme])
    write_legacy(client, prefix, golden_id_for("crm", "2"), [bob])
    keys = MatchKeys(prefix, SECRET)
    # Bob's value was indexed by a new worker already, to the same record: no conflict.
    client.set(keys.key("email", "bob@example.com"), golden_id_for("crm", "2"))
    assert client.exists(f"{prefix}match:tax_id:DE123456789")

    report = migrate_legacy_keys(client, keys)
    assert (report.scanned, report.moved, report.same, report.conflicts) == (4, 3, 1, [])
    names = b" ".join(keyspace(client, prefix))
    for clear in (b"ada@example.com", b"ap@acme.example", b"DE123456789", b"bob@example.com"):
        assert clear not in names
    assert list(client.scan_iter(match=f"{prefix}match:*")) == []

    # Resolution finds the same golden records by the values they were indexed by.
    resolver = IdentityResolver(client, prefix, RULES, TRUSTING, key_secret=SECRET)
    assert resolver.resolve(
        [
            change("support", "u-1", email="ada@example.com"),
            change("billing", "B-9", tax_id="DE123456789"),
            change("support", "u-2", email="bob@example.com"),
            change("crm", "1", email="ada@example.com"),
        ]
    ) == [golden_id_for("crm", "1"), golden_id_for("billing", "A-1"), golden_id_for("crm", "2"),
          golden_id_for("crm", "1")]  # fmt: skip

    # A rerun finds nothing to do and changes nothing.
    before = keyspace(client, prefix)
    again = migrate_legacy_keys(client, keys)
    assert (again.scanned, again.changed) == (0, 0)
    assert keyspace(client, prefix) == before


def test_a_hashed_key_of_another_record_wins_and_the_conflict_is_reported(
    client: redis.Redis, prefix: str
) -> None:
    keys = MatchKeys(prefix, SECRET)
    client.set(f"{prefix}match:email:ada@example.com", "g-old")
    client.set(keys.key("email", "ada@example.com"), "g-new")
    report = migrate_legacy_keys(client, keys)
    assert report.conflicts == [(keys.key("email", "ada@example.com"), "g-new", "g-old")]
    assert "kept golden g-new, dropped g-old" in report.describe()
    assert "ada@" not in report.describe()
    assert client.get(keys.key("email", "ada@example.com")) == b"g-new"
    assert not client.exists(f"{prefix}match:email:ada@example.com")


def test_a_resolver_migrates_left_over_clear_keys_before_its_first_batch(
    client: redis.Redis, prefix: str
) -> None:
    """No duplicate golden record for a customer an earlier version indexed."""
    write_legacy(client, prefix, "g-ada", [change("crm", "1", email="ada@example.com")])
    resolver = IdentityResolver(client, prefix, RULES, TRUSTING, key_secret=SECRET)
    assert resolver.resolve([change("support", "u-1", email="ada@example.com")]) == ["g-ada"]
    assert list(client.scan_iter(match=f"{prefix}match:*")) == []
    assert client.get(resolver.match_key("email", "ada@example.com")) == b"g-ada"


def test_the_accord_command_migrates_and_a_rerun_is_a_no_op(
    stack: AccordSettings, client: redis.Redis
) -> None:
    from tests.support import accord, isolated

    settings = isolated(stack)
    prefix = settings.worker.redis_prefix
    try:
        write_legacy(client, prefix, "g-ada", [change("crm", "1", email="ada@example.com")])
        first = accord(settings, "identity", "migrate-keys")
        assert first.returncode == 0, first.stderr
        assert "1 clear-text match keys found: 1 renamed to hashed names" in first.stdout
        keys = MatchKeys(prefix, settings.match_key_secret())
        assert client.get(keys.key("email", "ada@example.com")) == b"g-ada"
        again = accord(settings, "identity", "migrate-keys")
        assert again.returncode == 0, again.stderr
        assert "no clear-text match keys: nothing to do" in again.stdout
    finally:
        delete_prefix(client, prefix)


def test_another_secret_than_the_keys_were_made_with_is_refused(
    client: redis.Redis, prefix: str
) -> None:
    first = IdentityResolver(client, prefix, RULES, TRUSTING, key_secret=SECRET)
    [ada] = first.resolve([change("crm", "1", email="ada@example.com")])
    other = IdentityResolver(
        client, prefix, RULES, TRUSTING, key_secret=b"another-secret-of-enough-length"
    )
    with pytest.raises(MatchKeySecretChanged, match="identity rebuild --rekey"):
        other.resolve([change("support", "u-1", email="ada@example.com")])
    assert first.lookup("support", "u-1") is None  # nothing made under the wrong names
    assert first.resolve([change("support", "u-1", email="ada@example.com")]) == [ada]


def test_a_worker_on_a_remote_redis_without_a_key_secret_refuses_to_start(
    stack: AccordSettings,
) -> None:
    from tests.support import accord, isolated

    # With a Redis password of its own, so that the key secret is all that is missing.
    remote = isolated(stack).model_copy(
        update={
            "redis_url": "redis://redis.invalid:6379/0",
            "redis_password": SecretStr("a-redis-password-of-its-own"),
        }
    )
    result = accord(remote, "worker")
    assert result.returncode != 0
    assert "identity.key_secret is not set and Redis is not on loopback" in result.stderr
    assert "ACCORD_IDENTITY__KEY_SECRET_FILE" in result.stderr


# -- the match policy (the shipped default: support's email is low trust) -----------------

ADA = {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}
ADA_PHONE = "+441632960001"


def policed(client: redis.Redis, prefix: str) -> IdentityResolver:
    """A resolver under the shipped match policy."""
    return IdentityResolver(client, prefix, RULES, IdentityPolicy(), key_secret=SECRET)


def scored(system: str, decision: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "accord_identity_scored_total", {"system": system, "decision": decision}
        )
        or 0.0
    )


def customer(resolver: IdentityResolver) -> str:
    """Ada in CRM and billing, same email, name and phone: one golden record."""
    crm, billing = resolver.resolve(
        [
            change("crm", "1", phone=ADA_PHONE, **ADA),
            change("billing", "A-1", phone=ADA_PHONE, tax_id="DE123", **ADA),
        ]
    )
    assert crm == billing == golden_id_for("crm", "1")
    return crm


def test_a_stranger_with_a_customers_email_is_held_for_review_with_scores(
    client: redis.Redis, prefix: str
) -> None:
    resolver = policed(client, prefix)
    ada = customer(resolver)
    before = scored("support", "review")
    stranger = change(
        "support", "u-1", email="ada@example.com", first_name="Mallory", last_name="Jones",
        phone="+441632960999",
    )  # fmt: skip
    [result] = resolver.resolve_batch([stranger]).results
    assert result.golden_id is None and result.hold is not None
    hold = result.hold
    assert (hold.reason, hold.golden_id, hold.match) == (
        HoldReason.REVIEW,
        ada,
        ("email", "ada@example.com"),
    )
    assert hold.scores is not None and hold.policy is not None
    assert hold.scores["total"] == 0.6 and hold.scores["key"] == 0.6
    assert hold.scores["keys"] == {"email": "low"}
    assert hold.scores["name"] == 0 and hold.scores["name_similarity"] < 0.85
    assert hold.scores["phone"] == 0 and hold.scores["phone_equal"] is False
    assert hold.policy == {"auto_link": 1.0, "review": 0.5, "decision": "review"}
    assert scored("support", "review") == before + 1
    # Nothing linked, nothing indexed, and the record's profile is Ada's rows only.
    assert resolver.lookup("support", "u-1") is None
    assert resolver.links(ada) == [("billing", "A-1"), ("crm", "1")]
    assert set(client.hkeys(resolver.profile_key(ada))) == {b"crm:1", b"billing:A-1"}
    # The raw JSON, as the review queue reads it from `<prefix>held`.
    raw = json.loads(client.hget(resolver.held_key, "support:u-1"))
    assert raw["reason"] == "review" and raw["golden_id"] == ada
    assert set(raw) == {
        "reason", "golden_id", "match", "scores", "policy", "since_ms", "last_seen_ms",
        "updates", "entry",
    }  # fmt: skip
    # Its own profile entry, kept to score it again when its candidate changes.
    assert json.loads(raw["entry"])["s"] == "support"
    # Its later changes stay held, whatever they say.
    [again] = resolver.resolve_batch([change("support", "u-1", phone=ADA_PHONE, **ADA)]).results
    assert again.hold is not None and again.hold.updates == 1


def test_a_support_row_with_the_email_and_a_similar_name_links(
    client: redis.Redis, prefix: str
) -> None:
    resolver = policed(client, prefix)
    ada = customer(resolver)
    before = scored("support", "link")
    similar = change(
        "support", "u-2", email="ada@example.com", first_name="ada", last_name="Lovlace"
    )
    same_phone = change("support", "u-3", email="ada@example.com", phone=ADA_PHONE)
    assert resolver.resolve([similar, same_phone]) == [ada, ada]
    assert scored("support", "link") == before + 2
    entry = json.loads(client.hget(resolver.profile_key(ada), "support:u-2"))
    assert (entry["s"], entry["f"], entry["l"]) == ("support", "ada", "lovlace")
    # Profile key names carry no personal data; the values are the rows' own.
    names = {k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000)}
    assert not [name for name in names if "ada" in name.lower() or "DE123" in name]


def test_a_billing_row_with_a_matching_tax_id_links(client: redis.Redis, prefix: str) -> None:
    resolver = policed(client, prefix)
    ada = customer(resolver)
    other = change("billing", "A-2", tax_id="DE123", email="ap@other.example", first_name="X")
    assert resolver.resolve([other]) == [ada]


def test_a_record_a_stranger_founded_does_not_take_the_customers_crm_row(
    client: redis.Redis, prefix: str
) -> None:
    """The other order: the sign-up came first. A trusted CRM row meets a value only a
    low-trust row vouched for: review, unless the name or phone corroborates."""
    resolver = policed(client, prefix)
    [stranger] = resolver.resolve(
        [change("support", "u-1", email="ada@example.com", first_name="Mallory")]
    )
    [crm] = resolver.resolve_batch([change("crm", "1", **ADA)]).results
    assert crm.hold is not None and crm.hold.reason is HoldReason.REVIEW
    assert crm.hold.golden_id == stranger and crm.hold.scores["keys"] == {"email": "low"}
    [same_person] = resolver.resolve(
        [change("crm", "2", email="ada@example.com", first_name="Mallory")]
    )
    assert same_person == stranger


def test_below_the_review_band_a_row_founds_its_own_record(
    client: redis.Redis, prefix: str
) -> None:
    from streams.matchpolicy import MatchScoring

    policy = IdentityPolicy(matching=MatchPolicy(scoring=MatchScoring(low=0.3)))
    resolver = IdentityResolver(client, prefix, RULES, policy, key_secret=SECRET)
    ada = customer(resolver)
    before = scored("support", "new")
    [own] = resolver.resolve([change("support", "u-1", email="ada@example.com")])
    assert own == golden_id_for("support", "u-1") != ada
    assert scored("support", "new") == before + 1
    # The email stays indexed to Ada: first writer wins.
    assert client.get(resolver.match_key("email", "ada@example.com")) == ada.encode()


def test_a_candidate_that_changes_between_scoring_and_applying_is_scored_again(
    client: redis.Redis, prefix: str
) -> None:
    """Another worker re-points the email while this one scores: the apply script sees
    the candidate moved, reports it again, and the row is scored against the new one."""
    resolver = policed(client, prefix)
    ada = customer(resolver)
    [grace] = resolver.resolve(
        [change("crm", "9", email="grace@example.com", first_name="Mallory")]
    )
    calls: list[str] = []
    decide = resolver._decide

    def racing(*args: object) -> list[object]:
        outcome = args[3]
        calls.append(outcome[1][0])  # type: ignore[index]
        if len(calls) == 1:  # as if a merge moved the value to Grace's record meanwhile
            client.set(resolver.match_key("email", "ada@example.com"), grace)
        return decide(*args)  # type: ignore[arg-type]

    resolver._decide = racing  # type: ignore[method-assign]
    [result] = resolver.resolve([change("support", "u-1", email="ada@example.com",
                                        first_name="Mallory")])  # fmt: skip
    assert calls == [ada, grace]
    assert result == grace  # the name corroborates Grace's record, not Ada's


def test_concurrent_support_sign_ups_with_one_email_found_one_record_or_wait(
    stack: AccordSettings, prefix: str
) -> None:
    """Two support rows with one new email, racing: one founds the record; the other,
    scored against it, links (same name) - never two records for one customer."""
    start = threading.Barrier(2, timeout=30)
    results: dict[str, list[str | None]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        client = redis.Redis.from_url(stack.redis)
        resolver = policed(client, prefix)
        resolved: list[str | None] = []
        try:
            for i in range(100):
                start.wait()
                row = change("support", f"{name}-{i}", email=f"s{i}@x.io", first_name=f"P{i}")
                resolved += resolver.resolve([row])
        except BaseException as exc:
            errors.append(exc)
            start.abort()
        finally:
            client.close()
        results[name] = resolved

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert results["a"] == results["b"]
    assert None not in results["a"] and len(set(results["a"])) == 100


def test_a_profile_entry_follows_its_row_and_goes_with_its_delete(
    client: redis.Redis, prefix: str
) -> None:
    resolver = policed(client, prefix)
    ada, bob = resolver.resolve(
        [change("crm", "1", **ADA), change("crm", "2", email="bob@example.com")]
    )
    # A later change that carries only the phone keeps the name the row gave before.
    resolver.resolve([change("crm", "1", phone=ADA_PHONE)])
    entry = json.loads(client.hget(resolver.profile_key(ada), "crm:1"))
    assert (entry["f"], entry["l"], entry["p"]) == ("ada", "lovelace", ADA_PHONE)
    assert entry["k"]["email"] == resolver.match_key("email", ADA["email"]).rpartition(":")[2]
    resolver.link("crm", "1", bob)  # relinked: its entry moves with it
    assert client.hget(resolver.profile_key(ada), "crm:1") is None
    assert json.loads(client.hget(resolver.profile_key(bob), "crm:1"))["f"] == "ada"
    resolver.resolve([change("crm", "1", Op.DELETE)])  # deleted: it corroborates nothing
    assert client.hget(resolver.profile_key(bob), "crm:1") is None


def test_a_row_accord_made_for_a_sign_up_does_not_vouch_for_its_email(
    client: redis.Redis, prefix: str
) -> None:
    """A stranger signs up in support first; the CRM applier creates a CRM row for that
    record, with the stranger's values. That CRM row is Accord's copy, not CRM's word:
    the customer's billing account with the address is still reviewed, not linked."""
    resolver = policed(client, prefix)
    [stranger] = resolver.resolve(
        [change("support", "u-1", email="ada@example.com", first_name="Mallory")]
    )
    resolver.link("crm", "c-1", stranger)  # the CRM applier created the row
    echo = change("crm", "c-1", email="ada@example.com", first_name="Mallory")
    assert resolver.resolve([echo]) == [stranger]  # its CDC echo, through the xref
    entry = json.loads(client.hget(resolver.profile_key(stranger), "crm:c-1"))
    assert entry["a"] is True and entry["f"] == "mallory"
    [billing] = resolver.resolve_batch(
        [change("billing", "A-1", email="ada@example.com", tax_id="DE1")]
    ).results
    assert billing.hold is not None and billing.hold.reason is HoldReason.REVIEW
    assert billing.hold.scores["keys"] == {"email": "low"}
