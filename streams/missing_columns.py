"""Mapped source columns that a source's schema no longer has.

Schema evolution can drop an optional column that `mapping.yaml` maps: the rows still
map (a missing optional column is left out, the other fields keep syncing), but that
field stops syncing. `MissingColumns` makes it visible instead of silent: a gauge per
system and column while the source's latest rows lack it, a counter of the rows mapped
without it, and one WARNING log line per source schema and column (the `/status` page
lists the gauge's columns too).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

__all__ = ["MISSING", "MISSING_ROWS", "MissingColumns", "missing_columns"]

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

    def __init__(self) -> None:
        self._now: dict[str, frozenset[str]] = {}  # topic -> columns its latest row lacked
        self._warned: set[tuple[str, str, frozenset[str]]] = set()  # topic, column, schema

    def observe(self, system: str, topic: str, mapped: Iterable[str], row: Collection[str]) -> None:
        """Notes which of the `mapped` columns the row (its column names) lacks."""
        absent = [column for column in mapped if column not in row]
        before = self._now.get(topic)
        if not absent and not before:
            return
        now = frozenset(absent)
        for column in absent:
            MISSING_ROWS.labels(system, column).inc()
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
