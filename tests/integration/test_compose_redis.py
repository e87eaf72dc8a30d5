"""docker-compose.yml's Redis, its command line run for real with a .env from
docker/make-env.sh: the default user needs the password, the health check passes with it,
and the worker, as Accord's settings from the compose environment connect it, is the ACL
user confined to its own keys without admin or dangerous commands.

Its own redis-server (the same 7.0 as the image) on a free port, not the shared stack's.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml

from streams.settings import AccordSettings, load_settings
from streams.stack.process import wait_until
from tests.compose_env import COMPOSE, interpolate_all, make_env
from tests.support import free_port

pytestmark = pytest.mark.integration


@dataclass
class ComposeRedis:
    port: int
    service: dict  # the interpolated service
    dot_env: dict[str, str]
    log: Path

    def health_check(self, env: dict[str, str]) -> int:
        kind, command = self.service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        run_env = os.environ | env
        shell = command.replace("redis-cli", f"redis-cli -p {self.port}")
        return subprocess.run(["sh", "-c", shell], env=run_env, timeout=10).returncode


@pytest.fixture
def compose_redis(tmp_path: Path) -> Iterator[ComposeRedis]:
    compose = yaml.safe_load(COMPOSE.read_text())
    dot_env = make_env(tmp_path / ".env")
    service = interpolate_all(compose["services"]["redis"], dot_env)
    port = free_port()
    shell, flag, line = service["command"]
    assert (shell, flag) == ("sh", "-c")
    argv = [shell, flag, f"{line} --port {port} --bind 127.0.0.1 --dir {tmp_path}"]
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=os.environ | service["environment"], stdout=out, stderr=subprocess.STDOUT
        )
    probe = redis.Redis(port=port, socket_timeout=2)

    def answers() -> bool:
        try:
            probe.ping()
        except redis.AuthenticationError:
            return True  # up, and asking for a password
        except redis.ConnectionError:
            return False
        return True

    try:
        assert wait_until(answers, 20), log.read_text()
        yield ComposeRedis(port, service, dot_env, log)
    finally:
        probe.close()
        process.terminate()
        process.wait(10)


def _worker_settings(
    compose_redis: ComposeRedis, monkeypatch: pytest.MonkeyPatch
) -> AccordSettings:
    compose = yaml.safe_load(COMPOSE.read_text())
    env = interpolate_all(compose["services"]["worker"]["environment"], compose_redis.dot_env)
    for name in list(os.environ):
        if name.startswith("ACCORD_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    # The same URL, user and password, to this test's port instead of the service name.
    monkeypatch.setenv("ACCORD_REDIS_URL", f"redis://127.0.0.1:{compose_redis.port}/0")
    return load_settings()


def test_the_default_user_needs_the_password(compose_redis: ComposeRedis) -> None:
    anonymous = redis.Redis(port=compose_redis.port, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    wrong = redis.Redis(port=compose_redis.port, password="not-it", socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    admin = redis.Redis(
        port=compose_redis.port, password=compose_redis.dot_env["REDIS_PASSWORD"], socket_timeout=2
    )
    assert admin.ping()
    assert compose_redis.health_check(compose_redis.service["environment"]) == 0
    wrong_env = compose_redis.service["environment"] | {"REDIS_PASSWORD": "not-it"}
    assert compose_redis.health_check(wrong_env) != 0


def test_the_worker_is_an_acl_user_confined_to_its_keys(
    compose_redis: ComposeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _worker_settings(compose_redis, monkeypatch)
    assert settings.redis_credentials()["username"] == "accord"
    worker = redis.Redis.from_url(settings.redis, **settings.redis_credentials(), socket_timeout=2)
    prefix = settings.worker.redis_prefix
    assert worker.acl_whoami() == "accord"
    worker.set(f"{prefix}compose-test", "1")
    assert worker.get(f"{prefix}compose-test") == b"1"
    worker.xadd(f"{prefix}compose-stream", {"k": "v"}, maxlen=10)
    for refused in (
        lambda: worker.set("other:compose-test", "1"),
        lambda: worker.keys("*"),  # dangerous
        lambda: worker.flushall(),  # dangerous
        lambda: worker.config_get("requirepass"),  # admin
        lambda: worker.acl_list(),  # admin
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
