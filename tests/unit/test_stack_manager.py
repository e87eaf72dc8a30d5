"""Stack orchestration and its failure messages, with real processes in a temp folder."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streams.errors import StackError
from streams.settings import AccordSettings, StackSettings
from streams.stack.components import Component, Connect, Health, StackPaths, find_java
from streams.stack.manager import Stack
from streams.stack.process import ProcessSpec


def _settings(tmp_path: Path, **stack: object) -> AccordSettings:
    return AccordSettings(
        stack=StackSettings(
            state_dir=tmp_path / "state", install_missing=False, startup_timeout_s=20, **stack
        )
    )


def test_start_order_respects_dependencies(tmp_path: Path) -> None:
    stack = Stack(_settings(tmp_path))
    waves = [[c.name for c in wave] for wave in stack._waves(stack.select())]
    assert waves == [["postgres", "mariadb", "redis", "kafka"], ["registry"], ["connect"]]


def test_selecting_a_component_brings_its_dependencies(tmp_path: Path) -> None:
    names = [c.name for c in Stack(_settings(tmp_path)).select(["connect"])]
    assert names == ["postgres", "kafka", "registry", "connect"]


def test_unknown_component_is_named(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="zookeeper: unknown component"):
        Stack(_settings(tmp_path)).select(["zookeeper"])


class _Squatted(Component):
    """A component whose port another process holds; no server binary needed."""

    name = "redis"

    def __init__(self, settings: AccordSettings, paths: StackPaths, port: int) -> None:
        super().__init__(settings, paths)
        self._port = port

    @property
    def port(self) -> int:
        return self._port

    def process(self) -> ProcessSpec:
        return self._spec(["sleep", "30"])

    def health(self) -> Health:
        return Health(False, "never")


def test_port_in_use_names_component_port_and_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        stack = Stack(_settings(tmp_path))
        stack.components = {"redis": _Squatted(stack.settings, stack.paths, port)}
        with pytest.raises(StackError) as failure:
            stack.up()
    message = str(failure.value)
    assert message.startswith("redis: port")
    assert str(port) in message and "ACCORD_STACK__REDIS_PORT" in message
    assert "redis.log" in message


class _Doomed(Component):
    """A component whose process dies at once, as a misconfigured server would."""

    name = "doomed"

    @property
    def port(self) -> int:
        return 1

    def process(self) -> ProcessSpec:
        return self._spec(["sh", "-c", "echo 'FATAL: data directory is corrupt'; exit 3"])

    def health(self) -> Health:
        return Health(False, "never")


def test_a_component_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    stack = Stack(_settings(tmp_path))
    stack.components = {"doomed": _Doomed(stack.settings, stack.paths)}
    with pytest.raises(StackError) as failure:
        stack.up()
    message = str(failure.value)
    assert message.startswith("doomed: process exited during start-up")
    assert "FATAL: data directory is corrupt" in message
    assert str(tmp_path / "state" / "logs" / "doomed.log") in message


def test_missing_java_version_is_a_clear_error() -> None:
    with pytest.raises(StackError, match=r"registry: needs Java 99 or newer; found: .*\(\d+\)"):
        find_java("registry", 99)


def test_connect_writes_confluent_wire_format_through_the_registry(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    connect = Connect(settings, StackPaths(tmp_path))
    connect.prepare()
    config = dict(
        line.split("=", 1) for line in connect.config.read_text().splitlines() if "=" in line
    )
    for side in ("key", "value"):
        assert config[f"{side}.converter"] == "io.apicurio.registry.utils.converter.AvroConverter"
        assert config[f"{side}.converter.apicurio.registry.as-confluent"] == "true"
        assert config[f"{side}.converter.apicurio.registry.use-id"] == "contentId"
        assert config[f"{side}.converter.apicurio.registry.url"].endswith(":18081/apis/registry/v2")
    assert config["config.providers.env.class"].endswith("EnvVarConfigProvider")
    assert config["plugin.path"] == str(tmp_path / "connect-plugins")


def test_cli_reports_bad_configuration_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "streams.cli",
            "--config",
            str(tmp_path / "missing.toml"),
            "stack",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and "missing.toml does not exist" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="databases run as system users only under root"
)
def test_private_state_folder_is_refused_with_the_reason(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    settings = AccordSettings(
        stack=StackSettings(state_dir=private / "state", install_missing=False)
    )
    with pytest.raises(
        StackError,
        match=r"postgres: the state folder .* is not reachable by "
        r"system user 'postgres'",
    ):
        Stack(settings).components["postgres"].prepare()


def test_a_resolved_profile_whose_unpacked_jars_were_deleted_is_resolved_again(
    tmp_path: Path,
) -> None:
    from streams.stack.install import _pom_digest, _stamp, maven_profile_ready

    paths = StackPaths(tmp_path)
    stamp = _stamp(paths, "kafka")
    stamp.parent.mkdir(parents=True)
    stamp.write_text(_pom_digest())
    (tmp_path / "kafka" / "libs").mkdir(parents=True)
    assert not maven_profile_ready(paths, "kafka")  # stamped, but nothing unpacked
    (tmp_path / "kafka" / "libs" / "kafka_2.13.jar").write_bytes(b"jar")
    assert maven_profile_ready(paths, "kafka")


def test_a_taken_secondary_port_is_named_by_its_setting(tmp_path: Path) -> None:
    """Kafka takes three ports; the one in use is named, not just the main one."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        free = [_free_port(), _free_port()]
        stack = Stack(
            _settings(
                tmp_path,
                kafka_port=free[0],
                kafka_controller_port=free[1],
                kafka_sasl_ssl_port=taken,
            )
        )
        with pytest.raises(StackError) as failure:
            stack._start(stack.components["kafka"])
    message = str(failure.value)
    assert message.startswith(f"kafka: port {taken}")
    assert "ACCORD_STACK__KAFKA_SASL_SSL_PORT" in message


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
