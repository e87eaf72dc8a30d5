"""The pipeline with production-like security: every Kafka client of the worker over the
broker's TLS + SASL/SCRAM listener, Redis as an ACL user confined to its key prefix, and
the secrets read from a file and the environment, never written to a log."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from streams.settings import AccordSettings, KafkaSecurity
from streams.sources import postgres
from streams.stack.manager import Stack
from tests.support import (
    TopicTail,
    accord,
    isolated,
    latest_by_key,
    running_worker,
    without_appliers,
)

pytestmark = pytest.mark.e2e


def _secure(settings: AccordSettings, password_file: Path) -> AccordSettings:
    stack = settings.stack
    kafka = Stack(settings).components["kafka"]
    return settings.model_copy(
        update={
            "kafka_bootstrap": f"{stack.host}:{stack.kafka_sasl_ssl_port}",
            "kafka_security": KafkaSecurity(
                protocol="SASL_SSL",
                sasl_mechanism="SCRAM-SHA-512",
                sasl_username=stack.kafka_scram_user,
                sasl_password_file=password_file,
                ssl_ca_file=kafka.tls / "ca.pem",
            ),
        }
    )


@pytest.fixture
def secure(connectors: AccordSettings, tmp_path: Path) -> Iterator[AccordSettings]:
    password_file = tmp_path / "kafka-password"
    password_file.write_text(connectors.stack.kafka_scram_password.get_secret_value() + "\n")
    settings = without_appliers(isolated(_secure(connectors, password_file)))
    user, redis_password = f"accord-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = redis.Redis.from_url(connectors.redis)
    # The worker's user may touch only its own keys; no admin or dangerous commands.
    admin.execute_command(
        "ACL", "SETUSER", user, "on", f">{redis_password}", "resetkeys",
        f"~{settings.worker.redis_prefix}*", "+@all", "-@admin", "-@dangerous",
    )  # fmt: skip
    yield settings.model_copy(
        update={"redis_username": user, "redis_password": SecretStr(redis_password)}
    )
    admin.execute_command("ACL", "DELUSER", user)


def test_the_pipeline_runs_over_tls_and_scram_with_a_redis_acl_user(
    secure: AccordSettings,
) -> None:
    settings = secure
    email = f"secure.{uuid.uuid4().hex[:8]}@example.com"
    with running_worker(settings) as worker:
        golden = TopicTail(settings, settings.topics.golden)  # over TLS + SCRAM as well
        try:
            with postgres(settings, "crm") as conn:
                conn.execute(
                    "INSERT INTO customers (first_name, last_name, email, country) "
                    "VALUES ('Grace', 'Hopper', %s, 'US')",
                    (email,),
                )

            def merged(records: list) -> bool:
                return any(r["fields"]["email"] == email for r in latest_by_key(records).values())

            assert golden.wait_for(merged, 90), "no golden record over the secure listener"
        finally:
            golden.close()
        log = worker.log.read_text()

    # The dedupe and identity keys were written as the confined ACL user.
    owner = redis.Redis.from_url(
        settings.redis, username=settings.redis_username, password=redis_password(settings)
    )
    assert next(owner.scan_iter(match=f"{settings.worker.redis_prefix}*"), None) is not None
    with pytest.raises(redis.exceptions.NoPermissionError):
        owner.get("someone-else:key")
    for secret in (
        settings.stack.kafka_scram_password.get_secret_value(),
        redis_password(settings),
    ):
        assert secret not in log


def redis_password(settings: AccordSettings) -> str:
    assert settings.redis_password is not None
    return settings.redis_password.get_secret_value()


def test_a_wrong_scram_password_is_a_clear_error_that_does_not_echo_it(
    connectors: AccordSettings, tmp_path: Path
) -> None:
    wrong = f"not-the-password-{uuid.uuid4().hex[:6]}"
    password_file = tmp_path / "kafka-password"
    password_file.write_text(wrong)
    settings = _secure(connectors, password_file)
    result = accord(settings, "monitor", "--once", "--json", "--interval", "0.2")
    assert result.returncode == 1
    assert "authentication" in result.stderr.lower(), result.stderr
    assert wrong not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
