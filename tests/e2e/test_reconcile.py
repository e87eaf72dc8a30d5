"""`accord reconcile` on the real stack: a target row changed while the pipeline is
stopped shows as drift, field by field; the rest is in accord. `--repair` corrects a row
whose change the source log never carried, through the merge."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from streams.settings import AccordSettings
from streams.sources import mariadb, postgres
from streams.stack.components import MariaDB, StackPaths
from streams.stack.process import wait_until
from streams.workers import WorkerProcess
from tests.support import TopicTail, accord, drained, isolated, latest_by_key, running_worker

pytestmark = pytest.mark.e2e
SYSTEMS = ("--system", "crm", "--system", "support")  # billing: this test leaves it alone


@pytest.fixture
def worker(connectors: AccordSettings) -> Iterator[tuple[AccordSettings, WorkerProcess]]:
    """A worker with its appliers, on topics and groups of its own."""
    settings = isolated(connectors)
    with running_worker(settings) as process:
        yield settings, process


def reconcile(
    settings: AccordSettings, *args: str, systems: tuple[str, ...] = SYSTEMS
) -> tuple[int, dict[str, dict[str, Any]]]:
    result = accord(settings, "reconcile", "--json", *systems, *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, {card["target"]: card for card in json.loads(result.stdout)}


def test_reconcile_reports_a_target_row_changed_while_the_pipeline_is_stopped(
    worker: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, process = worker
    email = f"drift-{uuid.uuid4().hex[:8]}@example.com"
    golden = TopicTail(settings, settings.topics.golden)
    with postgres(settings, "crm") as conn:
        conn.execute(
            "INSERT INTO customers (first_name, last_name, email, country) "
            "VALUES ('Ada', 'Lovelace', %s, 'GB')",
            (email,),
        )

    def in_support(records: list[Any]) -> bool:
        ours = [r for r in latest_by_key(records).values() if r["fields"]["email"] == email]
        return bool(ours) and any(link["system"] == "support" for link in ours[0]["links"])

    # The support applier creates the user; its CDC echo links it to the golden record.
    assert golden.wait_for(in_support, 120)
    assert wait_until(lambda: drained(settings), 90)
    [record] = [r for r in latest_by_key(golden.records).values() if r["fields"]["email"] == email]

    status, cards = reconcile(settings)
    assert status == 0, cards
    assert cards["support"]["in_accord"] == 1 and cards["crm"]["in_accord"] == 1

    process.stop()  # the pipeline is stopped: nothing will correct the row
    with postgres(settings, "support") as conn:
        conn.execute("UPDATE users SET display_name = 'Grace Hopper' WHERE email = %s", (email,))

    status, cards = reconcile(settings)
    assert status == 1
    support = cards["support"]
    assert (support["checked"], support["drifted"], support["missing"]) == (1, 1, 0)
    [drift] = support["drifts"]
    assert (drift["golden_id"], drift["field"]) == (record["golden_id"], "display_name")
    assert (drift["golden"], drift["target_value"]) == ("Ada Lovelace", "Grace Hopper")
    assert (cards["crm"]["drifted"], cards["crm"]["in_accord"]) == (0, 1)


def edit_behind_the_binlog(settings: AccordSettings, statement: str, *params: object) -> None:
    """An edit the source log never carries (`sql_log_bin = 0`, as a hand fix or a restore
    would be): only reconcile can see it, and nothing in the pipeline will correct it."""
    server = MariaDB(settings, StackPaths(settings.stack.state_dir.resolve()))
    root = settings.stack.mariadb_root_password.get_secret_value()
    with pymysql.connect(
        unix_socket=str(server.socket),
        user="root",
        password=root,
        database=settings.billing.database,
        autocommit=True,
    ) as conn, conn.cursor() as cur:  # fmt: skip
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute(statement, params)
        assert cur.rowcount == 1


def billing_company(settings: AccordSettings, account_no: str) -> str:
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT legal_name FROM accounts WHERE account_no = %s", (account_no,))
        return cur.fetchone()[0]


def test_repair_corrects_a_row_whose_change_the_source_log_never_carried(
    worker: tuple[AccordSettings, WorkerProcess],
) -> None:
    settings, process = worker
    tag = uuid.uuid4().hex[:8]
    account_no, email = f"R-{tag}", f"repair-{tag}@example.com"
    golden = TopicTail(settings, settings.topics.golden)
    with mariadb(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO accounts (account_no, legal_name, contact_email, billing_country) "
            "VALUES (%s, 'Acme Ltd', %s, 'GB')",
            (account_no, email),
        )

    def linked(records: list[Any]) -> bool:
        return any(r["fields"]["email"] == email for r in latest_by_key(records).values())

    assert golden.wait_for(linked, 120)
    assert wait_until(lambda: drained(settings), 90)
    billing = ("--system", "billing")
    status, cards = reconcile(settings, systems=billing)
    assert status == 0 and cards["billing"]["drifted"] == 0, cards

    process.stop()
    edit_behind_the_binlog(
        settings, "UPDATE accounts SET legal_name = 'Evil Corp' WHERE account_no = %s", account_no
    )
    process.start()
    assert wait_until(lambda: drained(settings), 90)
    status, cards = reconcile(settings, systems=billing)
    assert status == 1  # the pipeline ran, and did not see it
    [drift] = cards["billing"]["drifts"]
    assert (drift["key"], drift["field"]) == (account_no, "legal_name")
    assert (drift["golden"], drift["target_value"]) == ("Acme Ltd", "Evil Corp")

    golden.read_to_end()  # the record as it stands before the repair
    [before] = [r for r in latest_by_key(golden.records).values() if r["fields"]["email"] == email]
    status, cards = reconcile(settings, "--repair", systems=billing)
    assert status == 0 and cards["billing"]["repairs_requested"] == 1, cards
    assert wait_until(lambda: billing_company(settings, account_no) == "Acme Ltd", 60)
    assert wait_until(lambda: drained(settings), 90)
    status, cards = reconcile(settings, systems=billing)
    assert status == 0 and cards["billing"]["drifted"] == 0, cards
    # The repair corrected the row and moved no golden value: the record's version is the
    # one it had before, and its company is still the one billing first reported.
    golden.read_to_end()
    [record] = [r for r in latest_by_key(golden.records).values() if r["fields"]["email"] == email]
    assert record["fields"]["company"] == "Acme Ltd"
    assert record["version"] == before["version"]
