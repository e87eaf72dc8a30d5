"""Identity resolution: which golden record a source row belongs to.

A source row, `(system, primary key)`, is linked to a golden id (its xref). A row seen
for the first time is matched by the match policy (`streams.matchpolicy`): the golden
records its match values (already normalized by the mappings) are indexed to are its
candidates; the best-scoring one is linked (score at least `identity.scoring.auto_link`),
or the row is held for review (inside the review band), or it gets a new golden id. The
new id is derived from the row (`golden_id_for`), so replaying a row after its xref was
lost creates the same id.

Key layout, under the configured prefix (`WorkerSettings.redis_prefix`):

    xref:{system}:{key}      -> golden id of that source row (string)
    hmatch:{field}:{digest}  -> golden id first indexed for that value (string); the
                                digest is a keyed hash of the value (`streams.matchkeys`)
    match-key-check          -> which secret made the hmatch keys (string)
    links:{golden_id}        -> every source row linked to it, as "system:key" (set)
    profile:{golden_id}      -> "system:key" -> that row's own normalized name, phone and
                                match value digests, JSON (hash; `streams.matchpolicy`)
    held                     -> "system:key" -> JSON of why that row is held (hash)
    held-for:{golden_id}     -> rows held for review with that record as candidate (set;
                                may name rows no longer held: `streams.corroborate`)
    rescore                  -> golden ids whose review holds want scoring again: the
                                record's profile or a held row changed (set)
    merged:{golden_id}       -> the record it was merged into (`accord merge`; string)
    identity-epoch           -> when these keys were first made or last rebuilt (string)

A row that would make a golden record link more than `IdentityPolicy.max_rows_per_record`
rows, whose only way to a record is a role address (`info@`, `billing@`, ...), or whose
best candidate scores inside the review band, is *held*: it gets no xref, no golden id
and indexes nothing, so nothing downstream sees it; the hold records why until a review
decides. A held row stays held through its later changes, until a review decides or,
for a review hold, until scoring it again against its candidate links it
(`streams.corroborate`); its delete releases it. Role addresses are never indexed nor
matched: many people share them, so they say nothing about who a row is.

The epoch key is the sentinel of the rest: a Redis that lost its data (FLUSHALL, a restart
without persistence) has lost it too. A guarded resolver (what workers and appliers run)
refuses to create or link anything while it is missing, inside the same script, so no
batch can slip in between a check and a resolve; `streams.relink` rebuilds the keys from
the golden records and writes it again.

Resolution runs as one Lua script per batch, so it is atomic: two workers resolving
rows of the same new customer from different systems at the same time end with one
golden id, and two workers cannot both pass the cap. Scoring needs Python: a change with
candidates comes back from the script with them and their match profiles, is scored, and
is passed again with its decision and the golden id each candidate pointed to; the
script applies it only if they still do (else it reports them again). A batch costs one
round trip, two when it has candidates. Match
key names are computed here (their hashes need the secret) and passed as KEYS; xref, link
and hold names the script still computes from the prefix, so it needs a single Redis node,
not a cluster.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
from prometheus_client import Counter

from streams.dedupe import RedisUnavailable, redis_errors
from streams.errors import AccordError, ConfigError
from streams.matchkeys import (
    MatchKeys,
    MigrationReport,
    check_secret,
    drop_match_keys,
    migrate_legacy_keys,
)
from streams.matchpolicy import (
    Decision,
    MatchPolicy,
    MatchSide,
    decide,
    profile_entry,
    score,
)
from streams.model import FIELDS, SYSTEMS, Change, Op

log = logging.getLogger(__name__)

# Fixed forever: golden records store ids derived from it, and replays must recreate them.
GOLDEN_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:accord:golden")
REBUILD_BATCH = 500

EPOCH_KEY = "identity-epoch"
LOST_MARKER = "ACCORD_IDENTITY_LOST"
# Rounds of score-then-apply a batch may take: another worker changing a candidate
# between this one's read and its apply costs a round; this many means contention gone
# wrong, and the batch is retried as a whole.
MAX_SCORE_ROUNDS = 8
REBUILT_PROFILE = "*"  # the profile field a rebuild writes: the golden record's own values

SCORED = Counter(
    "accord_identity_scored_total",
    "New rows scored against a candidate golden record by the match policy, by decision",
    ["system", "decision"],  # decision: link, review, new
)

# The golden id a record merged into others (`accord merge`) ends at: `merged:{id}` points
# from a merged record to the one it was merged into (a chain when that one was merged
# in turn). A match key or an applier's link that still names a merged record lands on
# the record that took its rows.
FOLLOW_MERGED = """
local function follow(prefix, gid)
  for _ = 1, 32 do
    if not gid then
      return gid
    end
    local into = redis.call('GET', prefix .. 'merged:' .. gid)
    if not into then
      return gid
    end
    gid = into
  end
  return gid
end
"""

# KEYS[1]: the epoch key (guarded: ARGV[5] "1"). ARGV: prefix, survivor, loser, max rows
# per record. Moves every row of the loser to the survivor: xref, link, profile entry, and
# each match key that named the loser; review holds waiting on the loser wait on the
# survivor (and are scored again); `merged:{loser}` points at the survivor. Returns JSON
# [outcome, detail, rows moved]: "merged" (detail: rows the survivor links now),
# "already" (the same merge was made before), "same", "loser_merged" / "survivor_merged"
# (detail: the record it was merged into), "no_record" (detail: the id that links no
# row), "full" (detail: the rows the two would link).
MERGE_SCRIPT = """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('ACCORD_IDENTITY_LOST ' .. KEYS[1] .. ' is missing')
end
local prefix, survivor, loser = ARGV[1], ARGV[2], ARGV[3]
if survivor == loser then
  return cjson.encode({'same', survivor, {}})
end
local into = redis.call('GET', prefix .. 'merged:' .. loser)
if into then
  if into == survivor then
    return cjson.encode({'already', redis.call('SCARD', prefix .. 'links:' .. survivor), {}})
  end
  return cjson.encode({'loser_merged', into, {}})
end
into = redis.call('GET', prefix .. 'merged:' .. survivor)
if into then
  return cjson.encode({'survivor_merged', into, {}})
end
local rows = redis.call('SCARD', prefix .. 'links:' .. survivor)
local moving = redis.call('SCARD', prefix .. 'links:' .. loser)
if rows == 0 then
  return cjson.encode({'no_record', survivor, {}})
end
if moving == 0 then
  return cjson.encode({'no_record', loser, {}})
end
if rows + moving > tonumber(ARGV[4]) then
  return cjson.encode({'full', rows + moving, {}})
end
local moved = redis.call('SMEMBERS', prefix .. 'links:' .. loser)
local profile = prefix .. 'profile:' .. loser
for _, link in ipairs(moved) do
  redis.call('SET', prefix .. 'xref:' .. link, survivor)
  redis.call('SADD', prefix .. 'links:' .. survivor, link)
  local entry = redis.call('HGET', profile, link)
  if entry then
    redis.call('HSET', prefix .. 'profile:' .. survivor, link, entry)
    for name, digest in pairs(cjson.decode(entry)['k'] or {}) do
      local key = prefix .. 'hmatch:' .. name .. ':' .. digest
      if redis.call('GET', key) == loser then
        redis.call('SET', key, survivor)
      end
    end
  end
end
local rebuilt = redis.call('HGET', profile, '*')
if rebuilt then
  redis.call('HSET', prefix .. 'profile:' .. survivor, '*' .. loser, rebuilt)
end
redis.call('DEL', prefix .. 'links:' .. loser, profile)
redis.call('SET', prefix .. 'merged:' .. loser, survivor)
for _, link in ipairs(redis.call('SMEMBERS', prefix .. 'held-for:' .. loser)) do
  local text = redis.call('HGET', prefix .. 'held', link)
  if text then
    local hold = cjson.decode(text)
    if hold['golden_id'] == loser then
      hold['golden_id'] = survivor
      redis.call('HSET', prefix .. 'held', link, cjson.encode(hold))
      redis.call('SADD', prefix .. 'held-for:' .. survivor, link)
    end
  end
end
redis.call('DEL', prefix .. 'held-for:' .. loser)
redis.call('SADD', prefix .. 'rescore', survivor)
return cjson.encode({'merged', rows + moving, moved})
"""

# KEYS[1]: the epoch key; ARGV[5] "1" (guarded resolvers) refuses a batch without it.
# KEYS[2..]: the match keys the batch reads or writes (`MatchKeys.key`).
# ARGV[1]: key prefix. ARGV[2]: JSON list, one entry per change, in batch order:
# [system, key, is_delete, new_golden_id, [[field, value, index in KEYS], ...match
# candidates in rule order, role addresses left out], role address carried ("" for none),
# profile entry ("" for none: `streams.matchpolicy.profile_entry`), decision].
# The decision is false on a change's first pass, else what scoring decided from the
# candidates this script reported: [kind ("link", "review" or "new"), golden id,
# [golden id each candidate pointed to then, "" for none], hold fields (an object)].
# ARGV[3]: max rows per record. ARGV[4]: now, ms since the epoch.
# Returns JSON [[outcome per change], rows held]; an outcome is ["golden", id],
# ["unknown"] (a delete of an unknown row), ["held", hold JSON], ["released"],
# ["score", [golden id per candidate, "" for none], {golden id: profile as HGETALL}]
# (a new row some candidate points to: nothing done, score it and pass it again with
# the decision; also when a decision's candidates changed since) or ["again"] (a later
# change of a row waiting for its score: pass it again after that one).
RESOLVE_SCRIPT = (
    FOLLOW_MERGED
    + """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('ACCORD_IDENTITY_LOST ' .. KEYS[1] .. ' is missing')
end
local prefix = ARGV[1]
local cap = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local held = prefix .. 'held'
local waiting = {}
local out = {}
local function merged_entry(old, entry)
  local merged = cjson.decode(old)
  local new = cjson.decode(entry)
  local keys = merged['k'] or {}
  for name, digest in pairs(new['k'] or {}) do
    keys[name] = digest
  end
  for name, value in pairs(new) do
    merged[name] = value
  end
  merged['k'] = keys
  return cjson.encode(merged)
end
local function put_profile(gid, link, entry)
  if entry == '' then
    return
  end
  local key = prefix .. 'profile:' .. gid
  local old = redis.call('HGET', key, link)
  if old then
    if old == entry then
      return
    end
    entry = merged_entry(old, entry)
  end
  redis.call('HSET', key, link, entry)
  if redis.call('EXISTS', prefix .. 'held-for:' .. gid) == 1 then
    redis.call('SADD', prefix .. 'rescore', gid)
  end
end
local function candidates(c)
  local found = {}
  local profiles = {}
  local any = false
  for j, m in ipairs(c[5]) do
    local gid = follow(prefix, redis.call('GET', KEYS[m[3]]))
    found[j] = gid or ''
    if gid then
      any = true
      if not profiles[gid] then
        profiles[gid] = redis.call('HGETALL', prefix .. 'profile:' .. gid)
      end
    end
  end
  return any, found, profiles
end
for i, c in ipairs(cjson.decode(ARGV[2])) do
  local link = c[1] .. ':' .. c[2]
  local xref = prefix .. 'xref:' .. link
  local gid = redis.call('GET', xref)
  local hold = nil
  local decision = c[8]
  if waiting[link] then
    out[i] = {'again'}
  elseif c[3] then
    if gid then
      redis.call('HDEL', prefix .. 'profile:' .. gid, link)
      out[i] = {'golden', gid}
    elseif redis.call('HDEL', held, link) == 1 then
      out[i] = {'released'}
    else
      out[i] = {'unknown'}
    end
  else
    if not gid then
      local known = redis.call('HGET', held, link)
      if known then
        hold = cjson.decode(known)
        hold['updates'] = hold['updates'] + 1
        hold['last_seen_ms'] = now
        if hold['reason'] == 'review' and hold['golden_id'] and c[7] ~= '' then
          if hold['entry'] then
            hold['entry'] = merged_entry(hold['entry'], c[7])
          else
            hold['entry'] = c[7]
          end
          redis.call('SADD', prefix .. 'held-for:' .. hold['golden_id'], link)
          redis.call('SADD', prefix .. 'rescore', hold['golden_id'])
        end
      else
        local any, found, profiles = candidates(c)
        local kind = 'new'
        if decision then
          kind = decision[1]
          for j, expected in ipairs(decision[3]) do
            if found[j] ~= expected then
              kind = 'score'
            end
          end
        elseif any then
          kind = 'score'
        end
        if kind == 'score' then
          waiting[link] = true
          out[i] = {'score', found, profiles}
        elseif kind == 'link' then
          gid = decision[2]
          local rows = redis.call('SCARD', prefix .. 'links:' .. gid)
          if rows >= cap then
            hold = decision[4]
            hold['reason'] = 'max_rows_per_record'
            hold['golden_id'] = gid
            hold['rows'] = rows
            hold['cap'] = cap
          end
        elseif kind == 'review' then
          hold = decision[4]
          if c[7] ~= '' then
            hold['entry'] = c[7]
          end
          redis.call('SADD', prefix .. 'held-for:' .. decision[2], link)
        elseif c[6] ~= '' then
          hold = {reason = 'role_address', match = {'email', c[6]}}
        else
          gid = c[4]
        end
        if hold then
          hold['since_ms'] = now
          hold['last_seen_ms'] = now
          hold['updates'] = 0
        elseif gid then
          redis.call('SET', xref, gid)
        end
      end
    end
    if hold then
      local text = cjson.encode(hold)
      redis.call('HSET', held, link, text)
      out[i] = {'held', text}
    elseif gid then
      redis.call('SADD', prefix .. 'links:' .. gid, link)
      for _, m in ipairs(c[5]) do
        redis.call('SET', KEYS[m[3]], gid, 'NX')
      end
      put_profile(gid, link, c[7])
      out[i] = {'golden', gid}
    end
  end
end
return cjson.encode({out, redis.call('HLEN', held)})
"""
)

# KEYS: xref key (and the epoch key, guarded). ARGV: prefix, "system:key", golden id.
# Moves the row out of the link set of the golden record it pointed to before, if any,
# and its match profile entry with it. A hold on the row ends: an applier wrote the
# record's values into it, so it is that record's row now. A row without a profile entry
# gets one marked `"a"` (linked by Accord): its later values are the record's, copied,
# so they never vouch for a match value (`streams.matchpolicy.MatchSide.vouches`).
LINK_SCRIPT = (
    FOLLOW_MERGED
    + """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('ACCORD_IDENTITY_LOST ' .. KEYS[2] .. ' is missing')
end
ARGV[3] = follow(ARGV[1], ARGV[3])
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[3] then
  redis.call('SREM', ARGV[1] .. 'links:' .. old, ARGV[2])
  local entry = redis.call('HGET', ARGV[1] .. 'profile:' .. old, ARGV[2])
  if entry then
    redis.call('HDEL', ARGV[1] .. 'profile:' .. old, ARGV[2])
    redis.call('HSET', ARGV[1] .. 'profile:' .. ARGV[3], ARGV[2], entry)
  end
end
local system = string.match(ARGV[2], '^([^:]*)')
redis.call('HSETNX', ARGV[1] .. 'profile:' .. ARGV[3], ARGV[2],
           cjson.encode({s = system, k = {}, a = true}))
redis.call('HDEL', ARGV[1] .. 'held', ARGV[2])
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SADD', ARGV[1] .. 'links:' .. ARGV[3], ARGV[2])
return 1
"""
)


class IdentityLost(RedisUnavailable):
    """Redis no longer holds Accord's identity keys (its epoch key is gone).

    A `RedisUnavailable`: whoever gets it retries later, having created nothing (ingest
    reads its batch again, an applier retries its event), once `streams.relink` has
    rebuilt the keys.
    """


class MergeRefused(AccordError):
    """Two golden records that cannot be merged, and why."""

    def __init__(self, survivor: str, loser: str, reason: str) -> None:
        super().__init__(f"cannot merge {loser} into {survivor}: {reason}")
        self.survivor = survivor
        self.loser = loser
        self.reason = reason


@dataclass(frozen=True)
class MergeResult:
    """What a merge moved in Redis."""

    survivor: str
    loser: str
    rows: int  # rows the survivor links now
    moved: list[str]  # the loser's rows ("system:key"), now the survivor's
    already: bool = False  # the same merge was made before: nothing moved this time


class IdentityContended(RedisUnavailable):
    """A batch's candidates kept changing under it (`MAX_SCORE_ROUNDS`): retried whole,
    like a Redis outage; the changes it did resolve resolve the same way again."""


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


class HoldReason(StrEnum):
    """Why a row is held instead of linked."""

    MAX_ROWS = "max_rows_per_record"  # its match found a record that links the most rows
    ROLE_ADDRESS = "role_address"  # a role address was its only way to a record
    REVIEW = "review"  # its best candidate scored inside the review band (match policy)


# Why 20: a customer has one row per system, and a few more where people sign up twice
# or a household or small office shares an address; tens cover those. Each linked row
# costs the golden record its last values and sent-value history (up to ~0.5 KB) and one
# sink order per change, so 20 rows keep a record near 10 KB, far below Kafka's 1 MB.
DEFAULT_MAX_ROWS_PER_RECORD = 20
# Local parts of shared mailboxes: many people write from them, so they identify nobody.
DEFAULT_ROLE_ADDRESSES = (
    "info", "billing", "support", "noreply", "no-reply", "donotreply", "do-not-reply",
    "sales", "admin", "contact", "office", "hello", "team", "help", "accounts",
    "accounting", "finance", "invoices", "orders", "marketing", "hr", "mail",
    "postmaster", "webmaster",
)  # fmt: skip
ROLE_ADDRESS_FIELD = "email"  # the canonical field role addresses are looked for in


def role_local_part(address: str) -> str:
    """The mailbox an address names, as role addresses are compared: lower-cased, blanks
    trimmed, a `+tag` dropped (`Info+EU@x.com ` -> `info`); "" when it is no address."""
    local, at, _domain = address.strip().lower().rpartition("@")
    return local.partition("+")[0].strip() if at else ""


@dataclass(frozen=True)
class IdentityPolicy:
    """When a row is held rather than linked (`identity:` in the survivorship rules)."""

    max_rows_per_record: int = DEFAULT_MAX_ROWS_PER_RECORD
    role_addresses: frozenset[str] = field(
        default_factory=lambda: frozenset(DEFAULT_ROLE_ADDRESSES)
    )
    matching: MatchPolicy = field(default_factory=MatchPolicy)  # trust and scoring

    def __post_init__(self) -> None:
        cap = self.max_rows_per_record
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ConfigError(f"identity.max_rows_per_record must be at least 1, got {cap!r}")
        names = frozenset(name.strip().lower().rstrip("@") for name in self.role_addresses)
        if "" in names or any("@" in name or "+" in name for name in names):
            raise ConfigError(
                "identity.role_addresses: each entry is a mailbox name such as `info`, "
                f"got {sorted(self.role_addresses)!r}"
            )
        object.__setattr__(self, "role_addresses", names)

    def is_role_address(self, address: str) -> bool:
        return role_local_part(address) in self.role_addresses

    def admits(self, rows_linked: int) -> bool:
        """Whether a record linking `rows_linked` rows may link one more.

        The resolve script applies the same test inside Redis, where it is atomic."""
        return rows_linked < self.max_rows_per_record

    def split(self, candidates: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
        """A row's match candidates without role addresses, and the role address it
        carries ("" for none): the one is matched and indexed, the other never is."""
        trusted: list[tuple[str, str]] = []
        role = ""
        for name, value in candidates:
            if name == ROLE_ADDRESS_FIELD and self.is_role_address(value):
                role = role or value
            else:
                trusted.append((name, value))
        return trusted, role


@dataclass(frozen=True)
class Hold:
    """A held row: what the resolve script recorded in the `held` hash."""

    system: str
    key: str
    reason: HoldReason
    golden_id: str | None = None  # the record it would have joined (max rows only)
    rows: int | None = None  # how many rows that record linked when this one was held
    cap: int | None = None  # identity.max_rows_per_record then
    match: tuple[str, str] | None = None  # the (field, value) that led to the record
    since_ms: int = 0
    last_seen_ms: int = 0
    updates: int = 0  # changes of the row held since the first
    # A scored match (review, and a cap hold of a scored link): `Score.as_dict`, and the
    # policy's thresholds with the decision (`{"auto_link", "review", "decision"}`).
    scores: Mapping[str, Any] | None = None
    policy: Mapping[str, Any] | None = None
    # A review hold: the held row's own profile entry (`streams.matchpolicy.profile_entry`,
    # merged over its later changes), what scoring it again compares
    # (`streams.corroborate`).
    entry: str | None = None

    @classmethod
    def parse(cls, link: str, text: str) -> Hold:
        system, key = parse_link(link)
        data = json.loads(text)
        match = data.get("match")
        return cls(
            system,
            key,
            HoldReason(data["reason"]),
            data.get("golden_id"),
            data.get("rows"),
            data.get("cap"),
            (match[0], match[1]) if match else None,
            int(data.get("since_ms", 0)),
            int(data.get("last_seen_ms", 0)),
            int(data.get("updates", 0)),
            data.get("scores") or None,
            data.get("policy") or None,
            data.get("entry") or None,
        )

    def describe(self) -> str:
        """Why the row is held, in words with no personal data (a role address shows its
        mailbox, not its domain): fit for logs."""
        if self.reason is HoldReason.ROLE_ADDRESS:
            mailbox = role_local_part(self.match[1]) if self.match else "?"
            return (
                f"its only match is the role address {mailbox}@…, "
                "which many people share (identity.role_addresses)"
            )
        by = f" by {self.match[0]}" if self.match else ""
        if self.reason is HoldReason.REVIEW:
            return f"matched{by} golden record {self.golden_id}, {self._scored()}"
        return (
            f"matched{by} golden record {self.golden_id}, which already links {self.rows} "
            f"rows (identity.max_rows_per_record: {self.cap})"
        )

    def _scored(self) -> str:
        """The scores of a review hold, in words."""
        scores = self.scores or {}
        policy = self.policy or {}
        keys = ", ".join(f"{name} ({trust})" for name, trust in (scores.get("keys") or {}).items())
        return (
            f"scoring {scores.get('total')} (keys {keys or 'none'}: {scores.get('key')}; name "
            f"similarity {scores.get('name_similarity')}: {scores.get('name')}; same phone: "
            f"{scores.get('phone')}), inside the review band [{policy.get('review')}, "
            f"{policy.get('auto_link')}) of identity.scoring: held for review"
        )


@dataclass(frozen=True)
class Resolution:
    """What identity made of one change: a golden id, a hold, or neither (a delete of a
    row never seen: `released` when it was a held row's, whose hold it ended)."""

    golden_id: str | None = None
    hold: Hold | None = None
    released: bool = False


@dataclass(frozen=True)
class BatchResolution:
    results: list[Resolution]
    held_rows: int  # rows held now, across every worker sharing the prefix


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

    `key_secret` names the match keys (`streams.matchkeys`); a resolver with match rules
    needs it. Before its first batch (or rebuild) such a resolver checks that the keys
    under its prefix were made with that secret (`MatchKeySecretChanged` if not) and
    renames clear-text match keys an earlier version left, so no row misses the record
    its value was indexed to and founds a duplicate.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        rules: Sequence[MatchRule],
        policy: IdentityPolicy | None = None,
        guarded: bool = False,
        key_secret: bytes | None = None,
    ) -> None:
        if rules and not key_secret:
            raise ConfigError("identity: match rules need a key secret (identity.key_secret)")
        self._client = client
        self._prefix = prefix
        self._rules = tuple(rules)
        self._policy = policy or IdentityPolicy()
        self._guarded = guarded
        self._guard = [self.epoch_key] if guarded else []
        self._match_keys = MatchKeys(prefix, key_secret) if key_secret else None
        self._prepared = not self._rules
        self._resolve = client.register_script(RESOLVE_SCRIPT)
        self._link = client.register_script(LINK_SCRIPT)
        self._merge = client.register_script(MERGE_SCRIPT)

    @property
    def rules(self) -> tuple[MatchRule, ...]:
        return self._rules

    @property
    def client(self) -> redis.Redis:
        return self._client

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

    def profile_key(self, golden_id: str) -> str:
        """The match profile of a golden record: per linked row (`system:key`), that
        row's own normalized name, phone and match value digests (JSON:
        `streams.matchpolicy.profile_entry`); what scoring compares a new row with."""
        return f"{self._prefix}profile:{golden_id}"

    @property
    def policy(self) -> IdentityPolicy:
        return self._policy

    def match_key(self, field: str, value: str) -> str:
        """The key a match value is indexed under: a keyed hash, no value in the name."""
        if self._match_keys is None:
            raise ConfigError("identity: match keys need a key secret (identity.key_secret)")
        return self._match_keys.key(field, value)

    def drop_match_keys(self) -> int:
        """Delete every match key and the secret's check value (`accord identity rebuild
        --rekey`, before the rebuild): the next `prepare` records this resolver's secret."""
        if self._match_keys is None:
            return 0
        self._prepared = False
        return drop_match_keys(self._client, self._match_keys)

    def prepare(self) -> MigrationReport | None:
        """Check the key secret against the one the keys were made with, and migrate
        clear-text match keys left by an earlier version (logged when there are any).
        Runs once, before the first batch or rebuild; None for a resolver without
        match rules. A guarded resolver writes nothing while the epoch key is missing
        (it tries again next time). Raises `MatchKeySecretChanged` or `RedisUnavailable`."""
        if self._prepared or self._match_keys is None:
            return None
        if self._guarded:
            with redis_errors("reading the identity epoch"):
                if not self._client.exists(self.epoch_key):
                    return None
        check_secret(self._client, self._match_keys)
        report = migrate_legacy_keys(self._client, self._match_keys, log.info)
        if report.scanned:
            log.warning(
                "identity: migrated clear-text match keys under %r: %s",
                self._prefix,
                report.describe(),
            )
        self._prepared = True
        return report

    @property
    def held_key(self) -> str:
        return f"{self._prefix}held"

    def resolve(self, changes: Sequence[Change]) -> list[str | None]:
        """The golden id of each change, in order; None for a delete of an unknown row
        and for a held row (`resolve_batch` tells which)."""
        return [result.golden_id for result in self.resolve_batch(changes).results]

    def resolve_batch(self, changes: Sequence[Change]) -> BatchResolution:
        """What identity makes of each change, in order.

        For an upsert: its xref if the row is known; else, if the row is held, held
        again; else, when the values it may link on (`identity.trust`; role addresses
        left out) point to golden records, the best-scoring one decides
        (`streams.matchpolicy`): linked, unless that record links `max_rows_per_record`
        rows already (held); held for review; or a new record. Else, if it carries a
        role address, held; else a new id. A linked row's xref, link and match profile
        entry are recorded, and every match value it carries is indexed to its golden id
        unless already indexed (first writer wins). A delete only reads the xref (and
        drops the row's profile entry: a deleted row corroborates nothing), and ends the
        hold of a held row.

        One script round trip for a batch no candidate is found for; scoring needs
        Python, so a batch with candidates takes a second, which applies each decision
        only if every candidate still points where it did (else that change is scored
        again, in another round). Guarded, raises `IdentityLost` (nothing done) while
        the epoch key is missing; `IdentityContended` after `MAX_SCORE_ROUNDS`.
        """
        if not changes:
            return BatchResolution([], 0)
        self.prepare()
        keys = [self.epoch_key]
        entries: list[list[Any]] = []
        sides: list[MatchSide] = []
        for change in changes:
            allowed = [
                (name, text)
                for name, text in match_candidates(change.system, change.values, self._rules)
                if self._policy.matching.may_link(change.system, name)
            ]
            trusted, role = self._policy.split(allowed)
            candidates = []
            digests: dict[str, str] = {}
            for name, text in trusted:
                key = self.match_key(name, text)
                keys.append(key)
                candidates.append([name, text, len(keys)])
                digests.setdefault(name, key.rpartition(":")[2])
            is_delete = change.op is Op.DELETE
            entries.append(
                [
                    change.system,
                    change.source_key,
                    is_delete,
                    golden_id_for(change.system, change.source_key),
                    candidates,
                    role,
                    "" if is_delete else profile_entry(change.system, change.values, digests),
                ]
            )
            sides.append(MatchSide.of(change.system, change.values, digests))
        results: list[Resolution | None] = [None] * len(changes)
        decisions: dict[int, list[Any]] = {}
        todo = list(range(len(changes)))
        held_rows = 0
        cap = self._policy.max_rows_per_record
        guard = "1" if self._guarded else "0"
        for _round in range(MAX_SCORE_ROUNDS):
            batch = [[*entries[i], decisions.get(i, False)] for i in todo]
            payload = json.dumps(batch, ensure_ascii=False, separators=(",", ":"))
            now_ms = int(time.time() * 1000)
            with (
                redis_errors(f"resolving identities of {len(todo)} changes"),
                _lost_identities(),
            ):
                reply = self._resolve(keys=keys, args=[self._prefix, payload, cap, now_ms, guard])
            outcomes, held_rows = json.loads(_decoded(reply) or "[[], 0]")
            again = []
            for i, outcome in zip(todo, outcomes, strict=True):
                kind = outcome[0]
                if kind == "score":
                    decisions[i] = self._decide(changes[i], entries[i], sides[i], outcome)
                    again.append(i)
                elif kind == "again":
                    decisions.pop(i, None)
                    again.append(i)
                else:
                    decided = decisions.pop(i, None)
                    if decided is not None:
                        SCORED.labels(changes[i].system, decided[0]).inc()
                    results[i] = _resolution(changes[i], outcome)
            todo = again
            if not todo:
                break
        else:
            raise IdentityContended(
                f"identity: {len(todo)} changes still contended after {MAX_SCORE_ROUNDS} "
                "rounds of scoring: their candidates kept changing"
            )
        return BatchResolution([result or Resolution() for result in results], int(held_rows))

    def _decide(
        self, change: Change, entry: list[Any], side: MatchSide, outcome: list[Any]
    ) -> list[Any]:
        """The decision a `score` outcome calls for, as the resolve script takes it."""
        found: list[str] = list(outcome[1])
        profiles = outcome[2] if isinstance(outcome[2], dict) else {}
        matched: dict[str, list[int]] = {}
        for j, golden_id in enumerate(found):
            if golden_id:
                matched.setdefault(golden_id, []).append(j)
        candidates = entry[4]
        policy = self._policy.matching
        best: tuple[str, list[int], Any] | None = None
        for golden_id, indexes in matched.items():
            flat = profiles.get(golden_id) or []
            profile = [
                parsed
                for parsed in (MatchSide.parse(text) for text in flat[1::2])
                if parsed is not None
            ]
            fields_ = [candidates[j][0] for j in indexes]
            result = score(policy, side, fields_, profile)
            if best is None or result.total > best[2].total:
                best = (golden_id, indexes, result)
        assert best is not None  # a `score` outcome has at least one candidate
        golden_id, indexes, result = best
        decision = decide(policy.scoring, result)
        name, text = candidates[indexes[0]][0], candidates[indexes[0]][1]
        extra: dict[str, Any] = {
            "match": [name, text],
            "scores": result.as_dict(),
            "policy": {**policy.scoring.thresholds(), "decision": decision.value},
        }
        if decision is Decision.REVIEW:
            extra = {"reason": HoldReason.REVIEW.value, "golden_id": golden_id, **extra}
        elif decision is Decision.NEW:
            golden_id = entry[3]
            log.info(
                "identity: %s scored %.3f against its best candidate, below identity.scoring"
                ".review: a golden record of its own",
                change.link,
                result.total,
            )
        return [decision.value, golden_id, found, extra]

    def link(self, system: str, key: str, golden_id: str) -> None:
        """Record that a row an applier created in `system` belongs to `golden_id`.

        So the change Debezium captures from that write resolves to the same record.
        """
        with redis_errors(f"linking {system}:{key}"), _lost_identities():
            self._link(
                keys=[self.xref_key(system, key), *self._guard],
                args=[self._prefix, f"{system}:{key}", golden_id],
            )

    def merge(self, survivor: str, loser: str) -> MergeResult:
        """Move every row of golden record `loser` to `survivor` in Redis, atomically
        (`MERGE_SCRIPT`): xrefs, links, match profiles, match keys, review holds, and a
        pointer from the loser to the survivor that later lookups follow. The merge of
        the records' states goes through the changes topic (`streams.merging`).
        Raises `MergeRefused` (with the reason) when the two cannot be merged, and
        `IdentityLost` for a guarded resolver whose keys Redis lost."""
        with redis_errors(f"merging {loser} into {survivor}"), _lost_identities():
            reply = self._merge(
                keys=[*self._guard] or [self.epoch_key],
                args=[
                    self._prefix,
                    survivor,
                    loser,
                    self._policy.max_rows_per_record,
                    "1" if self._guard else "0",
                ],
            )
        outcome, detail, moved = json.loads(_decoded(reply) or "[]")
        if outcome in ("merged", "already"):
            links = sorted(_decoded(m) or "" for m in (moved or []))
            return MergeResult(survivor, loser, int(detail), links, outcome == "already")
        reasons = {
            "same": "a record cannot be merged into itself",
            "loser_merged": f"{loser} was merged into {detail} already",
            "survivor_merged": f"{survivor} was merged into {detail}: merge into {detail}",
            "no_record": f"no golden record {detail} links any row",
            "full": (
                f"together they would link {detail} rows "
                f"(identity.max_rows_per_record: {self._policy.max_rows_per_record})"
            ),
        }
        raise MergeRefused(survivor, loser, reasons.get(outcome, f"unexpected reply {outcome}"))

    def merged_into(self, golden_id: str) -> str | None:
        """The record `golden_id` was merged into (the end of the chain), or None."""
        seen = golden_id
        with redis_errors(f"looking up {golden_id}"):
            for _ in range(32):
                into = _decoded(self._client.get(f"{self._prefix}merged:{seen}"))
                if into is None:
                    break
                seen = into
        return None if seen == golden_id else seen

    def lookup(self, system: str, key: str) -> str | None:
        with redis_errors(f"looking up {system}:{key}"):
            return _decoded(self._client.get(self.xref_key(system, key)))

    def held(self, system: str, key: str) -> Hold | None:
        """The hold on one row, if it is held."""
        link = f"{system}:{key}"
        with redis_errors(f"looking up the hold of {link}"):
            text = _decoded(self._client.hget(self.held_key, link))
        return Hold.parse(link, text) if text else None

    def holds(self) -> list[Hold]:
        """Every held row, sorted by system and key (a scan: fine for thousands)."""
        with redis_errors("reading the held rows"):
            entries = list(self._client.hscan_iter(self.held_key, count=1000))
        holds = [Hold.parse(_decoded(link) or "", _decoded(text) or "") for link, text in entries]
        return sorted(holds, key=lambda hold: (hold.system, hold.key))

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
        self.prepare()
        restored = 0
        pending = 0
        pipe = self._client.pipeline(transaction=False)
        for golden_id, links, values in records:
            pipe.delete(self.links_key(golden_id))
            for system, key in links:
                pipe.set(self.xref_key(system, key), golden_id)
                pipe.sadd(self.links_key(golden_id), f"{system}:{key}")
            allowed = [
                (name, text)
                for name, text in rebuild_candidates(links, values, self._rules)
                if any(self._policy.matching.may_link(system, name) for system, _ in links)
            ]
            trusted, _role = self._policy.split(allowed)
            for name, text in trusted:
                pipe.set(self.match_key(name, text), golden_id, nx=True)
            # The rows' own values went with Redis: the record's stand in for them.
            pipe.hset(self.profile_key(golden_id), REBUILT_PROFILE, profile_entry("", values, {}))
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


def _resolution(change: Change, outcome: list[Any]) -> Resolution:
    """One final outcome of the resolve script."""
    kind = outcome[0]
    if kind == "golden":
        return Resolution(golden_id=outcome[1])
    if kind == "held":
        return Resolution(hold=Hold.parse(change.link, outcome[1]))
    return Resolution(released=kind == "released")


def _decoded(value: bytes | str | None) -> str | None:
    """Redis replies as bytes unless the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
