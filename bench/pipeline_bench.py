"""Processor throughput: Accord's worker beside a pass-through ceiling, same events, same run.

    make bench        (or: .venv/bin/python bench/pipeline_bench.py [--customers N])

Events are real Debezium envelopes (the captured vectors in tests/vectors/debezium,
their writer schemas registered in the stack's registry) re-rendered with the sample
generator's messy rows: every customer is created in the systems that know it (crm,
billing, support, as `SampleGenerator.systems_for` decides), a third get one update, and
5% of all messages are sent twice. They are loaded into raw topics of this run's own
(6 partitions) before anything reads them.

- The ceiling: one confluent-kafka consumer -> producer pass-through, batches of 1,000,
  doing no work; the most a single Python process moves through Kafka here.
- Accord: a real `accord worker` (no appliers) reading the same topics from the start:
  decode, normalise, validate, dedupe (Redis), identity, merge, and the golden record,
  audit entries and sink events written by the emitter. Done when its group and its
  emitter have committed every offset.

Figures go to bench/results/<date>-pipeline.json: events/s, CPU seconds per 1,000 events
and peak RSS of each, and Accord / ceiling.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.registry import registry_client  # noqa: E402
from streams.samples import SampleGenerator  # noqa: E402
from streams.settings import AccordSettings, TopicSettings, load_settings  # noqa: E402
from streams.stack.manager import Stack  # noqa: E402
from streams.stack.process import wait_until  # noqa: E402
from streams.workers import WorkerProcess  # noqa: E402
from tests import vectors  # noqa: E402

PARTITIONS = 6
DUPLICATE_SHARE = 0.05
UPDATE_SHARE = 0.33
RESULTS = ROOT / "bench" / "results"


# ------------------------------------------------------------------------ the events


@dataclass
class Template:
    """One system's captured create: its envelope and schemas, re-registered for the run."""

    topic: str
    key_schema: Any
    value_schema: Any
    key_id: int
    value_id: int
    envelope: dict[str, Any]


def _parsed(vector: vectors.Vector, payload: bytes) -> tuple[int, Any, dict[str, Any]]:
    schema_id = int.from_bytes(payload[1:5], "big")
    schema = fastavro.parse_schema(json.loads(vector.schemas[schema_id]))
    return schema_id, schema, fastavro.schemaless_reader(io.BytesIO(payload[5:]), schema)


def templates(settings: AccordSettings, run: str) -> dict[str, Template]:
    registry = registry_client(settings)
    result = {}
    for system in ("crm", "billing", "support"):
        vector = vectors.load(f"{system}-c")
        key_id, _, _ = _parsed(vector, vector.key)
        value_id, _, envelope = _parsed(vector, vector.value)
        topic = f"bench-{run}.{vector.topic}"
        ids = []
        for side, schema_id in (("key", key_id), ("value", value_id)):
            text = vector.schemas[schema_id]
            ids.append(registry.register_schema(f"{topic}-{side}", Schema(text, "AVRO")))
        result[system] = Template(
            topic,
            fastavro.parse_schema(json.loads(vector.schemas[key_id])),
            fastavro.parse_schema(json.loads(vector.schemas[value_id])),
            ids[0],
            ids[1],
            envelope,
        )
    return result


def _frame(schema_id: int, schema: Any, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    out.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def _row(system: str, generated: dict[str, Any], at: dt.datetime) -> dict[str, Any]:
    row = dict(generated)
    row["updated_at"] = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if system == "billing":
        row["credit_limit"] = Decimal(row["credit_limit"]).quantize(Decimal("0.01"))
    return row


def generate(customers: int, template: dict[str, Template], seed: int = 7):
    """(topic, key, value) messages in commit order, duplicates included."""
    samples, rng = SampleGenerator(seed), random.Random(seed)
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    position = 0
    messages: list[tuple[str, bytes, bytes]] = []
    for index in range(customers):
        person = samples.person(index)
        rows = {
            "crm": samples.crm_row,
            "billing": samples.billing_row,
            "support": samples.support_row,
        }
        for system in samples.systems_for(index):
            t = template[system]
            row = rows[system](person)
            edits = [("c", row)]
            if rng.random() < UPDATE_SHARE:
                changed = dict(row)
                changed["phone"] = None if row.get("phone") else "+44 20 7946 0999"
                edits.append(("u", changed))
            before = None
            for op, values in edits:
                position += 1
                at = start + dt.timedelta(milliseconds=position)
                after = _row(system, values, at)
                envelope = dict(t.envelope)
                source = dict(envelope["source"])
                ts_ms = int(at.timestamp() * 1000)
                source.update(ts_ms=ts_ms, ts_us=ts_ms * 1000, ts_ns=ts_ms * 1_000_000)
                if system == "billing":
                    source.update(pos=position, gtid=f"0-1-{position}")
                else:
                    source.update(lsn=position, sequence=f'["{position - 1}","{position}"]')
                envelope.update(before=before, after=after, source=source, op=op)
                envelope.update(ts_ms=ts_ms, ts_us=ts_ms * 1000, ts_ns=ts_ms * 1_000_000)
                key_field = next(iter(t.key_schema["fields"]))["name"]
                key = _frame(t.key_id, t.key_schema, {key_field: after[key_field]})
                message = (t.topic, key, _frame(t.value_id, t.value_schema, envelope))
                messages.append(message)
                if rng.random() < DUPLICATE_SHARE:
                    messages.append(message)  # Debezium's at-least-once: the same bytes again
                before = after
    return messages


def load_topics(settings: AccordSettings, messages: list[tuple[str, bytes, bytes]]) -> None:
    producer = Producer(settings.kafka_config({"linger.ms": 50, "batch.size": 1_000_000}))
    for topic, key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(120):
        raise SystemExit("could not load the raw topics")


# ----------------------------------------------------------------------- measuring


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ceiling(settings: AccordSettings, topics: list[str], total: int, run: str) -> dict:
    sink = f"bench-{run}.ceiling"
    AdminClient(settings.kafka_config()).create_topics([NewTopic(sink, PARTITIONS, 1)])
    consumer = Consumer(
        settings.kafka_config(
            {
                "group.id": f"bench-{run}-ceiling",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
    )
    producer = Producer(settings.kafka_config({"linger.ms": 5}))
    consumer.subscribe(topics)
    moved, started, cpu0 = 0, None, time.process_time()
    deadline = time.monotonic() + 600
    while moved < total and time.monotonic() < deadline:
        batch = consumer.consume(1000, 1.0)
        if batch and started is None:
            started = time.monotonic()
        for message in batch:
            if message.error():
                continue
            while True:
                try:
                    producer.produce(sink, key=message.key(), value=message.value())
                    break
                except BufferError:
                    producer.poll(0.05)
            moved += 1
        producer.poll(0)
        if batch:
            consumer.commit(asynchronous=True)
    producer.flush(60)
    elapsed = time.monotonic() - (started or time.monotonic())
    cpu = time.process_time() - cpu0
    consumer.close()
    return {
        "events": moved,
        "seconds": round(elapsed, 2),
        "events_per_s": round(moved / elapsed, 1) if elapsed else None,
        "cpu_s_per_1000": round(cpu / moved * 1000, 4) if moved else None,
        "peak_rss_mb": round(_peak_rss_mb(os.getpid()), 1),
    }


def _committed_all(settings: AccordSettings, group: str, ends: dict) -> bool:
    consumer = Consumer(settings.kafka_config({"group.id": group}))
    try:
        answer = consumer.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
        return all(tp.offset >= ends[(tp.topic, tp.partition)] for tp in answer)
    except Exception:
        return False
    finally:
        consumer.close()


def _ends(settings: AccordSettings, topics: list[str]) -> dict[tuple[str, int], int]:
    consumer = Consumer(settings.kafka_config({"group.id": "bench-ends"}))
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t in topics
            for p in range(PARTITIONS)
        }
    finally:
        consumer.close()


def accord(settings: AccordSettings, topics: list[str], total: int) -> dict:
    worker = WorkerProcess(settings)
    worker.start()
    pid = int(worker.spec.pid_file.read_text().split()[0])
    try:
        started, cpu0 = time.monotonic(), _proc_cpu_s(pid)
        ends = _ends(settings, topics)
        app = settings.worker.app_id
        if not wait_until(lambda: _committed_all(settings, app, ends), 1800, interval_s=1.0):
            raise SystemExit("the worker did not read every raw event within 30 minutes")
        changelog = f"{app}-golden-changelog"
        out_ends = _ends(settings, [changelog])
        if not wait_until(lambda: _committed_all(settings, f"{app}-emit", out_ends), 600):
            raise SystemExit("the emitter did not catch up within 10 minutes")
        elapsed, cpu = time.monotonic() - started, _proc_cpu_s(pid) - cpu0
        rss = _peak_rss_mb(pid)
    finally:
        worker.stop()
    return {
        "events": total,
        "seconds": round(elapsed, 2),
        "events_per_s": round(total / elapsed, 1),
        "cpu_s_per_1000": round(cpu / total * 1000, 4),
        "peak_rss_mb": round(rss, 1),
        "golden_revisions": sum(out_ends.values()),
    }


def bench_settings(base: AccordSettings, run: str, tmp: Path) -> AccordSettings:
    """This run's raw topics (mappings copied and pointed at them), Accord topics,
    consumer groups and Redis keys: nothing shared with the demo or the tests."""
    connectors = tmp / "connectors"
    shutil.copytree(base.connectors_dir, connectors)
    for mapping in connectors.glob("*/mapping.yaml"):
        text = mapping.read_text()
        topic = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("topic:"))  # fmt: skip
        mapping.write_text(text.replace(f"topic: {topic}", f"topic: bench-{run}.{topic}", 1))
    topics = TopicSettings(
        changes=f"bench-{run}.changes", golden=f"bench-{run}.golden",
        audit=f"bench-{run}.audit", dlq=f"bench-{run}.dlq", sink_prefix=f"bench-{run}.sink.",
    )  # fmt: skip
    worker = base.worker.model_copy(
        update={
            "app_id": f"bench-{run}",
            "redis_prefix": f"bench-{run}:",
            "partitions": PARTITIONS,
            "sinks": [],
            "reconcile_interval_s": 0,
            "connector_watchdog": False,
            "data_dir": base.stack.state_dir.resolve() / "bench-workers" / run,
        }
    )
    return base.model_copy(
        update={"connectors_dir": connectors, "topics": topics, "worker": worker}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    args = parser.parse_args()

    base = load_settings()
    Stack(base, progress=lambda m: print(f"[stack] {m}", file=sys.stderr)).up()
    run = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(base, run, Path(tmp))
        template = templates(settings, run)
        raw = [t.topic for t in template.values()]
        admin = AdminClient(settings.kafka_config())
        for future in admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in raw]).values():
            future.result(30)

        began = time.monotonic()
        messages = generate(args.customers, template)
        print(f"generated {len(messages):,} events in {time.monotonic() - began:.1f}s",
              file=sys.stderr)  # fmt: skip
        load_topics(settings, messages)
        total = len(messages)

        print("ceiling: pass-through ...", file=sys.stderr)
        ceiling_figures = ceiling(settings, raw, total, run)
        print(f"  {ceiling_figures}", file=sys.stderr)
        print("accord worker ...", file=sys.stderr)
        accord_figures = accord(settings, raw, total)
        print(f"  {accord_figures}", file=sys.stderr)

        ours = set(admin.list_topics(timeout=10).topics)
        admin.delete_topics([t for t in ours if t.startswith(f"bench-{run}")])

    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "customers": args.customers,
        "events": total,
        "partitions": PARTITIONS,
        "ceiling": ceiling_figures,
        "accord": accord_figures,
        "accord_over_ceiling": round(
            accord_figures["events_per_s"] / ceiling_figures["events_per_s"], 3
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{dt.date.today().isoformat()}-pipeline.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"figures: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
