"""The Faust worker: thin glue around ingest, merge and emit.

    raw topics --ingest loop--> accord.changes --merge agent--> table `golden`
    golden changelog --emitter (transactional)--> accord.golden, accord.audit

All logic lives in plain modules (`ingest`, `merge`, `emit`); this module only wires
them to Kafka and owns the worker's lifecycle. The merge is a Faust agent over a Faust
table; ingest and emit are confluent-kafka loops on threads of the same process, which
cost a fraction of Faust's per-message CPU (issue 8). Each stage fails closed: no offset
moves past a batch that was not fully handed on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import faust
import mode
import redis
from aiohttp import web as aioweb
from confluent_kafka import KafkaException, Producer
from faust.sensors.monitor import Monitor as FaustMonitor
from faust.stores.rocksdb import Store as RocksDBStore
from prometheus_client import CollectorRegistry, Counter, generate_latest
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rocksdict import WriteOptions

from streams import redact
from streams.changelog import ChangelogWriter
from streams.codec import (
    AvroCodec,
    DecodeError,
    DecodeReason,
    RegistryUnavailable,
    schema_id_of,
)
from streams.connect import SYSTEMS, ConnectClient, ConnectorWatchdog, load_connector
from streams.corroborate import HoldRescorer
from streams.dedupe import Deduplicator, RedisUnavailable
from streams.dlq import DeadLetter, DeadLetterWriter
from streams.emit import Emitter, EmitTopics, plan_sinks, repair
from streams.errors import AccordError, ConfigError
from streams.faust_codec import AvroRecordCodec, canonical_codec
from streams.health import LAG_CHECK_S, StageProgress
from streams.identity import IdentityResolver
from streams.ingest import IngestLoop, IngestPipeline, RawDecoder
from streams.mapping import Mapper, load_mappings
from streams.merge import (
    GoldenState,
    MergeError,
    Outcome,
    StateCache,
    absorb,
    apply,
    dumps,
    loads,
    retire,
    stage,
)
from streams.missing_columns import MissingColumns, MissingColumnSignal
from streams.model import CONTROL_SYSTEM, Change
from streams.monitor import Snapshot
from streams.offsets import guarded_consumer
from streams.projection import SinkKind, load_sinks
from streams.refusal import Refusal, RefusedWrites, oversize, record_limit, refusal_of
from streams.registry import registry_client, writer_schemas
from streams.relink import worker_relinker
from streams.restore import ChangelogRestore
from streams.review import reviewer_of
from streams.rules import Rules, load_rules
from streams.settings import AccordSettings
from streams.sinks import SinkRunner
from streams.status import BoardCollector, StatusBoard, page
from streams.topology import (
    changelog_topic,
    emit_group,
    ensure_topics,
    ingest_group,
    internal_replication,
)
from streams.web_auth import COOKIE_NAME, Access, WebGuard, strip_values
from streams.workerhost import (
    DataDirLock,
    check_port_free,
    data_dir,
    free_port,
    port_file,
    publish_port,
)

log = logging.getLogger(__name__)

MERGED = Counter(
    "accord_merge_changes_total",
    "Changes merged, by effect: new_version, state_only (provenance, echo), no_op (replay)",
    ["outcome"],
)
REJECTED = Counter(
    "accord_merge_rejected_total", "Values an owner rule refused", ["system", "field"]
)
REPAIRS = Counter(
    "accord_merge_repairs_total",
    "Repair requests from reconcile, by result: planned (a correction was sent) or none",
    ["target", "result"],
)


def _merge_outcome(outcome: Any) -> str:
    if outcome.new_version:
        return "new_version"
    return "state_only" if outcome.state_changed else "no_op"


CLEAN_STOP_MARKER = "running"  # present while a worker runs; left behind by a crash


class GoldenTable(faust.Table):
    """A Faust table whose latest changelog write can be awaited.

    Faust hands table writes to a producer buffer, and its flush before an offset commit
    gives up after 0.1 s with writes still in that buffer: a crash right after the commit
    loses a write whose input is already committed. The merge therefore acks an input only
    once the changelog has confirmed the write it caused (`AcksAfterWrites`).

    With `restore` set, its store restores newly assigned partitions in bulk first. With
    `writer` set (at-least-once), its changelog writes go through librdkafka
    (`streams.changelog`).
    """

    last_write: asyncio.Future | None = None
    restore: ChangelogRestore | None = None  # set before the table's store is made
    writer: ChangelogWriter | None = None  # at-least-once: writes go through librdkafka

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused_writes = RefusedWrites()

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        self.last_write = future = super().send_changelog(*args, **kwargs)
        return future

    def on_key_set(self, key: Any, value: Any) -> None:
        if self.writer is None:
            super().on_key_set(key, value)  # through `send_changelog`
            return
        # What Faust's `on_key_set` does for a table without expiry or sensors, with the
        # write through librdkafka; keys and values are bytes already (`key_type`,
        # `value_type`). The merge deletes no key, so no write takes Faust's producer.
        self.last_write = self.writer.send(self.partition_for_key(key), key, value)

    def on_key_del(self, key: Any) -> None:
        if self.writer is not None:  # it would race the writer's records of the partition
            raise NotImplementedError("golden states are never deleted under at-least-once")
        super().on_key_del(key)

    def undo(self, partition: int, key: bytes, refused: bytes, before: bytes | None) -> None:
        """A changelog write of `refused` (made over `before`) was refused: the local
        store holds again what the changelog holds (see `RefusedWrites`). Written to
        the partition's RocksDB directly: the store's own writes need the current event."""
        db = None if self.should_stop else self.data._dbs.get(partition)
        if db is None:  # revoked or closed: its next owner restores from the changelog
            return
        restore, state = self.refused_writes.refused(key, refused, before, db.get(key))
        if not restore:
            return
        if state is None:
            db.delete(key)
        else:
            db.put(key, state)

    def persisted(self, partition: int, offset: int) -> None:
        """A changelog write is confirmed: what Faust's `_on_changelog_sent` records."""
        if self.should_stop:
            # The store has closed its RocksDB partitions; writing would reopen one. A
            # restart replays the changelog from the offset persisted before instead.
            return
        tp = faust.types.TP(self.changelog_topic.get_topic_name(), partition)
        self.data.set_persisted_offset(tp, offset)

    def _new_store(self) -> Any:
        return GoldenStore(
            self.restore,
            self._store or self.app.conf.store,
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
        )


class GoldenStore(RocksDBStore):
    """Faust's RocksDB store without RocksDB's write-ahead log, restoring newly assigned
    partitions in bulk (with `restore`, see `streams.restore`) before Faust's recovery
    replays what is left.

    The WAL protected nothing: after a crash `run_worker` rebuilds the state from the
    changelog, the log of record, and a clean stop still flushes, as RocksDB does when it
    closes without a WAL. It only wrote every table write twice.
    """

    def __init__(self, restore: ChangelogRestore | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restore = restore

    def _open_for_partition(self, partition: int) -> Any:
        db = super()._open_for_partition(partition)
        unlogged = WriteOptions()
        unlogged.disable_wal = True
        db.set_write_options(unlogged)
        return db

    async def assign_partitions(
        self, table: Any, tps: set[faust.types.TP], generation_id: int = 0
    ) -> None:
        await super().assign_partitions(table, tps, generation_id)
        if self.restore is None:
            return
        opened = {tp.partition for tp in tps if tp.topic in table.changelog_topic.topics}
        dbs = {p: db for p, db in self._dbs.items() if p in opened}
        if not dbs:
            return
        app = self.app

        def rebalanced() -> bool:
            return app.consumer_generation_id != generation_id

        try:
            await asyncio.get_running_loop().run_in_executor(
                None, partial(self.restore.run, dbs, rebalanced)
            )
        except Exception as exc:  # Faust's own replay restores whatever this did not
            log.warning("bulk restore failed, Faust replays the changelog: %s", exc)


class PerEventStatsOff(FaustMonitor):
    """Faust's monitor without its per-message statistics (counts, timings, per-stream
    dicts), which nothing reads: Accord's Prometheus counters say what each stage did.
    It cost about 1% of a worker's CPU."""

    def on_message_in(self, *args: Any) -> None:
        pass

    def on_stream_event_in(self, *args: Any) -> None:
        return None

    def on_stream_event_out(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_message_out(self, *args: Any) -> None:
        pass

    def on_table_get(self, *args: Any) -> None:
        pass

    def on_table_set(self, *args: Any) -> None:
        pass

    def on_send_initiated(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def on_send_completed(self, *args: Any) -> None:
        pass


class MergeDeadLetters:
    """The merge's dead letters: each is on the DLQ before the input it stands for is
    acked; a DLQ that cannot take one stops the worker with that input uncommitted."""

    def __init__(self, stream: faust.StreamT, make_writer: Callable[[], DeadLetterWriter]) -> None:
        self.stream = stream
        self._make_writer = make_writer
        self._writer: DeadLetterWriter | None = None
        self._lock = asyncio.Lock()

    async def refuse(self, event: Any, refusal: Refusal) -> None:
        """Dead-letter `event`'s original record for `refusal`, then ack it."""
        message = event.message
        letter = DeadLetter.at(
            (message.topic, message.partition, message.offset),
            message.key,
            message.value,
            refusal.reason,
            refusal.detail,
            stage="merge",
        )
        log.warning(
            "merge: %s/%d/%d dead-lettered (%s): %s",
            message.topic, message.partition, message.offset, refusal.reason, refusal.detail,
        )  # fmt: skip
        async with self._lock:  # one letter at a time: each flush confirms its own
            await asyncio.get_running_loop().run_in_executor(None, self._write, letter)
        ack_now(self.stream, event)

    def _write(self, letter: DeadLetter) -> None:
        if self._writer is None:
            self._writer = self._make_writer()
        self._writer.write(letter)
        self._writer.flush()


class AcksAfterWrites:
    """Acks each merge input once the changelog has confirmed the write it caused.

    A write the broker refuses for that record alone (too large, invalid: see
    `streams.refusal`) is undone in the table and its input dead-lettered, then acked. Any
    other failed write stops the worker: its input stays uncommitted and is merged again
    after the restart.
    """

    def __init__(
        self,
        app: faust.App,
        stream: faust.StreamT,
        table: GoldenTable,
        letters: MergeDeadLetters,
    ) -> None:
        self.app = app
        self.stream = stream
        self.table = table
        self.letters = letters
        self._tasks: set[asyncio.Future] = set()

    def after(
        self, write: asyncio.Future, event: Any, key: bytes, payload: bytes, before: bytes | None
    ) -> None:
        """`write` put `payload` over `before` at `key`, because of `event`."""
        write.add_done_callback(partial(self._written, event, key, payload, before))

    def _written(
        self,
        event: Any,
        key: bytes,
        payload: bytes,
        before: bytes | None,
        write: asyncio.Future,
    ) -> None:
        error = RuntimeError("cancelled") if write.cancelled() else write.exception()
        if error is None:
            self.table.refused_writes.confirmed(key)
            ack_now(self.stream, event)
            return
        refusal = refusal_of(error)
        if refusal is None:
            log.error("golden changelog write failed, stopping: %s", error)
            self._keep(self.app.crash(error))
            return
        self.table.undo(event.message.partition, key, payload, before)
        self._keep(self._refuse(event, refusal))

    async def _refuse(self, event: Any, refusal: Refusal) -> None:
        try:
            await self.letters.refuse(event, refusal)
        except Exception as exc:
            log.error("merge: cannot dead-letter a refused change, stopping: %s", exc)
            await self.app.crash(exc)

    def _keep(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


UNDECODABLE = "undecodable"
REGISTRY_RETRY_S = (0.5, 1.0, 2.0, 5.0)  # then every 5 s, until the registry answers


async def decode_change(codec: AvroRecordCodec, value: bytes | None) -> Change | Refusal:
    """The change an `accord.changes` record holds, or why it holds none (dead-letter it).

    A registry that cannot be asked is waited for (the record is fine, its schema only
    unknown for now), in order: the changes after it wait too.
    """
    for attempt in itertools.count():
        try:
            if value is None:
                raise DecodeError(DecodeReason.TOO_SHORT, "a record without a value")
            if schema_id_of(value) == codec.schema_id:  # the usual case: nothing to fetch
                return Change.from_record(codec.loads(value))
            # Another schema id: fetching it may wait out the registry's retries, which
            # must not stall the event loop (and with it the changelog's reports).
            loop = asyncio.get_running_loop()
            record = await loop.run_in_executor(None, codec.loads, value)
            return Change.from_record(record)
        except RegistryUnavailable as exc:
            wait_s = REGISTRY_RETRY_S[min(attempt, len(REGISTRY_RETRY_S) - 1)]
            log.warning("merge: registry unavailable (%s); retrying in %.1fs", exc, wait_s)
            await asyncio.sleep(wait_s)
        except DecodeError as exc:
            return Refusal(UNDECODABLE, str(exc))
        except (KeyError, TypeError, ValueError) as exc:  # decoded, but not a change
            return Refusal(UNDECODABLE, f"not a change record: {type(exc).__name__}: {exc}")
    raise AssertionError("unreachable")


UNREADABLE_CONTROL = Refusal(
    "merge_control_unreadable",
    "a merge control change without merge_into or absorb: its writer schema lacks them "
    "(push dev.accord.CustomerChange to the registry: accord schemas push), then run the "
    "same accord merge again",
)


class HandOver:
    """The merge agent's writes into the changes topic, for `accord merge`
    (`streams.merging`): a merged record's state handed to the survivor, and changes
    that reach a tombstone forwarded to the record it was merged into. Each waits for
    the broker's acknowledgement before the agent goes on, so the input change is acked
    only once its consequence is durable; a repeat after a crash is harmless (the
    survivor takes the same rows in once, a forwarded change merges once)."""

    def __init__(
        self, make_producer: Callable[[], Any], topic: str, encode: Callable[[Change], bytes]
    ) -> None:
        self._make_producer = make_producer
        self._producer: Any = None
        self._topic = topic
        self._encode = encode

    async def retire(self, state: GoldenState, change: Change) -> Outcome:
        """Hand `state` over to `change.merge_into`, then make it a tombstone pointing
        there (`streams.merge.retire`; nothing to do when it is one already)."""
        survivor = change.merge_into
        assert survivor is not None
        if state.merged_into is None:
            absorbed = Change(
                change_id=f"absorb:{state.golden_id}:{survivor}",
                system=CONTROL_SYSTEM,
                source_key=state.golden_id,
                op=change.op,
                source_ts=change.source_ts,
                position="merge",
                golden_id=survivor,
                absorb=dumps(state),
            )
            await self._send(survivor, absorbed)
        outcome = retire(state, survivor)
        if outcome.state_changed:
            stage(state, change, outcome, ())
        return outcome

    async def forward(self, change: Change, golden_id: str) -> None:
        await self._send(golden_id, change.with_golden_id(golden_id))

    async def _send(self, key: str, change: Change) -> None:
        value = self._encode(change)
        await asyncio.get_running_loop().run_in_executor(None, self._deliver, key, value)

    def _deliver(self, key: str, value: bytes) -> None:
        if self._producer is None:
            self._producer = self._make_producer()
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        self._producer.produce(self._topic, key=key.encode(), value=value, on_delivery=delivered)
        if self._producer.flush(60) or failures:
            raise AccordError(
                f"{self._topic} did not take a merge hand-over "
                f"({failures[0] if failures else 'timed out'})"
            )


def ack_now(stream: faust.StreamT, event: Any) -> None:
    """`stream.ack(event)` without scheduling a task per event for it: Faust's
    `Stream.ack` is a coroutine that never awaits."""
    coroutine = stream.ack(event)
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("faust's Stream.ack awaited something: it must be awaited in a task")


def faust_credentials(settings: AccordSettings) -> Any:
    """Faust's (aiokafka's) form of the settings' Kafka security; None for plaintext."""
    security = settings.kafka_security
    if security.uses_sasl:
        return faust.SASLCredentials(
            username=security.sasl_username,
            password=security.password(),
            mechanism=security.sasl_mechanism,
            ssl_context=security.ssl_context(),
        )
    if security.uses_ssl:
        return faust.SSLCredentials(security.ssl_context())
    return None


def redis_client(settings: AccordSettings) -> redis.Redis:
    """Short timeouts and few retries: an outage must surface fast, the batch is retried."""
    return redis.Redis.from_url(
        settings.redis,
        **settings.redis_credentials(),
        socket_timeout=5,
        socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=0.5), 2),
    )


NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
# Faust's own web views: /table serves table values (golden states), /router the
# cluster's addresses, /, /graph and /performance internals. Accord serves its own only.
FAUST_VIEWS = ("tables", "router", "stats", "graph", "metrics")
FAUST_VIEWS_OFF = {f"web_{view}_enabled": False for view in FAUST_VIEWS}


def _faust_views_off(app: faust.App) -> None:
    """Faust reads APP_WEB_<VIEW>_ENABLED from the environment over the App's own
    arguments: one set would serve its view (/table: golden states) to anyone."""
    on = [view for view in FAUST_VIEWS if getattr(app.conf, f"web_{view}_enabled")]
    if on:
        names = ", ".join(f"APP_WEB_{view.upper()}_ENABLED" for view in on)
        raise ConfigError(
            f"{names} set in the environment: Faust would serve its own web views (/table "
            "holds golden records) to anyone who reaches the port; unset it"
        )


def _unauthorized(web: Any) -> Any:
    return web.json(
        {
            "error": "unauthorized",
            "detail": "this page needs worker.web_token: send 'Authorization: Bearer <token>', "
            "or open /status?token=<token> once in a browser",
        },
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="accord"', **NO_STORE},
    )


def _host_check(guard: WebGuard) -> Any:
    """aiohttp middleware: every path (Faust's too) refuses a Host header that is
    neither an allowed name nor an IP address (`WebGuard.host_ok`), before any handler."""

    @aioweb.middleware
    async def check_host(request: aioweb.Request, handler: Any) -> Any:
        host = request.headers.get("Host")
        if guard.host_ok(host):
            return await handler(request)
        detail = (
            f"Host {host!r} is not one this worker answers to: add it to "
            "worker.web_allowed_hosts (ACCORD_WORKER__WEB_ALLOWED_HOSTS, a JSON list)"
        )
        return aioweb.json_response({"error": "host not allowed", "detail": detail}, status=403)

    return check_host


def faust_web_options(guard: WebGuard) -> dict[str, Any]:
    """The App's web arguments: Faust's own views off, the Host check on every path."""
    return {**FAUST_VIEWS_OFF, "web_application_options": {"middlewares": [_host_check(guard)]}}


def add_status_pages(app: faust.App, guard: WebGuard, status: Callable[[], dict]) -> None:
    """`/status` and `/status.json`, guarded by `guard` (`streams.web_auth`). `status`
    gives the board's dict (`StatusBoard.as_dict`)."""

    def access(request: Any) -> Access:
        return guard.access(request.headers.get("Authorization"), request.cookies.get(COOKIE_NAME))

    @app.page("/status")
    async def status_page(web: Any, request: Any) -> Any:
        """Topics and lag, throughput, DLQ, drift and latency; refreshes itself.
        `?token=` (the right one) sets the session cookie and reloads without it."""
        given = request.query.get("token")
        if given is not None:
            if guard.token is not None and not guard.token_ok(given):
                return _unauthorized(web)
            headers = {"Location": "status", **NO_STORE}
            if guard.token is not None:
                headers["Set-Cookie"] = guard.set_cookie()
            return web.text("", status=303, headers=headers)
        if access(request) is Access.DENIED:
            return _unauthorized(web)
        return web.text(page(), content_type="text/html", headers=NO_STORE)

    @app.page("/status.json")
    async def status_json(web: Any, request: Any) -> Any:
        """The board; without a configured token, counts and names only."""
        seen = access(request)
        if seen is Access.DENIED:
            return _unauthorized(web)
        body = status()
        return web.json(body if seen is Access.FULL else strip_values(body), headers=NO_STORE)


def _prepare_identity(identity: IdentityResolver) -> None:
    """Check the match key secret and migrate clear-text match keys before serving: a
    secret other than the one the keys were made with stops the worker here
    (`MatchKeySecretChanged`). A Redis away now is retried before the first batch."""
    try:
        identity.prepare()
    except RedisUnavailable as exc:
        log.warning("identity keys not checked yet (retried before the first batch): %s", exc)


def create_app(settings: AccordSettings, rules: Rules | None = None) -> faust.App:
    worker = settings.worker
    rules = rules or load_rules(worker.rules_file)
    mappings = load_mappings(settings.connectors_dir)
    sinks = load_sinks(settings.connectors_dir)
    registry = registry_client(settings)
    redis_conn = redis_client(settings)

    guard = WebGuard.of(worker.web_token_value(), worker.web_allowed_hosts, worker.web_host)
    if guard.token is None:
        log.info("worker.web_token is not set: /status shows counts and names, no values")
    app = faust.App(
        worker.app_id,
        broker=f"kafka://{settings.kafka}",
        store="rocksdb://",
        datadir=str(data_dir(settings)),
        topic_partitions=worker.partitions,
        topic_replication_factor=internal_replication(settings),
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        web_enabled=True,
        web_host=worker.web_host,
        web_bind=worker.web_host,
        web_port=worker.port,
        **faust_web_options(guard),
        producer_acks=-1,
        # Faust's (aiokafka's) producer writes the changelog only under exactly_once
        # (at-least-once: `streams.changelog`). Let it gather a few ms of writes into one
        # request, in batches that hold more than four golden states (its default is
        # 16 KB): sending each write alone cost more CPU than the merge itself.
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
        producer_compression_type=None if worker.compression == "none" else worker.compression,
        table_standby_replicas=0,
        broker_client_id=f"{worker.app_id}-{worker.instance}",
        broker_session_timeout=worker.session_timeout_s,
        broker_heartbeat_interval=worker.session_timeout_s / 5,
        broker_credentials=faust_credentials(settings),
        processing_guarantee=worker.processing_guarantee,
        Monitor=PerEventStatsOff,
    )
    _faust_views_off(app)

    # Before anything creates the consumer: see `streams.offsets` for why.
    app.transport.Consumer = guarded_consumer(
        app.transport.Consumer,
        [settings.topics.changes],
        in_order=worker.processing_guarantee == "at_least_once",
    )

    change_codec = canonical_codec(
        settings, registry, "dev.accord.CustomerChange", settings.topics.changes
    )
    # Read as bytes and decoded in the merge: a record that does not decode is
    # dead-lettered there, where Faust's codec would ack it and crash the agent.
    changes_topic = app.topic(
        settings.topics.changes,
        key_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=worker.partitions,
    )
    # Values are `streams.merge.dumps` bytes: the changelog format `emit` reads.
    golden = GoldenTable(
        app,
        name="golden",
        beacon=app.tables.beacon,
        partitions=worker.partitions,
        key_type=bytes,
        value_type=bytes,
        # Per partition. RocksDB's defaults (3 x 64 MiB memtables, a 2 GiB block cache)
        # grew the worker past 1 GiB at 100,000 customers; reads mostly hit the
        # merge's own `StateCache` anyway. 16 MiB memtables: 8 MiB ones cost 10%
        # more CPU in flushes and compactions (make bench, issue 8).
        options={
            "write_buffer_size": 16 * 1024**2,
            "max_write_buffer_number": 2,
            "block_cache_size": worker.rocksdb_cache_mb * 1024**2,
        },
    )
    if worker.bulk_restore:
        golden.restore = ChangelogRestore(
            settings.kafka_config(),
            changelog_topic(settings),
            RocksDBStore.offset_key,
            worker.bulk_restore_min_records,
        )
    app.tables.add(golden)
    # The largest state the merge writes: the setting, or less if the changelog takes less.
    max_state_bytes = record_limit(
        settings.kafka_config(), [changelog_topic(settings)], worker.max_record_bytes
    )
    if worker.processing_guarantee == "at_least_once":
        golden.writer = ChangelogWriter(
            settings.kafka_config(),
            changelog_topic(settings),
            golden.persisted,
            client_id=f"{worker.app_id}-{worker.instance}-changelog",
            compression=worker.compression,
            batch_bytes=max_state_bytes,
        )

    # What /health judges stalls and refusals by (`streams.health`): the worker's own
    # stages only; a paused target is a status, not a reason to restart the worker.
    stages = {name: StageProgress(name) for name in ("ingest", "merge", "emit")}

    # An unexpected error in an agent is a bug or broken state, not bad input (that goes
    # to the DLQ): crash the worker, so it shows, instead of restarting the agent forever.
    states = StateCache(worker.state_cache_size)
    dlq_producer = partial(Producer, settings.kafka_config({"enable.idempotence": True}))

    handover = HandOver(
        partial(
            Producer,
            settings.kafka_config({"enable.idempotence": True, "partitioner": "murmur2_random"}),
        ),
        settings.topics.changes,
        lambda change: change_codec.dumps(change.to_record()),
    )

    @app.agent(changes_topic, name="merge", supervisor_strategy=mode.CrashingSupervisor)
    async def merge(stream: faust.StreamT) -> None:
        inputs = stream.noack()
        letters = MergeDeadLetters(
            inputs, lambda: DeadLetterWriter(settings, registry, dlq_producer())
        )
        acks = AcksAfterWrites(app, inputs, golden, letters)
        async for event in inputs.events():
            stages["merge"].moved()
            if not app.consumer.admit(event.message):
                await inputs.ack(event)  # refused: it is read again, in order
                continue
            change = await decode_change(change_codec, event.value)
            if isinstance(change, Refusal):
                await letters.refuse(event, change)
                continue
            if change.system == CONTROL_SYSTEM and not change.is_control:
                # A merge's control change read under a schema without its fields (not
                # pushed to the registry, or an older worker): never a source row.
                await letters.refuse(event, UNREADABLE_CONTROL)
                continue
            key = event.key
            before = golden.get(key)
            state = states.get(key, before)
            if change.merge_into is not None:  # `accord merge`: hand this record over
                try:
                    outcome = await handover.retire(state, change)
                except MergeError as exc:
                    log.error("merge: %s; the control change is skipped", exc)
                    await inputs.ack(event)
                    continue
            elif state.merged_into is not None:  # a tombstone: its changes go on
                await handover.forward(change, state.merged_into)
                await inputs.ack(event)
                continue
            elif change.absorb is not None:  # a merged record's rows, for this one
                try:
                    outcome = absorb(state, loads(change.absorb), rules)
                except MergeError as exc:
                    log.error("merge: %s; the hand-over is skipped", exc)
                    await inputs.ack(event)
                    continue
                MERGED.labels("absorbed" if outcome.state_changed else "duplicate").inc()
                if outcome.state_changed:
                    stage(state, change, outcome, plan_sinks(state, change, sinks, rules))
            elif change.observed:
                outcome = repair(state, change, sinks, rules)
                REPAIRS.labels(change.system, "planned" if outcome.state_changed else "none").inc()
            else:
                outcome = apply(state, change, rules)
                MERGED.labels(_merge_outcome(outcome)).inc()
                for name in outcome.rejected:
                    REJECTED.labels(change.system, name).inc()
                if outcome.state_changed:
                    stage(state, change, outcome, plan_sinks(state, change, sinks, rules))
            if not outcome.state_changed:
                await inputs.ack(event)
                continue
            # `states.get` handed `state` out of the cache: one not written is not
            # cached, and the next change of the key starts again from the table.
            payload = dumps(state)
            refusal = oversize(len(payload), max_state_bytes)
            if refusal is None:
                try:
                    golden[key] = payload  # the changelog write `emit` turns into outputs
                except KafkaException as exc:  # refused before sending; the store is as it was
                    refusal = refusal_of(exc)
                    if refusal is None:
                        raise
            if refusal is not None:
                await letters.refuse(event, refusal)
                continue
            states.put(key, payload, state)
            acks.after(golden.last_write, event, key, payload, before)

    identity = IdentityResolver(
        redis_conn,
        worker.redis_prefix,
        rules.match,
        rules.identity,
        guarded=True,
        key_secret=settings.match_key_secret(),
    )
    _prepare_identity(identity)
    relinker = worker_relinker(settings, redis_conn, identity)
    ingest = partial(
        IngestLoop,
        settings.kafka_config(),
        ingest_group(settings),
        [mapping.topic for mapping in mappings.values()],
        IngestPipeline(
            RawDecoder(AvroCodec(writer_schemas(settings, registry))),
            Mapper(
                mappings,
                MissingColumns(MissingColumnSignal(redis_conn, worker.redis_prefix)),
                worker.max_clock_skew_s,
            ),
            Deduplicator(redis_conn, worker.redis_prefix, worker.dedupe_ttl_s),
            identity,
        ),
        settings.topics.changes,
        change_codec.dumps,
        partial(DeadLetterWriter, settings, registry),
        batch_size=worker.batch_size,
        batch_window_s=worker.batch_window_s,
        compression=worker.compression,
        session_timeout_s=worker.session_timeout_s,
        client_id=f"{ingest_group(settings)}-{worker.instance}",
        on_identity_lost=relinker.lost,
        progress=stages["ingest"],
        review_topic=settings.topics.review,
    )
    services = [ThreadStatus("ingest"), ThreadStatus("emitter")]
    services.append(ThreadStatus("identity-keeper"))
    app.service(_thread_service(services[-1], lambda: relinker))
    app.service(_thread_service(services[0], ingest))
    app.service(_thread_service(services[1], _make_emitter(settings, registry, stages["emit"])))
    if golden.writer is not None:
        services.append(ThreadStatus("changelog-writer"))
        app.service(_thread_service(services[-1], lambda: golden.writer))
    services.append(ThreadStatus("corroboration"))
    rescorer = HoldRescorer(
        redis_conn, worker.redis_prefix, rules.identity.matching, partial(reviewer_of, settings)
    )
    app.service(_thread_service(services[-1], lambda: rescorer))
    board = StatusBoard(settings)
    board_metrics = CollectorRegistry(auto_describe=True)
    board_metrics.register(BoardCollector(board))
    app.service(_thread_service(ThreadStatus("status-board"), lambda: board))
    if worker.connector_watchdog:
        services.append(ThreadStatus("connector-watchdog"))
        app.service(_thread_service(services[-1], partial(_make_watchdog, settings)))
    for target in in_worker_sinks(settings):
        status = ThreadStatus(f"sink-{target}")
        services.append(status)
        app.service(_thread_service(status, partial(SinkRunner, settings, target)))

    @app.timer(LAG_CHECK_S)
    async def merge_lag() -> None:
        """The merge's lag on this worker's partitions of the changes topic, from the
        status board's last snapshot (a stale or missing one tells nothing). While Faust
        rebalances or recovers the table, the merge is not expected to move: /health
        reports the rebalance instead."""
        if app.rebalancing:
            stages["merge"].lag(False)
            return
        snapshot = board.snapshot
        if snapshot is None or time.time() - snapshot.taken_at > 3 * worker.status_interval_s:
            return
        mine = {(tp.topic, tp.partition) for tp in app.consumer.assignment()}
        stages["merge"].lag(merge_has_work(snapshot, worker.app_id, settings.topics.changes, mine))

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        """Ready once partitions are assigned and the emitter runs, while no stage of its
        own (ingest, merge, emit) is stalled or refused; 503 with the reasons if not."""
        problems = []
        if app.rebalancing or not app.consumer.assignment():
            problems.append("waiting for partitions (rebalancing)")
        problems += [f"{s.name} not running" for s in services if not s.ready]
        if relinker.problem:
            problems.append(relinker.problem)
        for progress in stages.values():
            problems += progress.problems(worker.stall_after_s)
        # The pid tells a launcher this answer is its worker's, not a neighbour's.
        # Open to anyone who reaches the port: no customer value in a problem.
        problems = [redact.redact(problem) for problem in problems]
        body = {"ready": not problems, "problems": problems, "pid": os.getpid()}
        return web.json(body, status=200 if not problems else 503)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        """Prometheus text format: every stage's counters in this worker process, and the
        lag, DLQ and drift gauges of the status board."""
        text = generate_latest() + generate_latest(board_metrics)
        return web.text(text.decode(), content_type="text/plain")

    add_status_pages(app, guard, board.as_dict)

    return app


def merge_has_work(
    snapshot: Snapshot, app_id: str, changes: str, mine: set[tuple[str, int]]
) -> bool:
    """True when the merge group has uncommitted records on a partition of `changes` this
    worker holds (`mine`); partitions of other workers are theirs to judge."""
    return any(
        p.lag > 0
        for group in snapshot.groups
        if group.group == app_id
        for p in group.partitions
        if p.topic == changes and (p.topic, p.partition) in mine
    )


class ThreadStatus:
    """Shared between a background-thread service and the health page."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = False


Runnable = Any  # an object with run(stop: threading.Event) and close()


def _thread_service(status: ThreadStatus, make: Callable[[], Runnable]) -> type[mode.Service]:
    """A Faust service that runs a blocking loop (`run(stop)`) on its own thread.

    The emitter and the in-worker appliers are confluent-kafka loops; they run beside
    the agents, and a failure of one crashes the worker instead of going unnoticed.
    """

    class ThreadService(mode.Service):
        def __post_init__(self) -> None:
            self._stop = threading.Event()
            self._thread: threading.Thread | None = None
            self._failure: BaseException | None = None

        async def on_start(self) -> None:
            runnable = await asyncio.get_running_loop().run_in_executor(None, make)
            self._thread = threading.Thread(
                target=self._run, args=(runnable,), name=f"accord-{status.name}", daemon=True
            )
            self._thread.start()
            status.ready = True

        def _run(self, runnable: Runnable) -> None:
            try:
                runnable.run(self._stop)
            except BaseException as exc:  # surfaced by the watchdog below
                status.ready = False
                self._failure = exc
                log.exception("%s failed", status.name)
            finally:
                runnable.close()

        @mode.Service.task
        async def _watchdog(self) -> None:
            while not self.should_stop:
                if self._failure is not None:
                    await self.crash(self._failure)
                    return
                await self.sleep(1.0)

        async def on_stop(self) -> None:
            self._stop.set()
            if self._thread is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    ThreadService.__name__ = f"{status.name.title().replace('-', '')}Service"
    return ThreadService


def _make_emitter(
    settings: AccordSettings, registry: Any, progress: StageProgress | None = None
) -> Callable[[], Emitter]:
    topics = settings.topics

    def make() -> Emitter:
        outputs = [
            topics.golden,
            topics.audit,
            *map(topics.sink, load_sinks(settings.connectors_dir)),
        ]
        max_bytes = record_limit(settings.kafka_config(), outputs, settings.worker.max_record_bytes)
        return Emitter(
            settings.kafka_config(),
            group_id=emit_group(settings),
            session_timeout_s=settings.worker.session_timeout_s,
            transactional_id=f"{settings.worker.app_id}-emit-{settings.worker.instance}",
            topics=EmitTopics(
                changelog_topic(settings), topics.golden, topics.audit, topics.sink_prefix
            ),
            encode_golden=canonical_codec(
                settings, registry, "dev.accord.Customer", topics.golden
            ).dumps,
            encode_audit=canonical_codec(
                settings, registry, "dev.accord.AuditEntry", topics.audit
            ).dumps,
            encode_sink=_sink_encoder(settings, registry),
            batch_size=settings.worker.batch_size,
            compression=settings.worker.compression,
            progress=progress,
            # Letters go in the emitter's own transactions: no producer of their own.
            dead_letters=lambda: DeadLetterWriter(settings, registry, None),
            max_record_bytes=max_bytes,
        )

    return make


def _make_watchdog(settings: AccordSettings) -> ConnectorWatchdog:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.kafka_config({"group.id": "accord-watchdog"}))

    def heartbeat_end(topic: str) -> int:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return -1
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
            for p in metadata.partitions
        )

    connectors = [load_connector(settings.connectors_dir, system) for system in SYSTEMS]
    return ConnectorWatchdog(
        ConnectClient.of(settings),
        connectors,
        heartbeat_end,
        stall_s=settings.worker.connector_stall_s,
    )


def in_worker_sinks(settings: AccordSettings) -> list[str]:
    """The targets whose appliers this worker runs (`worker.sinks`; None: every SQL one)."""
    specs = load_sinks(settings.connectors_dir)
    if settings.worker.sinks is None:
        return sorted(t for t, spec in specs.items() if spec.kind is SinkKind.SQL)
    unknown = [t for t in settings.worker.sinks if t not in specs]
    if unknown:
        raise ConfigError(
            f"worker.sinks names {', '.join(unknown)}, which has no sink section in "
            f"{settings.connectors_dir} (targets: {', '.join(sorted(specs))})"
        )
    return list(settings.worker.sinks)


def _sink_encoder(settings: AccordSettings, registry: Any) -> Callable[[dict[str, Any]], bytes]:
    """SinkEvent encoders, one per target topic (each topic has its own subject)."""
    codecs = {
        target: canonical_codec(
            settings, registry, "dev.accord.SinkEvent", settings.topics.sink(target)
        )
        for target in load_sinks(settings.connectors_dir)
    }
    return lambda event: codecs[event["target"]].dumps(event)


def run_worker(settings: AccordSettings, loglevel: str = "info") -> None:
    """Lock the data dir, create topics, guard the local state, and run until stopped
    (SIGINT/SIGTERM).

    The lock comes first: a second worker with the same app id and instance must leave
    before it can judge (and wipe) the first one's live state. Raises
    `WorkerAlreadyRunning` or `PortTaken` before touching anything.
    """
    if settings.redact_pii:
        redact.install()
    # A Redis off loopback without identity.key_secret: refused before anything starts.
    settings.match_key_secret()
    directory = data_dir(settings)
    lock = DataDirLock(directory)
    lock.acquire(settings.worker.instance)  # held until this process ends
    settings = _with_web_port(settings)
    port = settings.worker.port
    ensure_topics(settings)
    if settings.worker.processing_guarantee == "exactly_once":
        log.warning(
            "processing_guarantee=exactly_once is experimental: it failed the fault suite "
            "(Faust's transactional commits trip Accord's offset guard); see the README"
        )
    marker = directory.with_name(directory.name + "." + CLEAN_STOP_MARKER)
    if marker.exists():
        # The last worker died without committing: its RocksDB may hold writes whose
        # changelog records never reached Kafka. Rebuild from the changelog instead.
        log.warning("previous worker stopped uncleanly: rebuilding state from the changelog")
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text("a worker is running, or died without a clean stop\n")
    publish_port(directory, port)
    print(f"accord worker {settings.worker.instance}: web port {port}", flush=True)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        if exit_.code in (0, None):
            marker.unlink(missing_ok=True)
        raise
    finally:
        port_file(directory).unlink(missing_ok=True)
        lock.release()


def _with_web_port(settings: AccordSettings) -> AccordSettings:
    """The settings with the web port this worker will bind: a free one for 0. Raises
    `PortTaken` when another process listens on it, before anything starts."""
    worker = settings.worker
    port = worker.port or free_port(worker.web_host)
    check_port_free(worker.web_host, port)
    return settings.model_copy(update={"worker": worker.model_copy(update={"web_port": port})})
