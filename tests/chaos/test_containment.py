"""The fault suite, part two: one record, one target or one shared component at fault.

Where the fault is confined to one record or one target, the rest must keep flowing
*during* the fault: a probe creates a customer in CRM every few seconds and times it
until Accord has created it in support (`tests.chaos.harness.Probe`). Where a shared
component is paused, the pipeline must resume by itself. Every scenario is judged by the
same oracle as the rest of the suite: 0 lost, 0 applied twice, final state equal.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from streams.reconcile import golden_records
from streams.sources import mariadb, postgres
from streams.stack.manager import Stack
from streams.stack.process import read_pid
from streams.workers import WorkerProcess
from tests.chaos.harness import (
    Run,
    assert_flowed,
    assert_held,
    probing,
    record,
    settle,
    under_load,
)
from tests.chaos.load import scrape
from tests.support import HTML_PAGE, RegistryProxy, Reply, accord

pytestmark = pytest.mark.chaos

FAULT_AFTER_S = 10.0  # into the load: the pipeline is busy when the fault comes


def dead_letters(run: Run, reason: str) -> list[dict]:
    letters = accord(run.settings, "dlq", "list", "--reason", reason, "--json")
    assert letters.returncode == 0, letters.stderr
    return json.loads(letters.stdout)


def worker_alive(run: Run) -> bool:
    return all(worker.running for worker in run.workers)


# ------------------------------------------------------------------- one bad record


def test_a_400_kb_row(run: Run) -> None:
    """A support user with a 400 KB display name: dead-lettered, nothing else stops."""
    email = f"huge-{run.load.tag}@example.com"

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(FAULT_AFTER_S)
        run.faults += 1
        with postgres(run.settings, "support") as conn:
            conn.execute(
                "INSERT INTO users (email, display_name) VALUES (%s, %s)",
                (email, "Ada " + "x" * 400_000),
            )

    with probing(run) as probe:
        ended = under_load(run, fault)
    result = settle(run, "a 400 KB row", ended, probe)
    assert worker_alive(run), "the worker died on one row"
    assert_held(result)
    assert_flowed(result)
    letters = dead_letters(run, "field_too_long")
    assert len(letters) == 1, letters
    result["dead_lettered"] = len(letters)
    record(result)


ROLE_ROWS = 2000


def test_2000_rows_sharing_one_role_email(run: Run) -> None:
    """2,000 support sign-ups with one `info@` address: held, none written anywhere."""
    email = f"info@role-{run.load.tag}.example.com"

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(FAULT_AFTER_S)
        run.faults += 1
        with postgres(run.settings, "support") as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (email, display_name, phone) VALUES (%s, %s, %s)",
                [(email, f"Person {n} {uuid.uuid4().hex[:6]}", None) for n in range(ROLE_ROWS)],
            )

    with probing(run) as probe:
        ended = under_load(run, fault)
    result = settle(run, f"{ROLE_ROWS:,} rows sharing one role email", ended, probe)
    assert worker_alive(run), "the worker died on a hot key"
    assert_held(result)
    assert_flowed(result)
    with postgres(run.settings, "crm") as conn:
        # Rows this app wrote: other apps on a shared stack read the same sources.
        (in_crm,) = conn.execute(
            "SELECT count(*) FROM customers c JOIN accord_applied a "
            "ON a.target_key = c.id::text AND a.app = %s WHERE lower(c.email) = %s",
            (run.settings.worker.app_id, email),
        ).fetchone()
    assert in_crm == 0, f"{in_crm} role-address rows were written into CRM"
    held_rows = scrape(run.settings, ("accord_identity_held_total",))
    result["held"] = int(held_rows["accord_identity_held_total"])
    record(result)
    assert result["held"] >= ROLE_ROWS, result


# ------------------------------------------------------------------- one broken target


def test_a_billing_column_renamed_under_load_and_back(run: Run) -> None:
    """Billing's `phone` renamed for 20 s: billing's applier pauses, the rest flows,
    and billing catches up by itself once the column is back."""
    paused: list[float] = []

    def rename(old: str, new: str) -> None:
        with mariadb(run.settings) as conn, conn.cursor() as cur:
            cur.execute(f"ALTER TABLE accounts RENAME COLUMN {old} TO {new}")

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(FAULT_AFTER_S)
        run.faults += 1
        rename("phone", "phone_renamed")
        try:
            for _ in range(20):
                threading.Event().wait(1.0)  # the fault's length, not a synchronisation
                gauge = scrape(run.settings, ('accord_sink_paused{target="billing"}',))
                paused.append(next(iter(gauge.values())))
        finally:
            rename("phone_renamed", "phone")

    with probing(run) as probe:
        ended = under_load(run, fault)
    result = settle(run, "billing column renamed for 20 s, then back", ended, probe)
    result["billing_paused_seen"] = max(paused, default=0.0) == 1.0
    record(result)
    assert worker_alive(run), "the worker died on a broken target"
    assert_held(result)
    assert_flowed(result)
    assert result["billing_paused_seen"], "billing's applier never reported its pause"


# ------------------------------------------------------------ a garbage schema registry


class GarbageRegistry(RegistryProxy):
    """The real registry, until `broken`: then an HTML page with status 200 for every
    request (a misrouted load balancer, a captive portal)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.broken = False
        self.garbage_served = 0

    def answer(self, method: str, path: str) -> Reply | None:
        if not self.broken:
            return None
        self.garbage_served += 1
        return HTML_PAGE


@contextmanager
def through_garbage_registry(run: Run) -> Iterator[GarbageRegistry]:
    """The run's worker restarted against the proxy; Connect keeps the real registry."""
    real = run.settings.registry
    prefix, _, path = real.partition("/apis/")
    proxy = GarbageRegistry(prefix)
    [worker] = run.workers
    run.count_duplicates(worker)
    worker.stop()
    proxied = WorkerProcess(
        run.settings.model_copy(update={"schema_registry_url": f"{proxy.url}/apis/{path}"})
    )
    proxied.start()
    run.workers = [proxied]
    try:
        yield proxy
    finally:
        proxy.broken = False
        proxy.close()


def test_the_registry_answering_html_for_30_s(run: Run) -> None:
    """While the registry answers garbage, CRM's schema changes: the worker must wait for
    a sane answer, not dead-letter good records or crash, and resume by itself."""
    column = f"chaos_{run.load.tag}"

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(FAULT_AFTER_S)
        run.faults += 1
        proxy.broken = True
        # A new writer schema the worker has not seen: its next CRM record needs a lookup.
        with postgres(run.settings, "crm") as conn:
            conn.execute(f"ALTER TABLE customers ADD COLUMN {column} text")
        threading.Event().wait(30.0)  # the fault's length, not a synchronisation
        proxy.broken = False

    try:
        with through_garbage_registry(run) as proxy:
            ended = under_load(run, fault)
            result = settle(run, "schema registry answering HTML (200) for 30 s", ended)
            result["garbage_served"] = proxy.garbage_served
            record(result)
    finally:
        with postgres(run.settings, "crm") as conn:
            conn.execute(f"ALTER TABLE customers DROP COLUMN IF EXISTS {column}")
    assert worker_alive(run), "the worker died on registry garbage"
    assert_held(result)
    assert result["garbage_served"] > 0, "the worker never asked the registry in the fault"
    assert dead_letters(run, "schema_unavailable") == []


# ------------------------------------------------------- a shared component paused


def sigstopped(run: Run, component: str, seconds: float = 20.0) -> Callable:
    """A fault: `component`'s whole process group stopped (SIGSTOP) for `seconds`: it
    holds its connections but answers nothing, as a machine under swap or a VM paused."""
    spec = Stack(run.settings).components[component].process()

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(FAULT_AFTER_S)
        pid = read_pid(spec)
        assert pid is not None, f"{component} is not running"
        run.faults += 1
        os.killpg(pid, signal.SIGSTOP)
        try:
            threading.Event().wait(seconds)  # the fault's length, not a synchronisation
        finally:
            os.killpg(pid, signal.SIGCONT)

    return fault


@pytest.mark.parametrize(
    ("component", "scenario"),
    [
        ("kafka", "Kafka paused (SIGSTOP) 20 s"),
        ("redis", "Redis paused (SIGSTOP) 20 s"),
        ("postgres", "PostgreSQL paused (SIGSTOP) 20 s"),
    ],
)
def test_a_component_paused_for_20_s(run: Run, component: str, scenario: str) -> None:
    result = settle(run, scenario, under_load(run, sigstopped(run, component)))
    assert worker_alive(run), f"the worker died while {component} was paused"
    assert_held(result)


# ----------------------------------------------------------------- Redis flushed


def test_redis_flushed_under_load(run: Run) -> None:
    """Every key of the app in Redis deleted mid-load (what FLUSHALL does to it): the
    worker notices, rebuilds its identity links, and makes no twin golden record or row."""
    prefix = run.settings.worker.redis_prefix

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(FAULT_AFTER_S)
        run.faults += 1
        client = redis.Redis.from_url(run.settings.redis, **run.settings.redis_credentials())
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for n in range(0, len(keys), 500):
            client.delete(*keys[n : n + 500])

    result = settle(run, "Redis flushed (the app's keys) under load", under_load(run, fault))
    assert worker_alive(run), "the worker died when Redis lost its keys"
    assert_held(result)
    emails = [customer.email for customer in run.load.customers]
    twins = {}
    for system, table in (("crm", "customers"), ("support", "users")):
        with postgres(run.settings, system) as conn:
            rows = conn.execute(
                f"SELECT email, count(*) FROM {table} WHERE email = ANY(%s) "
                "GROUP BY email HAVING count(*) > 1",
                (emails,),
            ).fetchall()
        twins[system] = len(rows)
    result["twin_rows"] = sum(twins.values())
    per_email = Counter(
        golden["fields"]["email"]
        for golden in golden_records(run.settings, timeout_s=30).values()
        if golden["fields"]["email"] in emails
    )
    result["twin_golden_records"] = sum(count - 1 for count in per_email.values())
    record(result)
    assert twins == {"crm": 0, "support": 0}, twins
    assert result["twin_golden_records"] == 0, per_email
