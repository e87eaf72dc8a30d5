"""The fault suite (`make chaos`): a steady load of source edits while something breaks.

Each scenario runs a real worker (ingest, merge, emit and the three appliers) on topics,
groups and Redis keys of its own, drives `Load` at a fixed rate, injects its fault, stops
the load, and then waits for every system to converge. It reports:

- changes made: edits the load committed in the sources;
- delivered duplicates: repeats the pipeline saw and made harmless (Redis dedupe hits,
  merge no-ops and appliers' stale-version skips, summed over every worker process);
- applied duplicates: sink events applied twice, or a row given an older revision
  after a newer one (from the appliers' ledgers) — must be 0;
- lost: customers whose golden values differ from the oracle, plus target rows not in
  accord with their golden record — must be 0;
- equal to the oracle, and the seconds from the end of the load until convergence.

Results go to `.accord/reports/chaos.json`; the session prints them as a table.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer

from streams.mapping import load_mappings
from streams.projection import load_sinks
from streams.reconcile import compare, golden_records, target_rows
from streams.rules import load_rules
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.stack.manager import Stack
from streams.stack.process import spawn, stop, wait_until
from streams.topics import RAW_TOPICS
from streams.workers import WorkerProcess
from tests.chaos.load import Load, every, scrape
from tests.support import accord, free_port, isolated, running_worker

pytestmark = pytest.mark.chaos

CUSTOMERS, WITH_BILLING = 30, 10
RATE_PER_S = 10.0
LOAD_S = 60.0
CONVERGE_S = 240.0
DUPLICATE_COUNTERS = (
    "accord_dedupe_hits_total",
    'accord_merge_changes_total{outcome="no_op"}',
    'accord_sink_skipped_total{reason="stale_version"',
)


@dataclass
class Run:
    """One scenario's worker(s), load and figures."""

    settings: AccordSettings
    load: Load
    workers: list[WorkerProcess]
    duplicates_seen: float = 0.0
    faults: int = 0  # how many times the fault was injected

    def count_duplicates(self, worker: WorkerProcess) -> None:
        """Add what a worker has counted so far (before it is killed or stopped)."""
        self.duplicates_seen += sum(scrape(worker.settings, DUPLICATE_COUNTERS).values())

    def restart(self, worker: WorkerProcess, kill: bool = True) -> None:
        self.faults += 1
        self.count_duplicates(worker)
        if kill:
            worker.kill()
        else:
            worker.stop()
        worker.start()


@pytest.fixture
def run(connectors: AccordSettings, request: pytest.FixtureRequest) -> Iterator[Run]:
    settings = isolated(connectors)
    guarantee = getattr(request, "param", "at_least_once")  # Faust's processing guarantee
    worker = settings.worker.model_copy(update={"processing_guarantee": guarantee})
    settings = settings.model_copy(update={"worker": worker})
    load = Load(settings)
    with running_worker(settings) as worker:
        load.create(CUSTOMERS, WITH_BILLING)
        assert wait_until(load.link_support_rows, 180), "support rows were not created"
        yield Run(settings, load, [worker])


@contextmanager
def loading(run: Run) -> Iterator[None]:
    stop_load = threading.Event()
    thread = threading.Thread(target=run.load.run, args=(stop_load, RATE_PER_S), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop_load.set()
        thread.join(30)


# ------------------------------------------------------------------------- the verdict


def applied_duplicates(settings: AccordSettings) -> int:
    """Ledger rows sharing an event, or a row applied an older revision after a newer one."""
    app = settings.worker.app_id
    rows: list[tuple] = []
    for system in ("crm", "support"):
        with postgres(settings, system) as conn:
            rows += conn.execute(
                "SELECT event_id, golden_id, target_key, golden_version, applied_at_us "
                "FROM accord_applied WHERE app = %s",
                (app,),
            ).fetchall()
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT event_id, golden_id, target_key, golden_version, applied_at_us "
            "FROM accord_applied WHERE app = %s",
            (app,),
        )
        rows += list(cur.fetchall())
    events = [row[0] for row in rows]
    twice = len(events) - len(set(events))
    backwards = 0
    by_row: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for _event, golden_id, key, version, applied_at in rows:
        by_row.setdefault((golden_id, key), []).append((applied_at, version))
    for history in by_row.values():
        versions = [version for _, version in sorted(history)]
        backwards += sum(1 for a, b in itertools.pairwise(versions) if b < a)
    return twice + backwards


def verdict(
    run: Run, expected: dict[str, dict[str, Any]] | None = None, why: list[str] | None = None
) -> tuple[int, bool]:
    """(lost, equal to the oracle) for the current state of every system; what is lost
    is described in `why`, when given."""
    why = why if why is not None else []
    settings, load = run.settings, run.load
    expected = expected or load.expected(load_rules(settings.worker.rules_file))
    golden = {
        g: r
        for g, r in golden_records(settings, timeout_s=30).items()
        if r["fields"]["email"] in expected
    }
    actual = {r["fields"]["email"]: r for r in golden.values()}
    lost = 0
    for email, values in expected.items():
        record = actual.get(email)
        if record is None or any(record["fields"].get(k) != v for k, v in values.items()):
            lost += 1
            held = None if record is None else {k: record["fields"].get(k) for k in values}
            why.append(f"golden {email}: expected {values}, holds {held}")
    sinks, mappings = load_sinks(settings.connectors_dir), load_mappings(settings.connectors_dir)
    for target in ("crm", "support", "billing"):
        keys = [
            link["key"]
            for record in golden.values()
            for link in record["links"]
            if link["system"] == target
        ]
        rows = target_rows(settings, sinks[target], keys)
        card = compare(sinks[target], mappings[target], golden, rows)
        lost += card.drifted + card.missing
        why += [f"{target}: {drift}" for drift in card.drifts]
        why += [f"{target}: missing row of {golden_id}" for golden_id in card.missing_ids]
    return lost, lost == 0


def settle(run: Run, scenario: str, load_ended: float) -> dict[str, Any]:
    """Wait for convergence, then record the scenario's figures."""
    state: dict[str, Any] = {}

    def converged() -> bool:
        state["why"] = []
        try:
            state["lost"], state["equal"] = verdict(run, why=state["why"])
        except (KafkaException, TimeoutError) as exc:  # the broker is still settling
            state["why"] = [f"could not read the golden records yet: {exc}"]
            return False
        return state["equal"]

    ok = wait_until(converged, CONVERGE_S, interval_s=2.0)
    took = time.monotonic() - load_ended
    if ok:
        # The check can fail: one value the systems do not hold is counted as lost.
        tampered = run.load.expected(load_rules(run.settings.worker.rules_file))
        email = next(iter(tampered))
        tampered[email] = {**tampered[email], "segment": "never-written"}
        assert verdict(run, tampered)[0] == 1, "the verdict cannot tell"
    for worker in run.workers:
        if worker.running:
            run.count_duplicates(worker)
    result = {
        "scenario": scenario,
        "faults": run.faults,
        "changes_made": len(run.load.edits),
        "delivered_duplicates": int(run.duplicates_seen),
        "applied_duplicates": applied_duplicates(run.settings),
        "lost": state.get("lost"),
        "equal_to_oracle": ok,
        "converged_s": round(took, 1) if ok else None,
        "load_errors": len(run.load.errors),
        "lost_detail": state.get("why", [])[:20],
        "fields_checked": sum(
            v is not None
            for values in run.load.expected(load_rules(run.settings.worker.rules_file)).values()
            for v in values.values()
        ),
    }
    record(result)
    return result


def record(result: dict[str, Any]) -> None:
    from tests.chaos.report import REPORT

    REPORT.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    existing[result["scenario"]] = result
    REPORT.write_text(json.dumps(existing, indent=2) + "\n")


def held(result: dict[str, Any]) -> bool:
    return result["equal_to_oracle"] and result["lost"] == 0 and result["applied_duplicates"] == 0


def assert_held(result: dict[str, Any]) -> None:
    assert result["equal_to_oracle"], result
    assert result["lost"] == 0 and result["applied_duplicates"] == 0, result


def under_load(run: Run, fault: Callable[[threading.Event], None]) -> float:
    """Run the load for LOAD_S with `fault` on its own thread; returns when the load ended."""
    stop_fault = threading.Event()
    with loading(run):
        thread = threading.Thread(target=fault, args=(stop_fault,), daemon=True)
        thread.start()
        stop_fault.wait(LOAD_S)
        stop_fault.set()
        thread.join(300)
    return time.monotonic()


# ---------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize("run", ["at_least_once", "exactly_once"], indirect=True)
def test_worker_sigkilled_every_10_to_30_s_with_a_burst(run: Run) -> None:
    rng = random.Random(11)
    [worker] = run.workers

    def fault(stop_fault: threading.Event) -> None:
        every(lambda: rng.uniform(10, 30), stop_fault, lambda: run.restart(worker))
        # The burst: kills 0.5 s apart, each before the worker has finished starting.
        for _ in range(4):
            run.faults += 1
            run.count_duplicates(worker)
            worker.kill()
            spawn(worker.spec)
            time.sleep(0.5)  # the fault's rhythm, not a synchronisation
        worker.kill()
        worker.start()

    scenario = "worker SIGKILL every 10-30 s + burst"
    if run.settings.worker.processing_guarantee == "exactly_once":
        scenario += " (Faust exactly_once)"
    result = settle(run, scenario, under_load(run, fault))
    if run.settings.worker.processing_guarantee == "exactly_once" and not held(result):
        # Measured for the guarantee decision, not a mode Accord runs in: the figures are
        # in the report; the README says why at-least-once is the default.
        pytest.xfail(f"Faust exactly_once does not hold: {result}")
    assert_held(result)


def outage(run: Run, component: str, seconds: float = 30.0) -> Callable[[threading.Event], None]:
    """A fault: `component` of the stack stopped 10 s into the load, for `seconds`."""
    manager = Stack(run.settings)

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(10)
        run.faults += 1
        stop(manager.components[component].process())
        stop_fault.wait(seconds)
        manager.up([component])

    return fault


@pytest.mark.parametrize(
    ("component", "scenario"),
    [
        ("redis", "Redis down 30 s"),
        ("registry", "schema registry down 30 s"),
        ("mariadb", "billing database (MariaDB) down 30 s"),
    ],
)
def test_a_component_stopped_for_30_s(run: Run, component: str, scenario: str) -> None:
    result = settle(run, scenario, under_load(run, outage(run, component)))
    assert_held(result)


def test_two_workers_scaled_1_2_1_under_load(run: Run) -> None:
    second_settings = run.settings.model_copy(
        update={
            "worker": run.settings.worker.model_copy(
                update={"instance": "2", "web_port": free_port(), "sinks": []}
            )
        }
    )
    second = WorkerProcess(second_settings)
    run.workers.append(second)

    def fault(stop_fault: threading.Event) -> None:
        while not stop_fault.wait(8):
            run.faults += 1
            second.start()
            if stop_fault.wait(12):
                break
            run.count_duplicates(second)
            second.stop()

    try:
        result = settle(run, "two workers, scaled 1 -> 2 -> 1", under_load(run, fault))
    finally:
        if second.running:
            second.stop()
    assert_held(result)


def test_kafka_broker_restarted_three_times(run: Run) -> None:
    manager = Stack(run.settings)

    def fault(stop_fault: threading.Event) -> None:
        for _ in range(3):
            if stop_fault.wait(8):
                return
            run.faults += 1
            stop(manager.components["kafka"].process())
            manager.up(["kafka"])

    result = settle(run, "Kafka broker restarted 3 times", under_load(run, fault))
    assert_held(result)


CONNECT_FLUSH_MS = 60_000  # the stack's default is 5 s; the issue asks for a long one


def test_kafka_connect_sigkilled_with_a_long_offset_flush_interval(run: Run) -> None:
    stack = run.settings.stack.model_copy(
        update={"connect_offset_flush_interval_ms": CONNECT_FLUSH_MS}
    )
    manager = Stack(run.settings.model_copy(update={"stack": stack}))
    manager.up(["connect"])  # restarts Connect with the long interval: nothing flushed yet
    connect = replace(manager.components["connect"].process(), stop_signal=signal.SIGKILL)

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(20)
        run.faults += 1
        stop(connect, 10)  # a crash: the last 20 s of captured changes are replayed
        manager.up(["connect"])

    try:
        result = settle(
            run,
            f"Kafka Connect SIGKILLed (offset flush {CONNECT_FLUSH_MS // 1000} s)",
            under_load(run, fault),
        )
    finally:
        Stack(run.settings).up(["connect"])  # back to the stack's own interval
    assert_held(result)


POISON = (
    b"",
    b"\x00\x01",
    b"\x01not-avro",
    b'{"op": "c"}',
    b"\x00\x7f\xff\xff\xff" + b"\x02" * 8,  # a schema id no registry has
)


def test_a_thousand_poison_messages_among_valid_traffic(run: Run) -> None:
    producer = Producer({"bootstrap.servers": run.settings.kafka})

    def fault(stop_fault: threading.Event) -> None:
        topics = list(RAW_TOPICS.values())
        for n in range(1000):
            run.faults += 1
            # No key: the value's own fault is the reason each one is dead-lettered.
            producer.produce(topics[n % 3], key=None, value=POISON[n % len(POISON)])
            if n % 50 == 49:
                producer.flush(10)
                if stop_fault.wait(1.0):
                    break
        producer.flush(30)

    result = settle(run, "1,000 poison messages mixed in", under_load(run, fault))
    assert_held(result)
    # Every poison message is in this app's DLQ, with its reason.
    letters = accord(run.settings, "dlq", "list", "--json")
    assert letters.returncode == 0, letters.stderr
    # The app started after every earlier message: its DLQ holds only this poison.
    reasons = Counter(entry["reason"] for entry in json.loads(letters.stdout))
    assert sum(reasons.values()) == 1000, reasons
    assert len(reasons) >= 3, reasons  # every kind of garbage, not one reason for all
    result["dead_lettered"] = dict(reasons)
    record(result)
