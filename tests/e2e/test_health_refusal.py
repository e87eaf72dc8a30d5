"""A real worker's `/health` names a Redis refusal of its ingest, and a stall, and is
ready again by itself once the refusal is lifted, with nothing lost.

The worker reads raw topics of this test's own (a copy of the connectors folder pointed
at them) and talks to Redis as an ACL user of this test's own that may not SET.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streams.app import redis_client
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests.integration.test_ingest_loop import CREATES, RawTopics
from tests.support import TopicTail, isolated, running_worker, without_appliers

pytestmark = pytest.mark.e2e


@pytest.fixture
def acl_user(stack: AccordSettings) -> Iterator[tuple[str, str]]:
    """A Redis ACL user of this test that may do everything but SET; deleted after."""
    name, password = f"test-noset-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = redis_client(stack)
    admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "+@all", "-set")
    try:
        yield name, password
    finally:
        admin.execute_command("ACL", "DELUSER", name)


def _health(url: str) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(url, timeout=5)
    return answer.status_code, answer.json()


def test_health_names_a_redis_refusal_and_recovers_when_it_is_lifted(
    stack: AccordSettings, acl_user: tuple[str, str], tmp_path: Path
) -> None:
    name, password = acl_user
    base = without_appliers(isolated(stack))
    raw = RawTopics(base)
    connectors = tmp_path / "connectors"
    shutil.copytree(base.connectors_dir, connectors)
    for mapping in connectors.glob("*/mapping.yaml"):
        text = mapping.read_text()
        for original, ours in raw.by_vector_topic.items():
            text = text.replace(f"topic: {original}\n", f"topic: {ours}\n")
        mapping.write_text(text)
    settings = base.model_copy(
        update={
            "connectors_dir": connectors,
            "redis_username": name,
            "redis_password": password,
            "worker": base.worker.model_copy(
                update={"stall_after_s": 3.0, "connector_watchdog": False}
            ),
        }
    )
    url = f"http://{settings.stack.host}:{settings.worker.port}/health"

    with running_worker(settings):
        for vector in CREATES:
            raw.write(vector)

        def refused() -> bool:
            status, body = _health(url)
            return status == 503 and any(
                p.startswith("ingest: redis NOPERM: ") for p in body["problems"]
            )

        assert wait_until(refused, 60, interval_s=0.5), _health(url)
        assert wait_until(
            lambda: any("ingest: records waiting" in p for p in _health(url)[1]["problems"]),
            30,
            interval_s=0.5,
        ), _health(url)

        redis_client(stack).execute_command("ACL", "SETUSER", name, "+set")  # lifted
        assert wait_until(lambda: _health(url)[0] == 200, 60, interval_s=0.5), _health(url)
        golden = TopicTail(settings, settings.topics.golden)
        try:
            assert golden.wait_for(lambda records: len(records) >= len(CREATES), 60)
        finally:
            golden.close()
