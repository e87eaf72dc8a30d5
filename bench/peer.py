"""The Quix Streams peer of the processor benchmark: same events, same run, its own venv.

`peer(settings, topics, total, run)` runs `bench/quix_peer.py` (Accord's pipeline written
plainly on Quix Streams) over a run's raw topics and measures it as `pipeline_bench`
measures Accord's worker: events per second, CPU seconds per 1,000 events and peak RSS
of the process. quixstreams pins older confluent-kafka and pydantic than Accord, so the
peer runs in a venv of its own (`.accord/bench/quix-venv`, from
`bench/quix-requirements.txt`), made on first use and reused while the pins are the same.

    .venv/bin/python bench/peer.py [--customers N]

loads N customers into a run's own raw topics, runs the peer, checks its outputs and
prints the figures (a standalone check; `pipeline_bench` calls `peer` beside the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from procstat import cpu_s, peak_rss_mb  # noqa: E402

from streams.settings import AccordSettings  # noqa: E402
from streams.stack.process import tail, wait_until  # noqa: E402

VENV = ROOT / ".accord" / "bench" / "quix-venv"
REQUIREMENTS = ROOT / "bench" / "quix-requirements.txt"
PEER = ROOT / "bench" / "quix_peer.py"
MADE_FROM = "accord-made-from.txt"  # in the venv: the requirements it was made from
# What the peer imports: a venv that cannot import them is broken, whatever pip said.
IMPORT_CHECK = (
    "import quixstreams, streams.ingest, streams.mapping, streams.merge, streams.emit, "
    "streams.identity, streams.rules, streams.projection, streams.registry"
)


def _say(message: str) -> None:
    print(f"[peer] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the venv


def library() -> str:
    """The library and its pinned version ("quixstreams 3.28.1"), from the requirements."""
    for line in REQUIREMENTS.read_text().splitlines():
        if line.lower().startswith("quixstreams=="):
            return "quixstreams " + line.split("==", 1)[1].strip()
    raise SystemExit(f"{REQUIREMENTS} pins no quixstreams version")


def ensure_venv(venv: Path = VENV) -> Path:
    """The peer venv's python: reused when made from the same pins, else made anew.

    Made from scratch (never patched) so that a changed pin cannot leave stale packages.
    """
    python = venv / "bin" / "python"
    wanted = REQUIREMENTS.read_text()
    made_from = venv / MADE_FROM
    if python.exists() and made_from.exists() and made_from.read_text() == wanted:
        return python
    _say(f"making the Quix Streams venv in {venv} ({library()}) ...")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        [str(python), "-c", IMPORT_CHECK],
    ]
    for argv in steps:
        _say("  " + " ".join(Path(a).name if a.startswith("/") else a for a in argv[:4]))
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            shutil.rmtree(venv, ignore_errors=True)
            raise SystemExit(f"making the peer venv failed:\n{done.stdout}\n{done.stderr}")
    made_from.write_text(wanted)
    _say("venv ready")
    return python


# ------------------------------------------------------------------- measuring


def _ends(admin: AdminClient, probe: Consumer, topics: list[str]) -> dict[tuple[str, int], int]:
    """The high watermark of every partition of `topics`."""
    metadata = admin.list_topics(timeout=10).topics
    return {
        (topic, partition): probe.get_watermark_offsets(TopicPartition(topic, partition), 10)[1]
        for topic in topics
        for partition in metadata[topic].partitions
    }


def _committed_all(probe: Consumer, ends: dict[tuple[str, int], int]) -> bool:
    """Has the probe's group committed the end of every partition in `ends`?"""
    try:
        answer = probe.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
    except Exception:
        return False
    return all(tp.offset >= ends[(tp.topic, tp.partition)] for tp in answer)


def _status(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _until(condition: Callable[[], bool], process: subprocess.Popen, timeout_s: float,
           what: str, log: Path) -> None:  # fmt: skip
    """Poll `condition`; a peer that exits or a timeout ends the benchmark with its log."""
    if not wait_until(lambda: condition() or process.poll() is not None, timeout_s):
        raise SystemExit(f"the Quix peer did not {what} within {timeout_s:.0f}s:\n{tail(log)}")
    if process.poll() is not None and not condition():
        raise SystemExit(f"the Quix peer exited ({process.returncode}):\n{tail(log, 40)}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (Quix commits and closes), then SIGKILL to what is left of its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _forget(settings: AccordSettings, group: str, prefix: str) -> int:
    """Delete the peer's internal topics, consumer group and Redis keys (its output topics
    start with `bench-<run>`, which the benchmark deletes). Returns how many golden ids
    its identity index held."""
    import redis

    admin = AdminClient(settings.kafka_config())
    internal = [
        topic
        for topic in admin.list_topics(timeout=10).topics
        if topic.startswith((f"repartition__{group}--", f"changelog__{group}--"))
    ]
    futures = list(admin.delete_consumer_groups([group]).values())
    if internal:
        futures += admin.delete_topics(internal).values()
    for future in futures:
        try:
            future.result(30)
        except Exception as exc:  # left behind is untidy, not wrong
            _say(f"cleanup: {exc}")
    client = redis.Redis.from_url(settings.redis, **settings.redis_credentials())
    keys = list(client.scan_iter(match=f"{prefix}*", count=10_000))
    golden_ids = sum(1 for key in keys if key.startswith(f"{prefix}links:".encode()))
    for start in range(0, len(keys), 10_000):
        client.delete(*keys[start : start + 10_000])
    return golden_ids


def peer(settings: AccordSettings, topics: list[str], total: int, run: str) -> dict:
    """Run the Quix Streams peer over `topics` (holding `total` events) and measure it.

    Timed from the peer's first consumed event until its consumer group has committed
    the end of every raw partition and then of its repartition topic (Quix flushes its
    producer before each commit, so every output is written by then). CPU is the
    process's utime+stime over that span, read just before it is stopped; peak RSS is
    its VmHWM. Its outputs stay in `bench-<run>.quix.*` for the caller to inspect.
    """
    python = ensure_venv()
    base = settings.worker.data_dir or settings.stack.state_dir.resolve() / "bench-workers" / run
    work = Path(base) / "quix-peer"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    group, prefix, out = f"bench-{run}-quix", f"bench-{run}-quix:", f"bench-{run}.quix."
    security = settings.kafka_security
    config = {
        "bootstrap_servers": settings.kafka,
        "kafka": security.librdkafka() if security.protocol != "PLAINTEXT" else {},
        "raw_topics": topics,
        "registry_url": settings.registry,
        "registry_auth": settings.registry_auth(),
        "redis_url": settings.redis,
        "redis_credentials": settings.redis_credentials(),
        "redis_prefix": prefix,
        "match_key_secret": settings.match_key_secret().decode(),
        "output_prefix": out,
        "consumer_group": group,
        "state_dir": str(work / "state"),
        "connectors_dir": str(Path(settings.connectors_dir).resolve()),
        "rules_file": str(Path(settings.worker.rules_file).resolve()),
        "commit_interval_s": 1.0,  # as often as Accord's worker commits
        "status_file": str(work / "status.jsonl"),
    }
    config_file, log, status = work / "config.json", work / "peer.log", work / "status.jsonl"
    config_file.write_text(json.dumps(config, indent=2))

    admin = AdminClient(settings.kafka_config())
    probe = Consumer(settings.kafka_config({"group.id": group, "enable.auto.commit": False}))
    _say(f"running {PEER.name} over {total:,} events ...")
    with log.open("ab") as log_out:
        process = subprocess.Popen(
            [str(python), str(PEER), "--config", str(config_file)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            raw_ends = _ends(admin, probe, topics)
            _until(lambda: bool(_status(status)), process, 300, "consume an event", log)
            first = _status(status)[0]
            _until(lambda: _committed_all(probe, raw_ends), process, 1800, "read all", log)
            repartition = sorted(
                t for t in admin.list_topics(timeout=10).topics
                if t.startswith(f"repartition__{group}--")
            )  # fmt: skip
            internal_ends = _ends(admin, probe, repartition)
            _until(lambda: _committed_all(probe, internal_ends), process, 600, "merge", log)
            elapsed = time.time() - first["first_event"]
            cpu = cpu_s(process.pid) - first["cpu_s"]
            rss = peak_rss_mb(process.pid)
        finally:
            _stop(process)
        outputs = {
            topic.removeprefix(out): sum(_ends(admin, probe, [topic]).values())
            for topic in sorted(admin.list_topics(timeout=10).topics)
            if topic.startswith(out)
        }
    finally:
        probe.close()
        golden_ids = _forget(settings, group, prefix)
    counts = next((line["counts"] for line in _status(status) if "counts" in line), {})
    shutil.rmtree(work, ignore_errors=True)
    return {
        "events": total,
        "seconds": round(elapsed, 2),
        "events_per_s": round(total / elapsed, 1),
        "cpu_s_per_1000": round(cpu / total * 1000, 4),
        "peak_rss_mb": round(rss, 1),
        "library": library(),
        "golden_ids": golden_ids,
        "repartition_records": sum(internal_ends.values()),
        "outputs": outputs,
        "counts": counts,
    }


# ------------------------------------------------------------- standalone check


def _distinct_keys(settings: AccordSettings, topic: str) -> tuple[int, int]:
    """(records, distinct keys) of a whole topic."""
    consumer = Consumer(settings.kafka_config({"group.id": "bench-peer-check"}))
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
            for p in metadata.partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        keys: set[bytes] = set()
        records = 0
        deadline = time.monotonic() + 120
        while records < sum(ends.values()) and time.monotonic() < deadline:
            for message in consumer.consume(1000, 1.0):
                if message.error() is None:
                    records += 1
                    keys.add(message.key())
        return records, len(keys)
    finally:
        consumer.close()


def main() -> None:
    """Load N customers into a run's raw topics, run the peer, check and print."""
    import pipeline_bench as bench
    from confluent_kafka.admin import NewTopic

    from streams.settings import load_settings

    parser = argparse.ArgumentParser(description="Run the Quix Streams peer alone.")
    parser.add_argument("--customers", type=int, default=5_000)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    base = load_settings()
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench.bench_settings(base, run, Path(tmp))
        admin = AdminClient(settings.kafka_config())
        try:
            template = bench.templates(settings, run)
            raw = [t.topic for t in template.values()]
            creating = admin.create_topics([NewTopic(t, bench.PARTITIONS, 1) for t in raw])
            for future in creating.values():
                future.result(30)
            messages = bench.generate(args.customers, template)
            bench.load_topics(settings, messages)
            figures = peer(settings, raw, len(messages), run)
            records, distinct = _distinct_keys(settings, f"bench-{run}.quix.golden")
        finally:
            ours = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"bench-{run}")]
            if ours:
                for future in admin.delete_topics(ours).values():
                    future.result(30)
            shutil.rmtree(Path(settings.worker.data_dir), ignore_errors=True)

    counts = figures["counts"]
    duplicates = len(messages) - len(set(messages))
    handled = sum(counts.get(k, 0) for k in ("changes", "duplicates", "dead_letters",
                                              "tombstones", "unknown_deletes"))  # fmt: skip
    checks = {
        "every event handled once": handled == len(messages) == counts.get("consumed"),
        "golden records: one key per golden id": distinct == figures["golden_ids"],
        "golden topic holds every version": records == counts.get("golden"),
        f"duplicates dropped ({duplicates:,} sent twice)": counts.get("duplicates") == duplicates,
        "no dead letters": counts.get("dead_letters") == 0,
    }
    print(json.dumps({"customers": args.customers, "run": run, "peer": figures}, indent=2))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
