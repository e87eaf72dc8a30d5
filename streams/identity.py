"""Identity resolution: which golden record a source row belongs to.

A source row, `(system, primary key)`, is linked to a golden id (its xref). A row seen
for the first time is matched to an existing golden record by deterministic match
rules on its already-normalized canonical values (exact comparison: mapping lower-cases
emails before this), or else gets a new golden id. The new id is derived from the row
(`golden_id_for`), so replaying a row after its xref was lost creates the same id.

Key layout, under the configured prefix (`WorkerSettings.redis_prefix`):

    xref:{system}:{key}      -> golden id of that source row (string)
    match:{field}:{value}    -> golden id first indexed for that value (string)
    links:{golden_id}        -> every source row linked to it, as "system:key" (set)
    identity-epoch           -> when these keys were first made or last rebuilt (string)

The epoch key is the sentinel of the rest: a Redis that lost its data (FLUSHALL, a restart
without persistence) has lost it too. A guarded resolver (what workers and appliers run)
refuses to create or link anything while it is missing, inside the same script, so no
batch can slip in between a check and a resolve; `streams.relink` rebuilds the keys from
the golden records and writes it again.

Resolution runs as one Lua script per batch, so it is atomic: two workers resolving
rows of the same new customer from different systems at the same time end with one
golden id, and a batch costs one round trip. The script computes key names from the
prefix instead of declaring them, so it needs a single Redis node, not a cluster.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from streams.dedupe import RedisUnavailable, redis_errors
from streams.errors import ConfigError
from streams.model import FIELDS, SYSTEMS, Change, Op

# Fixed forever: golden records store ids derived from it, and replays must recreate them.
GOLDEN_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:accord:golden")
REBUILD_BATCH = 500

EPOCH_KEY = "identity-epoch"
LOST_MARKER = "ACCORD_IDENTITY_LOST"

# KEYS[1] (guarded resolvers only): the epoch key; the guard below refuses a batch without it.
# ARGV[1]: key prefix. ARGV[2]: JSON list, one entry per change, in batch order:
# [system, key, is_delete, new_golden_id, [[field, value], ...match candidates in rule order]].
# Returns one golden id per change, "" for a delete of an unknown row.
RESOLVE_SCRIPT = """
if KEYS[1] and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('ACCORD_IDENTITY_LOST ' .. KEYS[1] .. ' is missing')
end
local prefix = ARGV[1]
local out = {}
for i, c in ipairs(cjson.decode(ARGV[2])) do
  local link = c[1] .. ':' .. c[2]
  local xref = prefix .. 'xref:' .. link
  local gid = redis.call('GET', xref)
  if c[3] then
    out[i] = gid or ''
  else
    if not gid then
      for _, m in ipairs(c[5]) do
        gid = redis.call('GET', prefix .. 'match:' .. m[1] .. ':' .. m[2])
        if gid then break end
      end
      gid = gid or c[4]
      redis.call('SET', xref, gid)
    end
    redis.call('SADD', prefix .. 'links:' .. gid, link)
    for _, m in ipairs(c[5]) do
      redis.call('SET', prefix .. 'match:' .. m[1] .. ':' .. m[2], gid, 'NX')
    end
    out[i] = gid
  end
end
return out
"""

# KEYS: xref key (and the epoch key, guarded). ARGV: prefix, "system:key", golden id.
# Moves the row out of the link set of the golden record it pointed to before, if any.
LINK_SCRIPT = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('ACCORD_IDENTITY_LOST ' .. KEYS[2] .. ' is missing')
end
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[3] then
  redis.call('SREM', ARGV[1] .. 'links:' .. old, ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SADD', ARGV[1] .. 'links:' .. ARGV[3], ARGV[2])
return 1
"""


class IdentityLost(RedisUnavailable):
    """Redis no longer holds Accord's identity keys (its epoch key is gone).

    A `RedisUnavailable`: whoever gets it retries later, having created nothing (ingest
    reads its batch again, an applier retries its event), once `streams.relink` has
    rebuilt the keys.
    """


@contextmanager
def _lost_identities() -> Iterator[None]:
    """The guard's error reply as `IdentityLost`; other Redis errors pass untouched."""
    try:
        yield
    except redis.ResponseError as exc:
        if str(exc).startswith(LOST_MARKER):
            raise IdentityLost(f"Redis lost Accord's identity keys: {exc}") from exc
        raise


@dataclass(frozen=True)
class MatchRule:
    """Rows carrying the same value of `field` are one customer.

    The rule applies to rows of `systems` only (None: every system), both for finding
    a golden record and for indexing values: a system whose values of that field are
    not trusted neither matches nor is matched by them.
    """

    field: str
    systems: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.field not in FIELDS:
            raise ConfigError(f"match rule on unknown canonical field {self.field!r}")
        if self.systems is not None:
            unknown = sorted(set(self.systems) - set(SYSTEMS))
            if not self.systems or unknown:
                raise ConfigError(
                    f"match rule on {self.field!r}: systems must be some of "
                    f"{', '.join(SYSTEMS)} (or none for all), got {self.systems!r}"
                )

    def applies_to(self, system: str) -> bool:
        return self.systems is None or system in self.systems


def golden_id_for(system: str, key: str) -> str:
    """The golden id a row founds when nothing matches it: the same on every replay."""
    return str(uuid.uuid5(GOLDEN_NAMESPACE, f"{system}:{key}"))


def match_text(value: object) -> str | None:
    """A canonical value as the text match keys compare, or None when it is empty."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text or None


def match_candidates(
    system: str, values: Mapping[str, object], rules: Sequence[MatchRule]
) -> list[tuple[str, str]]:
    """The `(field, value)` pairs a row of `system` is matched and indexed by, in rule order."""
    return _candidates(values, [rule for rule in rules if rule.applies_to(system)])


def rebuild_candidates(
    links: Sequence[tuple[str, str]], values: Mapping[str, object], rules: Sequence[MatchRule]
) -> list[tuple[str, str]]:
    """The `(field, value)` pairs a golden record is indexed by when rebuilding.

    Golden values no longer say which system gave them, so a rule is used when it
    applies to at least one system linked to the record.
    """
    systems = {system for system, _ in links}
    return _candidates(values, [rule for rule in rules if any(rule.applies_to(s) for s in systems)])


def _candidates(values: Mapping[str, object], rules: Sequence[MatchRule]) -> list[tuple[str, str]]:
    candidates: list[tuple[str, str]] = []
    for rule in rules:
        text = match_text(values.get(rule.field))
        if text is not None and (rule.field, text) not in candidates:
            candidates.append((rule.field, text))
    return candidates


def parse_link(member: str) -> tuple[str, str]:
    """`"system:key"` back to `(system, key)`; the key may itself hold colons."""
    system, sep, key = member.partition(":")
    if not sep:
        raise ValueError(f"not a system:key link: {member!r}")
    return system, key


class IdentityResolver:
    """Finds or creates the golden id of source rows, atomically, one round trip a batch.

    `guarded`: `resolve` and `link` raise `IdentityLost` instead of creating anything
    while the epoch key is missing (workers and appliers run guarded; a tool or test on
    a private prefix of its own may not).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        rules: Sequence[MatchRule],
        guarded: bool = False,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._rules = tuple(rules)
        self._guard = [self.epoch_key] if guarded else []
        self._resolve = client.register_script(RESOLVE_SCRIPT)
        self._link = client.register_script(LINK_SCRIPT)

    @property
    def rules(self) -> tuple[MatchRule, ...]:
        return self._rules

    def key(self, name: str) -> str:
        """A key of this resolver's prefix."""
        return f"{self._prefix}{name}"

    @property
    def epoch_key(self) -> str:
        return self.key(EPOCH_KEY)

    def xref_key(self, system: str, key: str) -> str:
        return f"{self._prefix}xref:{system}:{key}"

    def links_key(self, golden_id: str) -> str:
        return f"{self._prefix}links:{golden_id}"

    def match_key(self, field: str, value: str) -> str:
        return f"{self._prefix}match:{field}:{value}"

    def resolve(self, changes: Sequence[Change]) -> list[str | None]:
        """The golden id of each change, in order; None for a delete of an unknown row.

        For an upsert: its xref if the row is known; else the golden id indexed for the
        first match rule (in rule order) whose value it carries and that is indexed;
        else a new id. The xref and link are recorded, and every match value the row
        carries is indexed to its golden id unless already indexed (first writer wins).
        A delete only reads the xref: it never creates or matches anything. Guarded,
        raises `IdentityLost` (nothing done) while the epoch key is missing.
        """
        if not changes:
            return []
        batch = [
            [
                change.system,
                change.source_key,
                change.op is Op.DELETE,
                golden_id_for(change.system, change.source_key),
                match_candidates(change.system, change.values, self._rules),
            ]
            for change in changes
        ]
        payload = json.dumps(batch, ensure_ascii=False, separators=(",", ":"))
        with redis_errors(f"resolving identities of {len(changes)} changes"), _lost_identities():
            result = self._resolve(keys=self._guard, args=[self._prefix, payload])
        return [_decoded(golden_id) or None for golden_id in result]

    def link(self, system: str, key: str, golden_id: str) -> None:
        """Record that a row an applier created in `system` belongs to `golden_id`.

        So the change Debezium captures from that write resolves to the same record.
        """
        with redis_errors(f"linking {system}:{key}"), _lost_identities():
            self._link(
                keys=[self.xref_key(system, key), *self._guard],
                args=[self._prefix, f"{system}:{key}", golden_id],
            )

    def lookup(self, system: str, key: str) -> str | None:
        with redis_errors(f"looking up {system}:{key}"):
            return _decoded(self._client.get(self.xref_key(system, key)))

    def links(self, golden_id: str) -> list[tuple[str, str]]:
        """Every `(system, key)` linked to a golden record, sorted."""
        with redis_errors(f"reading the links of {golden_id}"):
            members = self._client.smembers(self.links_key(golden_id))
        return sorted(parse_link(_decoded(member) or "") for member in members)

    def rebuild(
        self,
        records: Iterable[tuple[str, Sequence[tuple[str, str]], Mapping[str, object]]],
        batch_size: int = REBUILD_BATCH,
    ) -> int:
        """Restore xrefs, link sets and match keys from golden records after losing Redis.

        Records are `(golden_id, links, canonical values)`. Xrefs and link sets are
        rewritten to what the records say; match keys keep first-writer-wins, so a value
        two records share stays with whichever was indexed first. Returns how many
        golden records were restored.
        """
        restored = 0
        pending = 0
        pipe = self._client.pipeline(transaction=False)
        for golden_id, links, values in records:
            pipe.delete(self.links_key(golden_id))
            for system, key in links:
                pipe.set(self.xref_key(system, key), golden_id)
                pipe.sadd(self.links_key(golden_id), f"{system}:{key}")
            for field, text in rebuild_candidates(links, values, self._rules):
                pipe.set(self.match_key(field, text), golden_id, nx=True)
            pending += 1
            if pending == batch_size:
                restored += self._flush(pipe, pending)
                pending = 0
        if pending:
            restored += self._flush(pipe, pending)
        return restored

    def _flush(self, pipe: redis.client.Pipeline, records: int) -> int:
        with redis_errors(f"rebuilding identities of {records} golden records"):
            pipe.execute()
        return records


def _decoded(value: bytes | str | None) -> str | None:
    """Redis replies as bytes unless the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
