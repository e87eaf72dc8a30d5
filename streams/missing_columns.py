"""Mapped source columns that a source's schema no longer has.

Schema evolution can drop an optional column that `mapping.yaml` maps: the rows still
map (a missing optional column is left out, the other fields keep syncing), but that
field stops syncing. `MissingColumns` makes it visible instead of silent: a gauge per
system and column while the source's latest rows lack it, a counter of the rows mapped
without it, and one WARNING log line per source schema and column. The `/status` page
lists the gauge's columns; `accord monitor`, a process of its own, reads them from Redis,
where the worker publishes each one (`MissingColumnSignal`) while its rows lack it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

__all__ = [
    "MISSING",
    "MISSING_ROWS",
    "MissingColumn",
    "MissingColumnSignal",
    "MissingColumns",
    "missing_columns",
    "read_missing_columns",
]

log = logging.getLogger(__name__)

MISSING = Gauge(
    "accord_mapping_missing_columns",
    "1 while a mapped source column is absent from the source's latest rows (its schema "
    "dropped it), else 0",
    ["system", "column"],
)
MISSING_ROWS = Counter(
    "accord_mapping_missing_column_rows_total",
    "Rows mapped without a mapped source column that their schema does not have",
    ["system", "column"],
)


class MissingColumns:
    """Tracks, per source topic, which mapped columns its latest row lacked.

    `observe` is called for every row mapped as an upsert (a delete's before image may
    hold only the key, so it says nothing about the schema). It does work only when a
    column is missing or was missing in the topic's previous row.
    """

    def __init__(self, publish: Callable[[str, str, bool], None] | None = None) -> None:
        """`publish(system, column, missing)` is told each change, and again now and then
        while a column stays missing (`MissingColumnSignal.__call__`)."""
        self._now: dict[str, frozenset[str]] = {}  # topic -> columns its latest row lacked
        self._warned: set[tuple[str, str, frozenset[str]]] = set()  # topic, column, schema
        self._publish = publish or (lambda system, column, missing: None)

    def observe(self, system: str, topic: str, mapped: Iterable[str], row: Collection[str]) -> None:
        """Notes which of the `mapped` columns the row (its column names) lacks."""
        absent = [column for column in mapped if column not in row]
        before = self._now.get(topic)
        if not absent and not before:
            return
        now = frozenset(absent)
        for column in absent:
            MISSING_ROWS.labels(system, column).inc()
            self._publish(system, column, True)
        if now == before:
            return
        schema = frozenset(row)
        for column in now - (before or frozenset()):
            MISSING.labels(system, column).set(1)
            if (topic, column, schema) not in self._warned:
                self._warned.add((topic, column, schema))
                log.warning(
                    "%s: mapped column %r is not in the rows of %s any more (its schema "
                    "dropped it?): its field is not synced from %s until the column is back "
                    "or mapping.yaml changes",
                    system, column, topic, system,
                )  # fmt: skip
        for column in (before or frozenset()) - now:
            MISSING.labels(system, column).set(0)
            self._publish(system, column, False)
            log.info("%s: mapped column %r is back in the rows of %s", system, column, topic)
        self._now[topic] = now


def missing_columns(registry: CollectorRegistry = REGISTRY) -> list[dict[str, str]]:
    """The (system, column) pairs the gauge says are missing now, for `/status`."""
    return [
        {"system": sample.labels["system"], "column": sample.labels["column"]}
        for metric in registry.collect()
        if metric.name == "accord_mapping_missing_columns"
        for sample in metric.samples
        if sample.value >= 1
    ]


SIGNAL_KEY = "missing-columns"  # under the worker's Redis prefix: a hash "system:column" -> seen
REFRESH_S = 60.0  # how often a column still missing is stamped again
FORGET_AFTER_S = 600.0  # a stamp this old is a worker gone, not a column missing


@dataclass(frozen=True)
class MissingColumn:
    system: str
    column: str
    last_seen: float  # epoch seconds of the last row seen without it


class MissingColumnSignal:
    """Publishes missing columns to Redis for `accord monitor`: a stamp when a row lacks
    the column (at most every `REFRESH_S` per column), removed when it is back. A Redis
    error is logged and forgotten: the signal is for people, the data path goes on."""

    def __init__(self, client: Any, prefix: str, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._key = f"{prefix}{SIGNAL_KEY}"
        self._clock = clock
        self._stamped: dict[str, float] = {}

    def __call__(self, system: str, column: str, missing: bool) -> None:
        field = f"{system}:{column}"
        now = self._clock()
        if missing and now - self._stamped.get(field, float("-inf")) < REFRESH_S:
            return
        try:
            if missing:
                self._client.hset(self._key, field, f"{now:.3f}")
                self._stamped[field] = now
            else:
                self._client.hdel(self._key, field)
                self._stamped.pop(field, None)
        except Exception as exc:  # redis-py's errors, and anything a broken client raises
            log.warning("could not publish the missing column %s to Redis: %s", field, exc)


def read_missing_columns(client: Any, prefix: str, now: float | None = None) -> list[MissingColumn]:
    """The columns some worker saw missing in the last `FORGET_AFTER_S`, oldest first."""
    now = time.time() if now is None else now
    found = []
    for field, stamp in client.hgetall(f"{prefix}{SIGNAL_KEY}").items():
        text = field.decode() if isinstance(field, bytes) else field
        system, _, column = text.partition(":")
        seen = float(stamp)
        if now - seen < FORGET_AFTER_S:
            found.append(MissingColumn(system, column, seen))
    return sorted(found, key=lambda m: (m.last_seen, m.system, m.column))
