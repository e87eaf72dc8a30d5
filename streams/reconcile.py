"""Reconcile: does every target hold the projection of every golden record?

Reads the golden records (the compacted `accord.golden`) and each SQL target's rows, and
compares them field by field. A field is in accord when the row's value, read through
the system's own mapping, equals the golden value (so `United Kingdom` in a column
agrees with `GB`), or when the column holds exactly what Accord would write (so a
display name that cannot be split back into the golden first and last names still
agrees). The comparison is plain (`compare`); reading is batched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from psycopg import sql

from streams.equality import holds
from streams.mapping import Mapper, SystemMapping, canonical_row
from streams.model import Change, Op
from streams.projection import SinkKind, SinkSpec
from streams.registry import registry_codec
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.topics import scan

BATCH = 5_000


@dataclass(frozen=True)
class Drift:
    golden_id: str
    target: str
    key: str
    field: str
    golden: Any
    target_value: Any


@dataclass
class Scorecard:
    target: str
    checked: int = 0
    in_accord: int = 0
    drifted: int = 0
    missing: int = 0  # a golden record the target should hold and does not
    orphaned: int = 0  # a target row no golden record links to
    drifts: list[Drift] = field(default_factory=list)
    drifted_rows: list[tuple[str, str]] = field(default_factory=list)  # (golden id, key)
    repairs_requested: int = 0
    missing_ids: list[str] = field(default_factory=list)
    orphaned_keys: list[str] = field(default_factory=list)

    def as_dict(self, details: int = 20) -> dict[str, Any]:
        return {
            "target": self.target,
            "checked": self.checked,
            "in_accord": self.in_accord,
            "drifted": self.drifted,
            "missing": self.missing,
            "orphaned": self.orphaned,
            "repairs_requested": self.repairs_requested,
            "drifts": [asdict(d) for d in self.drifts[:details]],
            "missing_ids": self.missing_ids[:details],
            "orphaned_keys": self.orphaned_keys[:details],
        }


# ------------------------------------------------------------------------ comparing


def compare(
    spec: SinkSpec,
    mapping: SystemMapping,
    golden: Mapping[str, dict[str, Any]],
    rows: Mapping[str, dict[str, Any]],
    deleted_everywhere: bool = False,
) -> Scorecard:
    """One target's scorecard. `golden`: golden id -> Customer record; `rows`: key -> row.

    `deleted_everywhere`: inactive records are deleted in every system (`propagate`).
    """
    card = Scorecard(spec.target)
    mapper = Mapper({mapping.system: mapping})
    linked: set[str] = set()
    for golden_id, record in golden.items():
        keys = [link["key"] for link in record["links"] if link["system"] == spec.target]
        linked.update(keys)
        expected_absent = deleted_everywhere and not record["active"]
        present = [key for key in keys if key in rows]
        if expected_absent:
            card.checked += 1
            if present:
                card.drifted += 1
                card.drifts.append(Drift(golden_id, spec.target, present[0], "*", None, "exists"))
                card.drifted_rows.append((golden_id, present[0]))
            else:
                card.in_accord += 1
            continue
        if not present:
            # Linked but gone is expected only for an inactive record (its row was
            # deleted); never linked is expected unless Accord should have created it.
            should_exist = record["active"] and (bool(keys) or spec.create)
            if should_exist:
                card.checked += 1
                card.missing += 1
                card.missing_ids.append(golden_id)
            continue
        for key in present:
            card.checked += 1
            drifts = _row_drifts(spec, mapper, mapping, golden_id, record["fields"], key, rows[key])
            if drifts:
                card.drifted += 1
                card.drifts.extend(drifts)
                card.drifted_rows.append((golden_id, key))
            else:
                card.in_accord += 1
    orphans = sorted(set(rows) - linked)
    card.orphaned, card.orphaned_keys = len(orphans), orphans
    return card


def _row_drifts(
    spec: SinkSpec,
    mapper: Mapper,
    mapping: SystemMapping,
    golden_id: str,
    values: Mapping[str, Any],
    key: str,
    row: dict[str, Any],
) -> list[Drift]:
    canonical = _canonical(mapper, mapping, key, row)
    projected = spec.project(values)
    drifts = []
    for column in spec.columns:
        if holds(row.get(column.name), projected[column.name]):
            continue
        if all(holds(canonical.get(f), values.get(f)) for f in column.fields):
            continue
        drifts.append(
            Drift(
                golden_id,
                spec.target,
                key,
                column.name,
                projected[column.name],
                row.get(column.name),
            )
        )
    return drifts


def _canonical(mapper: Mapper, mapping: SystemMapping, key: str, row: dict[str, Any]) -> dict:
    return canonical_row(mapping, key, row) or {}


# -------------------------------------------------------------------------- reading


def golden_records(
    settings: AccordSettings,
    timeout_s: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """The latest version of every golden record, from the compacted `accord.golden`."""
    codec = registry_codec(settings)
    latest: dict[str, dict] = {}
    for read, message in enumerate(
        scan(
            settings.kafka_config(),
            settings.topics.golden,
            lambda m: m.value() is not None,
            timeout_s,
        ),
        start=1,
    ):
        record = codec.decode(message.value()).value
        latest[record["golden_id"]] = record
        if progress is not None and read % (BATCH * 2) == 0:
            progress(read)
    return latest


def target_rows(
    settings: AccordSettings,
    spec: SinkSpec,
    keys: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The rows of an SQL target (all, or those with `keys`), keyed by key as text.

    Read with a server-side cursor in batches of `BATCH`; `progress` hears the running
    count after each batch.
    """
    if spec.kind is not SinkKind.SQL:
        raise ValueError(f"{spec.target} is a {spec.kind} target: it has no rows to read")
    rows: dict[str, dict[str, Any]] = {}
    for row in _rows(settings, spec, keys):
        rows[str(row[spec.key_column])] = row
        if progress is not None and len(rows) % BATCH == 0:
            progress(len(rows))
    return rows


def _rows(
    settings: AccordSettings, spec: SinkSpec, keys: list[str] | None
) -> Iterator[dict[str, Any]]:
    if spec.target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            if keys is None:
                cur.execute(f"SELECT * FROM `{spec.table}`")
            elif keys:
                marks = ", ".join(["%s"] * len(keys))
                cur.execute(
                    f"SELECT * FROM `{spec.table}` WHERE `{spec.key_column}` IN ({marks})", keys
                )
            else:
                return
            columns = [d[0] for d in cur.description]
            while batch := cur.fetchmany(BATCH):
                yield from (dict(zip(columns, row, strict=True)) for row in batch)
        return
    query = sql.SQL("SELECT * FROM {}").format(sql.Identifier(spec.table))
    if keys is not None:
        query += sql.SQL(" WHERE {}::text = ANY(%s)").format(sql.Identifier(spec.key_column))
    with postgres(settings, spec.target) as conn, conn.cursor(name="reconcile") as cur:
        conn.autocommit = False
        cur.itersize = BATCH
        cur.execute(query, (keys,) if keys is not None else None)
        columns = None
        for row in cur:
            columns = columns or [d.name for d in cur.description]
            yield dict(zip(columns, row, strict=True))


# ------------------------------------------------------------------------ the command


def reconcile(
    settings: AccordSettings,
    systems: list[str] | None = None,
    progress: Callable[[str], None] = lambda _message: None,
    repair: bool = False,
) -> list[Scorecard]:
    """Every SQL target's scorecard against the golden records (all rows, batched).

    `repair`: also send a repair request for every drifted row (see `repair_requests`).
    """
    from streams.mapping import load_mappings
    from streams.projection import load_sinks
    from streams.rules import DeletePolicy, load_rules

    sinks = load_sinks(settings.connectors_dir)
    unknown = sorted(set(systems or ()) - set(sinks))
    if unknown:
        raise ValueError(f"no sink target named {', '.join(unknown)}; known: {', '.join(sinks)}")
    mappings = load_mappings(settings.connectors_dir)
    propagate = load_rules(settings.worker.rules_file).delete_policy is DeletePolicy.PROPAGATE
    progress(f"reading golden records from {settings.topics.golden}")
    golden = golden_records(
        settings, progress=lambda n: progress(f"{n:,} golden record versions read")
    )
    progress(f"{len(golden)} golden records")
    cards = []
    for target, spec in sorted(sinks.items()):
        if spec.kind is not SinkKind.SQL or (systems and target not in systems):
            continue
        progress(f"{target}: reading {spec.table}")
        rows = target_rows(
            settings, spec, progress=lambda n, t=target: progress(f"{t}: {n:,} rows read")
        )
        card = compare(spec, mappings[target], golden, rows, deleted_everywhere=propagate)
        progress(f"{target}: {len(rows)} rows, {card.drifted} drifted, {card.missing} missing")
        if repair and card.drifted_rows:
            fresh = target_rows(settings, spec, [key for _, key in card.drifted_rows])
            requests = repair_requests(mappings[target], card, fresh, time.time_ns() // 1000)
            send_repairs(settings, requests)
            card.repairs_requested = len(requests)
            progress(f"{target}: {len(requests)} repair requests sent to {settings.topics.changes}")
        cards.append(card)
    return cards


# ----------------------------------------------------------------------- repairing


def repair_requests(
    mapping: SystemMapping, card: Scorecard, rows: Mapping[str, dict[str, Any]], now_us: int
) -> list[Change]:
    """One repair request per drifted row, carrying what the row holds now.

    A request goes through the merge like any change (keyed by golden id, so it meets
    that record's state in order): the merge plans the row's correction as a new revision,
    which the applier writes only if the row still holds what was observed.
    """
    requests = []
    for golden_id, key in card.drifted_rows:
        row = rows.get(key)
        if row is None:
            continue  # gone since it was read: nothing left to correct
        requests.append(
            Change(
                change_id=f"repair:{card.target}:{key}:{uuid.uuid4().hex}",
                system=card.target,
                source_key=key,
                op=Op.UPSERT,
                source_ts=now_us,
                position="",
                values=canonical_row(mapping, key, row) or {},
                golden_id=golden_id,
                captured_at_ms=now_us // 1000,
                observed=True,
            )
        )
    return requests


def send_repairs(settings: AccordSettings, requests: list[Change]) -> None:
    """Write repair requests to the merge's input topic and wait until the broker has them."""
    from confluent_kafka import Producer

    from streams.faust_codec import canonical_codec
    from streams.registry import registry_client

    codec = canonical_codec(
        settings,
        registry_client(settings),
        "dev.accord.CustomerChange",
        settings.topics.changes,
    )
    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    # murmur2, as Faust's producer partitions by key: a request must reach the partition
    # that holds its golden record's state.
    producer = Producer(
        settings.kafka_config(
            {
                "enable.idempotence": True,
                "partitioner": "murmur2_random",
            }
        )
    )
    for request in requests:
        producer.produce(
            settings.topics.changes,
            key=(request.golden_id or "").encode(),
            value=codec.dumps(request.to_record()),
            on_delivery=delivered,
        )
    remaining = producer.flush(30)
    if remaining or failures:
        raise RuntimeError(
            f"{remaining + len(failures)} of {len(requests)} repair requests were not "
            f"delivered to {settings.topics.changes}: {'; '.join(failures[:3]) or 'timed out'}"
        )
