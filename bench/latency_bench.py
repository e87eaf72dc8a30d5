"""End-to-end latency under an open-loop load: source commit -> applied in every target.

    .venv/bin/python bench/latency_bench.py [--rates 100,500,1000] [--seconds 20]
        [--customers 3000] [--writers 1] [--all-rates] [--refine 2] [--keep]
        [--appliers-apart]

GitHub issue 8. The real path is measured, nothing simulated: UPDATEs committed in the
three source databases, captured by the real Debezium connectors, read by a real
`accord worker` (ingest, merge, emit and the three SQL appliers in-process, the
production default) and applied in the other systems. The appliers' own ledger
(`accord_applied`, written in the transaction of each apply) says when each event was
applied and which source commit caused it, so the figure is
`applied_at_us - source_ts_us` per applied target row, read from the targets.

How a run goes:

1. The connectors are applied and running. The worker is an app of this run's own
   (Accord topics, consumer groups, Redis keys and state named `bench-lat-<run>`),
   started at the raw topics' current ends: it reads the real connectors' topics but
   no backlog, state or golden records left by demos and tests. It is reset at the end
   (`--keep` leaves it for inspection); the seeded source rows stay, as tests' rows do.
2. A pool of customers (sample generator, seed 42, a block of indexes no earlier run
   used) is inserted into the systems that know them; the run waits until every row is
   linked, every system that should hold each customer does (CRM and support create
   rows, billing does not), reconcile finds no drift, and the pipeline is quiet.
3. For each rate R (100, 500, 1,000, then +500 until saturation) an open-loop
   generator issues `R x seconds_per_rate` phone edits (every target holds the phone),
   spread over the three databases, edit i due at i / R s by the wall clock: the
   schedule never waits for the pipeline. A writer thread per database (`--writers`
   each) commits whatever is due, batching the edits that fell due while it was busy
   into one transaction, so a slow commit delays edits but never thins the load; the
   achieved rate and the generator's lateness are reported. Customers are visited
   round robin, so one customer is edited again only after `pool / R` seconds: edits
   do not conflict unless the pipeline is already that far behind.
4. After the step the run waits (bounded) until every expected apply is in the
   ledgers and the worker has drained. Ledger rows are matched to the edit that caused
   them (golden id and source commit time), which gives per target and overall
   p50/p95/p99, the time until an edit was applied in every target, and what was never
   applied. Before each step the pipeline must be quiet (every group at its ends, no
   topic growing: the echoes of the last step's applies are back), so a step measures
   its own rate and not the tail of the one before.
5. Lag grew when an expected apply did not arrive within the drain timeout, or when
   the median latency of the step's last third exceeds its first third's by more than
   max(200 ms, 50 %): a pipeline that keeps up has the same latency at the end of a
   step as at its start. The rates stop rising once lag grows, p99 passes 5 s, or the
   generator itself could not offer the rate; two more steps then bisect between the
   last rate that kept up and the first that did not.

Figures go to bench/results/<date>-latency.json. The machine is shared and small (the
whole stack runs beside the worker), so each step records the load average and the
worker's CPU use beside its figures.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import os
import platform
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from figures import write_figures  # noqa: E402

from streams.app import redis_client  # noqa: E402
from streams.demo import apply_connectors, percentile, wait_converged  # noqa: E402
from streams.errors import AccordError  # noqa: E402
from streams.identity import IdentityResolver, parse_link  # noqa: E402
from streams.projection import SinkKind, load_sinks  # noqa: E402
from streams.reset import reset  # noqa: E402
from streams.samples import SAMPLE_CRM_ID_BASE, SampleGenerator  # noqa: E402
from streams.settings import AccordSettings, TopicSettings, load_settings  # noqa: E402
from streams.sinks import LEDGER_TABLE  # noqa: E402
from streams.sources import PRIMARY_KEYS, TABLES, insert_rows, mariadb, postgres  # noqa: E402
from streams.stack.manager import Stack  # noqa: E402
from streams.stack.process import read_pid, spawn, stop, wait_until  # noqa: E402
from streams.topics import RAW_TOPICS  # noqa: E402
from streams.topology import ingest_group  # noqa: E402
from streams.workers import WorkerProcess, applier_process  # noqa: E402
from tests.support import drained, end_offsets, free_port, start_group_at_end  # noqa: E402

FIRST_RATES = (100, 500, 1000)
RATE_STEP = 500  # after FIRST_RATES, until saturation
MAX_RATE = 20_000  # a bound on the search, far beyond what one worker applies
P99_CEILING_MS = 5_000.0  # a step over this is saturated, growing or not
GOAL = {"rate": 1000, "p99_ms": 500.0}  # issue 8
FIELD = "phone"  # every target holds it (connectors/*/mapping.yaml, sink columns)
POOL_SEED = 42  # the demo uses 7: the pool never touches the demo's customers
POOL_INDEX_BASE = 5_000_000  # sample indexes of the pool: above the demo's and tests'
MAX_BATCH = 500  # edits one writer commits in one transaction at most
MATCH_TOLERANCE_US = 5_000  # clock rounding between the writer's stamps and the commit's
GROWTH_MIN_MS = 200.0  # lag grew: the last third's median above the first's by this ...
GROWTH_SHARE = 0.5  # ... or by this share of it, whichever is more
GENERATOR_SHORTFALL = 0.9  # achieved below this share of the rate: the rate was not offered
QUIET_TIMEOUT_S = 900.0  # a saturated step's backlog drains before the next step starts

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"[latency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _now_us() -> int:
    return time.time_ns() // 1000


# ---------------------------------------------------------------------- the pool


@dataclass
class Pool:
    """The seeded customers, as the run's app linked them: what the generator edits."""

    golden_ids: list[str]  # visiting order: shuffled, so the three systems interleave
    rows: dict[str, list[tuple[str, str]]]  # golden id -> every linked (system, key)
    seeded: dict[str, int]
    first_index: int
    cursor: int = 0  # next golden record to edit, across steps
    visits: Counter = field(default_factory=Counter)

    def next_edit(self) -> tuple[str, str, str]:
        """(golden id, system, key) of the next edit, round robin over customers; each
        visit of a customer edits the next of its rows, so every system gets its share."""
        position = self.cursor % len(self.golden_ids)
        golden_id = self.golden_ids[position]
        self.cursor += 1
        rows = self.rows[golden_id]
        visit = self.visits[golden_id]
        self.visits[golden_id] += 1
        system, key = rows[(visit + position) % len(rows)]
        return golden_id, system, key


def bench_settings(base: AccordSettings, run: str) -> AccordSettings:
    """An app of this run's own that reads the real connectors' raw topics.

    Own Accord topics, groups, Redis keys and state: no backlog or golden records of
    earlier demos and tests, nothing of theirs disturbed, and `reset` removes it all.
    The scheduled reconcile is off: a full scan of every target in the middle of a
    step would be measured as pipeline latency.
    """
    app = f"bench-lat-{run}"
    topics = TopicSettings.under(app)
    worker = base.worker.model_copy(
        update={
            "app_id": app,
            "redis_prefix": f"{app}:",
            "web_port": free_port(),
            "reconcile_interval_s": 0,
            "data_dir": base.stack.state_dir.resolve() / "bench-workers",
        }
    )
    return base.model_copy(update={"topics": topics, "worker": worker})


def _pool_rows(first: int, count: int) -> dict[str, list[dict[str, object]]]:
    generator = SampleGenerator(POOL_SEED)
    rows: dict[str, list[dict[str, object]]] = {system: [] for system in RAW_TOPICS}
    for index in range(first, first + count):
        person = generator.person(index)
        for system in generator.systems_for(index):
            rows[system].append(getattr(generator, f"{system}_row")(person))
    return rows


def _free_block(settings: AccordSettings, count: int) -> tuple[int, dict[str, list[dict]]]:
    """The first block of pool indexes whose rows no earlier run inserted, and its rows.

    A row that exists already is not inserted again, so no change of it would reach
    this run's app and it would never be linked: every run seeds rows of its own.
    """
    with postgres(settings, "crm") as conn:
        (crm_max,) = conn.execute(
            "SELECT max(id) FROM customers WHERE id >= %s",
            (SAMPLE_CRM_ID_BASE + POOL_INDEX_BASE,),
        ).fetchone()
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT max(account_no) FROM accounts WHERE account_no LIKE %s",
            (f"AC-{POOL_SEED:03d}-%",),
        )
        (billing_max,) = cur.fetchone()
    first = max(
        POOL_INDEX_BASE,
        (crm_max - SAMPLE_CRM_ID_BASE + 1) if crm_max else 0,
        (int(billing_max.rsplit("-", 1)[1]) + 1) if billing_max else 0,
    )
    while True:  # support keys are uuids: look for them (a support-only last customer)
        rows = _pool_rows(first, count)
        ids = [str(row["id"]) for row in rows["support"]]
        with postgres(settings, "support") as conn:
            (taken,) = conn.execute(
                "SELECT count(*) FROM users WHERE id = ANY(%s::uuid[])", (ids,)
            ).fetchone()
        if not taken:
            return first, rows
        first += count


def _linked(
    settings: AccordSettings, identity: IdentityResolver, rows: list[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    client = redis_client(settings)
    found: dict[tuple[str, str], str] = {}
    for start in range(0, len(rows), 1000):
        chunk = rows[start : start + 1000]
        for row, value in zip(
            chunk, client.mget([identity.xref_key(*row) for row in chunk]), strict=True
        ):
            if value is not None:
                found[row] = value.decode() if isinstance(value, bytes) else value
    return found


def _links(
    settings: AccordSettings, identity: IdentityResolver, golden_ids: list[str]
) -> dict[str, list[tuple[str, str]]]:
    pipe = redis_client(settings).pipeline(transaction=False)
    for golden_id in golden_ids:
        pipe.smembers(identity.links_key(golden_id))
    links = {}
    for golden_id, members in zip(golden_ids, pipe.execute(), strict=True):
        texts = (m.decode() if isinstance(m, bytes) else m for m in members)
        links[golden_id] = sorted(parse_link(text) for text in texts)
    return links


def quiet(settings: AccordSettings, timeout_s: float, stable_s: float = 2.0) -> bool:
    """Wait until every group of the app has committed everything and no topic of the
    path grows for `stable_s`: the appliers' writes have come back through CDC as
    no-ops. Polled twice a second (the tests' helper spins; here it would take a core
    from the worker it waits for)."""
    topics = [
        *RAW_TOPICS.values(),
        settings.topics.changes,
        *(settings.topics.sink(system) for system in RAW_TOPICS),
    ]
    state: dict[str, Any] = {"ends": None, "since": time.monotonic()}

    def settled() -> bool:
        ends = end_offsets(settings, topics)
        if ends != state["ends"] or not drained(settings):
            state["ends"], state["since"] = ends, time.monotonic()
            return False
        return time.monotonic() - state["since"] >= stable_s

    return wait_until(settled, timeout_s, interval_s=0.5)


def seed_pool(
    settings: AccordSettings, customers: int, progress: Progress, timeout_s: float = 900.0
) -> Pool:
    """Insert a fresh pool of customers and wait until every system holds them in accord.

    Measuring starts only then: latencies of the seed itself would say how fast a
    backlog of creates drains, not how fast an edit travels.
    """
    identity = IdentityResolver(redis_client(settings), settings.worker.redis_prefix, ())
    first, rows = _free_block(settings, customers)
    seeded = {}
    for system, batch in rows.items():
        seeded[system] = insert_rows(settings, system, batch)
        if seeded[system] != len(batch):
            raise AccordError(f"{system}: {len(batch) - seeded[system]} pool rows existed already")
    progress(
        f"seeded {customers} customers (indexes {first}..{first + customers - 1}): "
        + ", ".join(f"{system} {n}" for system, n in seeded.items())
    )
    keys = [
        (system, str(row[PRIMARY_KEYS[system]])) for system, batch in rows.items() for row in batch
    ]
    found: dict[tuple[str, str], str] = {}

    def all_linked() -> bool:
        found.update(_linked(settings, identity, [row for row in keys if row not in found]))
        return len(found) == len(keys)

    started = time.monotonic()
    if not wait_until(all_linked, timeout_s, interval_s=1.0):
        raise AccordError(f"{len(keys) - len(found)} of {len(keys)} pool rows never linked")
    golden_ids = sorted(set(found.values()))
    progress(f"{len(keys)} rows linked to {len(golden_ids)} golden records")

    sinks = load_sinks(settings.connectors_dir)
    creating = [t for t, spec in sinks.items() if spec.kind is SinkKind.SQL and spec.create]
    links: dict[str, list[tuple[str, str]]] = {}

    def held_everywhere() -> bool:
        links.update(_links(settings, identity, golden_ids))
        return all({system for system, _ in links[g]} >= set(creating) for g in golden_ids)

    remaining = max(60.0, timeout_s - (time.monotonic() - started))
    if not wait_until(held_everywhere, remaining, interval_s=1.0):
        short = sum(1 for g in golden_ids if {s for s, _ in links[g]} < set(creating))
        raise AccordError(f"{short} golden records not created in every system ({creating})")
    progress("every system holds every pool customer; waiting until reconcile agrees")
    wait_converged(settings, sinks, max(120.0, remaining), set(golden_ids))
    if not quiet(settings, 300):
        raise AccordError("the pipeline did not go quiet after the seed")
    links = _links(settings, identity, golden_ids)
    order = list(golden_ids)
    random.Random(first).shuffle(order)
    progress(
        f"pool in sync after {time.monotonic() - started:.0f}s: {len(order)} customers, "
        f"{sum(len(v) for v in links.values())} rows"
    )
    return Pool(order, links, seeded, first)


# ----------------------------------------------------------------- the generator


@dataclass
class Edit:
    """One scheduled UPDATE, and when it was really sent and committed."""

    golden_id: str
    system: str
    key: str
    value: str
    due_s: float  # from the step's start
    expected: dict[str, int]  # target -> rows there that must apply it
    sent_us: int = 0  # wall clock before the statement
    done_us: int = 0  # wall clock after its commit returned
    late_s: float = 0.0  # commit returned this long after it was due
    applied: dict[str, list[float]] = field(default_factory=dict)  # target -> ms per row
    superseded: int = 0


def _phone(serial: int) -> str:
    """A valid, distinct Berlin number per edit, written the way people type it."""
    return f"+49 30 {20_000_000 + serial % 80_000_000}"


def plan(pool: Pool, rate: int, seconds: float, serial: int, targets: list[str]) -> list[Edit]:
    """The step's edits in due order: edit i at i / rate seconds."""
    edits = []
    for i in range(round(rate * seconds)):
        golden_id, system, key = pool.next_edit()
        expected = Counter(s for s, k in pool.rows[golden_id] if (s, k) != (system, key))
        edits.append(
            Edit(
                golden_id, system, key, _phone(serial + i), i / rate,
                {t: expected[t] for t in targets if expected[t]},
            )
        )  # fmt: skip
    return edits


class Writer(threading.Thread):
    """Commits one database's share of the edits on schedule.

    Open loop: it sleeps only until the next edit is due, and when edits fell due while
    it was busy it commits all of them in one transaction, so the offered rate holds as
    long as the database takes a batch as fast as single edits, and lateness shows when
    it does not.
    """

    def __init__(
        self, settings: AccordSettings, system: str, edits: list[Edit], start: float
    ) -> None:
        super().__init__(name=f"writer-{system}", daemon=True)
        self.settings = settings
        self.system = system
        self.edits = edits
        self.start_at = start  # time.monotonic() of due 0
        self.batches = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the step, which fails
            self.error = exc

    def _run(self) -> None:
        table, key = TABLES[self.system], PRIMARY_KEYS[self.system]
        billing = self.system == "billing"
        if billing:
            statement: Any = f"UPDATE {table} SET {FIELD} = %s WHERE {key} = %s"
            conn: Any = mariadb(self.settings)
        else:
            statement = sql.SQL("UPDATE {} SET {} = %s WHERE {} = %s").format(
                sql.Identifier(table), sql.Identifier(FIELD), sql.Identifier(key)
            )
            conn = postgres(self.settings, self.system)
        with conn:
            i = 0
            while i < len(self.edits) and not self.stop.is_set():
                wait = self.edits[i].due_s - (time.monotonic() - self.start_at)
                if wait > 0:
                    time.sleep(wait)  # pacing by the clock, not waiting for the pipeline
                now = time.monotonic() - self.start_at
                j = i + 1
                while j < len(self.edits) and j - i < MAX_BATCH and self.edits[j].due_s <= now:
                    j += 1
                batch = self.edits[i:j]
                params = [(edit.value, edit.key) for edit in batch]
                sent = _now_us()
                if billing:
                    with conn.cursor() as cur:
                        if len(params) == 1:
                            cur.execute(statement, params[0])
                        else:
                            conn.begin()
                            cur.executemany(statement, params)
                            conn.commit()
                elif len(params) == 1:
                    conn.execute(statement, params[0])
                else:
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany(statement, params)
                done, done_s = _now_us(), time.monotonic() - self.start_at
                for edit in batch:
                    edit.sent_us, edit.done_us, edit.late_s = sent, done, done_s - edit.due_s
                self.batches += 1
                i = j


def run_generator(
    settings: AccordSettings, edits: list[Edit], writers_per_system: int, timeout_s: float
) -> dict[str, Any]:
    """Issue the edits on schedule; returns what the generator achieved."""
    shares: dict[tuple[str, int], list[Edit]] = {}
    per_system = Counter(edit.system for edit in edits)
    for n, edit in enumerate(edits):
        shares.setdefault((edit.system, n % writers_per_system), []).append(edit)
    start = time.monotonic() + 0.2  # connections open before the first edit is due
    writers = [Writer(settings, system, share, start) for (system, _), share in shares.items()]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(max(0.0, start + timeout_s - time.monotonic()))
    for writer in writers:
        if writer.is_alive():
            writer.stop.set()
            writer.join(30)
    failed = [w for w in writers if w.error is not None]
    if failed:
        raise AccordError(f"{failed[0].name} failed: {failed[0].error!r}") from failed[0].error
    issued = [edit for edit in edits if edit.done_us]
    late_ms = [edit.late_s * 1000 for edit in issued]
    span_s = max((edit.due_s + edit.late_s for edit in issued), default=0.0)
    batches = sum(w.batches for w in writers)
    return {
        "edits_issued": len(issued),
        "edits_by_system": dict(sorted(per_system.items())),
        "achieved_rate": round(len(issued) / span_s, 1) if span_s else None,
        "commit_late_ms": _summary(late_ms),
        "transactions": batches,
        "edits_per_transaction": round(len(issued) / batches, 2) if batches else None,
    }


# ----------------------------------------------------------------- the ledgers


def _ledger_rows(
    settings: AccordSettings, target: str, since_us: int, until_us: int
) -> list[tuple[str, str, int, str, int, int]]:
    """(golden id, target key, version, op, source ts, applied at) of the app's applies of
    changes committed in a window."""
    query = (
        "SELECT golden_id, target_key, golden_version, op, source_ts_us, applied_at_us "
        f"FROM {LEDGER_TABLE} WHERE app = %s AND source_ts_us BETWEEN %s AND %s"
    )
    params = (settings.worker.app_id, since_us, until_us)
    if target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall())
    with postgres(settings, target) as conn:
        return conn.execute(query, params).fetchall()


def _ledger_count(settings: AccordSettings, target: str, since_us: int, until_us: int) -> int:
    query = f"SELECT count(*) FROM {LEDGER_TABLE} WHERE app = %s AND source_ts_us BETWEEN %s AND %s"
    params = (settings.worker.app_id, since_us, until_us)
    if target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return int(cur.fetchone()[0])
    with postgres(settings, target) as conn:
        return int(conn.execute(query, params).fetchone()[0])


def match(edits: list[Edit], rows: dict[str, list[tuple[str, str, int, str, int, int]]]) -> Counter:
    """Attach each ledger row to the edit that caused it: same golden record, source
    commit between the edit's send and its commit. Returns what matched nothing
    (another process's changes, or one of ours outside its window) and the ops seen."""
    by_golden: dict[str, list[Edit]] = {}
    for edit in sorted((e for e in edits if e.done_us), key=lambda e: e.sent_us):
        by_golden.setdefault(edit.golden_id, []).append(edit)
    starts = {g: [e.sent_us - MATCH_TOLERANCE_US for e in group] for g, group in by_golden.items()}
    tally: Counter = Counter()
    for target, ledger in rows.items():
        for golden_id, _key, _version, op, source_us, applied_us in ledger:
            tally[f"op:{target}:{op}"] += 1
            group = by_golden.get(golden_id)
            if group is None:
                tally[f"unmatched:{target}"] += 1
                continue
            at = bisect.bisect_right(starts[golden_id], source_us) - 1
            if at < 0 or source_us > group[at].done_us + MATCH_TOLERANCE_US:
                tally[f"unmatched:{target}"] += 1
                continue
            edit = group[at]
            if op == "SUPERSEDED":
                edit.superseded += 1
                continue
            edit.applied.setdefault(target, []).append((applied_us - source_us) / 1000)
    return tally


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 0.50), 1),
        "p95_ms": round(percentile(values, 0.95), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "max_ms": round(max(values), 1),
        "mean_ms": round(sum(values) / len(values), 1),
    }


def _expected_applies(edit: Edit) -> dict[str, list[float]]:
    return {t: edit.applied.get(t, [])[:n] for t, n in edit.expected.items()}


def _complete(edit: Edit) -> bool:
    return all(len(edit.applied.get(t, ())) >= n for t, n in edit.expected.items())


def _thirds(edits: list[Edit], seconds: float) -> list[list[float]]:
    thirds: list[list[float]] = [[], [], []]
    for edit in edits:
        part = min(2, int(3 * edit.due_s / seconds))
        thirds[part].extend(ms for values in _expected_applies(edit).values() for ms in values)
    return thirds


# ----------------------------------------------------------------- the steps


def _cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step(
    settings: AccordSettings,
    pool: Pool,
    worker: WorkerProcess,
    rate: int,
    seconds: float,
    serial: int,
    writers_per_system: int,
    targets: list[str],
    progress: Progress,
) -> dict[str, Any]:
    """One rate: issue the load, wait for it to be applied everywhere, read the ledgers."""
    # Whatever an earlier step left (its backlog, the echoes of its applies) is done
    # first: this step measures its own rate, not the last one's tail.
    waited = time.monotonic()
    if not quiet(settings, QUIET_TIMEOUT_S):
        raise AccordError(f"the pipeline did not go quiet within {QUIET_TIMEOUT_S:.0f}s")
    quiet_waited_s = time.monotonic() - waited
    edits = plan(pool, rate, seconds, serial, targets)
    expected: Counter = Counter()
    for edit in edits:
        expected.update(edit.expected)
    pid = read_pid(worker.spec)
    cpu0, load0, wall0, began = _cpu_s(pid), os.getloadavg()[0], _now_us(), time.monotonic()
    progress(f"{rate}/s: {len(edits)} edits over {seconds:.0f}s")
    generator = run_generator(settings, edits, writers_per_system, seconds + 120)
    issued = [edit for edit in edits if edit.done_us]
    last_done = max(edit.done_us for edit in issued)
    cpu1, load1, elapsed = _cpu_s(pid), os.getloadavg()[0], time.monotonic() - began
    since_us, until_us = wall0 - 1_000_000, last_done + 1_000_000

    # Drained: every expected apply is in the ledgers and the worker's groups are at
    # their ends (the counts alone could be met by other processes' changes).
    drain_timeout = max(60.0, 3 * seconds)
    drain_started = time.monotonic()

    def all_applied() -> bool:
        return all(
            _ledger_count(settings, t, since_us, until_us) >= n for t, n in expected.items()
        ) and drained(settings)

    drained_in_time = wait_until(all_applied, drain_timeout, interval_s=0.5)
    drain_waited_s = time.monotonic() - drain_started
    rows = {t: _ledger_rows(settings, t, since_us, until_us) for t in targets}
    tally = match(issued, rows)

    # Only the applies an edit was expected to cause: a target row that round-trips a
    # value lossily (a support display_name split differently from CRM's names) is sent
    # an event on each of its own changes, which applies as a NOOP; counted apart.
    counted = [_expected_applies(edit) for edit in issued]
    per_target = {t: [ms for c in counted for ms in c.get(t, ())] for t in targets}
    every = [ms for values in per_target.values() for ms in values]
    everywhere = [
        max(ms for values in c.values() for ms in values)
        for e, c in zip(issued, counted, strict=True)
        if e.expected and _complete(e)
    ]
    complete = sum(1 for edit in issued if _complete(edit))
    last_apply_us = max((r[5] for ledger in rows.values() for r in ledger), default=last_done)
    early, middle, late = (_summary(third) for third in _thirds(issued, seconds))
    summary = _summary(every)
    growth = (
        late["p50_ms"] - early["p50_ms"]
        if late["p50_ms"] is not None and early["p50_ms"] is not None
        else None
    )
    threshold = max(GROWTH_MIN_MS, GROWTH_SHARE * (early["p50_ms"] or 0.0))
    deficit: Counter = Counter()
    for edit in issued:
        for target, n in edit.expected.items():
            deficit[target] += max(0, n - len(edit.applied.get(target, ())))
    missing = {target: n for target, n in sorted(deficit.items()) if n}
    grew = growth is not None and growth > threshold
    reasons = []
    if missing:
        reasons.append(
            f"expected applies missing {drain_timeout:.0f}s after the step (superseded, "
            f"folded or still queued): {missing}"
        )
    if grew:
        reasons.append(f"last third's median {growth:.0f} ms above the first's")
    if summary["p99_ms"] is not None and summary["p99_ms"] > P99_CEILING_MS:
        reasons.append(f"p99 {summary['p99_ms']:.0f} ms over {P99_CEILING_MS:.0f} ms")
    offered = (generator["achieved_rate"] or 0) >= GENERATOR_SHORTFALL * rate
    result = {
        "rate": rate,
        "seconds": seconds,
        "edits_planned": len(edits),
        **generator,
        "expected_applies": dict(sorted(expected.items())),
        "applied": {t: expected[t] - deficit[t] for t in targets},
        "extra_applies": {  # our edits' events beyond the rows expected (NOOPs)
            t: n
            for t in targets
            if (n := sum(len(e.applied.get(t, ())) for e in issued) - len(per_target[t]))
        },
        "superseded": sum(edit.superseded for edit in issued),
        "ledger_ops": {k[3:]: v for k, v in sorted(tally.items()) if k.startswith("op:")},
        "unmatched_ledger_rows": {
            k.split(":", 1)[1]: v for k, v in tally.items() if k.startswith("unmatched:")
        },
        "edits_applied_everywhere": complete,
        "latency": summary,
        "latency_by_target": {t: _summary(v) for t, v in per_target.items()},
        "latency_until_every_target": _summary(everywhere),
        "latency_by_third": {"first": early, "middle": middle, "last": late},
        "last_apply_after_last_commit_s": round((last_apply_us - last_done) / 1e6, 2),
        "drained_in_time": drained_in_time,
        "drain_waited_s": round(drain_waited_s, 1),
        "quiet_before_waited_s": round(quiet_waited_s, 1),
        "worker_cpu_cores": round((cpu1 - cpu0) / elapsed, 2)
        if cpu0 is not None and cpu1 is not None
        else None,
        "load_average_1m": [round(load0, 2), round(load1, 2)],
        "generator_kept_up": offered,
        "lag_grew": bool(missing) or grew,
        "saturated": bool(reasons),
        "why": reasons,
    }
    progress(
        f"{rate}/s: issued {len(issued)} at {generator['achieved_rate']}/s, "
        f"applied {sum(result['applied'].values())}/{sum(expected.values())}; "
        f"p50 {summary['p50_ms']} p95 {summary['p95_ms']} p99 {summary['p99_ms']} ms; "
        f"thirds p50 {early['p50_ms']} / {middle['p50_ms']} / {late['p50_ms']} ms"
        + (f"; saturated: {'; '.join(reasons)}" if reasons else "")
        + ("" if offered else "; the generator could not offer this rate")
    )
    return result


def _rates(rates: list[int] | None) -> Iterator[int]:
    if rates is not None:
        yield from rates
        return
    yield from FIRST_RATES
    rate = FIRST_RATES[-1]
    while rate + RATE_STEP <= MAX_RATE:
        rate += RATE_STEP
        yield rate


def _kept_up(figures: dict[str, Any]) -> bool:
    return not figures["saturated"] and figures["generator_kept_up"]


def _round_rate(rate: float) -> int:
    unit = 25 if rate >= 100 else 5
    return max(unit, round(rate / unit) * unit)


def latency(
    settings: AccordSettings,
    rates: list[int] | None = None,
    seconds_per_rate: float = 20,
    customers: int = 3000,
    writers_per_system: int = 1,
    keep: bool = False,
    stop_at_saturation: bool = True,
    refine_steps: int = 2,
    appliers_apart: bool = False,
    progress: Progress = _stderr,
) -> dict:
    """Measure commit-to-applied latency at rising open-loop edit rates (issue 8).

    `rates`: the rates to try in order (default 100, 500, 1,000, then +500); the run
    stops at the first saturated step unless `stop_at_saturation` is off (then each
    step still starts only once the previous one's backlog is gone). With the default
    rates, `refine_steps` more steps bisect between the last rate that kept up and the
    first that did not (0 if 100/s already saturates), so the highest sustainable rate
    is known closer than the coarse ladder says. The stack must be running; the
    connectors are applied here. Returns the figures (what `main` writes).
    """
    apply_connectors(settings, wait_s=120)
    run = uuid.uuid4().hex[:8]
    bench = bench_settings(settings, run)
    sinks = load_sinks(bench.connectors_dir)
    targets = sorted(t for t, s in sinks.items() if s.kind is SinkKind.SQL and FIELD in s.fields)
    start_group_at_end(bench, ingest_group(bench))
    if appliers_apart:  # each applier an `accord sink` process with a GIL of its own
        bench = bench.model_copy(update={"worker": bench.worker.model_copy(update={"sinks": []})})
    worker = WorkerProcess(bench)
    progress(f"starting worker {worker.name} on port {bench.worker.web_port} (log: {worker.log})")
    started = time.monotonic()
    worker.start()
    worker_start_s = round(time.monotonic() - started, 1)
    appliers = [applier_process(bench, target) for target in targets] if appliers_apart else []
    for applier in appliers:
        spawn(applier)
    steps: list[dict[str, Any]] = []
    pool: Pool | None = None
    try:
        progress(f"worker ready after {worker_start_s:.0f}s")
        pool = seed_pool(bench, customers, progress)
        serial = random.Random(run).randrange(80_000_000)

        def measure(rate: int) -> bool:
            nonlocal serial
            figures = step(
                bench, pool, worker, rate, seconds_per_rate, serial, writers_per_system,
                targets, progress,
            )  # fmt: skip
            serial += figures["edits_planned"]
            steps.append(figures)
            return _kept_up(figures)

        for rate in _rates(rates):
            if not measure(rate) and stop_at_saturation:
                break
        if rates is None and steps and not _kept_up(steps[-1]):
            # Narrow the gap between the last rate that kept up and the first that did not.
            low = max((s["rate"] for s in steps if _kept_up(s)), default=0)
            high = steps[-1]["rate"]
            for _ in range(refine_steps):
                rate = _round_rate((low + high) / 2)
                if not low < rate < high:
                    break
                low, high = (rate, high) if measure(rate) else (low, rate)
    finally:
        for applier in appliers:
            stop(applier, 30)
        worker.stop()
        if keep:
            progress(f"kept app {bench.worker.app_id} (topics, groups, Redis keys, ledger rows)")
        else:
            try:
                reset(bench, lambda m: None)
                progress(f"reset app {bench.worker.app_id}")
            except Exception as exc:  # the figures matter more than the clean-up
                progress(f"could not reset app {bench.worker.app_id}: {exc}")

    good = [s["rate"] for s in steps if _kept_up(s)]
    at_goal = next((s for s in steps if s["rate"] == GOAL["rate"]), None)
    goal_p99 = at_goal["latency"]["p99_ms"] if at_goal else None
    saturated_at = min((s["rate"] for s in steps if s["saturated"]), default=None)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "setup": {
            "app": bench.worker.app_id,
            "pool_customers": customers,
            "pool_rows": sum(len(v) for v in pool.rows.values()) if pool else None,
            "pool_rows_by_system": dict(
                sorted(Counter(s for v in pool.rows.values() for s, _ in v).items())
            )
            if pool
            else None,
            # Customers with two rows in one system (an applier's create racing the
            # seeded row's own CDC): their edits also reach the twin row.
            "pool_customers_with_twin_rows": sum(
                1 for v in pool.rows.values() if len({s for s, _ in v}) < len(v)
            )
            if pool
            else None,
            "seconds_per_rate": seconds_per_rate,
            "writers_per_system": writers_per_system,
            "edited_field": FIELD,
            "targets": targets,
            "worker": {
                "partitions": bench.worker.partitions,
                "batch_size": bench.worker.batch_size,
                "batch_window_s": bench.worker.batch_window_s,
                "appliers": "one `accord sink` process per target"
                if appliers_apart
                else "in the worker (worker.sinks default)",
                "reconcile_interval_s": bench.worker.reconcile_interval_s,
            },
            "worker_start_s": worker_start_s,
        },
        "steps": steps,
        "max_rate_without_growing_lag": max(good) if good else None,
        "goal": {
            **GOAL,
            "measured_p99_ms": goal_p99,
            "met": at_goal is not None and _kept_up(at_goal) and goal_p99 <= GOAL["p99_ms"],
            "note": None
            if at_goal is not None
            else f"{GOAL['rate']}/s not measured: saturated at {saturated_at}/s",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", type=lambda text: [int(r) for r in text.split(",")], default=None,
        help="comma-separated edits/s (default: 100,500,1000, then +500 until saturation)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per rate")
    parser.add_argument("--customers", type=int, default=3000, help="size of the edited pool")
    parser.add_argument("--writers", type=int, default=1, help="writer threads per database")
    parser.add_argument("--keep", action="store_true", help="keep the run's app (no reset)")
    parser.add_argument(
        "--all-rates", action="store_true", help="run every rate given, saturated or not"
    )
    parser.add_argument(
        "--refine", type=int, default=2, help="bisection steps after the first saturated rate"
    )
    parser.add_argument(
        "--appliers-apart", action="store_true",
        help="run each target's applier as its own `accord sink` process, not in the worker",
    )  # fmt: skip
    args = parser.parse_args()

    settings = load_settings()
    Stack(settings, progress=lambda m: print(f"[stack] {m}", file=sys.stderr)).up()
    result = latency(
        settings,
        args.rates,
        args.seconds,
        args.customers,
        args.writers,
        keep=args.keep,
        stop_at_saturation=not args.all_rates,
        refine_steps=args.refine,
        appliers_apart=args.appliers_apart,
    )
    out = write_figures(result, "latency")
    print(json.dumps(result, indent=2))
    print(f"figures: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
