"""The fault suite on a three-broker cluster: one broker killed under load, nothing lost.

The scenario needs replication, so it runs on a whole stack of its own (three KRaft
brokers, Connect with Debezium, the registry, PostgreSQL, MariaDB and Redis) under
`.accord/chaos-3brokers`, on ports of its own; it shares only the installed jars of the
local stack, and is taken down at the end.
"""

from __future__ import annotations

import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from confluent_kafka.admin import AdminClient

from streams.demo import apply_connectors
from streams.settings import AccordSettings, StackSettings
from streams.stack.components import StackPaths
from streams.stack.manager import Stack
from streams.stack.process import stop, wait_until
from streams.topology import changelog_topic
from tests.chaos.harness import CUSTOMERS, WITH_BILLING, Run, assert_held, settle, under_load
from tests.chaos.load import Load
from tests.support import isolated, running_worker

pytestmark = pytest.mark.chaos

PORT_SHIFT = 10_000  # every port of the shared stack, + this (20000 + ...)
SHARED_INSTALLS = ("kafka/libs", "connect-plugins", "registry")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _shifted(stack: StackSettings, root: str) -> StackSettings:
    ports = {
        name: getattr(stack, name) + PORT_SHIFT
        for name in type(stack).model_fields
        if name.endswith("_port")
    }
    busy = [f"{name}={port}" for name, port in ports.items() if not _free(port)]
    assert not busy, f"ports of the three-broker stack are in use: {busy}"
    return stack.model_copy(
        update={**ports, "state_dir": stack.state_dir.resolve() / root, "kafka_brokers": 3}
    )


@pytest.fixture(scope="module")
def three_brokers(settings: AccordSettings) -> Iterator[AccordSettings]:
    """A whole stack of its own with three brokers, its connectors running."""
    shared = StackPaths(settings.stack.state_dir.resolve())
    stack = _shifted(settings.stack, "chaos-3brokers")
    shutil.rmtree(stack.state_dir, ignore_errors=True)
    for installed in SHARED_INSTALLS:
        link = stack.state_dir / installed
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(shared.root / installed)
    own = settings.model_copy(update={"stack": stack, "kafka_bootstrap": None})
    manager = Stack(own, progress=lambda m: print(f"[3-broker stack] {m}"))
    try:
        unhealthy = [s.name for s in manager.up() if not s.healthy]
        assert not unhealthy, f"unhealthy: {unhealthy}"
        apply_connectors(own, wait_s=180)
        yield own
    finally:
        manager.down()
        shutil.rmtree(stack.state_dir, ignore_errors=True)


@pytest.fixture
def run3(three_brokers: AccordSettings) -> Iterator[Run]:
    settings = isolated(three_brokers)
    load = Load(settings)
    with running_worker(settings) as worker:
        load.create(CUSTOMERS, WITH_BILLING)
        assert wait_until(load.link_support_rows, 240), "support rows were not created"
        yield Run(settings, load, [worker])


def test_one_broker_of_three_killed_under_load(run3: Run) -> None:
    """SIGKILL one broker 10 s into the load; it stays down until the load ends."""
    manager = Stack(run3.settings)
    # Every topic the data path writes has three copies, so any broker is a leader of some.
    admin = AdminClient(run3.settings.kafka_config())
    topics = admin.list_topics(timeout=30).topics
    replicas = {
        name: len(topics[name].partitions[0].replicas)
        for name in (run3.settings.topics.changes, changelog_topic(run3.settings))
    }
    assert set(replicas.values()) == {3}, replicas
    victim = replace(manager.components["kafka-2"].process(), stop_signal=signal.SIGKILL)

    def fault(stop_fault: threading.Event) -> None:
        stop_fault.wait(10)
        run3.faults += 1
        stop(victim, 10)
        stop_fault.wait()  # down for the rest of the load

    ended = under_load(run3, fault)
    try:
        result = settle(run3, "one broker of three SIGKILLed", ended)
    finally:
        manager.up(["kafka"])
    assert_held(result)
