"""docker-compose.yml is safe as shipped (issue 20, item 2), checked without a compose plugin.

`compose_problems` lists what would make the file unsafe: a published port not bound to
127.0.0.1, the registry or Kafka Connect published, a password written in the file or given
a default, registry deletes on, Grafana anonymous, Redis without a password or without the
worker's confined ACL user. The shipped file must have none; a broken copy of each kind
must be found. The file also validates against the compose specification's JSON schema
(tests/unit/data/compose-spec.json, see tests/unit/data/README.md), before and after
interpolation with the passwords `docker/make-env.sh` writes, and the worker's environment
so interpolated is one Accord's settings accept (no code default password).
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

from streams.settings import AccordSettings, WorkerSettings, load_settings
from streams.settings_safety import UnsafeSettings, default_secrets
from tests.compose_env import (
    BRACED,
    COMPOSE,
    HOW_TO,
    MAKE_ENV,
    MissingVariable,
    interpolate,
    interpolate_all,
    make_env,
    references,
    required_reference,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"

# ------------------------------------------------------------ what makes the file unsafe

_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH")
UNPUBLISHED = ("registry", "connect")  # no auth: the compose network only


def _port_problems(service: str, spec: dict) -> list[str]:
    problems = []
    if spec.get("network_mode") == "host":
        problems.append(f"{service}: network_mode host publishes every port it listens on")
    for port in spec.get("ports", []):
        if isinstance(port, dict):
            bound = port.get("host_ip") == "127.0.0.1" and "published" in port
        else:
            bound = str(port).startswith("127.0.0.1:") and str(port).count(":") == 2
        if not bound:
            problems.append(f"{service}: port {port} is not bound to 127.0.0.1")
    if service in UNPUBLISHED and spec.get("ports"):
        problems.append(f"{service}: has no auth and must publish no port")
    return problems


def _variable_problems(compose: dict) -> list[str]:
    problems = []
    for body in references(compose):
        braced = BRACED.fullmatch(body)
        if braced is None or braced["op"] != ":?" or HOW_TO not in (braced["arg"] or ""):
            problems.append(
                f"${{{body}}}: every variable must be ${{NAME:?...{HOW_TO}...}} (no default)"
            )
    for service, spec in compose["services"].items():
        environment = spec.get("environment") or {}
        for name, value in environment.items():
            secret = _SECRET_NAME.search(name) and not name.endswith("_FILE")
            if secret and required_reference(value) is None:
                problems.append(f"{service}: {name} must be ${{NAME:?...}} from .env, not a value")
    return problems


def _environment(compose: dict, service: str) -> dict:
    return compose["services"][service].get("environment") or {}


def _registry_problems(compose: dict) -> list[str]:
    env = _environment(compose, "registry")
    problems = [
        f"registry: {name} is {value!r}: deletes must be off"
        for name, value in env.items()
        if "DELETION" in name and str(value).lower() != "false"
    ]
    wanted = ("ARTIFACT", "ARTIFACT_VERSION", "GROUP")
    for kind in wanted:
        if f"APICURIO_REST_DELETION_{kind}_ENABLED" not in env:
            problems.append(f"registry: APICURIO_REST_DELETION_{kind}_ENABLED not set to false")
    return problems


def _grafana_problems(compose: dict) -> list[str]:
    env = _environment(compose, "grafana")
    problems = []
    if str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "")).lower() != "false":
        problems.append("grafana: GF_AUTH_ANONYMOUS_ENABLED must be false (a login)")
    if required_reference(env.get("GF_SECURITY_ADMIN_PASSWORD")) is None:
        problems.append("grafana: GF_SECURITY_ADMIN_PASSWORD must come from .env")
    return problems


def redis_acl(command: str) -> dict[str, list[str]]:
    """The `--user NAME rule...` directives of a redis-server command line, by user."""
    users: dict[str, list[str]] = {}
    for directive in re.split(r"\s--", " " + command)[1:]:
        words = [word.strip("\"'") for word in directive.split()]
        if words and words[0] == "user" and len(words) > 1:
            users[words[1]] = words[2:]
    return users


def _redis_problems(compose: dict) -> list[str]:
    redis = compose["services"]["redis"]
    command = redis.get("command")
    command = " ".join(command) if isinstance(command, list) else str(command or "")
    env = redis.get("environment") or {}
    problems = []
    requirepass = re.search(r"--requirepass\s+\"?\$\$(\w+)", command)
    if requirepass is None or required_reference(env.get(requirepass[1])) is None:
        problems.append("redis: --requirepass must take a password from .env ($$VARIABLE)")
    worker = _environment(compose, "worker")
    user = worker.get("ACCORD_REDIS_USERNAME")
    rules = redis_acl(command).get(str(user))
    if rules is None:
        return [*problems, f"redis: no ACL user {user!r} for the worker (ACCORD_REDIS_USERNAME)"]
    secret = next((rule for rule in rules if rule.startswith(">")), "")
    variable = re.fullmatch(r">\$\$(\w+)", secret)
    if "on" not in rules or variable is None:
        problems.append(f"redis: ACL user {user} must be on with a >$$VARIABLE password")
    elif required_reference(env.get(variable[1])) is None:
        problems.append(f"redis: {variable[1]} must come from .env")
    elif worker.get("ACCORD_REDIS_PASSWORD") != env.get(variable[1]):
        problems.append("worker: ACCORD_REDIS_PASSWORD is not the ACL user's password")
    keys = [rule for rule in rules if rule.startswith("~") or rule in ("allkeys", "resetkeys")]
    if keys != ["resetkeys", f"~{WorkerSettings().redis_prefix}*"]:
        problems.append(f"redis: ACL user {user} must see its own keys only, not {keys}")
    for category in ("-@admin", "-@dangerous"):
        if category not in rules:
            problems.append(f"redis: ACL user {user} lacks {category}")
    return problems


def compose_problems(compose: dict) -> list[str]:
    """Everything that makes a loaded (not interpolated) compose file unsafe as shipped."""
    problems = []
    for service, spec in compose["services"].items():
        problems += _port_problems(service, spec)
    for service in UNPUBLISHED:
        if service not in compose["services"]:
            problems.append(f"{service}: missing")
    problems += _variable_problems(compose)
    problems += _registry_problems(compose)
    problems += _grafana_problems(compose)
    problems += _redis_problems(compose)
    return problems


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture
def dot_env(tmp_path: Path) -> dict[str, str]:
    return make_env(tmp_path / ".env")


def _example_names() -> list[str]:
    text = (ROOT / ".env.example").read_text()
    return re.findall(r"^([A-Z_][A-Z0-9_]*)=$", text, re.MULTILINE)


# --------------------------------------------------------------- the shipped file


def test_the_shipped_compose_file_is_safe(compose: dict) -> None:
    assert compose_problems(compose) == []


def test_only_what_a_user_needs_is_published(compose: dict) -> None:
    published = {name for name, spec in compose["services"].items() if spec.get("ports")}
    assert published == {
        "postgres", "mariadb", "redis", "kafka", "worker", "prometheus", "grafana"
    }  # fmt: skip


def _set(path: str, value: object) -> Callable[[dict], None]:
    def mutate(compose: dict) -> None:
        *parents, last = path.split(".")
        node = compose
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


def _redis_command(old: str, new: str) -> Callable[[dict], None]:
    def mutate(compose: dict) -> None:
        command = compose["services"]["redis"]["command"]
        compose["services"]["redis"]["command"] = [part.replace(old, new) for part in command]

    return mutate


BROKEN = {
    "a port on every interface": (
        _set("services.worker.ports", ["16066:16066"]),
        "worker: port 16066:16066 is not bound to 127.0.0.1",
    ),
    "a port on 0.0.0.0": (
        _set("services.grafana.ports", ["0.0.0.0:13000:3000"]),
        "grafana: port 0.0.0.0:13000:3000 is not bound to 127.0.0.1",
    ),
    "a long-syntax port without host_ip": (
        _set("services.kafka.ports", [{"target": 19092, "published": "19092"}]),
        "kafka: port {'target': 19092, 'published': '19092'} is not bound to 127.0.0.1",
    ),
    "host networking": (
        _set("services.postgres.network_mode", "host"),
        "postgres: network_mode host",
    ),
    "the registry published": (
        _set("services.registry.ports", ["127.0.0.1:18081:8080"]),
        "registry: has no auth and must publish no port",
    ),
    "Connect published": (
        _set("services.connect.ports", ["127.0.0.1:18083:8083"]),
        "connect: has no auth and must publish no port",
    ),
    "a password written in the file": (
        _set("services.postgres.environment.POSTGRES_PASSWORD", "accord-postgres"),
        "postgres: POSTGRES_PASSWORD must be ${NAME:?...} from .env, not a value",
    ),
    "a password with a default": (
        _set(
            "services.mariadb.environment.MARIADB_ROOT_PASSWORD",
            "${MARIADB_ROOT_PASSWORD:-accord-root}",
        ),
        "${MARIADB_ROOT_PASSWORD:-accord-root}: every variable must be",
    ),
    "a variable that may be unset": (
        _set("services.worker.environment.ACCORD_REDIS_PASSWORD", "${REDIS_WORKER_PASSWORD}"),
        "worker: ACCORD_REDIS_PASSWORD must be ${NAME:?...} from .env, not a value",
    ),
    "a bare variable that may be unset": (
        _set("services.worker.environment.ACCORD_REDIS_PASSWORD", "$REDIS_WORKER_PASSWORD"),
        "${REDIS_WORKER_PASSWORD}: every variable must be",
    ),
    "a required variable that does not say how to make it": (
        _set("services.grafana.environment.GF_SECURITY_ADMIN_PASSWORD", "${GRAFANA_PW:?unset}"),
        "${GRAFANA_PW:?unset}: every variable must be",
    ),
    "registry deletes on": (
        _set("services.registry.environment.APICURIO_REST_DELETION_GROUP_ENABLED", "true"),
        "registry: APICURIO_REST_DELETION_GROUP_ENABLED is 'true': deletes must be off",
    ),
    "Grafana anonymous": (
        _set("services.grafana.environment.GF_AUTH_ANONYMOUS_ENABLED", "true"),
        "grafana: GF_AUTH_ANONYMOUS_ENABLED must be false",
    ),
    "Redis without a password": (
        _redis_command('--requirepass "$$REDIS_PASSWORD"', ""),
        "redis: --requirepass must take a password from .env",
    ),
    "the worker's ACL user on every key": (
        _redis_command('"~accord:*"', "allkeys"),
        "redis: ACL user accord must see its own keys only",
    ),
    "the worker's ACL user with dangerous commands": (
        _redis_command("-@dangerous", ""),
        "redis: ACL user accord lacks -@dangerous",
    ),
    "the worker as another Redis user": (
        _set("services.worker.environment.ACCORD_REDIS_USERNAME", "default"),
        "redis: no ACL user 'default' for the worker",
    ),
}


@pytest.mark.parametrize("broken", BROKEN, ids=list(BROKEN))
def test_a_broken_copy_is_found(compose: dict, broken: str) -> None:
    mutate, expected = BROKEN[broken]
    copied = copy.deepcopy(compose)
    mutate(copied)
    problems = compose_problems(copied)
    assert any(expected in problem for problem in problems), problems


# ------------------------------------------------------------------ the compose schema


def test_the_file_validates_against_the_compose_specification(
    compose: dict, validator: jsonschema.protocols.Validator, dot_env: dict[str, str]
) -> None:
    assert list(validator.iter_errors(compose)) == []
    assert list(validator.iter_errors(interpolate_all(compose, dot_env))) == []


@pytest.mark.parametrize(
    "mutate",
    [
        _set("services.worker.ports", {"16066": "16066"}),  # a map, not a list
        _set("services.worker.portz", ["127.0.0.1:16066:16066"]),  # no such key
        _set("services.worker.depends_on.kafka.condition", "service_ready"),
        _set("services.redis.healthcheck.retry", 3),  # retries
        _set("services.worker.volumes", "worker-state:/var/lib/accord"),  # not a list
        _set("servicez", {}),
    ],
)
def test_the_schema_rejects_a_broken_copy(
    compose: dict, validator: jsonschema.protocols.Validator, mutate: Callable[[dict], None]
) -> None:
    copied = copy.deepcopy(compose)
    mutate(copied)
    assert list(validator.iter_errors(copied)) != []


# ------------------------------------------------------------- .env and its variables


def test_without_env_compose_refuses_and_says_how_to_make_it(compose: dict) -> None:
    """Compose stops at the first missing variable; each one's message names the script."""
    missing = set()
    for body in references(compose):
        with pytest.raises(MissingVariable) as refused:
            interpolate("${" + body + "}", {})
        assert HOW_TO in refused.value.message
        missing.add(refused.value.name)
    assert missing == set(_example_names())
    with pytest.raises(MissingVariable):
        interpolate_all(compose, {})
    with pytest.raises(MissingVariable):  # `:?` refuses an empty value too
        interpolate_all(compose, dict.fromkeys(_example_names(), ""))


def test_interpolation_follows_compose(compose: dict) -> None:
    env = {"A": "a", "E": ""}
    assert interpolate("x$$A ${A} $A ${B:-d} ${E:-d} ${E-d} ${A:+alt} ${B+alt}", env) == (
        "x$A a a d d  alt "
    )
    with pytest.raises(MissingVariable, match="say so"):
        interpolate("${E:?say so}", env)
    assert interpolate("${E?say so}", env) == ""


def test_make_env_writes_every_variable_randomly_and_privately(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    env = make_env(target)
    assert list(env) == _example_names()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    values = list(env.values())
    assert len(set(values)) == len(values)
    assert all(re.fullmatch(r"[0-9a-f]{48}", value) for value in values)
    assert not set(values) & default_secrets(AccordSettings)
    again = make_env(tmp_path / "other.env")
    assert not set(again.values()) & set(values)


def test_make_env_adds_what_is_missing_and_keeps_what_is_set(tmp_path: Path) -> None:
    """An .env from an older release gets the new variables; a set password is never
    changed (the databases keep their first ones), an empty one is an error."""
    target = tmp_path / ".env"
    target.write_text("POSTGRES_PASSWORD=kept\n")
    env = make_env(target)
    assert env["POSTGRES_PASSWORD"] == "kept"
    assert list(env) == _example_names()
    assert make_env(target) == env  # a rerun changes nothing
    target.write_text("POSTGRES_PASSWORD=\n")
    result = subprocess.run([str(MAKE_ENV), str(target)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD empty" in result.stderr
    assert target.read_text() == "POSTGRES_PASSWORD=\n"


def test_env_is_git_ignored_and_the_example_holds_no_value() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored
    example = (ROOT / ".env.example").read_text()
    assert re.findall(r"^[A-Z_]+=(.+)$", example, re.MULTILINE) == []
    assert _example_names()


# --------------------------------------------------- the worker's settings from .env


def _service_env(compose: dict, service: str, dot_env: dict[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in interpolate_all(_environment(compose, service), dot_env).items()}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("ACCORD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


@pytest.mark.parametrize("service", ["worker", "connectors"])
def test_the_worker_s_environment_from_env_is_accepted(
    compose: dict, dot_env: dict[str, str], clean_env: pytest.MonkeyPatch, service: str
) -> None:
    """Hosts `postgres`, `mariadb`, `redis` are not loopback: settings take only passwords
    that are not the code's defaults, which .env provides."""
    for name, value in _service_env(compose, service, dot_env).items():
        clean_env.setenv(name, value)
    settings = load_settings()
    assert settings.redis_credentials() == {
        "username": "accord",
        "password": dot_env["REDIS_WORKER_PASSWORD"],
    }
    for system in ("crm", "support", "billing"):
        source = settings.source(system)
        assert source.app_password.get_secret_value() == dot_env["ACCORD_DB_PASSWORD"]
        assert source.cdc_password.get_secret_value() == dot_env["DEBEZIUM_DB_PASSWORD"]


def test_an_env_with_the_code_s_defaults_is_refused(
    compose: dict, dot_env: dict[str, str], clean_env: pytest.MonkeyPatch
) -> None:
    weak = dot_env | {"ACCORD_DB_PASSWORD": "accord", "DEBEZIUM_DB_PASSWORD": "debezium"}
    for name, value in _service_env(compose, "worker", weak).items():
        clean_env.setenv(name, value)
    with pytest.raises(UnsafeSettings) as refused:
        load_settings()
    assert "crm.app_password is a default in the code" in str(refused.value)
    assert "billing.cdc_password is a default in the code" in str(refused.value)


def test_the_passwords_reach_the_services_that_set_them(compose: dict) -> None:
    """Each database, Redis and Grafana gets the variables its init script or option reads,
    and the init scripts write no password of their own."""
    variables = {
        service: {required_reference(v) for v in _environment(compose, service).values()}
        for service in compose["services"]
    }
    assert {"POSTGRES_PASSWORD", "ACCORD_DB_PASSWORD", "DEBEZIUM_DB_PASSWORD"} <= variables[
        "postgres"
    ]
    assert {"MARIADB_ROOT_PASSWORD", "ACCORD_DB_PASSWORD", "DEBEZIUM_DB_PASSWORD"} <= variables[
        "mariadb"
    ]
    assert {"REDIS_PASSWORD", "REDIS_WORKER_PASSWORD"} <= variables["redis"]
    assert "ACCORD_DB_PASSWORD" in variables["registry"]
    assert "DEBEZIUM_DB_PASSWORD" in variables["connect"]
    postgres_init = (ROOT / "docker" / "postgres-init.sh").read_text()
    assert re.findall(r"PASSWORD\s+'", postgres_init) == []
    assert "PASSWORD :'accord_password'" in postgres_init
    assert "PASSWORD :'debezium_password'" in postgres_init
    mariadb_init = (ROOT / "docker" / "mariadb-init.sh").read_text()
    assert re.findall(r"IDENTIFIED BY '[^$]", mariadb_init) == []
    assert "DEBEZIUM_DB_PASSWORD" in mariadb_init
    mounts = " ".join(compose["services"]["mariadb"]["volumes"])
    assert "./docker/mariadb-init.sh:/docker-entrypoint-initdb.d/" in mounts
