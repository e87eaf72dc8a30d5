"""Which topics the worker makes before it starts, and how."""

import pytest

from streams.errors import ConfigError
from streams.settings import AccordSettings, DurabilitySettings, KeptTopic
from streams.topology import (
    REPLICATION,
    WEEK_MS,
    TopicSpec,
    accord_topics,
    config_drift,
    reassignment_plan,
    source_topics,
)


def test_source_topics_are_made_as_their_connectors_would_make_them() -> None:
    specs = {spec.name: spec.partitions for spec in source_topics(AccordSettings())}
    assert specs == {
        "crm.public.customers": 3,
        "billing.billing.accounts": 3,
        "support.public.users": 3,
    }


def test_source_topics_are_not_accords_own() -> None:
    """`accord reset` deletes Accord's own topics; the captured sources must not be among them."""
    ours = {spec.name for spec in accord_topics(AccordSettings())}
    assert not ours & {spec.name for spec in source_topics(AccordSettings())}


def _specs(brokers: int, **durability: object) -> dict[str, TopicSpec]:
    settings = AccordSettings(durability=DurabilitySettings(**durability))  # type: ignore[arg-type]
    return {spec.kind: spec for spec in accord_topics(settings, brokers)}


@pytest.mark.parametrize(("brokers", "replication"), [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_replication_is_three_or_the_brokers_there_are(brokers: int, replication: int) -> None:
    specs = [*accord_topics(AccordSettings(), brokers), *source_topics(AccordSettings(), brokers)]
    assert {spec.replication for spec in specs} == {replication}


def test_min_insync_is_two_only_where_there_are_three_copies() -> None:
    for brokers in (1, 2):
        assert all("min.insync.replicas" not in s.config for s in _specs(brokers).values())
    assert {s.config["min.insync.replicas"] for s in _specs(3).values()} == {"2"}


def test_each_kind_has_its_production_defaults() -> None:
    specs = _specs(3)
    assert set(specs) == {"changes", "changelog", "golden", "audit", "dlq", "review", "sink"}
    for kind in ("audit", "dlq"):  # kept until an operator deletes them
        assert specs[kind].config["retention.ms"] == "-1"
        assert specs[kind].config["retention.bytes"] == "-1"
        assert specs[kind].config["cleanup.policy"] == "delete"
    for kind in ("golden", "changelog", "review"):  # the latest record of each key
        assert specs[kind].config["cleanup.policy"] == "compact"
        assert "retention.ms" not in specs[kind].config
    assert specs["changelog"].config["min.compaction.lag.ms"] == WEEK_MS
    for kind in ("changes", "sink"):  # the broker's retention
        assert specs[kind].config == {"cleanup.policy": "delete", "min.insync.replicas": "2"}


def test_a_kind_set_in_part_keeps_its_other_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_DURABILITY__DLQ__RETENTION_MS", "86400000")
    monkeypatch.setenv("ACCORD_DURABILITY__SINK__REPLICATION_FACTOR", "2")
    specs = {spec.kind: spec for spec in accord_topics(AccordSettings(), 3)}
    assert specs["dlq"].config["retention.ms"] == "86400000"
    assert specs["dlq"].config["retention.bytes"] == "-1"
    assert specs["sink"].replication == 2
    assert "min.insync.replicas" not in specs["sink"].config
    assert specs["golden"].replication == 3


def test_min_insync_above_replication_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"durability\.dlq: min_insync_replicas 3"):
        _specs(3, dlq=KeptTopic(replication_factor=2, min_insync_replicas=3))


def _dlq(brokers: int = 3) -> TopicSpec:
    return _specs(brokers)["dlq"]


BROKER_DEFAULTS = {
    "cleanup.policy": "delete",
    "retention.ms": "604800000",
    "retention.bytes": "-1",
    "min.insync.replicas": "1",
}


def test_a_dlq_made_before_with_a_weeks_retention_is_raised() -> None:
    drifts = config_drift(_dlq(), BROKER_DEFAULTS, replication=3)
    assert [(d.name, d.have, d.want, d.alterable) for d in drifts] == [
        ("min.insync.replicas", "1", "2", True),
        ("retention.ms", "604800000", "-1", True),
    ]
    assert "ACCORD_DURABILITY__DLQ" in drifts[1].describe()


def test_replication_cannot_be_altered_nor_min_insync_beyond_it() -> None:
    drifts = {d.name: d for d in config_drift(_dlq(), BROKER_DEFAULTS, replication=1)}
    assert drifts[REPLICATION].have == "1" and drifts[REPLICATION].want == "3"
    assert not drifts[REPLICATION].alterable
    assert not drifts["min.insync.replicas"].alterable  # would stop every write
    assert drifts["retention.ms"].alterable


def test_a_topic_keeping_as_much_or_more_has_no_drift() -> None:
    have = {**BROKER_DEFAULTS, "retention.ms": "-1", "min.insync.replicas": "2"}
    assert config_drift(_dlq(), have, replication=3) == []
    sink = _specs(3)["sink"]
    longer = {**BROKER_DEFAULTS, "retention.ms": "-1", "min.insync.replicas": "3"}
    assert config_drift(sink, longer, replication=5) == []


def test_a_golden_topic_that_is_not_compacted_is_drift() -> None:
    golden = _specs(1)["golden"]
    drifts = config_drift(golden, {"cleanup.policy": "delete"}, replication=1)
    assert [(d.name, d.want) for d in drifts] == [("cleanup.policy", "compact")]
    assert config_drift(golden, {"cleanup.policy": "compact"}, replication=1) == []


def test_a_shorter_compaction_lag_on_the_changelog_is_drift() -> None:
    changelog = _specs(1)["changelog"]
    have = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
    assert [d.name for d in config_drift(changelog, have, 1)] == ["min.compaction.lag.ms"]


def test_the_reassignment_plan_keeps_each_leader_and_spreads_new_copies() -> None:
    plan = reassignment_plan("t", {0: [1], 1: [2], 2: [3]}, {3: None, 1: None, 2: None}, 3)
    assert plan == {
        "version": 1,
        "partitions": [
            {"topic": "t", "partition": 0, "replicas": [1, 2, 3]},
            {"topic": "t", "partition": 1, "replicas": [2, 3, 1]},
            {"topic": "t", "partition": 2, "replicas": [3, 1, 2]},
        ],
    }
