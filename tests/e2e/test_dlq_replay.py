"""A dead letter replayed after its cause is fixed: the original change reaches the golden
record, and a second replay does nothing."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from streams.settings import AccordSettings
from streams.sources import mariadb
from streams.stack.process import wait_until
from streams.topics import RAW_TOPICS
from streams.workers import WorkerProcess
from tests.support import TopicTail, accord, isolated, latest_by_key, running_worker

pytestmark = pytest.mark.e2e


def dead_letters(settings: AccordSettings, needle: str) -> list[dict[str, Any]]:
    result = accord(settings, "dlq", "list", "--json", "--topic", RAW_TOPICS["billing"])
    assert result.returncode == 0, result.stderr
    return [entry for entry in json.loads(result.stdout) if needle in entry["detail"]]


def test_a_dead_letter_replayed_after_its_mapping_is_fixed_reaches_the_golden_record(
    connectors: AccordSettings, tmp_path: Path
) -> None:
    settings = isolated(connectors)
    tag = uuid.uuid4().hex[:8]
    account_no, email = f"N-{tag}", f"narnia-{tag}@example.com"
    with running_worker(settings):
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO accounts (account_no, legal_name, contact_email, billing_country) "
                "VALUES (%s, 'Cair Paravel Ltd', %s, 'Narnia')",
                (account_no, email),
            )
        # billing's mapping rejects a country it cannot resolve: the row is dead-lettered.
        assert wait_until(lambda: len(dead_letters(settings, "Narnia")) == 1, 90)
    [letter] = dead_letters(settings, "Narnia")
    assert letter["reason"] == "validation_failed"

    # The fix: accept such rows and leave their country out (on_invalid: drop).
    fixed = tmp_path / "connectors"
    shutil.copytree(settings.connectors_dir, fixed)
    mapping = fixed / "billing" / "mapping.yaml"
    text = mapping.read_text()
    strict = "country: {column: billing_country, transforms: [country], on_invalid: reject}"
    assert strict in text
    mapping.write_text(text.replace(strict, strict.replace("reject", "drop")))
    settings = settings.model_copy(update={"connectors_dir": fixed})

    golden = TopicTail(settings, settings.topics.golden)
    worker = WorkerProcess(settings)  # the same app, resuming where it stopped
    worker.start()
    try:
        first = accord(settings, "dlq", "replay", letter["at"], "--yes")
        again = accord(settings, "dlq", "replay", letter["at"], "--yes")
        assert "replayed 1, skipped 0" in first.stdout, first.stdout + first.stderr
        assert "replayed 0, skipped 1" in again.stdout, again.stdout + again.stderr

        def merged(records: list[Any]) -> bool:
            return any(r["fields"]["email"] == email for r in latest_by_key(records).values())

        assert golden.wait_for(merged, 90)
    finally:
        worker.stop()
    [record] = [r for r in latest_by_key(golden.records).values() if r["fields"]["email"] == email]
    assert record["fields"]["company"] == "Cair Paravel Ltd"
    assert record["fields"]["country"] is None  # dropped, as the fixed mapping says
    assert [link["key"] for link in record["links"] if link["system"] == "billing"] == [account_no]
    assert len(dead_letters(settings, "Narnia")) == 1  # the replay was not dead-lettered again
