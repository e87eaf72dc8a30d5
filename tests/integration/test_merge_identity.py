"""`IdentityResolver.merge` against the real Redis: a merged record's rows, match keys
and holds move to the survivor in one script, lookups follow the pointer it leaves, and
a merge that cannot be made is refused with the reason."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from streams.identity import IdentityPolicy, IdentityResolver, MergeRefused
from streams.settings import AccordSettings
from tests.integration.test_identity import (
    RULES,
    SECRET,
    TRUST_ALL,
    change,
    delete_prefix,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def client(stack: AccordSettings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis)
    yield client
    client.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    delete_prefix(client, prefix)


def _resolver(client: redis.Redis, prefix: str, cap: int = 20) -> IdentityResolver:
    policy = IdentityPolicy(max_rows_per_record=cap, matching=TRUST_ALL)
    return IdentityResolver(client, prefix, RULES, policy, key_secret=SECRET)


def test_a_merge_moves_rows_match_keys_and_lookups_to_the_survivor(
    client: redis.Redis, prefix: str
) -> None:
    identity = _resolver(client, prefix)
    [ada, twin] = identity.resolve(
        [change("crm", "1", email="ada@example.com"), change("crm", "2", email="al@example.net")]
    )
    assert ada != twin

    result = identity.merge(ada, twin)
    assert (result.moved, result.rows, result.already) == (["crm:2"], 2, False)
    assert identity.lookup("crm", "2") == ada
    assert sorted(identity.links(ada)) == [("crm", "1"), ("crm", "2")]
    assert identity.links(twin) == []
    assert identity.merged_into(twin) == ada and identity.merged_into(ada) is None
    assert client.hexists(identity.profile_key(ada), "crm:2")

    # A new row with the merged record's email finds the survivor: its key was re-pointed.
    [found] = identity.resolve([change("support", "s-1", email="al@example.net")])
    assert found == ada
    # An applier linking a row to the merged record links it to the survivor.
    identity.link("billing", "AC-1", twin)
    assert identity.lookup("billing", "AC-1") == ada

    again = identity.merge(ada, twin)
    assert again.already and again.moved == []


def test_merges_that_cannot_be_made_are_refused_with_the_reason(
    client: redis.Redis, prefix: str
) -> None:
    identity = _resolver(client, prefix, cap=2)
    a, b, c = identity.resolve(
        [
            change("crm", "1", email="a@example.com"),
            change("crm", "2", email="b@example.com"),
            change("crm", "3", email="c@example.com"),
        ]
    )
    identity.resolve([change("support", "s-3", email="c@example.com")])  # c links two rows

    def refused(survivor: str, loser: str) -> str:
        with pytest.raises(MergeRefused) as caught:
            identity.merge(survivor, loser)
        return caught.value.reason

    assert refused(a, a) == "a record cannot be merged into itself"
    nowhere = str(uuid.uuid4())
    assert refused(a, nowhere) == f"no golden record {nowhere} links any row"
    assert "identity.max_rows_per_record: 2" in refused(a, c)  # 1 + 2 rows past the cap
    identity.merge(a, b)
    assert refused(c, b) == f"{b} was merged into {a} already"
    assert refused(b, c) == f"{b} was merged into {a}: merge into {a}"
