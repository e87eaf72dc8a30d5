"""`accord reconcile` on the real stack: a target row changed while the pipeline is
stopped shows as drift, field by field; the rest is in accord."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from streams.settings import AccordSettings
from streams.sources import postgres
from streams.stack.process import wait_until
from streams.workers import WorkerProcess
from tests.support import TopicTail, accord, drained, isolated, latest_by_key, running_worker

pytestmark = pytest.mark.e2e
SYSTEMS = ("--system", "crm", "--system", "support")  # billing: this test leaves it alone


@pytest.fixture
def worker(connectors: AccordSettings) -> Iterator[tuple[AccordSettings, WorkerProcess]]:
    """A worker with its appliers, on topics and groups of its own."""
    settings = isolated(connectors)
    with running_worker(settings) as process:
        yield settings, process


def reconcile(settings: AccordSettings) -> tuple[int, dict[str, dict[str, Any]]]:
    result = accord(settings, "reconcile", "--json", *SYSTEMS)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, {card["target"]: card for card in json.loads(result.stdout)}


def test_reconcile_reports_a_target_row_changed_while_the_pipeline_is_stopped(
    worker: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, process = worker
    email = f"drift-{uuid.uuid4().hex[:8]}@example.com"
    golden = TopicTail(settings, settings.topics.golden)
    with postgres(settings, "crm") as conn:
        conn.execute(
            "INSERT INTO customers (first_name, last_name, email, country) "
            "VALUES ('Ada', 'Lovelace', %s, 'GB')",
            (email,),
        )

    def in_support(records: list[Any]) -> bool:
        ours = [r for r in latest_by_key(records).values() if r["fields"]["email"] == email]
        return bool(ours) and any(link["system"] == "support" for link in ours[0]["links"])

    # The support applier creates the user; its CDC echo links it to the golden record.
    assert golden.wait_for(in_support, 120)
    assert wait_until(lambda: drained(settings), 90)
    [record] = [r for r in latest_by_key(golden.records).values() if r["fields"]["email"] == email]

    status, cards = reconcile(settings)
    assert status == 0, cards
    assert cards["support"]["in_accord"] == 1 and cards["crm"]["in_accord"] == 1

    process.stop()  # the pipeline is stopped: nothing will correct the row
    with postgres(settings, "support") as conn:
        conn.execute("UPDATE users SET display_name = 'Grace Hopper' WHERE email = %s", (email,))

    status, cards = reconcile(settings)
    assert status == 1
    support = cards["support"]
    assert (support["checked"], support["drifted"], support["missing"]) == (1, 1, 0)
    [drift] = support["drifts"]
    assert (drift["golden_id"], drift["field"]) == (record["golden_id"], "display_name")
    assert (drift["golden"], drift["target_value"]) == ("Ada Lovelace", "Grace Hopper")
    assert (cards["crm"]["drifted"], cards["crm"]["in_accord"]) == (0, 1)
