"""Relink: notice that Redis lost Accord's identity keys, and rebuild them.

Identity links live in Redis (`streams.identity`). A Redis flushed, or restarted without
persistence, forgets them all; the next change of a known row would then found a new
golden record (a twin), and an applier would create a second row in its target. So the
keys carry an epoch key, written when an app's identities are first made or rebuilt: a
guarded resolver refuses to create anything while it is missing (`IdentityLost`), and
this module decides what its absence means and repairs it.

- No epoch and no golden state anywhere (the golden table's changelog, `accord.golden`
  and `accord.changes` are all empty): a new app; the epoch is written and that is all.
- No epoch but golden state: the keys were lost. The worker's `/health` says so, ingest
  reads its batches again without committing, appliers retry, and one worker (a Redis
  lock with a TTL) rebuilds: it waits until the merge has taken in what ingest handed on,
  reads every golden state (latest per key) from the changelog, adds the target rows an
  applier created whose CDC echo has not reached a golden state yet (the `accord_applied`
  ledger of each SQL target), hands them to `IdentityResolver.rebuild`, then writes the
  epoch. `accord identity rebuild` does the same from the command line. Held rows are
  put back from the review topic (`streams.review.restore_holds`) once the xrefs are.

Dedupe keys are lost too, and need no rebuild: a replayed change they no longer catch is
merged again, and a merge of a change already merged is a no-op (`streams.merge`).

The plain parts (`decide`, `identity_of`, `latest_identities`, `with_ledger`) take no
I/O; `Relinker` and `rebuild` are the glue.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaException, TopicPartition

from streams.dedupe import redis_errors
from streams.errors import AccordError
from streams.identity import EPOCH_KEY, IdentityResolver
from streams.merge import GoldenState, loads
from streams.model import Value
from streams.review import restore_holds
from streams.settings import AccordSettings

__all__ = [
    "EPOCH_KEY",
    "LOCK_KEY",
    "LOST_REASON",
    "PROGRESS_EVERY",
    "Identity",
    "Plan",
    "RebuildLock",
    "RelinkBusy",
    "RelinkReport",
    "RelinkSources",
    "Relinker",
    "decide",
    "identity_of",
    "latest_identities",
    "owner_name",
    "read_epoch",
    "rebuild",
    "rebuild_now",
    "sources_of",
    "with_ledger",
    "worker_relinker",
    "write_epoch",
]

log = logging.getLogger(__name__)

LOST_REASON = "redis lost Accord's identity keys; rebuilding from the golden changelog"
LOCK_KEY = "identity-rebuild"  # under the prefix: held by the one process rebuilding
LOCK_TTL_S = 60.0  # refreshed while the rebuild makes progress
PROGRESS_EVERY = 10_000  # records between two progress reports
MERGE_WAIT_S = 60.0  # longest wait for the merge to take in what ingest handed on

# (golden id, linked (system, key) rows, the golden values match rules index)
Identity = tuple[str, tuple[tuple[str, str], ...], dict[str, Value]]


class RelinkBusy(AccordError):
    """Another process holds the rebuild lock."""

    def __init__(self, holder: str) -> None:
        self.holder = holder
        super().__init__(f"another rebuild of the identity keys is running ({holder})")


class Plan(StrEnum):
    INTACT = "intact"  # the epoch is there: nothing to do
    FRESH = "fresh"  # a new app: write the epoch
    REBUILD = "rebuild"  # the keys were lost: rebuild them, then write the epoch


def decide(epoch_present: bool, state_exists: bool) -> Plan:
    """What the epoch key's presence and the app's golden state call for."""
    if epoch_present:
        return Plan.INTACT
    return Plan.REBUILD if state_exists else Plan.FRESH


def identity_of(state: GoldenState, fields: Collection[str]) -> Identity:
    """What identity keys a golden state implies: every row it links (alive or deleted:
    a deleted row's xref outlived its delete) and its golden values of `fields`."""
    links = tuple(sorted((c.system, c.key) for c in state.contributions.values()))
    values = {name: r.value for name, r in state.golden.items() if name in fields}
    return state.golden_id, links, values


def latest_identities(
    records: Iterable[tuple[bytes | None, bytes | None]], fields: Collection[str]
) -> dict[str, Identity]:
    """The identity of each golden record's latest state, from changelog records
    `(key, value)` in log order; a tombstone forgets its key."""
    latest: dict[str, Identity] = {}
    for key, value in records:
        if key is None:
            continue
        if value is None:
            latest.pop(key.decode(), None)
            continue
        identity = identity_of(loads(value, cells=False), fields)
        latest[key.decode()] = identity
    return latest


def with_ledger(
    identities: dict[str, Identity], ledger: Iterable[tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    """Add the target rows appliers created, `(golden id, system, key)`, that no golden
    state links yet (their CDC echo has not been merged): without their links, the next
    create of that record would make its row again. Returns the links added."""
    linked = {link for _, links, _ in identities.values() for link in links}
    added = []
    for golden_id, system, key in ledger:
        if (system, key) in linked:
            continue
        _, links, values = identities.get(golden_id, (golden_id, (), {}))
        identities[golden_id] = (golden_id, (*links, (system, key)), values)
        linked.add((system, key))
        added.append((golden_id, system, key))
    return added


def _counted(items: Iterable[Any], every: int, report: Callable[[int], None]) -> Iterator[Any]:
    for count, item in enumerate(items, start=1):
        yield item
        if count % every == 0:
            report(count)


# ------------------------------------------------------------------------- the I/O


@dataclass(frozen=True)
class RelinkSources:
    """Where the golden state is read from; `sources_of` builds the real ones."""

    has_state: Callable[[], bool]
    changelog: Callable[[], Iterable[tuple[bytes | None, bytes | None]]]
    ledger: Callable[[], Iterable[tuple[str, str, str]]]
    merged: Callable[[], bool] = lambda: True  # has the merge taken in every change?
    review: Callable[[], Iterable[tuple[bytes | None, bytes | None]]] = lambda: ()  # holds


def sources_of(settings: AccordSettings) -> RelinkSources:
    """The real sources of an app: its topics and its SQL targets' ledgers."""
    from streams.topology import changelog_topic

    kafka = settings.kafka_config()
    changelog = changelog_topic(settings)
    # The review topic too: an app whose only state is held rows has holds to restore.
    topics = settings.topics
    state_topics = [changelog, topics.golden, topics.changes, topics.review]
    return RelinkSources(
        has_state=lambda: _any_records(kafka, state_topics),
        changelog=lambda: _scan_records(kafka, changelog),
        ledger=lambda: _ledger_links(settings),
        merged=lambda: _caught_up(kafka, settings.worker.app_id, settings.topics.changes),
        review=lambda: _scan_records(kafka, settings.topics.review),
    )


def _any_records(kafka: dict[str, Any], topics: list[str]) -> bool:
    consumer = Consumer({**kafka, "group.id": f"accord-relink-{uuid.uuid4().hex[:8]}"})
    try:
        metadata = consumer.list_topics(timeout=10).topics
        for topic in topics:
            if topic not in metadata:
                continue
            for partition in metadata[topic].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
                if high > low:
                    return True
        return False
    finally:
        consumer.close()


def _caught_up(kafka: dict[str, Any], group: str, topic: str) -> bool:
    """Has the merge's consumer group committed every change of `topic`?"""
    consumer = Consumer({**kafka, "group.id": group})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None:
            return True
        partitions = [TopicPartition(topic, p) for p in metadata.partitions]
        for tp in consumer.committed(partitions, timeout=10):
            low, high = consumer.get_watermark_offsets(tp, 10)
            if high > low and tp.offset < high:
                return False
        return True
    finally:
        consumer.close()


def _scan_records(kafka: dict[str, Any], topic: str) -> Iterator[tuple[bytes | None, bytes | None]]:
    from streams.topics import scan

    for message in scan(kafka, topic, lambda _m: True, timeout_s=3600):
        yield message.key(), message.value()


def _ledger_links(settings: AccordSettings) -> Iterator[tuple[str, str, str]]:
    """`(golden id, target, key)` of every row an applier of this app created or adopted."""
    from streams.projection import SinkKind, load_sinks
    from streams.sinks import DB_ERRORS, DIALECTS, LEDGER_TABLE, Action

    app = settings.worker.app_id
    for target, spec in sorted(load_sinks(settings.connectors_dir).items()):
        if spec.kind is not SinkKind.SQL or target not in DIALECTS:
            continue
        dialect = DIALECTS[target]()
        try:
            conn = dialect.connect(settings, target)
            try:
                with conn.cursor() as cur:
                    if dialect.columns(cur, LEDGER_TABLE) is None:
                        continue  # no applier ever ran there
                    cur.execute(
                        f"SELECT DISTINCT golden_id, target_key FROM {LEDGER_TABLE} "
                        "WHERE app = %s AND op IN (%s, %s)",
                        (app, Action.INSERT.value, Action.ADOPT.value),
                    )
                    rows = cur.fetchall()
            finally:
                conn.close()
        except DB_ERRORS as exc:
            raise AccordError(
                f"reading the applier ledger of {target}: {type(exc).__name__}: {exc}"
            ) from exc
        yield from ((str(golden_id), target, str(key)) for golden_id, key in rows)


class RebuildLock:
    """`SET NX` with a TTL: one rebuild at a time across workers and the command line.
    A holder that dies frees it when the TTL runs out."""

    RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
    REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

    def __init__(self, client: redis.Redis, key: str, owner: str, ttl_s: float = LOCK_TTL_S):
        self.client, self.key, self.owner, self.ttl_ms = client, key, owner, int(ttl_s * 1000)

    def acquire(self) -> bool:
        with redis_errors("taking the identity rebuild lock"):
            return bool(self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    def holder(self) -> str | None:
        with redis_errors("reading the identity rebuild lock"):
            value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def refresh(self) -> None:
        with redis_errors("refreshing the identity rebuild lock"):
            self.client.eval(self.REFRESH, 1, self.key, self.owner, self.ttl_ms)

    def release(self) -> None:
        with redis_errors("releasing the identity rebuild lock"):
            self.client.eval(self.RELEASE, 1, self.key, self.owner)


@dataclass(frozen=True)
class RelinkReport:
    plan: Plan
    golden_records: int = 0  # golden records whose identity keys were rebuilt
    ledger_links: int = 0  # rows created by appliers and linked from their ledgers
    records_read: int = 0  # changelog records read (every version, tombstones too)
    seconds: float = 0.0
    holds_restored: int = 0  # held rows put back from the review topic

    def describe(self) -> str:
        if self.plan is not Plan.REBUILD:
            return f"identity keys {self.plan.value}: nothing to rebuild"
        held = f", {self.holds_restored:,} held rows restored" if self.holds_restored else ""
        return (
            f"rebuilt the identity keys of {self.golden_records:,} golden records "
            f"({self.ledger_links:,} rows linked from applier ledgers, "
            f"{self.records_read:,} changelog records read{held}) in {self.seconds:.1f} s"
        )


def owner_name(what: str) -> str:
    return f"{what}@{socket.gethostname()}:{os.getpid()}"


def write_epoch(client: redis.Redis, key: str, owner: str, how: Plan, records: int = 0) -> None:
    """Write the epoch key: the identity keys are whole from here on."""
    with redis_errors("writing the identity epoch"):
        client.set(key, _stamp(owner, how, records))


def rebuild(
    resolver: IdentityResolver,
    sources: RelinkSources,
    fields: Collection[str],
    progress: Callable[[str], None],
    alive: Callable[[], None] = lambda: None,
    every: int = PROGRESS_EVERY,
    merge_wait_s: float = MERGE_WAIT_S,
    stop: threading.Event | None = None,
) -> RelinkReport:
    """Rebuild every identity key from the golden state; the caller holds the lock and
    writes the epoch after. `alive` is called with each progress report (to refresh the
    lock); `fields` are the match rules' fields."""
    began = time.monotonic()
    deadline = began + merge_wait_s
    while not sources.merged():
        if time.monotonic() > deadline:
            progress(f"the merge is still behind after {merge_wait_s:.0f} s; rebuilding anyway")
            break
        alive()
        if (stop or threading.Event()).wait(0.5):  # the merge's pace, then look again
            raise AccordError("stopped before the identity rebuild began")
    read = 0

    def counting() -> Iterator[tuple[bytes | None, bytes | None]]:
        nonlocal read
        for record in sources.changelog():
            read += 1
            if read % every == 0:
                alive()
                progress(f"read {read:,} golden changelog records")
            yield record

    identities = latest_identities(counting(), fields)
    added = with_ledger(identities, sources.ledger())
    progress(
        f"{len(identities):,} golden records from {read:,} changelog records, "
        f"{len(added):,} created rows from applier ledgers; writing their identity keys"
    )

    def written(count: int) -> None:
        alive()
        progress(f"identity keys of {count:,} of {len(identities):,} golden records written")

    restored = resolver.rebuild(_counted(identities.values(), every, written))
    # After the xrefs: a row they link is not held again.
    held = restore_holds(resolver.client, resolver.key(""), sources.review())
    progress(held.describe())
    return RelinkReport(
        Plan.REBUILD, restored, len(added), read, time.monotonic() - began, held.held
    )


@dataclass
class Relinker:
    """The worker's keeper of the identity epoch (a thread of the worker: `run(stop)`).

    Checks the epoch every `interval_s`, and at once when `lost()` is called (ingest got
    `IdentityLost`). `problem` is the reason `/health` reports while the keys are lost.
    """

    client: redis.Redis
    resolver: IdentityResolver
    sources: RelinkSources
    fields: Collection[str]
    owner: str
    interval_s: float = 5.0
    every: int = PROGRESS_EVERY
    problem: str | None = None
    rebuilds: int = 0
    _wake: threading.Event = field(default_factory=threading.Event)

    def lost(self) -> None:
        self.problem = LOST_REASON
        self._wake.set()

    def check(self, stop: threading.Event | None = None) -> RelinkReport | None:
        """One look at the epoch, and what it calls for; None if another process is
        rebuilding (the keys are lost until it is done)."""
        epoch = self.resolver.epoch_key
        with redis_errors("reading the identity epoch"):
            present = bool(self.client.exists(epoch))
        plan = decide(present, present or self.sources.has_state())
        if plan is Plan.INTACT:
            self.problem = None
            return RelinkReport(plan)
        if plan is Plan.FRESH:
            with redis_errors("writing the identity epoch"):
                self.client.set(epoch, _stamp(self.owner, plan), nx=True)
            log.info("identity keys: a new app, epoch written")
            self.problem = None
            return RelinkReport(plan)
        self.problem = LOST_REASON
        lock = RebuildLock(self.client, self.resolver.key(LOCK_KEY), self.owner)
        if not lock.acquire():
            log.warning("%s; %s is rebuilding them", LOST_REASON, lock.holder() or "another")
            return None
        try:
            with redis_errors("reading the identity epoch"):
                if self.client.exists(epoch):  # rebuilt by another just before the lock
                    self.problem = None
                    return RelinkReport(Plan.INTACT)
            log.warning("%s (this worker rebuilds them)", LOST_REASON)
            report = rebuild(
                self.resolver,
                self.sources,
                self.fields,
                lambda message: log.info("identity rebuild: %s", message),
                lock.refresh,
                self.every,
                stop=stop,
            )
            write_epoch(self.client, epoch, self.owner, Plan.REBUILD, report.golden_records)
        finally:
            lock.release()
        self.rebuilds += 1
        self.problem = None
        log.warning("identity keys restored: %s", report.describe())
        return report

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.check(stop)
            except (AccordError, KafkaException, OSError) as exc:
                # RedisUnavailable, a target or Kafka away: the keys stay lost (health
                # says so) and the next check tries again.
                log.warning("identity check failed, retrying in %.0f s: %s", self.interval_s, exc)
            deadline = time.monotonic() + self.interval_s
            while not stop.is_set() and time.monotonic() < deadline:
                if self._wake.wait(0.5):
                    break
            self._wake.clear()

    def close(self) -> None:
        self._wake.set()


def rebuild_now(
    settings: AccordSettings,
    progress: Callable[[str], None],
    owner: str | None = None,
    rekey: bool = False,
) -> RelinkReport:
    """What `accord identity rebuild` does, whether or not the keys look intact.

    Takes the lock (`RelinkBusy` if a worker or another command holds it), removes the
    epoch (so workers stop resolving until it is back), rebuilds, writes the epoch. A
    run that dies half-way leaves the epoch missing: a worker rebuilds once the lock's
    TTL has run out. `rekey` first deletes every match key, so they are made again with
    the configured `identity.key_secret` (after changing it; workers stopped).
    """
    from streams.app import redis_client
    from streams.rules import load_rules

    client = redis_client(settings)
    rules = load_rules(settings.worker.rules_file)
    resolver = IdentityResolver(
        client,
        settings.worker.redis_prefix,
        rules.match,
        rules.identity,
        key_secret=settings.match_key_secret(),
    )
    owner = owner or owner_name("accord identity rebuild")
    sources = sources_of(settings)
    lock = RebuildLock(client, resolver.key(LOCK_KEY), owner)
    if not lock.acquire():
        raise RelinkBusy(lock.holder() or "a holder that just left")
    try:
        if not sources.has_state():
            write_epoch(client, resolver.epoch_key, owner, Plan.FRESH)
            return RelinkReport(Plan.FRESH)
        if not rekey:  # another secret than the keys were made with stops here, untouched
            resolver.prepare()
        with redis_errors("removing the identity epoch"):
            client.delete(resolver.epoch_key)
        progress("identity epoch removed: workers hold ingest until the rebuild is done")
        if rekey:
            dropped = resolver.drop_match_keys()
            progress(f"deleted {dropped:,} match keys: remade with the configured secret")
        report = rebuild(
            resolver, sources, {rule.field for rule in resolver.rules}, progress, lock.refresh
        )
        write_epoch(client, resolver.epoch_key, owner, Plan.REBUILD, report.golden_records)
        return report
    finally:
        lock.release()


def worker_relinker(
    settings: AccordSettings, client: redis.Redis, resolver: IdentityResolver
) -> Relinker:
    """The relinker of a worker: its app's sources, its match rules' fields."""
    worker = settings.worker
    return Relinker(
        client,
        resolver,
        sources_of(settings),
        {rule.field for rule in resolver.rules},
        owner_name(f"{worker.app_id}-{worker.instance}"),
        interval_s=worker.identity_check_s,
    )


def _stamp(owner: str, how: Plan, records: int = 0) -> str:
    return json.dumps(
        {
            "epoch": uuid.uuid4().hex,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "by": owner,
            "how": how.value,
            "golden_records": records,
        }
    )


def read_epoch(client: redis.Redis, key: str) -> Mapping[str, Any] | None:
    """The epoch's stamp, or None when it is missing."""
    with redis_errors("reading the identity epoch"):
        raw = client.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"raw": raw.decode(errors="replace") if isinstance(raw, bytes) else raw}
