"""A steady load of source edits for the fault suite, and the oracle it is judged by.

The load edits a fixed set of customers from one thread, one committed edit at a time, at
a fixed rate. Each edit writes a value never written before, already in canonical form,
so the oracle can fold the edit log through the survivorship rules with the real
`streams.merge.fold`, ordered by commit (the edits are sequential, so commit order is
the order they were made). The oracle knows nothing of Kafka, Redis or crashes: the
pipeline must end where a single-threaded fold of the same edits ends.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streams.merge import fold
from streams.model import Change, Op
from streams.rules import Rules
from streams.settings import AccordSettings
from streams.sources import mariadb, postgres


@dataclass(frozen=True)
class Edit:
    seq: int
    system: str
    key: str
    field: str  # canonical field
    value: str


@dataclass
class Customer:
    email: str
    crm_id: str
    billing_no: str | None = None
    support_id: str | None = None  # the row Accord creates in support, once linked


# (system, canonical field, column) the load edits, and who may edit it.
SLOTS = (
    ("crm", "segment", "segment"),  # owner crm
    ("crm", "phone", "phone"),  # lww, contested with support and billing
    ("support", "phone", "phone"),
    ("support", "support_tier", "tier"),  # owner support
    ("billing", "phone", "phone"),
    ("billing", "company", "legal_name"),  # priority billing > crm
    ("crm", "company", "company"),
)
ORACLE_FIELDS = ("segment", "phone", "support_tier", "company")


@dataclass
class Load:
    settings: AccordSettings
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    customers: list[Customer] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    # -- set-up -------------------------------------------------------------------------

    def create(self, count: int, with_billing: int) -> None:
        """`count` CRM customers; the first `with_billing` also get a billing account."""
        for n in range(count):
            email = f"chaos{n}-{self.tag}@example.com"
            with postgres(self.settings, "crm") as conn:
                (crm_id,) = conn.execute(
                    "INSERT INTO customers (first_name, last_name, email, country) "
                    "VALUES ('Chaos', %s, %s, 'GB') RETURNING id",
                    (f"N{n}", email),
                ).fetchone()
            customer = Customer(email, str(crm_id))
            if n < with_billing:
                customer.billing_no = f"C-{self.tag}-{n}"
                with mariadb(self.settings) as conn, conn.cursor() as cur:
                    cur.execute(
                        "INSERT INTO accounts (account_no, legal_name, contact_email, "
                        "billing_country) VALUES (%s, %s, %s, 'GB')",
                        (customer.billing_no, f"Chaos Ltd {n}", email),
                    )
            self.customers.append(customer)

    def link_support_rows(self) -> bool:
        """True once Accord has created every customer's support row."""
        emails = [c.email for c in self.customers]
        with postgres(self.settings, "support") as conn:
            rows = dict(
                conn.execute(
                    "SELECT email, id::text FROM users WHERE email = ANY(%s)", (emails,)
                ).fetchall()
            )
        for customer in self.customers:
            customer.support_id = rows.get(customer.email)
        return all(c.support_id for c in self.customers)

    # -- the load -----------------------------------------------------------------------

    def edit_once(self) -> Edit | None:
        customer = self.rng.choice(self.customers)
        system, name, column = self.rng.choice(SLOTS)
        if system == "billing" and customer.billing_no is None:
            return None
        seq = len(self.edits) + 1
        if name == "phone":
            value = f"+4420794{seq % 100000:05d}"
        elif name == "company":
            value = f"{system.title()} {self.tag} {seq}"
        else:
            value = f"{name[:4]}-{seq}"
        key = {"crm": customer.crm_id, "support": customer.support_id,
               "billing": customer.billing_no}[system]  # fmt: skip
        assert key is not None
        if system == "billing":
            with mariadb(self.settings) as conn, conn.cursor() as cur:
                cur.execute(
                    f"UPDATE accounts SET {column} = %s WHERE account_no = %s", (value, key)
                )
        else:
            table, pk = ("customers", "id") if system == "crm" else ("users", "id")
            with postgres(self.settings, system) as conn:
                conn.execute(
                    f"UPDATE {table} SET {column} = %s WHERE {pk}::text = %s", (value, key)
                )
        edit = Edit(seq, system, key, name, value)
        self.edits.append(edit)
        return edit

    def run(self, stop: threading.Event, rate_per_s: float) -> None:
        """Edit at `rate_per_s` until `stop`; a failed edit (a source down) is retried."""
        interval = 1.0 / rate_per_s
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                self.edit_once()
            except Exception as exc:  # the fault may be in a source: keep going
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))

    # -- the oracle ---------------------------------------------------------------------

    def expected(self, rules: Rules) -> dict[str, dict[str, Any]]:
        """Email -> the golden values a single-threaded fold of every edit gives."""
        by_link: dict[str, str] = {}
        for customer in self.customers:
            rows = (
                ("crm", customer.crm_id),
                ("support", customer.support_id),
                ("billing", customer.billing_no),
            )
            for system, key in rows:
                if key is not None:
                    by_link[f"{system}:{key}"] = customer.email
        changes: dict[str, list[Change]] = {c.email: [] for c in self.customers}
        for customer in self.customers:
            # The rows as created: CRM's email, and billing's company.
            changes[customer.email].append(
                Change(
                    "crm-create",
                    "crm",
                    customer.crm_id,
                    Op.UPSERT,
                    0,
                    "0",
                    {"email": customer.email},
                )
            )
            if customer.billing_no is not None:
                n = self.customers.index(customer)
                changes[customer.email].append(
                    Change(
                        "billing-create",
                        "billing",
                        customer.billing_no,
                        Op.UPSERT,
                        0,
                        "0",
                        {"company": f"Chaos Ltd {n}"},
                    )
                )
        for edit in self.edits:
            email = by_link[f"{edit.system}:{edit.key}"]
            changes[email].append(
                Change(
                    f"edit-{edit.seq}",
                    edit.system,
                    edit.key,
                    Op.UPSERT,
                    edit.seq,
                    f"{edit.seq:012d}",
                    {edit.field: edit.value},
                )
            )
        return {
            email: {name: state.values().get(name) for name in ORACLE_FIELDS}
            for email, state in ((email, fold(email, log, rules)) for email, log in changes.items())
        }


def scrape(settings: AccordSettings, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of some counters from a worker's /metrics (0 when it does not answer)."""
    url = f"http://{settings.worker.web_host}:{settings.worker.port}/metrics"
    totals = dict.fromkeys(names, 0.0)
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            text = response.read().decode()
    except OSError:
        return totals
    for line in text.splitlines():
        for name in names:
            if line.startswith(name) and not line.startswith("#"):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def every(
    interval_s: Callable[[], float], stop: threading.Event, action: Callable[[], None]
) -> None:
    """Run `action` after each `interval_s()` until `stop`."""
    while not stop.wait(interval_s()):
        action()
