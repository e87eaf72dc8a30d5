"""Processor throughput beside a ceiling and a peer, then latency and state: one run.

    make bench        (or: .venv/bin/python bench/pipeline_bench.py [--customers N]
                       [--parts ceiling,peer,accord,scale,latency,state])

Events are real Debezium envelopes (the captured vectors in tests/vectors/debezium,
their writer schemas registered in the stack's registry) re-rendered with the sample
generator's messy rows: every customer is created in the systems that know it (crm,
billing, support, as `SampleGenerator.systems_for` decides), a third get one update, and
5% of all messages are sent twice. They go to raw topics of this run's own (6 partitions).

- ceiling: one confluent-kafka consumer -> producer pass-through, batches of 1,000,
  doing no work, over the loaded topics; in a process of its own.
- peer: the same pipeline written plainly on Quix Streams (`bench/peer.py`).
- accord / scale: 1, then 2, real `accord worker` processes (no appliers), started and
  ready before the events are loaded into raw topics of their own, so that neither pays
  for its start nor gets a head start: decode, normalise, validate, dedupe (Redis),
  identity, merge, and the golden record, audit entries and sink events written by the
  emitter. Done when the group has committed every raw event and every change, and the
  emitter every changelog record. py-spy samples the single worker's thread holding
  the GIL.
- latency: the open-loop edit ladder on the real connectors (`bench/latency_bench.py`),
  with the appliers in the worker and then each in a process of its own.
- state: 1M golden states, cold recovery and warm restart (`bench/state_bench.py`).

Figures go to bench/results/<date>.json and a plot to <date>.png: events/s, CPU
seconds per 1,000 events and peak RSS of each, Accord / ceiling and Accord / peer. A
run of some `--parts` only writes <date>-<parts>.json and .png (`2026-11-24-accord.json`)
and leaves the day's full run alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
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

from figures import result_path, write_figures  # noqa: E402
from procstat import cpu_s, peak_rss_mb, wait_for_quiet  # noqa: E402

from streams.mapping import load_mappings  # noqa: E402
from streams.registry import registry_client  # noqa: E402
from streams.reset import delete_redis_keys  # noqa: E402
from streams.samples import SampleGenerator  # noqa: E402
from streams.settings import AccordSettings, TopicSettings, load_settings  # noqa: E402
from streams.stack.manager import Stack  # noqa: E402
from streams.stack.process import wait_until  # noqa: E402
from streams.topology import emit_group, ingest_group  # noqa: E402
from streams.workers import WorkerProcess, wait_all_ready  # noqa: E402
from tests import vectors  # noqa: E402

PARTITIONS = 6
DUPLICATE_SHARE = 0.05
UPDATE_SHARE = 0.33


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


def produce(
    producer: Producer, topic: str, key: bytes | None, value: bytes | None, wait_s: float = 0.1
) -> None:
    """Produce, waiting for room while the producer's queue is full."""
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            return
        except BufferError:
            producer.poll(wait_s)


def load_topics(
    settings: AccordSettings, messages: list[tuple[str, bytes, bytes]], prefix: str | None = None
) -> None:
    """Produce the messages; with `prefix`, into `<prefix>.<original topic>` instead."""
    producer = Producer(settings.kafka_config({"linger.ms": 50, "batch.size": 1_000_000}))
    renamed: dict[str, str] = {}
    for topic, key, value in messages:
        if prefix is not None:
            if topic not in renamed:
                renamed[topic] = f"{prefix}.{topic.split('.', 1)[1]}"
            topic = renamed[topic]
        produce(producer, topic, key, value)
    if producer.flush(120):
        raise SystemExit("could not load the raw topics")


def create_topics(settings: AccordSettings, topics: list[str]) -> None:
    admin = AdminClient(settings.kafka_config())
    for future in admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics]).values():
        future.result(30)


# ----------------------------------------------------------------------- measuring


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
            produce(producer, sink, message.key(), message.value(), wait_s=0.05)
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
        "peak_rss_mb": round(peak_rss_mb(os.getpid()), 1),
    }


def in_own_process(measure: Any, *args: Any) -> Any:
    """Run a measurement in a fresh interpreter, so its peak RSS is its own, not the
    bench's (which holds every generated event)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(measure, args)


def _committed(settings: AccordSettings, group: str, ends: dict) -> int | None:
    """How many of the events up to `ends` the group has committed; None if unknown."""
    consumer = Consumer(settings.kafka_config({"group.id": group}))
    try:
        answer = consumer.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
        return sum(min(max(tp.offset, 0), ends[(tp.topic, tp.partition)]) for tp in answer)
    except Exception:
        return None
    finally:
        consumer.close()


def _committed_all(settings: AccordSettings, group: str, ends: dict) -> bool:
    return _committed(settings, group, ends) == sum(ends.values())


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


def top_frames(collapsed: Path, limit: int = 15) -> list[dict[str, Any]]:
    """The functions the worker spent its samples in (self), from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:limit]
    return [{"frame": frame, "share": round(n / total, 4)} for frame, n in ranked]


def _profiler(pid: int, out: Path) -> subprocess.Popen:
    """py-spy on the thread holding the GIL: a worker is bound by its one GIL, and without
    `--gil` threads waiting in librdkafka or epoll took the top of the profile."""
    spy = Path(sys.executable).with_name("py-spy")
    argv = [str(spy), "record", "--pid", str(pid), "--rate", "50", "--format", "raw", "--gil",
            "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _instance(settings: AccordSettings, number: int) -> AccordSettings:
    """Worker process `number` of a run: its own state folder, and a free web port (0: the
    worker picks one and publishes it, so a worker already on this host is no obstacle)."""
    worker = settings.worker.model_copy(update={"instance": str(number), "web_port": 0})
    return settings.model_copy(update={"worker": worker})


def accord(
    settings: AccordSettings,
    messages: list[tuple[str, bytes, bytes]],
    workers: int = 1,
    profile: Path | None = None,
) -> dict:
    """Real worker processes, ready and idle, are handed every event; timed until every
    output is out.

    The events go to raw topics of this app's own, loaded once every process is ready,
    so that one worker gets no head start over another and none pays for its start.
    """
    raw = raw_topics_of(settings)
    create_topics(settings, raw)
    processes = [WorkerProcess(_instance(settings, n)) for n in range(1, workers + 1)]
    for process in processes:
        process.start()
    pids = [int(process.spec.pid_file.read_text().split()[0]) for process in processes]
    spy = _profiler(pids[0], profile) if profile else None
    try:
        wait_all_ready(processes, 120)  # raises with its log if one exits
        app = settings.worker.app_id
        started, cpu0 = time.monotonic(), sum(cpu_s(pid) for pid in pids)
        load_topics(settings, messages, prefix=app)
        ends = _ends(settings, raw)
        ingest = ingest_group(settings)
        if not wait_until(lambda: _committed_all(settings, ingest, ends), 1800, interval_s=0.5):
            raise SystemExit("the workers did not read every raw event within 30 minutes")
        # Raw offsets commit once changes are handed on; the merge commits its own input
        # only after the changelog holds what it wrote.
        merged = _ends(settings, [settings.topics.changes])
        if not wait_until(lambda: _committed_all(settings, app, merged), 600, interval_s=0.5):
            raise SystemExit("the merge did not catch up within 10 minutes")
        changelog = f"{app}-golden-changelog"
        out_ends = _ends(settings, [changelog])
        if not wait_until(
            lambda: _committed_all(settings, emit_group(settings), out_ends), 600, interval_s=0.5
        ):
            raise SystemExit("the emitter did not catch up within 10 minutes")
        elapsed = time.monotonic() - started
        cpu = sum(cpu_s(pid) for pid in pids) - cpu0
        rss = [peak_rss_mb(pid) for pid in pids]
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        for process in processes:
            process.stop()
    events = len(messages)
    return {
        "workers": workers,
        "events": events,
        "seconds": round(elapsed, 2),
        "events_per_s": round(events / elapsed, 1),
        "events_per_s_per_worker": round(events / elapsed / workers, 1),
        "cpu_s_per_1000": round(cpu / events * 1000, 4),
        "peak_rss_mb": round(max(rss), 1),
        "golden_revisions": sum(out_ends.values()),
    }


def bench_settings(base: AccordSettings, run: str, tmp: Path) -> AccordSettings:
    """This run's raw topics (mappings copied and pointed at them), Accord topics,
    consumer groups and Redis keys: nothing shared with the demo or the tests."""
    worker = base.worker.model_copy(
        update={
            "partitions": PARTITIONS,
            "sinks": [],
            "reconcile_interval_s": 0,
            "connector_watchdog": False,
        }
    )
    settings = base.model_copy(update={"worker": worker})
    return another_app(with_raw_topics(settings, f"bench-{run}", tmp / "home"), run, "home", tmp)


def with_raw_topics(settings: AccordSettings, prefix: str, folder: Path) -> AccordSettings:
    """The settings with every mapping reading `<prefix>.<its topic>` (a copied folder)."""
    connectors = folder / "connectors"
    shutil.copytree(settings.connectors_dir, connectors)
    for mapping in connectors.glob("*/mapping.yaml"):
        text = mapping.read_text()
        topic = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("topic:"))  # fmt: skip
        original = topic.split(".", 1)[1] if topic.startswith("bench-") else topic
        mapping.write_text(text.replace(f"topic: {topic}", f"topic: {prefix}.{original}", 1))
    return settings.model_copy(update={"connectors_dir": connectors})


def raw_topics_of(settings: AccordSettings) -> list[str]:
    return sorted(mapping.topic for mapping in load_mappings(settings.connectors_dir).values())


def another_app(settings: AccordSettings, run: str, name: str, tmp: Path) -> AccordSettings:
    """Another Accord app of the run: its own group, topics (raw ones too), keys and state.

    Its raw topics are `<app>.<original topic>`: `accord` loads them itself; the ceiling
    and the peer read the run's own, `bench-<run>.<original topic>`.
    """
    app = f"bench-{run}-{name}"
    topics = TopicSettings.under(app)
    worker = settings.worker.model_copy(
        update={
            "app_id": app,
            "redis_prefix": f"{app}:",
            "data_dir": settings.stack.state_dir.resolve() / "bench-workers" / app,
        }
    )
    named = settings.model_copy(update={"topics": topics, "worker": worker})
    return named if name == "home" else with_raw_topics(named, app, tmp / name)


def plot(result: dict[str, Any], out: Path) -> None:
    """Throughput beside the ceiling and the peer; latency percentiles by edit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = [
        (label, result[key]["events_per_s"])
        for label, key in (
            ("ceiling\n(pass-through)", "ceiling"),
            ("Quix Streams\npeer", "peer"),
            ("Accord\n1 worker", "accord"),
            ("Accord\n2 workers", "accord_2_workers"),
        )
        if (result.get(key) or {}).get("events_per_s")
    ]
    if bars:
        left.bar([b[0] for b in bars], [b[1] for b in bars], color="#4c72b0")
        for index, (_, value) in enumerate(bars):
            left.annotate(f"{value:,.0f}", (index, value), ha="center", va="bottom")
    left.set_yscale("log")  # the ceiling is two orders of magnitude above the rest
    left.set_ylabel("events per second (log scale)")
    left.set_title(f"Processor throughput, {result.get('events', 0):,} events")
    steps = sorted((result.get("latency") or {}).get("steps", []), key=lambda s: s["rate"])
    steps = [step for step in steps if (step.get("latency") or {}).get("count")]
    if steps:
        rates = [step["rate"] for step in steps]
        for name in ("p50", "p95", "p99"):
            values = [step["latency"][f"{name}_ms"] for step in steps]
            right.plot(rates, values, marker="o", label=name)
        right.axhline(500, color="grey", linestyle="--", linewidth=1, label="goal: p99 500 ms")
        right.set_yscale("log")
        right.legend()
    right.set_xlabel("edits per second (open loop)")
    right.set_ylabel("source commit -> applied in target (ms)")
    right.set_title("End-to-end latency")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


PARTS = ("ceiling", "peer", "accord", "scale", "latency", "state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--state-customers", type=int, default=1_000_000)
    parser.add_argument(
        "--state-templates",
        type=int,
        default=50_000,
        help="golden states folded for the recovery bench; the rest are copies of them "
        "under new golden ids (0: fold every one, about 15 minutes for 1M)",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")

    # A run of some parts only keeps its own files: it must not overwrite the day's full run.
    label = "" if parts == set(PARTS) else "-".join(sorted(parts))
    base = load_settings()
    Stack(base, progress=lambda m: print(f"[stack] {m}", file=sys.stderr)).up()
    run = uuid.uuid4().hex[:8]
    today = dt.date.today().isoformat()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "customers": args.customers,
        "partitions": PARTITIONS,
    }

    def step(name: str, measure: Any) -> None:
        quiet = wait_for_quiet()
        print(f"{name} ... (after {quiet['waited_s']} s for a quiet machine)", file=sys.stderr)
        result[name] = measure()
        if isinstance(result[name], dict):
            result[name]["quiet_before"] = quiet
        print(f"  {json.dumps(result[name])[:600]}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(base, run, Path(tmp))
        template = templates(settings, run)
        raw = [t.topic for t in template.values()]
        admin = AdminClient(settings.kafka_config())
        for future in admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in raw]).values():
            future.result(30)
        try:
            began = time.monotonic()
            messages = generate(args.customers, template)
            print(f"generated {len(messages):,} events in {time.monotonic() - began:.1f}s",
                  file=sys.stderr)  # fmt: skip
            load_topics(settings, messages)
            total = result["events"] = len(messages)

            if "ceiling" in parts:
                step("ceiling", lambda: in_own_process(ceiling, settings, raw, total, run))
            if "peer" in parts:
                from peer import peer

                step("peer", lambda: peer(settings, raw, total, run))
            if "accord" in parts:
                one = another_app(settings, run, "1w", Path(tmp))
                profile_name = f"{label}-worker-profile" if label else "worker-profile"
                profile = result_path(profile_name, "txt", day=today)
                step("accord", lambda: accord(one, messages, profile=profile))
                result["accord"]["profile_top"] = top_frames(profile)
            if "scale" in parts:
                two = another_app(settings, run, "2w", Path(tmp))
                step("accord_2_workers", lambda: accord(two, messages, workers=2))
            messages.clear()  # the state bench needs the memory more
            if "state" in parts:
                from state_bench import golden_recovery

                app = another_app(settings, run, "state", Path(tmp))
                step(
                    "state",
                    lambda: golden_recovery(
                        app, args.state_customers, templates=args.state_templates
                    ),
                )
        finally:
            ours = set(admin.list_topics(timeout=10).topics)
            admin.delete_topics([t for t in ours if t.startswith(f"bench-{run}")])
            # Dedupe and identity keys of every app of the run: a million per 100,000
            # customers, which would otherwise pile up in the stack's Redis run after run.
            delete_redis_keys(base, f"bench-{run}-")
            for folder in (base.stack.state_dir / "bench-workers").glob(f"bench-{run}-*"):
                shutil.rmtree(folder, ignore_errors=True)

    if "latency" in parts:
        from latency_bench import latency

        step("latency", lambda: latency(base))
        # The same ladder with each applier in a process of its own instead of the
        # worker's threads: how far the deployment moves the highest steady rate.
        step("latency_appliers_apart", lambda: latency(base, appliers_apart=True))
    for key in ("ceiling", "peer"):
        if result.get(key) and result.get("accord"):
            ratio = result["accord"]["events_per_s"] / result[key]["events_per_s"]
            result[f"accord_over_{key}"] = round(ratio, 3)
    out = write_figures(result, label, day=today)
    plot(result, result_path(label, "png", day=today))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("latency")}, indent=2))
    print(f"figures: {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
