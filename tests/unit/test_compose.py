"""docker-compose.yml cannot run here; this keeps it in agreement with the local stack."""

import re
from pathlib import Path

import pytest
import yaml

from streams.settings import StackSettings, load_settings
from streams.stack.components import Connect, StackPaths

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _pom_property(name: str) -> str:
    pom = (ROOT / "streams" / "stack" / "pom.xml").read_text()
    match = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", pom)
    assert match, name
    return match.group(1)


def test_every_component_and_the_worker_are_services(services: dict) -> None:
    expected = {"postgres", "mariadb", "redis", "kafka", "registry", "connect", "worker"}
    assert expected <= set(services)
    assert services["worker"]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_host_ports_match_the_local_stack(services: dict) -> None:
    """On loopback, as the local stack's; the registry and Connect publish none (they have
    no auth: tests/unit/test_compose_security.py)."""
    defaults = StackSettings()
    expected = {
        "postgres": {f"127.0.0.1:{defaults.postgres_port}:5432"},
        "mariadb": {f"127.0.0.1:{defaults.mariadb_port}:3306"},
        "redis": {f"127.0.0.1:{defaults.redis_port}:6379"},
        "kafka": {f"127.0.0.1:{defaults.kafka_port}:{defaults.kafka_port}"},
        "worker": {f"127.0.0.1:{load_settings().worker.port}:{load_settings().worker.port}"},
    }
    for service, ports in expected.items():
        assert set(services[service]["ports"]) == ports, service
    assert "ports" not in services["registry"]
    assert "ports" not in services["connect"]
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"127.0.0.1:{defaults.kafka_port}" in advertised


def test_images_run_the_versions_the_local_stack_resolves(services: dict) -> None:
    assert services["kafka"]["image"] == f"apache/kafka:{_pom_property('kafka.version')}"
    assert services["connect"]["image"].endswith(f":{_pom_property('debezium.version')}")
    registry_version = _pom_property("apicurio.registry.version")
    assert services["registry"]["image"] == f"apicurio/apicurio-registry:{registry_version}"


def test_databases_are_configured_for_cdc(services: dict) -> None:
    postgres = " ".join(services["postgres"]["command"])
    assert "wal_level=logical" in postgres
    mariadb = services["mariadb"]["command"]
    for flag in ("--binlog-format=ROW", "--binlog-row-image=FULL", "--gtid-strict-mode=ON"):
        assert flag in mariadb
    assert services["mariadb"]["environment"]["MARIADB_DATABASE"] == "billing"


def test_connect_provides_what_the_connector_files_reference(services: dict) -> None:
    """Every variable a connector file reads is set, and the env provider's allow-list lets
    a connector read those and nothing else of Connect's environment."""
    env = services["connect"]["environment"]
    allowed = re.compile(
        env["CONNECT_CONFIG_PROVIDERS_ENV_PARAM_ALLOWLIST_PATTERN"].replace("$$", "$")
    )
    referenced = set()
    for source in (ROOT / "connectors").glob("*/source.json"):
        for name in re.findall(r"\$\{env:([A-Z0-9_]+)\}", source.read_text()):
            assert name in env, f"{source}: {name} not set for the connect service"
            assert allowed.search(name), f"{source}: {name} not in the env allow-list"
            referenced.add(name)
    assert "CRM_DB_PASSWORD" in referenced
    assert allowed.search("BILLING_DB_TRUSTSTORE_PASSWORD")  # a TLS setting's, at apply
    for name in set(env) - referenced | {"PATH", "HOME", "CRM_DB_PASSWORD_X", "X_CRM_DB_HOST"}:
        assert not allowed.search(name), name


def test_connect_matches_the_local_worker_config(services: dict, tmp_path: Path) -> None:
    env = services["connect"]["environment"]
    connect = Connect(load_settings(), StackPaths(tmp_path))
    connect.prepare()
    local = dict(
        line.split("=", 1) for line in connect.config.read_text().splitlines() if "=" in line
    )
    assert env["GROUP_ID"] == local["group.id"]
    pattern = env["CONNECT_CONFIG_PROVIDERS_ENV_PARAM_ALLOWLIST_PATTERN"].replace("$$", "$")
    assert pattern == local["config.providers.env.param.allowlist.pattern"]
    assert all(re.search(pattern, name) for name in connect.worker_env())
    for topic in ("config", "offset", "status"):
        assert env[f"{topic.upper()}_STORAGE_TOPIC"] == local[f"{topic}.storage.topic"]
    assert env["CONNECT_CONFIG_PROVIDERS_ENV_CLASS"] == local["config.providers.env.class"]
    for side in ("key", "value"):
        assert env[f"{side.upper()}_CONVERTER"] == local[f"{side}.converter"]
        for option in ("as-confluent", "use-id", "auto-register", "find-latest"):
            compose_name = f"CONNECT_{side.upper()}_CONVERTER_APICURIO_REGISTRY_{option.upper()}"
            assert env[compose_name] == local[f"{side}.converter.apicurio.registry.{option}"]
        assert env[f"CONNECT_{side.upper()}_CONVERTER_APICURIO_REGISTRY_URL"].endswith(
            "/apis/registry/v2"
        )


def test_registry_uses_postgres_storage_like_the_local_one(services: dict) -> None:
    env = services["registry"]["environment"]
    assert env["APICURIO_STORAGE_KIND"] == "sql"
    assert env["APICURIO_STORAGE_SQL_KIND"] == "postgresql"
    assert env["APICURIO_DATASOURCE_URL"].endswith("/registry")


def test_worker_runs_the_stream_worker_with_every_source_reachable(services: dict) -> None:
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    env = worker["environment"]
    for system, host in (("CRM", "postgres"), ("SUPPORT", "postgres"), ("BILLING", "mariadb")):
        assert env[f"ACCORD_{system}__HOST"] == host
    assert env["ACCORD_WORKER__WEB_HOST"] == "0.0.0.0"
    assert services["connectors"]["command"][:2] == ["connectors", "apply"]


def test_registry_speaks_http1_only_like_the_local_one(services: dict) -> None:
    assert services["registry"]["environment"]["QUARKUS_HTTP_HTTP2"] == "false"


# ------------------------------------------------------------- Prometheus and Grafana


def _defined_metric_names() -> set[str]:
    """Every metric Accord's worker and appliers can serve."""
    from prometheus_client import REGISTRY, CollectorRegistry

    import streams.app
    import streams.sinks  # noqa: F401
    from streams.status import BoardCollector, StatusBoard

    names = {m.name for m in REGISTRY.collect()}
    board = CollectorRegistry()
    board.register(BoardCollector(StatusBoard(load_settings(), monitor=object(), reconcile=list)))
    names |= {m.name for m in board.collect()}
    return names


def test_prometheus_scrapes_the_worker_s_metrics_port(services: dict) -> None:
    prometheus = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"worker:{load_settings().worker.port}"]
    mounted = " ".join(services["prometheus"]["volumes"])
    assert "./docker/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in mounted


def test_every_dashboard_query_names_a_metric_accord_serves(services: dict) -> None:
    import json

    dashboard = json.loads((ROOT / "docker/grafana/dashboards/accord.json").read_text())
    defined = _defined_metric_names()
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\baccord_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|count|sum|total)$", "", name)
                queried.add(name)
                assert base in defined, f"{panel['title']}: {name} is not a metric Accord serves"
    assert {"accord_consumer_lag", "accord_end_to_end_latency_seconds_bucket"} <= queried
    provisioning = services["grafana"]["volumes"]
    assert any(v.startswith("./docker/grafana/dashboards:") for v in provisioning)
    datasource = yaml.safe_load(
        (ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]
