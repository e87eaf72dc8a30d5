"""The demo job: seed the sample systems, change a row in each, watch it arrive decoded.

At this stage of Accord the main job is the capture half of the data path: a change
committed in CRM, billing or support must appear on its raw topic as a Debezium
envelope that decodes through the schema registry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from streams.connect import SYSTEMS, ConnectClient, load_connector
from streams.errors import AccordError
from streams.samples import SampleGenerator
from streams.settings import AccordSettings
from streams.sources import insert_rows, mariadb, postgres
from streams.stack.process import wait_until
from streams.topics import RAW_TOPICS, DecodedMessage, RawTopicReader

Progress = Callable[[str], None]


def apply_connectors(
    settings: AccordSettings, systems: list[str] | None = None, wait_s: float = 90.0
) -> list[dict[str, object]]:
    """Create or update each connector from its file and wait until its task runs."""
    client = ConnectClient(settings.connect)
    files = [load_connector(settings.connectors_dir, system) for system in systems or SYSTEMS]
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
