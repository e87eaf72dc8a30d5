"""Accord's own topics, declared in one place and created before the worker starts.

Partition counts matter: `accord.changes` and the golden table's changelog must have the
same count (Faust co-partitions them), and a topic the broker auto-created with its
default count would break that. So every topic is created explicitly, and an existing
topic with the wrong count is an error that says so rather than a silent mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.error import KafkaError, KafkaException

from streams.errors import AccordError
from streams.model import SYSTEMS
from streams.settings import AccordSettings

WEEK_MS = str(7 * 24 * 3600 * 1000)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    strict_partitions: bool = False  # co-partitioned: a different count is an error


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


def source_topics(settings: AccordSettings) -> list[TopicSpec]:
    """The raw topics Debezium writes, made as its connector would make them.

    A connector creates its topic with the first change it captures; a worker started
    on an empty source before that would find no topic to subscribe to and never read it.
    """
    from streams.connect import load_connector
    from streams.mapping import load_mappings

    specs = []
    for system, mapping in load_mappings(settings.connectors_dir).items():
        config = load_connector(settings.connectors_dir, system).config
        specs.append(
            TopicSpec(mapping.topic, int(config.get("topic.creation.default.partitions", 1)))
        )
    return specs


def accord_topics(settings: AccordSettings) -> list[TopicSpec]:
    topics, partitions = settings.topics, settings.worker.partitions
    return [
        TopicSpec(topics.changes, partitions, strict_partitions=True),
        # The merge's source of truth, read by `emit`: compacted, but never before emit
        # has had a week to read every version.
        TopicSpec(
            changelog_topic(settings),
            partitions,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": WEEK_MS},
            strict_partitions=True,
        ),
        TopicSpec(topics.golden, partitions, {"cleanup.policy": "compact"}),
        TopicSpec(topics.audit, partitions),
        TopicSpec(topics.dlq, 1),
        *(TopicSpec(topics.sink(target), partitions) for target in sink_targets(settings)),
    ]


def ensure_topics(settings: AccordSettings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics, the sources' and Accord's own; returns the names created."""
    admin = AdminClient(settings.kafka_config())
    specs = [*source_topics(settings), *accord_topics(settings)]
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise AccordError(f"kafka at {settings.kafka}: cannot list topics: {exc}") from exc
    for spec in specs:
        if spec.name in existing and spec.strict_partitions:
            have = len(existing[spec.name].partitions)
            if have != spec.partitions:
                raise AccordError(
                    f"topic {spec.name} has {have} partitions but the worker is configured "
                    f"for {spec.partitions} (ACCORD_WORKER__PARTITIONS); they must agree"
                )
    missing = [spec for spec in specs if spec.name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, s.partitions, 1, config=s.config) for s in missing],
        operation_timeout=timeout_s,
    )
    for name, future in futures.items():
        try:
            future.result(timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise AccordError(f"kafka: cannot create topic {name}: {exc}") from exc
    return [spec.name for spec in missing]
