"""Accord's own topics, declared in one place and created before the worker starts.

Partition counts matter: `accord.changes` and the golden table's changelog must have the
same count (Faust co-partitions them), and a topic the broker auto-created with its
default count would break that. So every topic is created explicitly, and an existing
topic with the wrong count is an error that says so rather than a silent mismatch.

Durability is set per kind of topic (`settings.durability`): replication `min(3, brokers)`
counted from the cluster when the topics are made, `min.insync.replicas` 2 where there are
3 copies, the DLQ and audit kept until an operator deletes them. An existing topic that
keeps less than configured is reported; its configs are raised in place, its replication
(which no config can change) is left with the command that reassigns it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ClusterMetadata,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)
from confluent_kafka.error import KafkaError, KafkaException

from streams.errors import AccordError, ConfigError
from streams.model import SYSTEMS
from streams.settings import AccordSettings, TopicDurability

log = logging.getLogger(__name__)

WEEK_MS = str(7 * 24 * 3600 * 1000)
REPLICATION = "replication.factor"  # not a topic config: a Drift of it cannot be altered


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    strict_partitions: bool = False  # co-partitioned: a different count is an error
    replication: int = 1
    kind: str = ""  # the `settings.durability` section it follows


def durable_spec(
    name: str,
    partitions: int,
    kind: str,
    durability: TopicDurability,
    brokers: int,
    config: Mapping[str, str] | None = None,
    strict_partitions: bool = False,
) -> TopicSpec:
    """A topic made as its kind's durability says, on a cluster of `brokers` brokers.

    Replication defaults to `min(3, brokers)`, so a one-broker development cluster works
    unchanged; `min.insync.replicas` to 2 where there are 3 copies or more (one broker may
    fail without stopping writes or losing an acknowledged one), else the broker's own.
    """
    replication = durability.replication_factor or min(3, max(brokers, 1))
    full = {"cleanup.policy": durability.cleanup_policy, **(config or {})}
    min_insync = durability.min_insync_replicas or (2 if replication >= 3 else None)
    if min_insync is not None:
        if min_insync > replication:
            raise ConfigError(
                f"durability.{kind}: min_insync_replicas {min_insync} is more than its "
                f"{replication} replica(s); no write to {name} could ever be acknowledged"
            )
        full["min.insync.replicas"] = str(min_insync)
    if durability.retention_ms is not None:
        full["retention.ms"] = str(durability.retention_ms)
    if durability.retention_bytes is not None:
        full["retention.bytes"] = str(durability.retention_bytes)
    return TopicSpec(name, partitions, full, strict_partitions, replication, kind)


def changelog_topic(settings: AccordSettings) -> str:
    """The golden table's changelog, named as Faust names it."""
    return f"{settings.worker.app_id}-golden-changelog"


def ingest_group(settings: AccordSettings) -> str:
    """The consumer group of the workers' ingest loops over the raw topics."""
    return f"{settings.worker.app_id}-ingest"


def emit_group(settings: AccordSettings) -> str:
    """The consumer group of the workers' emitters over the golden changelog."""
    return f"{settings.worker.app_id}-emit"


def sink_group(settings: AccordSettings, target: str) -> str:
    """The consumer group of `target`'s appliers over its sink topic."""
    return f"{settings.worker.app_id}-sink-{target}"


def sink_targets(settings: AccordSettings) -> list[str]:
    """Every target with a sink section; the sample systems even without one."""
    from streams.projection import load_sinks

    return sorted(set(SYSTEMS) | set(load_sinks(settings.connectors_dir)))


def source_topics(settings: AccordSettings, brokers: int = 1) -> list[TopicSpec]:
    """The raw topics Debezium writes, made as its connector would make them.

    A connector creates its topic with the first change it captures; a worker started
    on an empty source before that would find no topic to subscribe to and never read it.
    `brokers` is the cluster's size, which sets the default replication.
    """
    from streams.connect import load_connector
    from streams.mapping import load_mappings

    specs = []
    for system, mapping in load_mappings(settings.connectors_dir).items():
        config = load_connector(settings.connectors_dir, system).config
        partitions = int(config.get("topic.creation.default.partitions", 1))
        specs.append(
            durable_spec(mapping.topic, partitions, "source", settings.durability.source, brokers)
        )
    return specs


def accord_topics(settings: AccordSettings, brokers: int = 1) -> list[TopicSpec]:
    """Accord's own topics; `brokers` is the cluster's size, which sets the replication."""
    topics, partitions, durability = (
        settings.topics,
        settings.worker.partitions,
        settings.durability,
    )

    def spec(name: str, count: int, kind: str, **extra: object) -> TopicSpec:
        return durable_spec(name, count, kind, getattr(durability, kind), brokers, **extra)  # type: ignore[arg-type]

    return [
        spec(topics.changes, partitions, "changes", strict_partitions=True),
        # The merge's source of truth, read by `emit`: compacted, but never before emit
        # has had a week to read every version.
        spec(
            changelog_topic(settings),
            partitions,
            "changelog",
            config={"min.compaction.lag.ms": WEEK_MS},
            strict_partitions=True,
        ),
        spec(topics.golden, partitions, "golden"),
        spec(topics.audit, partitions, "audit"),
        spec(topics.dlq, 1, "dlq"),
        # Holds and review decisions (`streams.review`): the latest record of each held
        # row, which outlives Redis. One partition: a few records a held row, scanned whole.
        spec(topics.review, 1, "review"),
        *(spec(topics.sink(target), partitions, "sink") for target in sink_targets(settings)),
    ]


@dataclass(frozen=True)
class Drift:
    """One way an existing topic keeps less than its kind is configured to."""

    topic: str
    kind: str
    name: str  # a topic config, or REPLICATION
    have: str
    want: str
    alterable: bool  # can be raised in place without stopping writes

    def describe(self) -> str:
        setting = f"ACCORD_DURABILITY__{self.kind.upper()}"
        return (
            f"topic {self.topic} ({self.kind}): {self.name} is {self.have}, "
            f"configured {self.want} ({setting})"
        )


def _keeps_less(have: str, want: str) -> bool:
    """For a limit where -1 means none: does `have` keep less than `want`?"""
    if have == want:
        return False
    if want == "-1":
        return True
    return have != "-1" and int(have) < int(want)


def config_drift(spec: TopicSpec, have: Mapping[str, str], replication: int) -> list[Drift]:
    """Where an existing topic (its configs, its fewest replicas) is weaker than `spec`.

    Weaker: fewer replicas, a lower `min.insync.replicas`, a shorter retention or
    compaction lag, another cleanup policy. `min.insync.replicas` is alterable only
    where the topic has the replicas for it (more would stop every acknowledged write).
    """
    drifts = []
    if replication < spec.replication:
        drifts.append(
            Drift(spec.name, spec.kind, REPLICATION, str(replication), str(spec.replication), False)
        )
    for name, want in spec.config.items():
        current = have.get(name)
        alterable = True
        if current is None:
            weaker = True
        elif name == "cleanup.policy":
            weaker = set(current.split(",")) != set(want.split(","))
        elif name in ("retention.ms", "retention.bytes"):
            weaker = _keeps_less(current, want)
        elif name in ("min.insync.replicas", "min.compaction.lag.ms"):
            weaker = int(current) < int(want)
            alterable = name != "min.insync.replicas" or replication >= int(want)
        else:
            weaker = current != want
        if weaker:
            drifts.append(Drift(spec.name, spec.kind, name, str(current), want, alterable))
    return drifts


def reassignment_plan(
    topic: str, replicas: Mapping[int, list[int]], broker_ids: Iterable[int], replication: int
) -> dict[str, object]:
    """A `kafka-reassign-partitions.sh` plan that gives each partition `replication` copies.

    Each partition keeps its replicas (its leader first) and gains the brokers after its
    last one in id order, so the new copies are spread over the cluster.
    """
    ids = sorted(broker_ids)
    partitions = []
    for partition, current in sorted(replicas.items()):
        chosen = list(current)
        start = ids.index(current[-1]) + 1 if current and current[-1] in ids else partition
        for step in range(len(ids)):
            if len(chosen) >= replication:
                break
            candidate = ids[(start + step) % len(ids)]
            if candidate not in chosen:
                chosen.append(candidate)
        partitions.append({"topic": topic, "partition": partition, "replicas": chosen})
    return {"version": 1, "partitions": partitions}


def reconcile_durability(
    admin: AdminClient,
    specs: list[TopicSpec],
    metadata: ClusterMetadata,
    bootstrap: str,
    timeout_s: float = 30.0,
) -> tuple[list[Drift], list[Drift]]:
    """Report existing topics weaker than their specs; raise the configs that can be.

    Returns (altered, left): what was raised in place, and what an operator must fix
    (replication, or a `min.insync.replicas` the topic lacks the replicas for). Each is
    logged as a warning that says what to do.
    """
    existing = [spec for spec in specs if spec.name in metadata.topics]
    if not existing:
        return [], []
    resources = [ConfigResource(ResourceType.TOPIC, spec.name) for spec in existing]
    described = admin.describe_configs(resources, request_timeout=timeout_s)
    drifts: list[Drift] = []
    for spec, resource in zip(existing, resources, strict=True):
        try:
            entries = described[resource].result(timeout_s)
        except KafkaException as exc:
            raise AccordError(f"kafka: cannot read the configs of {spec.name}: {exc}") from exc
        partitions = metadata.topics[spec.name].partitions.values()
        replication = min((len(p.replicas) for p in partitions), default=0)
        have = {name: entry.value for name, entry in entries.items()}
        drifts += config_drift(spec, have, replication)
        if int(have.get("min.insync.replicas", 1)) > replication:
            log.warning(
                "topic %s has %d replica(s) but min.insync.replicas %s: every write that "
                "waits for all in-sync copies (acks=all, as Accord's) is refused",
                spec.name,
                replication,
                have["min.insync.replicas"],
            )
    altered = [d for d in drifts if d.alterable]
    left = [d for d in drifts if not d.alterable]
    by_topic: dict[str, list[Drift]] = {}
    for drift in altered:
        by_topic.setdefault(drift.topic, []).append(drift)
    changes = [
        ConfigResource(
            ResourceType.TOPIC,
            topic,
            incremental_configs=[
                ConfigEntry(d.name, d.want, incremental_operation=AlterConfigOpType.SET)
                for d in topic_drifts
            ],
        )
        for topic, topic_drifts in by_topic.items()
    ]
    if changes:
        for resource, future in admin.incremental_alter_configs(
            changes, request_timeout=timeout_s
        ).items():
            try:
                future.result(timeout_s)
            except KafkaException as exc:
                raise AccordError(
                    f"kafka: cannot raise the configs of {resource.name} to those configured: {exc}"
                ) from exc
    for drift in altered:
        log.warning("%s: raised to %s", drift.describe(), drift.want)
    for drift in left:
        if drift.name == REPLICATION:
            partitions = metadata.topics[drift.topic].partitions
            plan = reassignment_plan(
                drift.topic,
                {number: list(p.replicas) for number, p in partitions.items()},
                metadata.brokers,
                int(drift.want),
            )
            log.warning(
                "%s: no config changes the replication of an existing topic; reassign its "
                "partitions: save %s as plan.json and run kafka-reassign-partitions.sh "
                "--bootstrap-server %s --reassignment-json-file plan.json --execute",
                drift.describe(),
                json.dumps(plan, separators=(",", ":")),
                bootstrap.split(",")[0],
            )
        else:
            log.warning(
                "%s: left as it is, since the topic has fewer replicas than that; raise its "
                "replication first",
                drift.describe(),
            )
    return altered, left


def cluster_brokers(admin: AdminClient, bootstrap: str, timeout_s: float) -> ClusterMetadata:
    try:
        return admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise AccordError(f"kafka at {bootstrap}: cannot list topics: {exc}") from exc


def internal_replication(settings: AccordSettings, timeout_s: float = 30.0) -> int:
    """Replication of the few topics Faust makes itself (its assignor's leader topic)."""
    configured = settings.durability.changelog.replication_factor
    if configured is not None:
        return configured
    admin = AdminClient(settings.kafka_config())
    return min(3, max(len(cluster_brokers(admin, settings.kafka, timeout_s).brokers), 1))


def ensure_topics(settings: AccordSettings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics, the sources' and Accord's own; returns the names created.

    Existing ones weaker than configured are reported and, where it is safe, raised
    (`reconcile_durability`).
    """
    admin = AdminClient(settings.kafka_config())
    metadata = cluster_brokers(admin, settings.kafka, timeout_s)
    brokers = len(metadata.brokers)
    specs = [*source_topics(settings, brokers), *accord_topics(settings, brokers)]
    existing = metadata.topics
    for spec in specs:
        if spec.name in existing and spec.strict_partitions:
            have = len(existing[spec.name].partitions)
            if have != spec.partitions:
                raise AccordError(
                    f"topic {spec.name} has {have} partitions but the worker is configured "
                    f"for {spec.partitions} (ACCORD_WORKER__PARTITIONS); they must agree"
                )
    missing = [spec for spec in specs if spec.name not in existing]
    too_many = [spec for spec in missing if spec.replication > brokers]
    if too_many:
        spec = too_many[0]
        raise AccordError(
            f"topic {spec.name} is configured for {spec.replication} replicas but the cluster "
            f"at {settings.kafka} has {brokers} broker(s) "
            f"(ACCORD_DURABILITY__{spec.kind.upper()}__REPLICATION_FACTOR)"
        )
    reconcile_durability(admin, specs, metadata, settings.kafka, timeout_s)
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication, config=s.config) for s in missing],
        operation_timeout=timeout_s,
    )
    for name, future in futures.items():
        try:
            future.result(timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise AccordError(f"kafka: cannot create topic {name}: {exc}") from exc
    return [spec.name for spec in missing]
