"""Fixtures for tests that run Accord's consumers against the real stack."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from streams.debezium import SourceChange
from streams.ingest import RawChangeConsumer
from streams.settings import AccordSettings


@contextmanager
def running_consumer(
    settings: AccordSettings, topics: list[str], readers: dict[str, Any] | None = None
) -> Iterator[tuple[RawChangeConsumer, list[SourceChange], threading.Thread]]:
    """A RawChangeConsumer on its own thread, collecting every change it hands on."""
    collected: list[SourceChange] = []
    consumer = RawChangeConsumer(
        settings, topics, f"test-{uuid.uuid4().hex[:8]}", collected.extend, readers=readers
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run(stop)
        except BaseException as exc:
            errors.append(exc)
            raise

    thread = threading.Thread(target=run, name="raw-consumer", daemon=True)
    thread.start()
    try:
        yield consumer, collected, thread
    finally:
        stop.set()
        thread.join(30)
        consumer.close()
    assert not errors, f"consumer thread died: {errors}"
