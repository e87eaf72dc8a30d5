"""Start an Accord app over: its topics, consumer groups, Redis keys, local state, ledgers.

For development and demos, and after an incompatible upgrade of the golden state
format. Source systems, their connectors and their raw topics are left alone: the next
worker rebuilds everything from the raw topics (Debezium keeps them).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient
from confluent_kafka.error import KafkaException

from streams.errors import AccordError
from streams.projection import SinkKind, load_sinks
from streams.settings import AccordSettings
from streams.sinks import LEDGER_TABLE
from streams.sources import mariadb, postgres
from streams.topology import accord_topics, emit_group, ingest_group, sink_group, sink_targets
from streams.workerhost import DataDirLock, WorkerAlreadyRunning, data_dir

Progress = Callable[[str], None]


@dataclass
class ResetReport:
    topics: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    redis_keys: int = 0
    ledger_rows: dict[str, int] = field(default_factory=dict)


def reset(settings: AccordSettings, progress: Progress) -> ResetReport:
    """Delete what the app `settings.worker.app_id` made. Refuses while its worker runs."""
    from streams.workers import WorkerProcess

    app_id = settings.worker.app_id
    if WorkerProcess(settings).ready():
        raise AccordError(f"a worker of app {app_id!r} is running: stop it first")
    # Whatever its port, a worker of this instance holds its data dir's lock.
    lock = DataDirLock(data_dir(settings))
    try:
        lock.acquire(settings.worker.instance)
    except WorkerAlreadyRunning as exc:
        raise AccordError(
            f"a worker of app {app_id!r} is running (pid {exc.holder}): stop it first"
        ) from exc
    try:
        return _reset(settings, progress)
    finally:
        lock.release()


def _reset(settings: AccordSettings, progress: Progress) -> ResetReport:
    app_id = settings.worker.app_id
    report = ResetReport()
    admin = AdminClient(settings.kafka_config())

    existing = admin.list_topics(timeout=10).topics
    ours = {spec.name for spec in accord_topics(settings)}
    ours |= {name for name in existing if name.startswith(f"{app_id}-")}  # Faust's own
    report.topics = sorted(ours & set(existing))
    if report.topics:
        progress(f"deleting {len(report.topics)} topics")
        for name, future in admin.delete_topics(report.topics, operation_timeout=30).items():
            try:
                future.result(30)
            except KafkaException as exc:
                raise AccordError(f"kafka: cannot delete topic {name}: {exc}") from exc

    groups = [
        app_id,
        ingest_group(settings),
        emit_group(settings),
        *(sink_group(settings, t) for t in sink_targets(settings)),
    ]
    listed = {g.group_id for g in admin.list_consumer_groups().result(30).valid}
    report.groups = [g for g in groups if g in listed]
    if report.groups:
        progress(f"deleting consumer groups {', '.join(report.groups)}")
        for future in admin.delete_consumer_groups(report.groups).values():
            future.result(30)

    report.redis_keys = delete_redis_keys(settings, settings.worker.redis_prefix)
    progress(f"deleted {report.redis_keys} Redis keys under {settings.worker.redis_prefix!r}")

    shutil.rmtree(data_dir(settings), ignore_errors=True)
    marker = data_dir(settings)
    marker.with_name(marker.name + ".running").unlink(missing_ok=True)

    for target, spec in load_sinks(settings.connectors_dir).items():
        if spec.kind is SinkKind.SQL:
            report.ledger_rows[target] = _clear_ledger(settings, target, app_id)
    return report


def delete_redis_keys(settings: AccordSettings, prefix: str) -> int:
    """Unlink every key starting with `prefix`, a thousand at a time; how many there were."""
    from streams.app import redis_client

    client = redis_client(settings)
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def _clear_ledger(settings: AccordSettings, target: str, app_id: str) -> int:
    statement = f"DELETE FROM {LEDGER_TABLE} WHERE app = %s"
    if target == "billing":
        with mariadb(settings) as conn, conn.cursor() as cur:
            cur.execute(f"SHOW TABLES LIKE '{LEDGER_TABLE}'")
            if cur.fetchone() is None:
                return 0
            return cur.execute(statement, (app_id,))
    with postgres(settings, target) as conn:
        if conn.execute("SELECT to_regclass(%s)", (LEDGER_TABLE,)).fetchone()[0] is None:
            return 0
        return conn.execute(statement, (app_id,)).rowcount
