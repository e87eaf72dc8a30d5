"""Monitor: one consistent picture of Accord's topics, consumer groups, connectors and slots.

Every snapshot is read fresh from the broker, Connect and PostgreSQL: a group's lag is
computed from its committed offsets and the topics' current partitions, and the owner of
each partition from the group's current description. Nothing is carried over from an
earlier snapshot except the offsets used to compute rates, so after a rebalance no
partition is reported under an owner that gave it up, and none is left out.

Committed offsets are fetched by a consumer that carries the group's id and never joins,
not by the admin client: librdkafka (up to 2.16 at least, PR 5397) aborts the whole
process when a coordinator-targeted admin request (ListConsumerGroupOffsets,
DescribeConsumerGroups) loses its connection, which a broker restart does. The worker's
status board therefore also skips the group descriptions (`members=False`); the one-shot
`accord monitor` command keeps them, to show who owns each partition.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from streams.missing_columns import MissingColumn, read_missing_columns
from streams.settings import AccordSettings

REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WatchedTopic:
    name: str
    kind: str  # source, changes, changelog, golden, audit, dlq, sink


@dataclass
class TopicStats:
    topic: str
    kind: str
    partitions: int
    messages: int  # held now: end offsets minus earliest offsets
    end_offsets: list[int]
    rate_per_s: float | None = None  # messages written per second since the last snapshot
    exists: bool = True


@dataclass
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    committed: int | None  # None: the group has committed nothing here yet
    lag: int
    owner: str | None  # the member that holds it now (client id), None if unassigned


@dataclass
class GroupLag:
    group: str
    state: str
    members: int | None  # None: not described (the worker's status board)
    lag: int
    partitions: list[PartitionLag] = field(default_factory=list)


@dataclass
class ConnectorStatus:
    name: str
    state: str
    tasks: list[str]
    detail: str | None = None


@dataclass
class SlotLag:
    system: str
    slot: str
    active: bool
    lag_bytes: int | None  # WAL the slot still holds back, from its confirmed flush
    # PostgreSQL's wal_status (reserved, extended, unreserved, lost), or "missing" when
    # the connector's slot does not exist: both mean `accord connectors resnapshot`.
    wal_status: str | None = None


@dataclass
class PausedTarget:
    """A target whose applier is paused on a target-wide error (`streams.sinks`)."""

    target: str
    reason: str  # redacted; "unknown: ..." when the signals could not be read
    since: float | None  # epoch seconds


@dataclass
class Snapshot:
    taken_at: float
    topics: list[TopicStats]
    groups: list[GroupLag]
    connectors: list[ConnectorStatus]
    slots: list[SlotLag]
    dlq_size: int
    dlq_growth_per_s: float | None
    paused: list[PausedTarget] = field(default_factory=list)
    # Mapped source columns a source's rows no longer carry (`streams.missing_columns`).
    missing_columns: list[MissingColumn] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def watched_topics(settings: AccordSettings) -> list[WatchedTopic]:
    """Every source topic and every topic Accord writes, in data-path order."""
    from streams.mapping import load_mappings
    from streams.projection import load_sinks
    from streams.topology import changelog_topic

    topics = settings.topics
    mappings = load_mappings(settings.connectors_dir)
    return [
        *(WatchedTopic(m.topic, "source") for m in mappings.values()),
        WatchedTopic(topics.changes, "changes"),
        WatchedTopic(changelog_topic(settings), "changelog"),
        WatchedTopic(topics.golden, "golden"),
        WatchedTopic(topics.audit, "audit"),
        *(
            WatchedTopic(topics.sink(t), "sink")
            for t in sorted(load_sinks(settings.connectors_dir))
        ),
        WatchedTopic(topics.dlq, "dlq"),
    ]


def accord_groups(group_ids: Iterable[str], app_id: str) -> list[str]:
    """The consumer groups of one Accord app: its agents, emitter and appliers."""
    return sorted(g for g in group_ids if g == app_id or g.startswith(f"{app_id}-"))


def group_lag(
    group: str,
    state: str,
    committed: dict[tuple[str, int], int],
    owners: dict[tuple[str, int], str],
    ends: dict[tuple[str, int], int],
    starts: dict[tuple[str, int], int],
    members: int | None,
) -> GroupLag:
    """A group's lag on every partition of every topic it reads (committed to or owns).

    Partitions come from the topics' current layout, so a partition that nobody owns
    after a rebalance still shows its lag; one with no commit counts from its start.
    """
    topics = {topic for topic, _ in [*committed, *owners]}
    result = GroupLag(group, state, members, 0)
    for topic, partition in sorted(key for key in ends if key[0] in topics):
        end = ends[(topic, partition)]
        offset = committed.get((topic, partition))
        lag = max(0, end - (offset if offset is not None else starts.get((topic, partition), 0)))
        owner = owners.get((topic, partition))
        result.partitions.append(PartitionLag(topic, partition, end, offset, lag, owner))
        result.lag += lag
    return result


class Monitor:
    """Takes snapshots; keeps the previous one's offsets to turn them into rates."""

    def __init__(
        self, settings: AccordSettings, admin: AdminClient | None = None, members: bool = True
    ) -> None:
        self.settings = settings
        self.admin = admin or AdminClient(settings.kafka_config())
        self.members = members
        self._offset_readers: dict[str, Consumer] = {}
        self._connect: Any = None  # one HTTP client for every snapshot: each costs a TLS context
        self.watched = watched_topics(settings)
        self._changelogs = {w.name for w in self.watched if w.kind == "changelog"}
        self._previous: tuple[float, dict[str, int]] | None = None
        self._redis: Any = None
        self._missing: list[MissingColumn] = []  # read with the pauses

    # -- Kafka ------------------------------------------------------------------------

    def _layout(self, topics: list[str]) -> dict[str, int]:
        """Partition counts of the topics that exist. Only these are described: the
        cluster's whole metadata, on a shared cluster thousands of topics, cost a worker
        2% of its CPU at a snapshot every 5 s."""
        futures = self.admin.describe_topics(
            TopicCollection(topics), request_timeout=REQUEST_TIMEOUT_S
        )
        layout = {}
        for topic, future in futures.items():
            try:
                layout[topic] = len(future.result().partitions)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise
        return layout

    def _offsets(self, layout: dict[str, int], spec: OffsetSpec) -> dict[tuple[str, int], int]:
        request = {
            TopicPartition(topic, p): spec for topic, count in layout.items() for p in range(count)
        }
        if not request:
            return {}
        futures = self.admin.list_offsets(request, request_timeout=REQUEST_TIMEOUT_S)
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    def _committed(
        self, group: str, partitions: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        reader = self._offset_readers.get(group)
        if reader is None:
            reader = Consumer(
                self.settings.kafka_config(
                    {
                        "group.id": group,
                        "client.id": f"{self.settings.worker.app_id}-monitor",
                        "enable.auto.commit": False,
                    }
                )
            )
            self._offset_readers[group] = reader
        request = [TopicPartition(topic, p) for topic, p in partitions]
        if not request:
            return {}
        answer = reader.committed(request, timeout=REQUEST_TIMEOUT_S)
        return {(tp.topic, tp.partition): tp.offset for tp in answer if tp.offset >= 0}

    def _groups(
        self, ends: dict[tuple[str, int], int], starts: dict[tuple[str, int], int]
    ) -> list[GroupLag]:
        listed = self.admin.list_consumer_groups(request_timeout=REQUEST_TIMEOUT_S).result()
        states = {g.group_id: g.state for g in listed.valid}
        ids = accord_groups(states, self.settings.worker.app_id)
        if not ids:
            return []
        descriptions = {}
        if self.members:
            descriptions = {
                g: f.result()
                for g, f in self.admin.describe_consumer_groups(
                    ids, request_timeout=REQUEST_TIMEOUT_S
                ).items()
            }
        groups = []
        for group in ids:
            committed = self._committed(group, ends)
            description = descriptions.get(group)
            # Faust's own group is also assigned its table's changelog, which it reads only
            # to restore the table and never commits: that is not lag.
            restore_only = self._changelogs if group == self.settings.worker.app_id else set()
            owners = {
                (tp.topic, tp.partition): member.client_id
                for member in (description.members if description else [])
                for tp in (member.assignment.topic_partitions if member.assignment else [])
                if tp.topic not in restore_only
            }
            state = description.state if description else states[group]
            state = getattr(state, "name", str(state))
            members = len(description.members) if description else None
            lag = group_lag(group, state, committed, owners, ends, starts, members)
            if lag.partitions or lag.members:  # a one-off reader's empty group is noise
                groups.append(lag)
        return groups

    def close(self) -> None:
        for reader in self._offset_readers.values():
            reader.close()
        self._offset_readers.clear()
        if self._connect is not None:
            self._connect.http.close()
            self._connect = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    # -- the rest of the pipeline ------------------------------------------------------

    def _connectors(self) -> list[ConnectorStatus]:
        from streams.connect import SYSTEMS, ConnectClient, load_connector

        if self._connect is None:
            self._connect = ConnectClient.of(self.settings, timeout_s=REQUEST_TIMEOUT_S)
        client = self._connect
        result = []
        for system in SYSTEMS:
            name = load_connector(self.settings.connectors_dir, system).name
            try:
                state = client.state(name)
            except Exception as exc:  # Connect down is something to show, not to crash on
                result.append(ConnectorStatus(name, "UNREACHABLE", [], str(exc)[:200]))
                continue
            result.append(ConnectorStatus(name, state.state, state.tasks, state.trace))
        return result

    def _slots(self) -> list[SlotLag]:
        from streams.connect import load_connector
        from streams.sources import postgres

        slots = []
        for system in ("crm", "support"):
            expected = load_connector(self.settings.connectors_dir, system).config.get("slot.name")
            try:
                with postgres(self.settings, system) as conn:
                    rows = conn.execute(
                        "SELECT slot_name, active, "
                        "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, "
                        "wal_status "
                        "FROM pg_replication_slots WHERE database = current_database()"
                    ).fetchall()
            except Exception as exc:  # a source down is shown as unknown lag
                slots.append(SlotLag(system, f"unreachable: {str(exc)[:120]}", False, None))
                continue
            slots += [SlotLag(system, *row) for row in rows]
            if expected and expected not in {row[0] for row in rows}:
                slots.append(SlotLag(system, expected, False, None, "missing"))
        return slots

    def _paused(self) -> list[PausedTarget]:
        """Targets whose appliers say they are paused, wherever they run (the worker, or
        `accord sink`): each publishes its pause in Redis while it lasts."""
        import redis

        from streams.projection import load_sinks
        from streams.sinks import read_pauses

        targets = sorted(load_sinks(self.settings.connectors_dir))
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.redis,
                **self.settings.redis_credentials(),
                socket_timeout=REQUEST_TIMEOUT_S,
                socket_connect_timeout=REQUEST_TIMEOUT_S,
            )
        try:
            pauses = read_pauses(self._redis, self.settings.worker.redis_prefix, targets)
            self._missing = read_missing_columns(self._redis, self.settings.worker.redis_prefix)
        except redis.RedisError as exc:  # shown, not crashed on: Redis may be down
            return [PausedTarget("*", f"unknown: Redis: {type(exc).__name__}: {exc}", None)]
        return [PausedTarget(p.target, p.reason, p.since) for p in pauses]

    # -- the snapshot -------------------------------------------------------------------

    def snapshot(self, connectors: bool = True, slots: bool = True) -> Snapshot:
        names = [w.name for w in self.watched]
        try:
            layout = self._layout(names)
            ends = self._offsets(layout, OffsetSpec.latest())
            starts = self._offsets(layout, OffsetSpec.earliest())
            groups = self._groups(ends, starts)
        except KafkaException as exc:
            raise ConnectionError(f"Kafka at {self.settings.kafka}: {exc}") from exc
        now = time.monotonic()
        totals = {t: sum(ends[(t, p)] for p in range(count)) for t, count in layout.items()}
        elapsed = now - self._previous[0] if self._previous else 0.0
        topics = []
        for watched in self.watched:
            count = layout.get(watched.name, 0)
            rate = None
            if self._previous and elapsed > 0 and watched.name in self._previous[1]:
                rate = (totals[watched.name] - self._previous[1][watched.name]) / elapsed
            topics.append(
                TopicStats(
                    watched.name,
                    watched.kind,
                    count,
                    sum(ends[(watched.name, p)] - starts[(watched.name, p)] for p in range(count)),
                    [ends[(watched.name, p)] for p in range(count)],
                    None if rate is None else round(rate, 2),
                    exists=watched.name in layout,
                )
            )
        self._previous = (now, totals)
        [dlq] = [t for t in topics if t.kind == "dlq"]
        return Snapshot(
            taken_at=time.time(),
            topics=topics,
            groups=groups,
            connectors=self._connectors() if connectors else [],
            slots=self._slots() if slots else [],
            dlq_size=dlq.messages,
            dlq_growth_per_s=dlq.rate_per_s,
            paused=self._paused(),
            missing_columns=self._missing,
        )
