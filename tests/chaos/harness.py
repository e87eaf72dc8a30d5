"""The fault suite's harness: a run's worker and load, the fault's timing, the verdict.

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
- equal to the oracle, and the seconds from the end of the load until convergence;
- for faults confined to one record or one target, the probe: customers created in CRM
  while the fault lasts, and how long each took to reach support (the rest flowing).

Results go to `.accord/reports/chaos.json`; the session prints them as a table.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException

from streams.mapping import load_mappings
from streams.projection import load_sinks
from streams.reconcile import compare, golden_records, target_rows
from streams.rules import load_rules
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.stack.manager import Stack
from streams.stack.process import stop, wait_until
from streams.workers import WorkerProcess
from tests.chaos.load import Load, scrape
from tests.chaos.report import REPORT
from tests.support import accord

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


def settle(
    run: Run, scenario: str, load_ended: float, probe: Probe | None = None
) -> dict[str, Any]:
    """Wait for convergence, then record the scenario's figures (and the probe's)."""
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
    if not ok:
        state["stuck"] = where_stuck(run)
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
        "stuck": state.get("stuck"),
        "fields_checked": sum(
            v is not None
            for values in run.load.expected(load_rules(run.settings.worker.rules_file)).values()
            for v in values.values()
        ),
    }
    if probe is not None:
        result |= probe.figures()
    record(result)
    return result


def where_stuck(run: Run) -> dict[str, Any]:
    """What a run that did not converge was waiting on: each worker's /health, and the
    lag of every consumer group of the app, for the report."""
    found: dict[str, Any] = {"health": [], "lag": {}}
    for worker in run.workers:
        url = f"http://{worker.settings.worker.web_host}:{worker.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                found["health"].append(json.loads(response.read()))
        except urllib.error.HTTPError as exc:  # a 503 is an answer too
            found["health"].append(exc.read().decode(errors="replace")[:500])
        except OSError as exc:
            found["health"].append(f"no answer: {exc}")
    monitor = accord(run.settings, "monitor", "--once", "--json")
    if monitor.returncode == 0:
        app = run.settings.worker.app_id
        for group in json.loads(monitor.stdout).get("groups", []):
            if group["group"].startswith(app):
                found["lag"][group["group"]] = sum(p.get("lag") or 0 for p in group["partitions"])
    else:
        found["lag"] = monitor.stderr[-500:]
    return found


def record(result: dict[str, Any]) -> None:
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


@dataclass
class Probe:
    """Customers created in CRM while a fault lasts, each timed until Accord has created it
    in support: whether the rest of the pipeline flows *during* a fault confined to one
    record or one target."""

    settings: AccordSettings
    every_s: float = 5.0
    deadline_s: float = 60.0
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    latencies_s: list[float] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def run(self, stop_probe: threading.Event) -> None:
        n = 0
        while not stop_probe.is_set():
            email = f"probe{n}-{self.tag}@example.com"
            n += 1
            started = time.monotonic()
            with postgres(self.settings, "crm") as conn:
                conn.execute(
                    "INSERT INTO customers (first_name, last_name, email, country) "
                    "VALUES ('Probe', %s, %s, 'GB')",
                    (f"P{n}", email),
                )
            if wait_until(lambda email=email: self._in_support(email), self.deadline_s, 0.2):
                self.latencies_s.append(time.monotonic() - started)
            else:
                self.missing.append(email)
            stop_probe.wait(max(0.0, self.every_s - (time.monotonic() - started)))

    def _in_support(self, email: str) -> bool:
        with postgres(self.settings, "support") as conn:
            return conn.execute("SELECT 1 FROM users WHERE email = %s", (email,)).fetchone()

    def figures(self) -> dict[str, Any]:
        latencies = sorted(self.latencies_s)
        return {
            "probes": len(latencies) + len(self.missing),
            "probes_missing": len(self.missing),
            "probe_median_s": round(statistics.median(latencies), 2) if latencies else None,
            "probe_max_s": round(latencies[-1], 2) if latencies else None,
        }


@contextmanager
def probing(run: Run) -> Iterator[Probe]:
    """Probe customers on a thread of their own for as long as the block lasts."""
    probe = Probe(run.settings)
    stop_probe = threading.Event()
    thread = threading.Thread(target=probe.run, args=(stop_probe,), daemon=True)
    thread.start()
    try:
        yield probe
    finally:
        stop_probe.set()
        thread.join(probe.deadline_s + 10)


def assert_flowed(result: dict[str, Any]) -> None:
    """Every probe created during the fault reached support while it lasted."""
    assert result["probes"] > 0, result
    assert result["probes_missing"] == 0, result
