"""Golden state of many customers: worker RSS and the time to recover the table (issue 8).

    .venv/bin/python bench/state_bench.py [--customers N] [--history] [--templates K]
                                          [--profile] [--no-bulk-restore]
                                          [--faust-env NAME=VALUE ...]

Pushing a million customers through the whole pipeline would take hours, so the golden
table's changelog is filled directly, with exactly the bytes a worker writes there:

- Each customer's source rows come from `SampleGenerator` (the systems `systems_for`
  picks), become Debezium-shaped `SourceChange`s and go through the run's own `Mapper`,
  get the golden id identity would give them, and are merged as the merge agent does
  (`apply`, `stage` with `plan_sinks`, `dumps`, `loads` back). Every sink order a write
  emits is then applied to an in-memory copy of the target table the way the SQL
  applier would (insert with a new key, adopt, update of the differing columns), and
  the applier's write comes back as CDC through the mapping and is merged too (echoes,
  new links). So a state carries what a synced record carries: every linked row, echo
  cells, sent values. Change ids embed production topic names, not the run's.
- Writes are keyed and partitioned as Faust writes them: key = the golden id's bytes
  (a `key_type=bytes` table's serializer passes bytes through), value = `dumps` bytes,
  murmur2 partitioning (aiokafka's default; librdkafka's `murmur2_random`), compressed
  as the worker compresses (`worker.compression`). The topic is made as `ensure_topics`
  makes it.
- By default only each customer's final state is written: the changelog of a worker
  that has run for longer than `min.compaction.lag.ms` (a week) and been compacted.
  `--history` writes every state the merge wrote, as a younger changelog holds them.
- One process per core builds and produces its share. `--templates K` folds only K
  customers and writes the rest as copies under their own golden ids (fast, repetitive).

Then a real `accord worker` (no appliers, no watchdog, no reconcile) is started twice on
this run's settings and topics:

- cold: empty data dir, so the whole changelog is read into RocksDB: in bulk by
  `streams.restore` (`worker.bulk_restore`), then by Faust's own replay for
  whatever is left (`--no-bulk-restore`: Faust replays it all). Timed from the process
  start to `/health` answering ready. Faust starts its web server and the
  app's services only once the tables have recovered (`App.on_started` waits for it),
  and /health then also needs the rebalance ended, which Faust marks after recovery: so
  ready means every active changelog partition was read up to the highwater Faust took
  at assignment. Faust's log lines split the time into phases; its highwater table is
  checked against what was produced, and after the clean stop the RocksDB partitions
  are opened read-only, their keys counted and a sample value compared byte for byte.
- warm: the same data dir after a clean stop (SIGTERM, crash marker removed): the
  offsets persisted in RocksDB let Faust skip the replay.

RSS is VmRSS of the worker when it turns ready, VmHWM its peak; CPU seconds per thread
too. The emitter, a thread that reads the same changelog, starts only after recovery
(an app service), so it cannot slow the replay; its group is committed at the changelog's
end beforehand, as after the restart of a worker whose emitter had caught up, so that it
does not parse a million records right after ready (`--emitter-behind` leaves it at the
start). The result says what it committed and wrote. `--profile` samples the cold start
with py-spy.

Figures go to bench/results/<date>-state.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from figures import result_path, write_figures  # noqa: E402
from pipeline_bench import produce  # noqa: E402
from procstat import cpu_s, memory_mb  # noqa: E402

from streams.debezium import SourceChange, SourcePosition  # noqa: E402
from streams.emit import plan_sinks  # noqa: E402
from streams.errors import AccordError  # noqa: E402
from streams.identity import golden_id_for  # noqa: E402
from streams.mapping import Mapped, Mapper, SystemMapping, load_mappings  # noqa: E402
from streams.merge import GoldenState, SinkOrder, apply, dumps, loads, stage  # noqa: E402
from streams.model import Change, Op  # noqa: E402
from streams.projection import SinkSpec, load_sinks  # noqa: E402
from streams.rules import Rules, load_rules  # noqa: E402
from streams.samples import SampleGenerator  # noqa: E402
from streams.settings import AccordSettings, load_settings  # noqa: E402
from streams.stack.process import read_pid, spawn, wait_until  # noqa: E402
from streams.topology import (  # noqa: E402
    accord_topics,
    changelog_topic,
    emit_group,
    source_topics,
)
from streams.workers import WorkerProcess  # noqa: E402

SEED = 7
CHUNK = 2_000  # customers per generation task: progress granularity
ROUNDS = 40  # most merges of one customer: sources, then applier echoes (loop guard)
START_US = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
OFFSET_KEY = b"__faust\0offset__"  # where Faust's RocksDB store keeps a partition's offset
# Columns a row the applier inserts gets from its table's defaults (connectors/*/schema.sql).
INSERT_DEFAULTS: dict[str, dict[str, Any]] = {"crm": {"marketing_opt_in": False}}
GOAL_RSS_MB = 1024.0
GOAL_RECOVERY_S = 60.0


# ----------------------------------------------------------------- building the states


@dataclass
class Written:
    """One customer: its golden id and every state the merge wrote for it, in order."""

    golden_id: str
    writes: list[bytes]
    links: int  # source rows linked at the end
    rejected: int = 0  # source or echo changes the mapping refused
    truncated: bool = False  # hit ROUNDS: a loop the applier emulation did not settle


@dataclass
class _Row:
    system: str
    key: str
    columns: dict[str, Any]


@dataclass
class _Customer:
    """Per-customer bookkeeping of the emulated sources and targets."""

    index: int
    clock: int = 0  # changes made so far: orders commit times and log positions
    rows: dict[tuple[str, str], _Row] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)  # target -> key Accord made


class StateFactory:
    """Golden states as the merge agent writes them, from sample rows, without Kafka.

    Pure: the run's mappings, rules and sinks, and the sample generator. Same (seed,
    index), same bytes, whichever process builds them.
    """

    def __init__(self, connectors_dir: Path, rules_file: Path, seed: int = SEED) -> None:
        # Change ids (in every cell of a state) embed the source topic: a bench run's
        # renamed raw topics (`bench-<run>.crm.public.customers`) would make each state
        # about a kilobyte larger than production's, so the production names are used.
        self.mappings: dict[str, SystemMapping] = {
            system: replace(mapping, topic=_production_topic(mapping.topic))
            for system, mapping in load_mappings(connectors_dir).items()
        }
        self.mapper = Mapper(self.mappings)
        self.rules: Rules = load_rules(rules_file)
        self.sinks: dict[str, SinkSpec] = load_sinks(connectors_dir)
        self.samples = SampleGenerator(seed)
        self.seed = seed
        self._originals: dict[int, Written] = {}  # for `copy`

    def copy(self, index: int, templates: int, history: bool) -> Written:
        """Customer `index`, or, past the first `templates`, a copy of customer
        `index % templates` under a golden id of its own: the same bytes but for the id,
        which is all the table's recovery and memory see (key spread, value sizes)."""
        if index < templates or not templates:
            return self.customer(index)
        original = self._originals.get(index % templates)
        if original is None:
            original = self.customer(index % templates)
            if not history:
                original.writes = original.writes[-1:]
            self._originals[index % templates] = original
        golden_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"accord-bench:{self.seed}:{index}"))
        old, new = original.golden_id.encode(), golden_id.encode()
        writes = [write.replace(old, new) for write in original.writes]
        return Written(golden_id, writes, original.links, original.rejected, original.truncated)

    def customer(self, index: int) -> Written:
        """Every state the merge writes for customer `index`: its source rows' creates,
        then the applier's writes coming back, until nothing is pending."""
        person = self.samples.person(index)
        render = {
            "crm": self.samples.crm_row,
            "billing": self.samples.billing_row,
            "support": self.samples.support_row,
        }
        bench = _Customer(index)
        pending: deque[SourceChange] = deque()
        for system in self.samples.systems_for(index):
            row = dict(render[system](person))
            key = self._key_of(system, row)
            bench.rows[(system, key)] = _Row(system, key, row)
            pending.append(self._cdc(bench, system, "c", None, row))

        golden_id: str | None = None
        state: GoldenState | None = None
        writes: list[bytes] = []
        rejected = rounds = 0
        while pending and rounds < ROUNDS:
            rounds += 1
            mapped = self.mapper.map(pending.popleft())
            if not isinstance(mapped, Mapped):
                rejected += 1  # the worker would dead-letter it
                continue
            change = mapped.change
            if golden_id is None:  # the first row founds the record, the others match it
                golden_id = golden_id_for(change.system, change.source_key)
                state = GoldenState(golden_id)
            assert state is not None
            write = self._merge(state, change.with_golden_id(golden_id))
            if write is None:
                continue
            writes.append(write)
            state = loads(write)  # as the agent reads it back from the table
            if state.fresh:  # the emitter sends the outbox; the applier writes it
                for order in state.outbox:
                    pending.extend(self._applied(bench, order))
        if golden_id is None or state is None:
            raise AccordError(f"customer {index}: every row was rejected by the mapping")
        return Written(golden_id, writes, len(state.contributions), rejected, bool(pending))

    def _merge(self, state: GoldenState, change: Change) -> bytes | None:
        """The merge agent's body for one change: the bytes it writes, or None."""
        outcome = apply(state, change, self.rules)
        if not outcome.state_changed:
            return None
        stage(state, change, outcome, plan_sinks(state, change, self.sinks, self.rules))
        return dumps(state)

    def _key_of(self, system: str, row: dict[str, Any]) -> str:
        return "|".join(str(row[column]) for column in self.mappings[system].key)

    def _cdc(
        self,
        bench: _Customer,
        system: str,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any],
    ) -> SourceChange:
        """A change as Debezium captures it, with a commit time and log position."""
        mapping = self.mappings[system]
        bench.clock += 1
        position = bench.index * 64 + bench.clock  # grows within a customer and across
        commit_us = START_US + bench.index * 1_000_000 + bench.clock * 1_000
        stamp = dt.datetime.fromtimestamp(commit_us / 1_000_000, dt.UTC)
        # MariaDB's timestamp(6) arrives naive (MicroTimestamp), PostgreSQL's timestamptz aware.
        after = {
            **after,
            "updated_at": stamp.replace(tzinfo=None) if system == "billing" else stamp,
        }
        if system == "billing":
            where = SourcePosition(
                "mysql", "billing", "accounts", commit_us // 1_000_000 * 1_000_000, False,
                binlog_file="mysql-bin.000001", binlog_pos=position, binlog_row=0,
                gtid=f"0-1-{position}",
            )  # fmt: skip
        else:
            where = SourcePosition("postgresql", system, "t", commit_us, False, lsn=position)
        keys = {column: after[column] for column in mapping.key}
        return SourceChange(mapping.topic, op, keys, before, after, where, commit_us // 1000 + 50)

    def _applied(self, bench: _Customer, order: SinkOrder) -> list[SourceChange]:
        """What the SQL applier does with one order, as the CDC event its write makes.

        Insert with a new key (create), a touch of the row it made before (a create
        that finds its row: adopt), or an update of the columns that differ. Deletes do
        not occur here (no source deletes), and no row is edited concurrently, so the
        compare-and-set always holds.
        """
        spec = self.sinks[order.target]
        system = order.target
        wanted = spec.project(order.values)
        if order.op is Op.DELETE or spec.key_column is None:
            return []
        if order.target_key is None:
            key = bench.created.get(system)
            if key is not None:
                row = bench.rows[(system, key)]
                return [self._cdc(bench, system, "u", row.columns, row.columns)]
            if not spec.create:
                return []
            key = self._new_key(system, bench.index)
            bench.created[system] = key
            mapping = self.mappings[system]
            columns = {f.column: None for f in mapping.fields.values()}
            columns |= INSERT_DEFAULTS.get(system, {}) | wanted
            columns[spec.key_column] = int(key) if system == "crm" else key
            bench.rows[(system, key)] = _Row(system, key, columns)
            return [self._cdc(bench, system, "c", None, columns)]
        row = bench.rows.get((system, order.target_key))
        if row is None:
            return []
        differs = {
            c.name: wanted[c.name]
            for c in spec.columns_for(set(order.changed))
            if not _same(row.columns.get(c.name), wanted[c.name])
        }
        if not differs:
            return []
        before, row.columns = row.columns, {**row.columns, **differs}
        return [self._cdc(bench, system, "u", before, row.columns)]

    def _new_key(self, system: str, index: int) -> str:
        if system == "crm":  # bigserial: small numbers, far below the sample ids
            return str(index + 1)
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"accord-bench:{self.seed}:{index}:{system}"))


def _production_topic(topic: str) -> str:
    """`bench-<run>.crm.public.customers` -> `crm.public.customers` (pipeline_bench's naming)."""
    return topic.split(".", 1)[1] if topic.startswith("bench-") else topic


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


# ------------------------------------------------------- filling the changelog (workers)

_factory: StateFactory | None = None
_producer: Producer | None = None
_topic = ""


def _init_generator(
    connectors_dir: str, rules_file: str, kafka: dict[str, Any], topic: str
) -> None:
    """Pool initializer: each process builds its own factory and producer once."""
    global _factory, _producer, _topic
    _factory = StateFactory(Path(connectors_dir), Path(rules_file))
    _producer = Producer(kafka)
    _topic = topic


def _generate(task: tuple[int, int, bool, int]) -> dict[str, Any]:
    """Build and produce customers [start, stop): counts, bytes, and one sample record."""
    start, stop, history, templates = task
    assert _factory is not None and _producer is not None
    records = size = rejected = truncated = 0
    links: Counter[int] = Counter()
    writes_per_customer: Counter[int] = Counter()
    sample: tuple[str, str] | None = None
    began = time.process_time()
    for index in range(start, stop):
        customer = _factory.copy(index, templates, history)
        key = customer.golden_id.encode()
        values = customer.writes if history else customer.writes[-1:]
        for value in values:
            produce(_producer, _topic, key, value)
            records += 1
            size += len(key) + len(value)
        if sample is None:
            sample = (customer.golden_id, customer.writes[-1].decode())
        links[customer.links] += 1
        writes_per_customer[len(customer.writes)] += 1
        rejected += customer.rejected
        truncated += customer.truncated
    if _producer.flush(120):
        raise AccordError("could not write the changelog within 120 s")
    return {
        "customers": stop - start,
        "records": records,
        "bytes": size,
        "rejected": rejected,
        "truncated": truncated,
        "links": dict(links),
        "writes_per_customer": dict(writes_per_customer),
        "cpu_s": time.process_time() - began,
        "sample": sample,
    }


def _changelog_config(settings: AccordSettings) -> dict[str, Any]:
    """Faust's (aiokafka's) producer behaviour for the table's changelog writes."""
    return settings.kafka_config(
        {
            "partitioner": "murmur2_random",  # aiokafka's DefaultPartitioner: Java's murmur2
            "compression.type": settings.worker.compression,  # as the worker's producer
            "linger.ms": 50,
            # The worker's largest batch (`producer_max_batch_size`): compression works
            # per batch, so a bigger one here would flatter it.
            "batch.size": 256 * 1024,
            "acks": "all",
        }
    )


def fill_changelog(
    settings: AccordSettings,
    customers: int,
    history: bool = False,
    processes: int = 0,
    templates: int = 0,
) -> dict[str, Any]:
    """Create this run's changelog topic and write the states of `customers` into it.

    One process per core builds and produces its share: building a state costs far more
    than producing it, and one Python process would need most of an hour for a million.
    The processes are spawned (no fork of librdkafka's threads), so the calling script
    must keep its main code under `if __name__ == "__main__"`; a process pool, unlike
    `multiprocessing.Pool`, fails instead of respawning children that die on import.
    `templates` > 0 folds only that many customers and writes the others as copies of
    them under golden ids of their own (`StateFactory.copy`): a minute instead of most
    of an hour for a million on a busy machine, at the cost of repeated contents.
    """
    if multiprocessing.parent_process() is not None:
        raise AccordError(
            "fill_changelog called in a child process: the calling script re-ran on "
            "import; keep its main code under `if __name__ == '__main__'`"
        )
    topic = changelog_topic(settings)
    spec = next(s for s in accord_topics(settings) if s.name == topic)
    admin = AdminClient(settings.kafka_config())
    future = admin.create_topics([NewTopic(topic, spec.partitions, 1, config=spec.config)])
    try:
        future[topic].result(30)
    except KafkaException as exc:
        raise AccordError(
            f"cannot create {topic} ({exc}): a run needs an app id of its own, whose "
            "changelog does not exist yet"
        ) from exc

    processes = processes or os.cpu_count() or 1
    tasks = [(s, min(s + CHUNK, customers), history, templates) for s in range(0, customers, CHUNK)]
    totals: dict[str, Any] = {
        "customers": 0, "records": 0, "bytes": 0, "rejected": 0, "truncated": 0,
        "links": Counter(), "writes_per_customer": Counter(), "cpu_s": 0.0,
    }  # fmt: skip
    samples: list[tuple[str, str]] = []
    began = last = time.monotonic()
    init = (str(settings.connectors_dir), str(settings.worker.rules_file),
            _changelog_config(settings), topic)  # fmt: skip
    pool = ProcessPoolExecutor(
        processes, multiprocessing.get_context("spawn"), _init_generator, init
    )
    try:
        for done in as_completed([pool.submit(_generate, task) for task in tasks]):
            part = done.result()
            for name in ("customers", "records", "bytes", "rejected", "truncated", "cpu_s"):
                totals[name] += part[name]
            totals["links"].update(part["links"])
            totals["writes_per_customer"].update(part["writes_per_customer"])
            if part["sample"] and len(samples) < 20:
                samples.append(part["sample"])
            now = time.monotonic()
            if now - last >= 10 or totals["customers"] == customers:
                last = now
                rate = totals["customers"] / (now - began)
                print(
                    f"  changelog: {totals['customers']:,}/{customers:,} customers, "
                    f"{totals['records']:,} records, {totals['bytes'] / 2**20:,.0f} MiB, "
                    f"{rate:,.0f} customers/s, "
                    f"eta {(customers - totals['customers']) / rate:,.0f}s",
                    file=sys.stderr,
                )
    except BaseException:
        # Not the rest of the million; the chunks under way end first, or their
        # producers would make the topic again after the caller deleted it.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    seconds = time.monotonic() - began
    totals["links"] = {str(k): v for k, v in sorted(totals["links"].items())}
    totals["writes_per_customer"] = {
        str(k): v for k, v in sorted(totals["writes_per_customer"].items())
    }
    totals.update(
        seconds=round(seconds, 1),
        processes=processes,
        cpu_s=round(totals["cpu_s"], 1),
        history=history,
        templates=templates,
        mean_record_bytes=round(totals["bytes"] / max(totals["records"], 1), 1),
        samples=samples,
    )
    return totals


# ------------------------------------------------------------------------ Kafka helpers


def _end_offsets(settings: AccordSettings, topic: str) -> dict[int, int]:
    consumer = Consumer(settings.kafka_config({"group.id": "bench-state-ends"}))
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in metadata.partitions
        }
    finally:
        consumer.close()


def _committed(settings: AccordSettings, group: str, topic: str, partitions: int) -> int:
    """Sum of a group's committed offsets on a topic (0 where none)."""
    consumer = Consumer(settings.kafka_config({"group.id": group}))
    try:
        answer = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
        return sum(max(tp.offset, 0) for tp in answer)
    finally:
        consumer.close()


def _catch_up_emitter(settings: AccordSettings, ends: dict[int, int]) -> None:
    """Commit the emitter's group at the changelog's end: it has emitted everything.

    The emitter reads the changelog itself (group `<app_id>-emit`); left at the start,
    it would parse every record beside the recovery, which is not what a restart of a
    caught-up worker does. No setting turns it off; its group's offsets are Kafka state.
    """
    topic = changelog_topic(settings)
    group = emit_group(settings)
    consumer = Consumer(settings.kafka_config({"group.id": group, "enable.auto.commit": False}))
    try:
        offsets = [TopicPartition(topic, p, end) for p, end in ends.items()]
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def _outputs(settings: AccordSettings) -> dict[str, int]:
    """End offsets of the emitter's output topics (transaction markers take offsets too)."""
    topics = settings.topics
    names = {"golden": topics.golden, "audit": topics.audit}
    for spec in accord_topics(settings):
        if spec.name.startswith(topics.sink_prefix):
            names[spec.name.removeprefix(topics.sink_prefix)] = spec.name
    out = {}
    for label, name in names.items():
        try:
            out[label] = sum(_end_offsets(settings, name).values())
        except (KafkaException, KeyError):
            out[label] = 0
    return out


def _topics(settings: AccordSettings) -> set[str]:
    return set(AdminClient(settings.kafka_config()).list_topics(timeout=10).topics)


def delete_topics(settings: AccordSettings, names: set[str] | list[str]) -> list[str]:
    names = sorted(names)
    if names:
        admin = AdminClient(settings.kafka_config())
        for future in admin.delete_topics(names, operation_timeout=30).values():
            future.result(60)
    return names


def made_by_run(settings: AccordSettings, existed: set[str]) -> set[str]:
    """The topics that appeared since `existed` and are this app's: named after its app
    id (Faust's own), or topics its worker creates (raw and Accord topics). A raw topic
    the caller made before is left alone: it may still need it."""
    prefix = settings.worker.app_id
    worker_topics = {s.name for s in (*source_topics(settings), *accord_topics(settings))}
    return {t for t in _topics(settings) - existed if t.startswith(prefix) or t in worker_topics}


def delete_groups(settings: AccordSettings) -> None:
    """The app's consumer group and its emitter's (ignored where there is none)."""
    admin = AdminClient(settings.kafka_config())
    groups = [settings.worker.app_id, emit_group(settings)]
    with contextlib.suppress(KafkaException):
        for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
            with contextlib.suppress(KafkaException):
                future.result(30)


# -------------------------------------------------------------------- the worker runs


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MiB) and CPU seconds of a process, from /proc."""
    return {**memory_mb(pid), "cpu_s": cpu_s(pid)}


def thread_cpu(pid: int, limit: int = 8) -> list[dict[str, Any]]:
    """CPU seconds of a process's busiest live threads, the interpreter's main thread
    (Faust's event loop) marked: the others are aiokafka's consumer thread, RocksDB's
    flush and compaction threads, librdkafka's and executor threads, all named alike."""
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        main = task.name == str(pid)
        threads.append({"thread": "main" if main else name, "cpu_s": round(cpu, 1)})
    threads.sort(key=lambda t: -t["cpu_s"])
    return [t for t in threads[:limit] if t["cpu_s"] >= 0.05]


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[\d+\] \[\w+\] (.*)$")
PHASES = {
    "worker_starting": "[^Worker]: Starting",
    "recovery_starting": "[^---Recovery]: Starting",
    "bulk_restore_starting": "restoring ",  # streams.restore, before Faust's recovery
    "bulk_restore_done": "restored ",
    "highwaters": "[^---Recovery]: Highwater for active",
    "restoring": "[^---Recovery]: Restoring state from changelog topics",
    "done_reading": "[^---Recovery]: Done reading from changelog topics",
    "recovery_complete": "[^---Recovery]: Recovery complete",
    "faust_ready": "[^---Recovery]: Worker ready",
    "emitter_starting": "[^--EmitterService]: Starting",
    "worker_ready": "[^Worker]: Ready",
}
TABLE_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*(-?\d+)\s*\|$")
RESTORED = re.compile(r"^restored ([\d,]+) golden changelog records")


def _log_phases(text: str, spawned_at: float) -> dict[str, Any]:
    """Seconds from the spawn to each of Faust's recovery milestones in one run's log,
    and the highwaters and start offsets of the active changelog partitions it logged."""
    phases: dict[str, float] = {}
    restored = 0
    tables: dict[str, dict[int, int]] = {"highwater": {}, "start": {}}
    current: str | None = None
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp = dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            message = match[2]
            current = None
            if "Highwater for active" in message:
                current = "highwater"
            elif "active offsets at start of reading" in message:
                current = "start"
            for name, marker in PHASES.items():
                if message.startswith(marker) and name not in phases:
                    phases[name] = round(stamp - spawned_at, 3)
            if bulk := RESTORED.match(message):
                restored += int(bulk[1].replace(",", ""))
            continue
        row = TABLE_ROW.match(line.strip())
        if current and row:
            tables[current][int(row[2])] = int(row[3])
    return {
        "phases_s": phases,
        "restored": restored,
        "highwaters": tables["highwater"],
        "start_offsets": tables["start"],
    }


def _log_text(worker: WorkerProcess, start: int) -> str:
    with worker.log.open("rb") as log:
        log.seek(start)
        return log.read().decode(errors="replace")


def _timed_start(
    worker: WorkerProcess, timeout_s: float, label: str, profile: Path | None = None
) -> dict[str, Any]:
    """Start the worker and wait for /health ready, reporting its memory meanwhile.

    With `profile`, py-spy samples it (non-blocking, idle frames too) from the moment
    Faust logs its start (the interpreter is up by then) until it is ready.
    """
    log_start = worker.log.stat().st_size if worker.log.exists() else 0
    spawned_at, began = time.time(), time.monotonic()
    spawn(worker.spec)
    pid = read_pid(worker.spec)
    if pid is None:
        raise AccordError(f"{worker.name} exited at once (log: {worker.log})")
    spy = None
    if profile is not None:
        wait_until(
            lambda: PHASES["worker_starting"] in _log_text(worker, log_start) or not worker.running,
            120,
            interval_s=0.05,
        )
        spy = _py_spy(pid, profile)
    last = began

    def ready_or_gone() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last >= 10:
            last = now
            status = _status(pid) if read_pid(worker.spec) else {}
            print(
                f"  {label}: {now - began:,.0f}s, RSS {status.get('VmRSS', 0):,.0f} MiB, "
                f"cpu {status.get('cpu_s', 0):,.0f}s",
                file=sys.stderr,
            )
        return worker.ready() or not worker.running

    try:
        ready = wait_until(ready_or_gone, timeout_s, interval_s=0.1)
        seconds = time.monotonic() - began
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    if not worker.running:
        raise AccordError(f"{worker.name} exited while starting (log: {worker.log})")
    if not ready:
        raise AccordError(f"{worker.name} not ready after {timeout_s:.0f}s (log: {worker.log})")
    status, threads = _status(pid), thread_cpu(pid)
    result = {
        "seconds_to_ready": round(seconds, 2),
        "rss_mb": round(status["VmRSS"], 1),
        "peak_rss_mb": round(status["VmHWM"], 1),
        "cpu_s": round(status["cpu_s"], 1),
        "thread_cpu_s": threads,
        "pid": pid,
        **_log_phases(_log_text(worker, log_start), spawned_at),
    }
    if profile is not None and profile.exists():
        result["profile"] = {"file": str(profile), **profile_summary(profile)}
    return result


def _py_spy(pid: int, out: Path) -> subprocess.Popen | None:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("  (py-spy not installed: no profile)", file=sys.stderr)
        return None
    argv = [str(spy), "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
            "--output", str(out), "--nonblocking", "--idle"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


IDLE_FRAMES = ("EpollSelector.select", "select (selectors.py")


def profile_summary(raw: Path, limit: int = 15) -> dict[str, Any]:
    """Where the worker's main thread (the event loop: Faust's recovery) spent its
    samples, from py-spy's collapsed stacks: idle share, own time and inclusive time."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = main = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = stack.split(";")
        total += samples
        if not frames[0].startswith("_run_module_as_main"):
            continue  # other threads: the emitter, librdkafka callbacks, executors
        main += samples
        if frames[-1].startswith(IDLE_FRAMES):
            idle += samples
            continue
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        top = counter.most_common(limit)
        return [{"frame": frame, "share_of_main": round(n / main, 3)} for frame, n in top]

    interesting = Counter(
        {f: n for f, n in inclusive.items() if any(m in f for m in ("faust/", "aiokafka/"))}
    )
    return {
        "samples": total,
        "main_thread_share": round(main / total, 3) if total else None,
        "main_idle_share": round(idle / main, 3) if main else None,
        "main_own": share(own),
        "main_inclusive_faust_aiokafka": share(interesting),
    }


def _stop(worker: WorkerProcess, settings: AccordSettings) -> dict[str, Any]:
    """SIGTERM and wait; clean if the worker removed its crash marker on the way out."""
    from streams.app import CLEAN_STOP_MARKER, data_dir

    directory = data_dir(settings)
    marker = directory.with_name(directory.name + "." + CLEAN_STOP_MARKER)
    began = time.monotonic()
    worker.stop(timeout_s=120)
    return {"stop_s": round(time.monotonic() - began, 2), "clean": not marker.exists()}


def _rocksdb_keys(directory: Path) -> dict[str, Any]:
    """Keys in each RocksDB partition of the golden table, read after a clean stop."""
    import rocksdict

    counts = {}
    for path in sorted(directory.rglob("golden-*.db")):
        options = rocksdict.Options(raw_mode=True)
        db = rocksdict.Rdict(
            str(path), options=options, access_type=rocksdict.AccessType.read_only()
        )
        try:
            counts[path.name] = sum(1 for key in db.keys() if key != OFFSET_KEY)  # noqa: SIM118
        finally:
            db.close()
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return {"keys": sum(counts.values()), "partitions": counts, "disk_mb": round(size / 2**20, 1)}


def _rocksdb_value(directory: Path, key: bytes) -> bytes | None:
    import rocksdict

    for path in sorted(directory.rglob("golden-*.db")):
        db = rocksdict.Rdict(
            str(path),
            options=rocksdict.Options(raw_mode=True),
            access_type=rocksdict.AccessType.read_only(),
        )
        try:
            value = db.get(key)
        finally:
            db.close()
        if value is not None:
            return value
    return None


def _replayed(run: dict[str, Any]) -> int:
    """Records Faust read from the changelog: highwater minus where it started, per partition."""
    total = 0
    for partition, highwater in run["highwaters"].items():
        start = run["start_offsets"].get(partition, -1)
        total += max(highwater - start, 0)
    return total


# --------------------------------------------------------------------------- the bench


def golden_recovery(
    settings: AccordSettings,
    customers: int = 1_000_000,
    history: bool = False,
    emitter_caught_up: bool = True,
    ready_timeout_s: float = 1800.0,
    profile: Path | None = None,
    faust_env: dict[str, str] | None = None,
    templates: int = 0,
    bulk_restore: bool = True,
) -> dict[str, Any]:
    """Fill the run's golden changelog with `customers` states; measure a cold recovery
    and a warm restart of a real worker on it. `settings` must be a run's own
    (`pipeline_bench.bench_settings`, or `another_app` beside another measurement): the
    changelog must not exist yet; the topics it makes and its data dir are deleted.
    `profile`: a file for py-spy's samples of the cold recovery (py-spy takes a core).
    `faust_env`: Faust settings for the worker by their environment variables (Faust
    reads e.g. CONSUMER_MAX_FETCH_SIZE from the environment), to try a tuning without
    touching the code; recorded in the result. `templates`: see `fill_changelog`.
    `bulk_restore=False` leaves the whole replay to Faust.
    """
    from streams.app import data_dir

    worker_settings = settings.worker.model_copy(
        update={
            "sinks": [],
            "connector_watchdog": False,
            "reconcile_interval_s": 0,
            "bulk_restore": bulk_restore,
            "web_port": _free_port(settings.stack.host),
            "data_dir": settings.worker.data_dir
            or settings.stack.state_dir.resolve() / "bench-workers" / settings.worker.app_id,
        }
    )
    settings = settings.model_copy(update={"worker": worker_settings})
    directory = data_dir(settings)
    topic = changelog_topic(settings)
    worker = WorkerProcess(settings)
    if faust_env:
        worker.spec = replace(worker.spec, env={**(worker.spec.env or {}), **faust_env})
    existed = _topics(settings)
    try:
        _remove_state(directory)
        print(f"golden changelog {topic}: {customers:,} customers ...", file=sys.stderr)
        changelog = fill_changelog(settings, customers, history, templates=templates)
        ends = _end_offsets(settings, topic)
        changelog["end_offsets"] = sum(ends.values())
        samples = changelog.pop("samples")
        if emitter_caught_up:
            _catch_up_emitter(settings, ends)
        outputs_before = _outputs(settings)

        print("cold recovery (empty data dir) ...", file=sys.stderr)
        cold = _timed_start(worker, ready_timeout_s, "cold", profile)
        cold["emit_group_committed"] = _committed(settings, emit_group(settings), topic, len(ends))
        cold |= _stop(worker, settings)
        cold["replayed"] = _replayed(cold)
        cold["rocksdb"] = _rocksdb_keys(directory)
        cold["samples_identical"] = (
            f"{sum(_rocksdb_value(directory, g.encode()) == v.encode() for g, v in samples)}"
            f"/{len(samples)}"
        )  # values read back from RocksDB, byte for byte what was produced
        print(f"  {_summary(cold)}", file=sys.stderr)

        print("warm restart (data dir kept) ...", file=sys.stderr)
        warm = _timed_start(worker, ready_timeout_s, "warm")
        warm |= _stop(worker, settings)
        warm["replayed"] = _replayed(warm)
        print(f"  {_summary(warm)}", file=sys.stderr)
        outputs_after = _outputs(settings)
        emit_committed = _committed(settings, emit_group(settings), topic, len(ends))
    finally:
        worker.stop()
        delete_topics(settings, made_by_run(settings, existed))
        delete_groups(settings)
        _remove_state(directory)

    restore_s = _between(cold, "bulk_restore_starting", "bulk_restore_done")
    replay_s = _between(cold, "restoring", "done_reading")
    read_s = (restore_s or 0) + (replay_s or 0)
    return {
        "customers": customers,
        "partitions": settings.worker.partitions,
        "faust_env": faust_env or {},
        "bulk_restore": bulk_restore,
        "changelog": changelog,
        "cold": {
            **_public(cold),
            "restore_s": restore_s,
            "replay_s": replay_s,
            "records_per_s": round((cold["restored"] + cold["replayed"]) / read_s, 1)
            if read_s
            else None,
            "records_per_s_to_ready": round(changelog["records"] / cold["seconds_to_ready"], 1),
        },
        "warm": _public(warm),
        "emitter": {
            "caught_up_before_start": emitter_caught_up,
            "committed_at_end": emit_committed,
            "changelog_records": changelog["end_offsets"],
            "outputs_end_offsets_before": outputs_before,
            "outputs_end_offsets_after": outputs_after,
        },
        "goals": {
            "rss_mb": GOAL_RSS_MB,
            "recovery_s": GOAL_RECOVERY_S,
            "rss_ok": max(cold["peak_rss_mb"], warm["peak_rss_mb"]) <= GOAL_RSS_MB,
            "recovery_ok": cold["seconds_to_ready"] <= GOAL_RECOVERY_S,
        },
    }


def _remove_state(directory: Path) -> None:
    """The worker's RocksDB folder and its crash marker; nothing else in their parent."""
    from streams.app import CLEAN_STOP_MARKER

    shutil.rmtree(directory, ignore_errors=True)
    directory.with_name(directory.name + "." + CLEAN_STOP_MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()  # when it was this run's own folder, now empty


def _between(run: dict[str, Any], first: str, then: str) -> float | None:
    phases = run["phases_s"]
    if first in phases and then in phases:
        return round(phases[then] - phases[first], 2)
    return None


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "pid"}


def _summary(run: dict[str, Any]) -> str:
    return (
        f"ready in {run['seconds_to_ready']}s, restored in bulk {run['restored']:,}, "
        f"replayed by Faust {run['replayed']:,}, "
        f"RSS {run['rss_mb']:,.0f} MiB (peak {run['peak_rss_mb']:,.0f}), "
        f"cpu {run['cpu_s']}s, clean stop {run['clean']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument(
        "--history", action="store_true", help="every state the merge wrote, not only the last"
    )
    parser.add_argument(
        "--emitter-behind", action="store_true",
        help="leave the emitter's group uncommitted: it reads the whole changelog too",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the cold recovery (figures get noisier)"
    )
    parser.add_argument(
        "--faust-env", action="append", default=[], metavar="NAME=VALUE",
        help="a Faust setting for the worker by its environment variable (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--no-bulk-restore", action="store_true",
        help="leave the whole cold recovery to Faust's replay (worker.bulk_restore = false)",
    )  # fmt: skip
    parser.add_argument(
        "--templates", type=int, default=0, metavar="K",
        help="fold K customers only, the rest are copies under their own golden ids",
    )  # fmt: skip
    args = parser.parse_args()
    faust_env = dict(item.split("=", 1) for item in args.faust_env)

    from bench.pipeline_bench import bench_settings
    from streams.stack.manager import Stack

    # A SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C: the run's topics, groups and
    # data dir are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = load_settings()
    Stack(base, progress=lambda m: print(f"[stack] {m}", file=sys.stderr)).up()
    run = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(base, run, Path(tmp))
        try:
            profile = result_path("state-profile", "txt")
            figures = golden_recovery(
                settings,
                args.customers,
                args.history,
                not args.emitter_behind,
                profile=profile if args.profile else None,
                faust_env=faust_env,
                templates=args.templates,
                bulk_restore=not args.no_bulk_restore,
            )
        finally:  # everything of the run, whatever golden_recovery got to
            left = {t for t in _topics(settings) if t.startswith(f"bench-{run}")}
            delete_topics(settings, left)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **figures,
    }
    out = write_figures(result, "state")
    print(json.dumps(result, indent=2))
    print(f"figures: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
