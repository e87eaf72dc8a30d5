"""Held rows through the worker's ingest loop on the real broker, registry and Redis:
a row identity holds is handed on nowhere and is no dead letter, its batch is committed,
the hold is in Redis, and `accord explain` says why."""

from __future__ import annotations

import io
import json
import threading
import uuid
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema
from prometheus_client import REGISTRY

from streams.app import redis_client
from streams.codec import AvroCodec, SchemaCache, registry_fetcher
from streams.dedupe import Deduplicator
from streams.identity import HoldReason, IdentityPolicy, IdentityResolver
from streams.ingest import IngestPipeline, RawDecoder
from streams.mapping import Mapper
from streams.model import Change, Op
from streams.rules import load_rules
from streams.settings import AccordSettings
from streams.stack.process import wait_until
from tests import vectors
from tests.integration.test_ingest_loop import RawTopics, _committed, _loop, _read_all
from tests.support import accord, isolated

pytestmark = pytest.mark.integration

ROLE = "info@acme.example"


def _variant(name: str, row_id: str | int, **after: Any) -> tuple[bytes, bytes]:
    """The captured message `name`, about row `row_id` (its key column set to it), with
    `after` changed: wire bytes under the vector's own schema ids (RawTopics re-frames
    them)."""
    vector = vectors.load(name)
    out = []
    key_column = ""
    for payload in (vector.key, vector.value):
        schema = fastavro.parse_schema(
            json.loads(vector.schemas[int.from_bytes(payload[1:5], "big")])
        )
        record = fastavro.schemaless_reader(io.BytesIO(payload[5:]), schema)
        key_column = key_column or next(iter(record))  # the key record's one column
        if key_column in record:
            record[key_column] = row_id
        for image in ("before", "after"):
            if isinstance(record.get(image), dict):
                record[image].update({key_column: row_id, **after})
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, record)
        out.append(payload[:5] + buffer.getvalue())
    return out[0], out[1]


class Topics(RawTopics):
    def write_row(self, name: str, row_id: str | int, **after: Any) -> None:
        """A variant of the captured message `name` (see `_variant`), not yet flushed."""
        vector = vectors.load(name)
        topic = self.by_vector_topic[vector.topic]
        framed = []
        for payload, suffix in zip(_variant(name, row_id, **after), ("key", "value"), strict=True):
            text = vector.schemas[int.from_bytes(payload[1:5], "big")]
            schema_id = self.registry.register_schema(f"{topic}-{suffix}", Schema(text, "AVRO"))
            framed.append(b"\x00" + schema_id.to_bytes(4, "big") + payload[5:])
        self.producer.produce(topic, key=framed[0], value=framed[1])


def _pipeline(settings: AccordSettings, raw: RawTopics, policy: IdentityPolicy) -> IngestPipeline:
    store = redis_client(settings)
    worker = settings.worker
    return IngestPipeline(
        RawDecoder(AvroCodec(SchemaCache(registry_fetcher(raw.registry)))),
        Mapper(raw.mappings),
        Deduplicator(store, worker.redis_prefix, worker.dedupe_ttl_s),
        IdentityResolver(
            store,
            worker.redis_prefix,
            load_rules(worker.rules_file).match,
            policy,
            key_secret=settings.match_key_secret(),
        ),
    )


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_held_rows_are_committed_counted_and_sent_nowhere(stack: AccordSettings) -> None:
    settings = isolated(stack)
    raw = Topics(settings)
    held_before = _metric("accord_identity_held_total", system="support", reason="role_address")
    capped_before = _metric(
        "accord_identity_held_total", system="support", reason="max_rows_per_record"
    )
    role_rows = [str(uuid.uuid4()) for _ in range(30)]
    shared_rows = [str(uuid.uuid4()) for _ in range(5)]
    shared = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    for row in role_rows:
        raw.write_row("support-c", row, email=f" {ROLE.upper()} ")
    for row in shared_rows:  # cap 3: three linked, two held
        raw.write_row("support-c", row, email=shared)
    raw.write_row("support-d", role_rows[0], email=ROLE)  # a held row's delete releases it
    assert raw.producer.flush(30) == 0
    topic = raw.by_vector_topic[vectors.load("support-c").topic]
    end = raw.ends()[topic]

    loop = _loop(settings, raw, _pipeline(settings, raw, IdentityPolicy(max_rows_per_record=3)))
    stop = threading.Event()
    try:
        assert wait_until(
            lambda: loop.step(stop) >= 0 and _committed(settings, raw)[topic] == end, 60, 0
        )
    finally:
        loop.close()

    changes = _read_all(settings, settings.topics.changes)
    assert len(changes) == 3  # the three linked rows of `shared`, nothing else
    assert len({m.key() for m in changes}) == 1
    letters = [
        m for m in _read_all(settings, settings.topics.dlq) if raw.prefix.encode() in m.key()
    ]
    assert letters == []  # held is not dead: the hold keeps it
    identity = IdentityResolver(redis_client(settings), settings.worker.redis_prefix, ())
    holds = {hold.key: hold for hold in identity.holds()}
    assert set(holds) == set(role_rows[1:]) | set(shared_rows[3:])
    assert {holds[row].reason for row in role_rows[1:]} == {HoldReason.ROLE_ADDRESS}
    assert {(holds[row].reason, holds[row].rows) for row in shared_rows[3:]} == {
        (HoldReason.MAX_ROWS, 3)
    }
    assert (
        _metric("accord_identity_held_total", system="support", reason="role_address") - held_before
        == 30
    )
    assert (
        _metric("accord_identity_held_total", system="support", reason="max_rows_per_record")
        - capped_before
        == 2
    )
    assert _metric("accord_identity_held_rows") == 31

    # `accord explain` on a held row, and on the role address no golden record has.
    explained = accord(settings, "explain", f"support:{role_rows[1]}", "--json")
    assert explained.returncode == 0, explained.stderr
    [held] = json.loads(explained.stdout)["held"]
    assert held["row"] == f"support:{role_rows[1]}"
    assert held["reason"] == "role_address" and "info@" in held["why"]
    explained = accord(settings, "explain", f"support:{shared_rows[4]}")
    assert explained.returncode == 0, explained.stderr
    said = " ".join(explained.stdout.split())  # rich wraps lines
    assert f"support:{shared_rows[4]} is held, not linked" in said
    assert "already links 3 rows (identity.max_rows_per_record: 3)" in said
    by_address = accord(settings, "explain", ROLE, "--json")
    assert by_address.returncode == 0, by_address.stderr
    assert len(json.loads(by_address.stdout)["held"]) == 29
    released = accord(settings, "explain", f"support:{role_rows[0]}")
    assert released.returncode != 0
    assert "neither linked to a golden record nor held" in released.stderr + released.stdout


def test_a_stranger_signing_up_with_a_customers_email_is_held_for_review(
    stack: AccordSettings,
) -> None:
    """Issue 21's stranger, through the mapping: Ada is in CRM; a support sign-up carries
    her email upper-cased, another name and another phone. Support's email is low trust
    (the shipped match policy), nothing corroborates it: held for review, with the
    scores, and handed on nowhere. Her own sign-up (same name) links."""
    settings = isolated(stack)
    raw = Topics(settings)
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    rules = load_rules(settings.worker.rules_file)
    pipeline = _pipeline(settings, raw, rules.identity)
    identity = pipeline.identity
    [ada] = identity.resolve(
        [
            Change(
                change_id=f"crm:1:{uuid.uuid4().hex}",
                system="crm",
                source_key="1",
                op=Op.UPSERT,
                source_ts=1_700_000_000_000_000,
                position="lsn:00000000000000000001",
                values={
                    "email": email,
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "phone": "+442079460018",
                },
            )
        ]
    )
    stranger, herself = str(uuid.uuid4()), str(uuid.uuid4())
    raw.write_row(
        "support-c", stranger, email=f" {email.upper()} ", display_name="Mallory Jones",
        phone="020 7946 0999",
    )  # fmt: skip
    raw.write_row("support-c", herself, email=email, display_name="ada lovelace", phone=None)
    assert raw.producer.flush(30) == 0
    topic = raw.by_vector_topic[vectors.load("support-c").topic]
    end = raw.ends()[topic]
    reviewed = _metric("accord_identity_held_total", system="support", reason="review")

    loop = _loop(settings, raw, pipeline)
    stop = threading.Event()
    try:
        assert wait_until(
            lambda: loop.step(stop) >= 0 and _committed(settings, raw)[topic] == end, 60, 0
        )
    finally:
        loop.close()

    changes = _read_all(settings, settings.topics.changes)
    assert [m.key() for m in changes] == [ada.encode()]  # herself, linked to Ada
    assert identity.lookup("support", herself) == ada
    assert identity.lookup("support", stranger) is None
    hold = identity.held("support", stranger)
    assert hold is not None and hold.reason is HoldReason.REVIEW and hold.golden_id == ada
    assert hold.match == ("email", email)  # normalized by the mapping: matched, not linked
    assert hold.scores is not None and hold.scores["keys"] == {"email": "low"}
    assert hold.scores["total"] < hold.policy["auto_link"]
    assert _metric("accord_identity_held_total", system="support", reason="review") == (
        reviewed + 1
    )

    explained = accord(settings, "explain", f"support:{stranger}", "--json")
    assert explained.returncode == 0, explained.stderr
    [held] = json.loads(explained.stdout)["held"]
    assert held["reason"] == "review" and held["golden_id"] == ada
    assert held["scores"]["keys"] == {"email": "low"} and "review band" in held["why"]
