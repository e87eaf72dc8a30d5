"""Helpers shared by integration and end-to-end tests: isolation and reading outputs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streams.registry import registry_client
from streams.settings import AccordSettings, TopicSettings
from streams.topics import RAW_TOPICS
from streams.topology import emit_group, ingest_group, sink_group
from streams.workers import WorkerProcess, worker_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated(settings: AccordSettings, partitions: int = 3) -> AccordSettings:
    """The same stack with this test's own Accord topics, consumer groups, Redis keys and
    worker state: tests never see each other's outputs."""
    run = uuid.uuid4().hex[:8]
    topics = TopicSettings.under(f"test-{run}")
    worker = settings.worker.model_copy(
        update={
            "app_id": f"test-{run}",
            "redis_prefix": f"test-{run}:",
            "web_port": free_port(),
            "partitions": partitions,
            "data_dir": settings.stack.state_dir.resolve() / "test-workers",
            # Every restart of a test's worker restores its table in bulk, however small.
            "bulk_restore_min_records": 0,
        }
    )
    return settings.model_copy(update={"topics": topics, "worker": worker})


def without_appliers(settings: AccordSettings) -> AccordSettings:
    """The same settings with a worker that runs no applier of its own."""
    return settings.model_copy(update={"worker": settings.worker.model_copy(update={"sinks": []})})


@contextmanager
def running_worker(settings: AccordSettings) -> Iterator[WorkerProcess]:
    """A real `accord worker` that starts at the raw topics' current ends, so that it
    processes only what the test writes; stopped when the block ends."""
    start_group_at_end(settings, ingest_group(settings))
    worker = WorkerProcess(settings)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def accord(settings: AccordSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `accord` command against these settings, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        env={**os.environ, **worker_env(settings)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_group_at_end(settings: AccordSettings, group_id: str) -> None:
    """Commit the raw topics' current ends for a new consumer group, so a test's worker
    processes only what the test itself writes, not every earlier test's rows."""
    consumer = Consumer(settings.kafka_config({"group.id": group_id}))
    try:
        metadata = consumer.list_topics(timeout=10)
        offsets = []
        for topic in RAW_TOPICS.values():
            if topic not in metadata.topics:
                continue
            for partition in metadata.topics[topic].partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
                offsets.append(TopicPartition(topic, partition, high))
        if offsets:
            consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


class TopicTail:
    """Every record of an Avro topic from its start, decoded, read committed, as it grows.

    The topic must exist (the worker creates Accord's topics before it reports ready).
    """

    def __init__(
        self, settings: AccordSettings, topic: str, skip_undecodable: bool = False
    ) -> None:
        self.topic = topic
        self.records: list[dict[str, Any] | None] = []
        self.skip_undecodable = skip_undecodable
        self.undecodable = 0
        self._deserializer = AvroDeserializer(registry_client(settings))
        self._context = SerializationContext(topic, MessageField.VALUE)
        self._consumer = Consumer(
            settings.kafka_config(
                {
                    "group.id": f"test-tail-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
        )
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        self._consumer.assign(self._partitions)

    def poll(self, timeout_s: float = 0.5) -> int:
        """Read what is there now; returns how many records arrived."""
        count = 0
        for message in self._consumer.consume(1000, timeout_s):
            if message.error():
                continue
            value = message.value()
            try:
                self.records.append(self._deserializer(value, self._context) if value else None)
            except Exception:  # poison is anything: bad magic, unknown id, cut short
                if not self.skip_undecodable:
                    raise
                self.undecodable += 1
                continue
            count += 1
        return count

    def wait_for(self, condition: Callable[[list[Any]], bool], timeout_s: float) -> bool:
        return _wait(lambda: self.poll() >= 0 and condition(self.records), timeout_s)

    def read_to_end(self, timeout_s: float = 60.0) -> None:
        """Read everything committed so far: up to each partition's current end."""
        ends = {
            tp.partition: self._consumer.get_watermark_offsets(tp, timeout=10)[1]
            for tp in self._partitions
        }

        def at_end() -> bool:
            self.poll(0.2)
            positions = self._consumer.position(self._partitions)
            return all(ends[tp.partition] == 0 or tp.offset >= ends[tp.partition]
                       for tp in positions)  # fmt: skip

        if not _wait(at_end, timeout_s):
            raise AssertionError(f"could not read {self.topic} to its end in {timeout_s:.0f}s")

    def close(self) -> None:
        self._consumer.close()


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
    return condition()


def drained(settings: AccordSettings, appliers: list[str] | None = None) -> bool:
    """True when the worker has processed and committed everything on its inputs: raw
    topics (ingest), accord.changes (the Faust group), the golden changelog (emit) and the
    sink topics of `appliers` (default: every sample system's), wherever they run."""
    from streams.topology import changelog_topic

    app_id = settings.worker.app_id
    groups = {
        ingest_group(settings): list(RAW_TOPICS.values()),
        app_id: [settings.topics.changes],
        emit_group(settings): [changelog_topic(settings)],
        **{
            sink_group(settings, target): [settings.topics.sink(target)]
            for target in (list(RAW_TOPICS) if appliers is None else appliers)
        },
    }
    for group, topics in groups.items():
        consumer = Consumer(settings.kafka_config({"group.id": group}))
        try:
            metadata = consumer.list_topics(timeout=10).topics
            partitions = [
                TopicPartition(topic, p)
                for topic in topics
                if topic in metadata
                for p in metadata[topic].partitions
            ]
            for tp in consumer.committed(partitions, timeout=10):
                _, high = consumer.get_watermark_offsets(tp, 10)
                if high > 0 and tp.offset < high:
                    return False
        finally:
            consumer.close()
    return True


def end_offsets(settings: AccordSettings, topics: list[str]) -> dict[tuple[str, int], int]:
    consumer = Consumer(settings.kafka_config({"group.id": "test-ends"}))
    try:
        metadata = consumer.list_topics(timeout=10).topics
        return {
            (topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
            for topic in topics
            if topic in metadata
            for p in metadata[topic].partitions
        }
    finally:
        consumer.close()


def quiesced(
    settings: AccordSettings, topics: list[str], timeout_s: float, stable_s: float = 5.0
) -> bool:
    """Wait until the pipeline stays drained, with no topic growing, for `stable_s`: long
    enough for Debezium to have captured every write an applier made (it polls the logs
    every 0.5 s). Every echo has then come back and produced nothing more; a loop between
    systems never quiesces, so it fails here."""
    deadline = time.monotonic() + timeout_s
    previous: dict[tuple[str, int], int] | None = None
    stable_since = 0.0
    while time.monotonic() < deadline:
        ends = end_offsets(settings, topics)
        if not drained(settings) or ends != previous:
            previous, stable_since = ends, time.monotonic()
        elif time.monotonic() - stable_since >= stable_s:
            return True
    return False


def latest_by_key(records: list[dict[str, Any]], key: str = "golden_id") -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for record in records:
        if record is not None:
            latest[record[key]] = record
    return latest


Reply = tuple[int, str, bytes]  # status, content type, body


class RegistryProxy:
    """A tiny HTTP server in front of the real schema registry that relays every request,
    except those `answer(method, path)` replies to itself (a `Reply`; None relays): a
    registry that answers garbage for some ids, or for everything for a while.
    `asked` counts the lookups of each schema id."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.asked: Counter[int] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                match = re.search(r"/schemas/ids/(\d+)", self.path)
                if match:
                    proxy.asked[int(match.group(1))] += 1
                reply = proxy.answer(self.command, self.path) or proxy._relay(self)
                status, content_type, body = reply
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str) -> Reply | None:
        """Override: what to answer instead of the registry; None relays."""
        return None

    def _relay(self, request: BaseHTTPRequestHandler) -> Reply:
        length = int(request.headers.get("Content-Length") or 0)
        reply = httpx.request(
            request.command,
            self.upstream + request.path,
            content=request.rfile.read(length) if length else None,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
            timeout=10,
        )
        return reply.status_code, reply.headers.get("content-type", ""), reply.content

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


HTML_PAGE: Reply = (200, "text/html", b"<html><body>Service temporarily moved</body></html>")
