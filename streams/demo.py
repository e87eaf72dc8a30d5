"""The demo job: seed the sample systems, run the worker, edit each system, watch the
others follow (`run_sync_demo`), and the capture half alone: a change committed in CRM,
billing or support arrives on its raw topic as a Debezium envelope that decodes through
the schema registry (`trace_changes`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from streams.connect import SYSTEMS, ConnectClient, load_connector
from streams.dbtls import with_tls
from streams.errors import AccordError
from streams.samples import SampleGenerator
from streams.settings import AccordSettings
from streams.sources import PRIMARY_KEYS, insert_rows, mariadb, postgres
from streams.stack.process import wait_until
from streams.topics import RAW_TOPICS, DecodedMessage, RawTopicReader

Progress = Callable[[str], None]

# Records the worker still has to process below which the demo's own waits suffice.
CAUGHT_UP = 5_000


def apply_connectors(
    settings: AccordSettings, systems: list[str] | None = None, wait_s: float = 90.0
) -> list[dict[str, object]]:
    """Create or update each connector from its file and wait until its task runs."""
    client = ConnectClient.of(settings)
    files = [
        with_tls(load_connector(settings.connectors_dir, system), settings.source(system).tls)
        for system in systems or SYSTEMS
    ]
    for connector in files:
        client.apply(connector)
        state = client.state(connector.name)
        if state.state == "FAILED" or "FAILED" in state.tasks:
            client.restart(connector.name, only_failed=True)  # a failed task stays failed
    if wait_s > 0:

        def all_running() -> bool:
            return all(client.state(c.name).running for c in files)

        if not wait_until(all_running, wait_s, interval_s=1.0):
            states = [client.state(c.name) for c in files]
            failing = [
                f"{s.name}: {s.state} {s.tasks} {s.trace or ''}" for s in states if not s.running
            ]
            raise AccordError("connectors not running: " + "; ".join(failing))
    return [client.state(c.name).as_dict() for c in files]


def seed(
    settings: AccordSettings, count: int, seed_value: int = 7, start: int = 0
) -> dict[str, int]:
    """Load `count` generated customers into the systems that know them; idempotent."""
    generator = SampleGenerator(seed_value)
    rows: dict[str, list[dict[str, object]]] = {system: [] for system in SYSTEMS}
    for index in range(start, start + count):
        person = generator.person(index)
        for system in generator.systems_for(index):
            render = getattr(generator, f"{system}_row")
            rows[system].append(render(person))
    return {system: insert_rows(settings, system, batch) for system, batch in rows.items()}


@dataclass
class TracedChange:
    """One committed source change and the raw event it produced, once seen."""

    system: str
    op: str
    key: str
    committed_at: float
    event: DecodedMessage | None = None
    seen_at: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float | None:
        return None if self.seen_at is None else (self.seen_at - self.committed_at) * 1000


def change_each_system(settings: AccordSettings, tag: str) -> list[TracedChange]:
    """Insert, update and delete one row in each system; returns the changes in order."""
    changes: list[TracedChange] = []
    email = f"demo-{tag}@example.com"
    with postgres(settings, "crm") as conn:
        (crm_id,) = conn.execute(
            "INSERT INTO customers (first_name, last_name, email, country) "
            "VALUES ('Grace', 'Hopper', %s, 'United States') RETURNING id",
            (email.upper(),),
        ).fetchone()
        changes.append(TracedChange("crm", "c", str(crm_id), time.time()))
        conn.execute(
            "UPDATE customers SET phone = '(212) 555-0142', updated_at = now() WHERE id = %s",
            (crm_id,),
        )
        changes.append(TracedChange("crm", "u", str(crm_id), time.time()))
        conn.execute("DELETE FROM customers WHERE id = %s", (crm_id,))
        changes.append(TracedChange("crm", "d", str(crm_id), time.time()))
    account_no = f"DEMO-{tag}"[:32]
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts (account_no, legal_name, contact_email, credit_limit, "
            "billing_country, currency) "
            "VALUES (%s, 'Hopper Computing Ltd', %s, 2500.00, 'USA', 'USD')",
            (account_no, email),
        )
        changes.append(TracedChange("billing", "c", account_no, time.time()))
        cur.execute("UPDATE accounts SET status = 'suspended' WHERE account_no = %s", (account_no,))
        changes.append(TracedChange("billing", "u", account_no, time.time()))
        cur.execute("DELETE FROM accounts WHERE account_no = %s", (account_no,))
        changes.append(TracedChange("billing", "d", account_no, time.time()))
    with postgres(settings, "support") as conn:
        (user_id,) = conn.execute(
            "INSERT INTO users (email, display_name, locale) VALUES (%s, 'Grace Hopper', 'en-US') "
            "RETURNING id",
            (f"  {email} ",),
        ).fetchone()
        changes.append(TracedChange("support", "c", str(user_id), time.time()))
        conn.execute(
            "UPDATE users SET tier = 'premium', updated_at = now() WHERE id = %s", (user_id,)
        )
        changes.append(TracedChange("support", "u", str(user_id), time.time()))
        conn.execute("DELETE FROM users WHERE id = %s", (user_id,))
        changes.append(TracedChange("support", "d", str(user_id), time.time()))
    return changes


def _key_of(message: DecodedMessage) -> str | None:
    if not message.key:
        return None
    return str(next(iter(message.key.values())))


def trace_changes(
    settings: AccordSettings, progress: Progress, timeout_s: float = 90.0
) -> list[TracedChange]:
    """Make the changes and match each with its decoded event on the raw topics."""
    with RawTopicReader(settings, list(RAW_TOPICS.values()), from_beginning=False) as reader:
        reader.wait_assigned()
        tag = uuid.uuid4().hex[:10]
        changes = change_each_system(settings, tag)
        progress(f"committed {len(changes)} changes (tag {tag}); waiting for their events")
        pending = {(c.system, c.key, c.op): c for c in changes}
        topic_system = {topic: system for system, topic in RAW_TOPICS.items()}
        for message in reader.messages(timeout_s):
            if message.value is None:
                continue  # the tombstone that follows a delete
            wanted = (topic_system[message.topic], _key_of(message), message.op)
            if wanted in pending:
                change = pending.pop(wanted)
                change.event, change.seen_at = message, time.time()
            if not pending:
                break
    return changes


# ------------------------------------------------------------------ the sync demo


@dataclass
class Edit:
    """One scripted edit, and how long each other system took to apply it."""

    title: str
    system: str
    key: str
    field: str  # the canonical field it changes
    committed_us: int = 0
    golden_id: str | None = None
    value: object = None  # the golden value every system converged to
    latency_ms: dict[str, float | str] = field(default_factory=dict)  # target -> ms or why not


@dataclass
class DemoReport:
    seeded: dict[str, int]
    edits: list[Edit]
    scorecards: list[dict[str, object]]
    latencies_ms: dict[str, list[float]]  # target -> commit-to-applied of every apply


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_sync_demo(
    settings: AccordSettings, count: int, progress: Progress, timeout_s: float = 120.0
) -> DemoReport:
    """Seed, run the worker with its appliers, make scripted edits, watch every system follow."""
    from streams.app import redis_client
    from streams.identity import IdentityResolver
    from streams.projection import load_sinks
    from streams.workers import WorkerProcess

    seeded = seed(settings, count)
    progress("seeded " + ", ".join(f"{k}: {v} new" for k, v in seeded.items()))
    worker = WorkerProcess(settings)
    started_here = not worker.ready()
    if started_here:
        progress(f"starting the worker (log: {worker.log})")
        worker.start()
    try:
        await_caught_up(settings, progress, stall_s=timeout_s)
        sinks = load_sinks(settings.connectors_dir)
        # Looks up xrefs only: no match keys, so no match rules (nor their secret).
        identity = IdentityResolver(redis_client(settings), settings.worker.redis_prefix, ())
        progress("waiting until every system holds the sample customers (reconcile)")
        ours = _seeded_golden_ids(settings, identity, count, timeout_s)
        wait_converged(settings, sinks, timeout_s, ours)
        steady_us = _now_us()  # from here on, every commit finds the worker running
        edits = []
        for edit in _scripted_edits(settings, identity, uuid.uuid4().hex[:6]):
            progress(f"{edit.system}: {edit.title}")
            _await_sync(settings, edit, sinks, identity, timeout_s)
            edits.append(edit)
        ours |= {edit.golden_id for edit in edits if edit.golden_id}
        scorecards = wait_converged(settings, sinks, timeout_s, ours)
        latencies = {
            target: _ledger_since(settings, spec, steady_us) for target, spec in sinks.items()
        }
    finally:
        if started_here:
            worker.stop()
    return DemoReport(seeded, edits, scorecards, latencies)


@dataclass(frozen=True)
class Standing:
    """Where a worker's consumer groups stand: what each stage has left to read, and how
    much all of them have read, which grows while they work (the lags need not shrink
    meanwhile: each raw change read becomes a change for the merge, a revision for the
    emitter and sink events for the appliers)."""

    left: dict[str, int]  # stage -> records it has yet to read
    read: int  # committed offsets, summed over every stage's partitions

    @property
    def total(self) -> int:
        return sum(self.left.values())

    def describe(self) -> str:
        return ", ".join(f"{stage} {count:,}" for stage, count in self.left.items() if count)


@dataclass
class Backlog:
    """A worker working off its lag: how fast it reads, and whether it still does."""

    stall_s: float  # nothing read for this long: stalled
    first: tuple[float, int] | None = None  # (when, records read) at the first look
    most_read: int = -1
    progress_at: float = 0.0

    def observe(self, standing: Standing, now: float) -> None:
        if self.first is None:
            self.first = (now, standing.read)
        if standing.read > self.most_read:
            self.most_read, self.progress_at = standing.read, now

    def stalled(self, now: float) -> bool:
        return self.first is not None and now - self.progress_at > self.stall_s

    def rate(self, standing: Standing, now: float) -> float:
        """Records read per second since the first look, over every stage."""
        began, read = self.first or (now, standing.read)
        return (standing.read - read) / (now - began) if now > began else 0.0


def follow_backlog(
    standing_of: Callable[[], Standing],
    progress: Progress,
    stall_s: float,
    poll_s: float = 2.0,
    report_every_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait while the worker reads, until at most CAUGHT_UP records are left in all.

    A backlog can be far larger than any fixed timeout allows for (a benchmark's edits
    of the sample databases: hundreds of thousands of changes), so only a worker that
    reads nothing for `stall_s` is a failure.
    """
    backlog = Backlog(stall_s)
    reported: list[float] = []

    def caught_up() -> bool:
        standing, now = standing_of(), clock()
        backlog.observe(standing, now)
        if standing.total <= CAUGHT_UP:
            return True
        if backlog.stalled(now):
            raise AccordError(
                f"the worker read nothing in {stall_s:.0f}s with records left "
                f"({standing.describe()}): is it running? (its log, or `accord monitor`)"
            )
        if not reported:
            progress(
                f"the worker first catches up on what was written since it last ran (other "
                f"apps, benchmarks or tests on this stack): {standing.describe()}"
            )
            reported.append(now)
        elif now - reported[-1] >= report_every_s:
            rate = backlog.rate(standing, now)
            progress(f"catching up at {rate:,.0f} records/s: {standing.describe()} left")
            reported.append(now)
        return False

    wait_until(caught_up, float("inf"), interval_s=poll_s)


def await_caught_up(settings: AccordSettings, progress: Progress, stall_s: float) -> None:
    """Wait until the worker's consumer groups are (nearly) at the ends of their topics."""
    from streams.app import in_worker_sinks
    from streams.monitor import Monitor
    from streams.topology import emit_group, ingest_group, sink_group

    stages = {
        ingest_group(settings): "raw changes",
        settings.worker.app_id: "changes",  # the merge
        emit_group(settings): "revisions",
        **{
            sink_group(settings, target): f"{target} sink events"
            for target in in_worker_sinks(settings)
        },
    }
    with closing(Monitor(settings, members=False)) as monitor:

        def standing() -> Standing:
            groups = {
                group.group: group
                for group in monitor.snapshot(connectors=False, slots=False).groups
            }
            left = {name: groups[g].lag if g in groups else 0 for g, name in stages.items()}
            read = sum(
                partition.committed or 0
                for g in stages
                if g in groups
                for partition in groups[g].partitions
            )
            return Standing(left, read)

        follow_backlog(standing, progress, stall_s)


def _scripted_edits(settings: AccordSettings, identity: Any, tag: str) -> Iterator[Edit]:
    """Edits on customers every system knows: each yielded after its commit."""
    generator = SampleGenerator(7)
    people = [i for i in range(50) if len(generator.systems_for(i)) == 3]
    keys = [_sample_keys(generator, i) for i in people[:4]]
    phone = f"+1 212 555 01{int(tag, 16) % 100:02d}"  # 555-01xx: valid, and fictional

    yield _edit(settings, identity, "crm", keys[0]["crm"], "phone", f"phone -> {phone}",
                "customers", "phone", phone)  # fmt: skip
    yield _edit(settings, identity, "billing", keys[0]["billing"], "company",
                f"legal name -> Demo Holdings {tag}", "accounts", "legal_name",
                f"Demo Holdings {tag}")  # fmt: skip
    yield _edit(settings, identity, "support", keys[1]["support"], "email",
                f"email -> moved-{tag}@example.com", "users", "email",
                f"moved-{tag}@example.com")  # fmt: skip

    # A conflicting pair: CRM and support change one customer's email at the same moment.
    crm_email, support_email = f"crm-{tag}@example.com", f"support-{tag}@example.com"
    barrier = threading.Barrier(2)

    def concurrently(system: str, table: str, key: str, value: str) -> None:
        barrier.wait(10)
        _update(settings, system, table, "email", key, value)

    threads = [
        threading.Thread(target=concurrently, args=("crm", "customers", keys[2]["crm"], crm_email)),
        threading.Thread(
            target=concurrently, args=("support", "users", keys[2]["support"], support_email)
        ),
    ]
    committed = _now_us()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    yield Edit(
        f"conflict: crm sets {crm_email}, support sets {support_email} at the same moment",
        "crm+support",
        keys[2]["crm"],
        "email",
        committed,
        identity.lookup("crm", keys[2]["crm"]),
    )

    with postgres(settings, "support") as conn:
        (user_id,) = conn.execute(
            "INSERT INTO users (email, display_name, tier, locale) "
            "VALUES (%s, 'Nova Demo', 'standard', 'en-US') RETURNING id",
            (f"new-{tag}@example.com",),
        ).fetchone()
    yield Edit(f"new user new-{tag}@example.com", "support", str(user_id), "email", _now_us())


def _edit(
    settings: AccordSettings,
    identity: Any,
    system: str,
    key: str,
    field_name: str,
    title: str,
    table: str,
    column: str,
    value: object,
) -> Edit:
    _update(settings, system, table, column, key, value)
    return Edit(title, system, key, field_name, _now_us(), identity.lookup(system, key))


def _update(
    settings: AccordSettings, system: str, table: str, column: str, key: str, value: object
) -> None:
    primary = PRIMARY_KEYS[system]
    if system == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(f"UPDATE {table} SET {column} = %s WHERE {primary} = %s", (value, key))
        return
    with postgres(settings, system) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET {} = %s WHERE {} = %s").format(
                sql.Identifier(table), sql.Identifier(column), sql.Identifier(primary)
            ),
            (value, key),
        )


def _sample_keys(generator: SampleGenerator, index: int) -> dict[str, str]:
    person = generator.person(index)
    return {
        "crm": str(generator.crm_row(person)["id"]),
        "billing": str(generator.billing_row(person)["account_no"]),
        "support": str(generator.support_row(person)["id"]),
    }


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _await_sync(
    settings: AccordSettings, edit: Edit, sinks: dict[str, Any], identity: Any, timeout_s: float
) -> None:
    """Wait until every other system holds the golden value; record each one's latency."""
    from streams.reconcile import golden_records

    first_system = edit.system.split("+")[0]
    if edit.golden_id is None:
        wait_until(lambda: identity.lookup(first_system, edit.key) is not None, timeout_s)
        edit.golden_id = identity.lookup(first_system, edit.key)
    if edit.golden_id is None:
        raise AccordError(f"{edit.system} row {edit.key} was never linked to a golden record")

    from streams.mapping import load_mappings
    from streams.reconcile import compare, target_rows

    mappings = load_mappings(settings.connectors_dir)

    def targets_in_step() -> bool:
        record = golden_records(settings).get(edit.golden_id)
        if record is None:
            return False
        edit.value = record["fields"][edit.field]
        links = {link["system"]: link["key"] for link in record["links"]}
        for target, spec in sinks.items():
            if edit.field not in spec.fields:
                edit.latency_ms[target] = "not its field"
                continue
            if target not in links:
                if spec.create and record["active"]:
                    return False  # the create has not come back through CDC yet
                edit.latency_ms[target] = "no record here"
                continue
            rows = target_rows(settings, spec, [links[target]])
            card = compare(spec, mappings[target], {edit.golden_id: record}, rows)
            if card.drifted or card.missing:
                return False
            edit.latency_ms[target] = _ledger_latency(settings, spec, edit)
        return True

    if not wait_until(targets_in_step, timeout_s, interval_s=0.2):
        raise AccordError(f"{edit.title}: systems not in step after {timeout_s:.0f}s")


def _column_value(settings: AccordSettings, spec: Any, key: str, column: str) -> object:
    if spec.target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT {column} FROM {spec.table} WHERE {spec.key_column} = %s", (key,))
            row = cur.fetchone()
    else:
        with postgres(settings, spec.target) as conn:
            row = conn.execute(
                sql.SQL("SELECT {} FROM {} WHERE {} = %s").format(
                    sql.Identifier(column), sql.Identifier(spec.table),
                    sql.Identifier(spec.key_column),
                ),
                (key,),
            ).fetchone()  # fmt: skip
    return row[0] if row else None


def _ledger_latency(settings: AccordSettings, spec: Any, edit: Edit) -> float | str:
    """Commit in the source to applied in the target, from the target's own ledger."""
    query = (
        "SELECT applied_at_us - source_ts_us FROM accord_applied WHERE app = %s "
        "AND golden_id = %s AND source_ts_us >= %s ORDER BY golden_version LIMIT 1"
    )
    params = (settings.worker.app_id, edit.golden_id, edit.committed_us - 5_000_000)
    if spec.target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
    else:
        with postgres(settings, spec.target) as conn:
            row = conn.execute(query, params).fetchone()
    if row is None:
        return "already held it"  # the golden value was the target's own: nothing to apply
    return round(row[0] / 1000, 1)


def _seeded_golden_ids(
    settings: AccordSettings, identity: Any, count: int, timeout_s: float
) -> set[str]:
    """The golden records of the seeded sample customers, once each is linked."""
    generator = SampleGenerator(7)
    rows = [
        (system, _sample_keys(generator, index)[system])
        for index in range(count)
        for system in generator.systems_for(index)
    ]
    found: dict[tuple[str, str], str] = {}

    def all_linked() -> bool:
        for row in rows:
            if row not in found and (golden_id := identity.lookup(*row)) is not None:
                found[row] = golden_id
        return len(found) == len(rows)

    if not wait_until(all_linked, timeout_s, interval_s=0.5):
        raise AccordError(
            f"{len(rows) - len(found)} of {len(rows)} seeded rows were not linked to golden "
            f"records within {timeout_s:.0f}s: is the worker running? (accord worker)"
        )
    return set(found.values())


def _ledger_since(settings: AccordSettings, spec: Any, since_us: int) -> list[float]:
    """Commit-to-applied of every event caused by a commit made since a moment, in ms.

    Changes committed before the worker ran (the seed) waited for it to start: their
    figures say how long the worker took to come up, not how fast it keeps in accord.
    """
    query = (
        "SELECT applied_at_us - source_ts_us FROM accord_applied "
        "WHERE app = %s AND source_ts_us >= %s AND op <> 'SUPERSEDED'"
    )
    if spec.target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(query, (settings.worker.app_id, since_us))
            rows = cur.fetchall()
    else:
        with postgres(settings, spec.target) as conn:
            rows = conn.execute(query, (settings.worker.app_id, since_us)).fetchall()
    return [row[0] / 1000 for row in rows]


def wait_converged(
    settings: AccordSettings, sinks: dict[str, Any], timeout_s: float, only: set[str]
) -> list[dict[str, object]]:
    """Reconcile `only` these golden records until no target has drift or missing ones."""
    from streams.mapping import load_mappings
    from streams.reconcile import compare, golden_records, target_rows

    mappings = load_mappings(settings.connectors_dir)
    cards: list[dict[str, object]] = []

    def converged() -> bool:
        golden = {k: v for k, v in golden_records(settings).items() if k in only}
        cards.clear()
        for target, spec in sinks.items():
            linked = {
                link["key"] for r in golden.values() for link in r["links"]
                if link["system"] == target
            }  # fmt: skip
            ours = target_rows(settings, spec, sorted(linked))
            cards.append(compare(spec, mappings[target], golden, ours).as_dict(details=5))
        return len(golden) == len(only) and all(
            c["drifted"] == 0 and c["missing"] == 0 for c in cards
        )

    if not wait_until(converged, timeout_s, interval_s=1.0):
        raise AccordError(f"systems did not converge within {timeout_s:.0f}s: {cards}")
    return cards
