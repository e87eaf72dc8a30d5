"""The review queue on the real broker, registry and Redis: ingest keeps each hold and the
held row's latest change on the review topic; `accord review` lists, shows, accepts
(linking, re-checking the row cap) and rejects held rows, replaying their change into the
changes topic; and the held hash comes back from the review topic after Redis lost it."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from streams.app import redis_client
from streams.dlq import DeadLetterWriter
from streams.faust_codec import canonical_codec
from streams.identity import EPOCH_KEY, IdentityResolver, golden_id_for
from streams.ingest import IngestLoop, IngestPipeline
from streams.model import Change
from streams.relink import Plan, RelinkSources, rebuild, write_epoch
from streams.review import latest_records
from streams.rules import load_rules
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from streams.status import _review_source
from streams.topology import ingest_group
from tests.integration.test_holds import Topics
from tests.integration.test_holds import _pipeline as holds_pipeline
from tests.integration.test_ingest_loop import _committed, _read_all
from tests.support import accord, isolated

pytestmark = pytest.mark.integration

ROLE = "info@acme.example"
CAP = 2


def _with_cap(settings: AccordSettings, tmp_path: Path) -> AccordSettings:
    """The settings with a rules file whose `identity.max_rows_per_record` is CAP, so the
    worker's ingest and the `accord review` command agree on it."""
    text = settings.worker.rules_file.read_text()
    assert "max_rows_per_record: 20" in text
    rules = tmp_path / "survivorship.yaml"
    rules.write_text(text.replace("max_rows_per_record: 20", f"max_rows_per_record: {CAP}"))
    worker = settings.worker.model_copy(update={"rules_file": rules})
    return settings.model_copy(update={"worker": worker})


class App:
    """One test's app: its raw topics, an ingest loop writing the review topic, and the
    identity epoch written (the review command runs guarded, as workers do)."""

    def __init__(self, settings: AccordSettings) -> None:
        self.settings = settings
        self.raw = Topics(settings)
        self.client = redis_client(settings)
        self.prefix = settings.worker.redis_prefix
        write_epoch(self.client, self.prefix + EPOCH_KEY, "test", Plan.FRESH)
        policy = load_rules(settings.worker.rules_file).identity
        self.pipeline: IngestPipeline = holds_pipeline(settings, self.raw, policy)
        registry = self.raw.registry
        self.codec = canonical_codec(
            settings, registry, "dev.accord.CustomerChange", settings.topics.changes
        )
        self.loop = IngestLoop(
            settings.kafka_config(),
            ingest_group(settings),
            list(self.raw.by_vector_topic.values()),
            self.pipeline,
            settings.topics.changes,
            self.codec.dumps,
            lambda producer: DeadLetterWriter(settings, registry, producer),
            batch_size=50,
            batch_window_s=0.2,
            review_topic=settings.topics.review,
        )

    def ingest(self) -> None:
        """Everything written so far, through ingest, committed."""
        assert self.raw.producer.flush(30) == 0
        ends = {topic: end for topic, end in self.raw.ends().items() if end}
        stop = threading.Event()

        def done() -> bool:
            committed = _committed(self.settings, self.raw)
            return all(committed[topic] >= end for topic, end in ends.items())

        assert wait_until(lambda: self.loop.step(stop) >= 0 and done(), 60, 0)

    def changes(self) -> list[Change]:
        return [
            Change.from_record(self.codec.loads(m.value()))
            for m in _read_all(self.settings, self.settings.topics.changes)
        ]

    def review_records(self) -> dict[str, Any]:
        messages = _read_all(self.settings, self.settings.topics.review)
        return latest_records((m.key(), m.value()) for m in messages)

    def held(self) -> set[str]:
        return {link.decode() for link in self.client.hkeys(f"{self.prefix}held")}

    def review(self, *args: str) -> Any:
        return accord(self.settings, "review", *args)

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def app(stack: AccordSettings, tmp_path: Path) -> Any:
    app = App(_with_cap(isolated(stack), tmp_path))
    try:
        yield app
    finally:
        app.close()


def test_holds_are_kept_listed_accepted_refused_at_the_cap_and_rejected(app: App) -> None:
    customer, role_row = str(uuid.uuid4()), str(uuid.uuid4())
    shared = [str(uuid.uuid4()) for _ in range(CAP + 1)]
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    app.raw.write_row("support-c", customer, email=f"own-{uuid.uuid4().hex[:8]}@example.com")
    app.raw.write_row("support-c", role_row, email=f" {ROLE.upper()} ")
    for row in shared:  # CAP linked, the last held at the cap
        app.raw.write_row("support-c", row, email=email)
    app.ingest()

    by_row = {c.source_key: c for c in app.changes()}
    assert set(by_row) == {customer, *shared[:CAP]}
    customer_gid = by_row[customer].golden_id
    shared_gid = by_row[shared[0]].golden_id
    capped = shared[CAP]
    assert app.held() == {f"support:{role_row}", f"support:{capped}"}

    # The review topic keeps each hold with the held change, values and coordinates.
    records = app.review_records()
    kept = records[f"support:{role_row}"]
    assert kept.kind == "hold" and kept.hold["reason"] == "role_address"
    assert kept.change is not None and kept.change.values["email"] == ROLE
    assert kept.origin is not None and kept.origin.topic in app.raw.by_vector_topic.values()
    assert records[f"support:{capped}"].hold["golden_id"] == shared_gid

    listed = app.review("list", "--json")
    assert listed.returncode == 0, listed.stderr
    holds = {hold["row"]: hold for hold in json.loads(listed.stdout)}
    assert set(holds) == {f"support:{role_row}", f"support:{capped}"}
    assert holds[f"support:{capped}"]["reason"] == "max_rows_per_record"
    assert holds[f"support:{capped}"]["golden_id"] == shared_gid
    shown = app.review("show", f"support:{role_row}", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["kept_change"]["values"]["email"] == ROLE

    # A role-address hold has no candidate: accept needs --golden.
    refused = app.review("accept", f"support:{role_row}", "--json")
    assert refused.returncode == 1
    assert "--golden" in json.loads(refused.stdout)["refused"]
    assert f"support:{role_row}" in app.held()

    accepted = app.review("accept", f"support:{role_row}", "--golden", customer_gid, "--json")
    assert accepted.returncode == 0, accepted.stderr
    outcome = json.loads(accepted.stdout)
    assert (outcome["golden_id"], outcome["replayed"], outcome["rows"]) == (customer_gid, True, 2)
    assert outcome["by"]
    assert app.client.get(f"{app.prefix}xref:support:{role_row}").decode() == customer_gid
    assert f"support:{role_row}".encode() in app.client.smembers(
        f"{app.prefix}links:{customer_gid}"
    )
    replayed = [c for c in app.changes() if c.source_key == role_row]
    assert len(replayed) == 1
    assert replayed[0].golden_id == customer_gid
    assert replayed[0].values["email"] == ROLE
    assert replayed[0].change_id == kept.change.change_id  # the held change itself
    decided = app.review_records()[f"support:{role_row}"]
    assert decided.kind == "decision" and decided.decision == "accept"
    assert decided.golden_id == customer_gid
    assert decided.by == outcome["by"]
    again = app.review("accept", f"support:{role_row}", "--golden", customer_gid, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["already_decided"] is True
    assert len([c for c in app.changes() if c.source_key == role_row]) == 1

    # The capped row's record is still full: accept is refused with the reason.
    full = app.review("accept", f"support:{capped}")
    assert full.returncode == 1
    said = " ".join((full.stderr + full.stdout).split())
    assert f"golden record {shared_gid} already links {CAP} rows" in said
    assert f"identity.max_rows_per_record: {CAP}" in said
    assert f"support:{capped}" in app.held()

    # Reject: its own golden record, its change replayed there.
    rejected = app.review("reject", f"support:{capped}", "--json")
    assert rejected.returncode == 0, rejected.stderr
    own = golden_id_for("support", capped)
    assert json.loads(rejected.stdout)["golden_id"] == own
    assert [c.golden_id for c in app.changes() if c.source_key == capped] == [own]
    assert app.held() == set()

    # Its next change is not held again for the same candidate: it follows its xref.
    app.raw.write_row("support-u", capped, email=email, display_name="Later Name")
    app.ingest()
    assert [c.golden_id for c in app.changes() if c.source_key == capped] == [own, own]
    assert app.held() == set()

    summary = _review_source(app.settings)()
    assert summary["decisions"] == {"accept": 1, "reject": 1}
    assert summary["held"] == 0

    unknown = app.review("show", f"support:{uuid.uuid4()}")
    assert unknown.returncode == 1 and "is not held" in unknown.stderr
    bad = app.review("accept", "nowhere:1")
    assert bad.returncode == 1 and "unknown system 'nowhere'" in bad.stderr


def test_held_rows_come_back_from_the_review_topic_after_redis_lost_them(app: App) -> None:
    rows = [str(uuid.uuid4()) for _ in range(3)]
    for row in rows:
        app.raw.write_row("support-c", row, email=ROLE)
    app.raw.write_row("support-d", rows[2], email=ROLE)  # its delete releases it
    app.ingest()
    assert app.held() == {f"support:{rows[0]}", f"support:{rows[1]}"}
    decided = app.review("reject", f"support:{rows[1]}")
    assert decided.returncode == 0, decided.stderr
    assert app.held() == {f"support:{rows[0]}"}
    before = json.loads(app.client.hget(f"{app.prefix}held", f"support:{rows[0]}"))

    app.client.delete(f"{app.prefix}held", f"{app.prefix}review-decisions")
    assert app.held() == set()
    settings = app.settings
    resolver = IdentityResolver(app.client, app.prefix, (), guarded=False)

    def review_records() -> Any:
        messages = _read_all(settings, settings.topics.review)
        return [(m.key(), m.value()) for m in messages]

    report = rebuild(
        resolver,
        RelinkSources(
            has_state=lambda: True,
            changelog=lambda: iter(()),
            ledger=lambda: iter(()),
            review=review_records,
        ),
        fields=(),
        progress=lambda _message: None,
    )
    assert report.holds_restored == 1
    # Held again as it was; the rejected row (decided) and the released one are not.
    assert app.held() == {f"support:{rows[0]}"}
    assert json.loads(app.client.hget(f"{app.prefix}held", f"support:{rows[0]}")) == before
    assert app.client.hgetall(f"{app.prefix}review-decisions") == {b"reject": b"1"}
    listed = app.review("list", "--json")
    assert [hold["row"] for hold in json.loads(listed.stdout)] == [f"support:{rows[0]}"]
