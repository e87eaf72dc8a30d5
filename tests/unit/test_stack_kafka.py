"""The local Kafka cluster of 1 or 3 brokers: the configs the stack generates for it."""

from pathlib import Path

import pytest

from streams.errors import StackError
from streams.settings import AccordSettings, StackSettings
from streams.stack.components import Connect, Kafka, StackPaths, recorded_brokers
from streams.stack.manager import Stack


def _settings(tmp_path: Path, brokers: int = 1, **stack: object) -> AccordSettings:
    return AccordSettings(
        stack=StackSettings(
            state_dir=tmp_path / "state", install_missing=False, kafka_brokers=brokers, **stack
        )
    )


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _nodes(settings: AccordSettings) -> list[Kafka]:
    return [c for c in Stack(settings).components.values() if isinstance(c, Kafka)]


def test_one_broker_keeps_single_copies_and_a_standalone_quorum(tmp_path: Path) -> None:
    (node,) = _nodes(_settings(tmp_path))
    config = _properties(node.config_text())
    assert node.name == "kafka" and config["node.id"] == "1"
    assert config["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert "controller.quorum.voters" not in config
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ):
        assert config[key] == "1", key
    assert "min.insync.replicas" not in config


def test_three_brokers_replicate_everything_three_times(tmp_path: Path) -> None:
    settings = _settings(tmp_path, brokers=3)
    nodes = _nodes(settings)
    assert [n.name for n in nodes] == ["kafka", "kafka-2", "kafka-3"]
    configs = [_properties(n.config_text()) for n in nodes]
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19103,3@127.0.0.1:19113"
    for number, (node, config) in enumerate(zip(nodes, configs, strict=True), start=1):
        plain, controller, secure = (p + 10 * (number - 1) for p in (19092, 19093, 19094))
        assert config["node.id"] == str(number)
        assert config["controller.quorum.voters"] == voters
        assert config["listeners"] == (
            f"PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{controller},"
            f"SASL_SSL://127.0.0.1:{secure}"
        )
        assert node.port == plain
        assert config["log.dirs"] == str(settings.stack.state_dir.resolve() / node.name / "data")
        assert config["default.replication.factor"] == "3"
        assert config["min.insync.replicas"] == "2"
        assert config["offsets.topic.replication.factor"] == "3"
        assert config["transaction.state.log.replication.factor"] == "3"
        assert config["transaction.state.log.min.isr"] == "2"
        # One CA and broker certificate for the cluster.
        assert config["ssl.keystore.location"] == configs[0]["ssl.keystore.location"]
    assert settings.kafka == "127.0.0.1:19092,127.0.0.1:19102,127.0.0.1:19112"


@pytest.mark.parametrize(("brokers", "replication"), [(1, "1"), (3, "3")])
def test_connects_internal_topics_follow_the_brokers(
    tmp_path: Path, brokers: int, replication: str
) -> None:
    settings = _settings(tmp_path, brokers=brokers)
    config = _properties(Connect(settings, StackPaths(tmp_path)).config_text())
    for topic in ("config", "offset", "status"):
        assert config[f"{topic}.storage.replication.factor"] == replication
    assert config["bootstrap.servers"] == settings.kafka


def test_starting_kafka_starts_every_broker_together(tmp_path: Path) -> None:
    stack = Stack(_settings(tmp_path, brokers=3))
    selected = stack.select(["connect"])
    waves = [[c.name for c in wave] for wave in stack._waves(selected)]
    assert waves == [["postgres", "kafka", "kafka-2", "kafka-3"], ["registry"], ["connect"]]


def test_overlapping_broker_ports_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        StackSettings(kafka_brokers=3, kafka_port=19092, kafka_controller_port=19102)


def test_the_cluster_size_cannot_change_in_place(tmp_path: Path) -> None:
    settings = _settings(tmp_path, brokers=3)
    paths = StackPaths(settings.stack.state_dir.resolve())
    assert recorded_brokers(paths) is None
    _nodes(settings)[0]._cluster_id()  # as the first broker's format records it
    assert recorded_brokers(paths) == 3
    # Configured for one broker now, the stack still sees (and `down` stops) all three...
    single = _settings(tmp_path, brokers=1)
    assert [n.name for n in _nodes(single)] == ["kafka", "kafka-2", "kafka-3"]
    # ... and `up` refuses before it starts or stops anything, saying what to set.
    with pytest.raises(StackError, match="made with 3 broker"):
        _nodes(single)[0].preflight()


def test_a_cluster_made_before_the_count_was_recorded_has_one_broker(tmp_path: Path) -> None:
    paths = StackPaths(tmp_path)
    (tmp_path / "kafka" / "data").mkdir(parents=True)
    (tmp_path / "kafka" / "data" / "meta.properties").write_text("node.id=1\n")
    assert recorded_brokers(paths) == 1
