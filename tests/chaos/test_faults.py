"""The fault suite (`make chaos`): crashes and outages of the stack under load.

The harness (`tests.chaos.harness`) says how a scenario runs and is judged; the faults
confined to one record, one target or one shared component are in `test_containment`.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import replace

import pytest
from confluent_kafka import Producer

from streams.stack.manager import Stack
from streams.stack.process import spawn, stop
from streams.topics import RAW_TOPICS
from streams.workers import WorkerProcess
from tests.chaos.harness import Run, assert_held, held, outage, record, settle, under_load
from tests.chaos.load import every
from tests.support import accord, free_port

pytestmark = pytest.mark.chaos

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
