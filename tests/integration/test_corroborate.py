"""Corroboration that arrives after the row, on the real broker, registry and Redis: a
support sign-up held for review against a billing account (no name there to compare) is
linked once the customer's CRM row (a similar name) joins that record, with its kept
change replayed; a stranger held on the same record stays held."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from streams.corroborate import CORROBORATED_BY, HoldRescorer
from streams.identity import HoldReason
from streams.review import reviewer_of
from streams.rules import load_rules
from streams.settings import AccordSettings
from tests.integration.test_review import App
from tests.support import isolated

pytestmark = pytest.mark.integration


@pytest.fixture
def app(stack: AccordSettings) -> Any:
    app = App(isolated(stack))
    try:
        yield app
    finally:
        app.close()


def _golden_of(app: App, system: str, key: str) -> str | None:
    found = app.client.get(f"{app.prefix}xref:{system}:{key}")
    return found.decode() if found else None


def test_a_hold_is_linked_once_a_later_row_corroborates_it(app: App) -> None:
    tag = uuid.uuid4().hex[:8]
    email = f"ada-{tag}@example.com"
    account, customer = f"AC-{tag}", int(tag, 16) % 1_000_000_000
    herself, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    policy = load_rules(app.settings.worker.rules_file).identity.matching
    rescorer = HoldRescorer(app.client, app.prefix, policy, lambda: reviewer_of(app.settings))

    # Billing first: its account names a company, not a person.
    app.raw.write_row("billing-c", account, contact_email=email, phone="+44 20 7946 0999")
    app.ingest()
    account_gid = _golden_of(app, "billing", account)
    assert account_gid is not None

    # Her support sign-up (no phone) and a stranger's: nothing to corroborate either yet.
    app.raw.write_row("support-c", herself, email=email, display_name="Ada Lovelace", phone=None)
    app.raw.write_row("support-c", stranger, email=email, display_name="Mallory Jones", phone=None)
    app.ingest()
    assert app.held() == {f"support:{herself}", f"support:{stranger}"}
    kept = app.review_records()[f"support:{herself}"]
    assert kept.hold["reason"] == HoldReason.REVIEW.value
    assert kept.hold["golden_id"] == account_gid
    assert kept.hold["entry"]  # the row's own profile entry, for scoring again
    assert rescorer.step() == []  # the record still has no name to compare

    # Her CRM row joins the account's record (CRM's email is trusted): now her name does.
    app.raw.write_row(
        "crm-c", customer, email=email, first_name="Ada", last_name="Lovelace",
        phone="020 7946 0142",
    )  # fmt: skip
    app.ingest()
    assert _golden_of(app, "crm", str(customer)) == account_gid

    decided = rescorer.step()
    assert [(d.link, d.golden_id, d.replayed) for d in decided] == [
        (f"support:{herself}", account_gid, True)
    ]
    assert _golden_of(app, "support", herself) == account_gid
    assert app.held() == {f"support:{stranger}"}  # the stranger's name corroborates nothing
    replayed = [c for c in app.changes() if c.source_key == herself]
    assert [c.golden_id for c in replayed] == [account_gid]
    assert replayed[0].change_id == kept.change.change_id
    record = app.review_records()[f"support:{herself}"]
    assert (record.kind, record.decision, record.by) == ("decision", "accept", CORROBORATED_BY)

    # Scoring again changes nothing more: the stranger's hold is as it was.
    app.raw.write_row("support-u", stranger, email=email, display_name="Mallory Jones")
    app.ingest()
    assert rescorer.step() == []
    assert app.held() == {f"support:{stranger}"}


def test_a_sweep_indexes_holds_the_index_does_not_know(app: App) -> None:
    """Holds made before the index existed, or restored from the review topic after Redis
    lost its keys, are found by the sweep the worker runs at start."""
    tag = uuid.uuid4().hex[:8]
    email = f"grace-{tag}@example.com"
    account, customer, herself = f"AC-{tag}", int(tag, 16) % 1_000_000_000, str(uuid.uuid4())
    policy = load_rules(app.settings.worker.rules_file).identity.matching
    rescorer = HoldRescorer(app.client, app.prefix, policy, lambda: reviewer_of(app.settings))
    app.raw.write_row("billing-c", account, contact_email=email)
    app.ingest()
    account_gid = _golden_of(app, "billing", account)
    app.raw.write_row("support-c", herself, email=email, display_name="Grace Hopper", phone=None)
    app.ingest()
    assert app.held() == {f"support:{herself}"}
    app.client.delete(f"{app.prefix}held-for:{account_gid}", f"{app.prefix}rescore")

    app.raw.write_row("crm-c", customer, email=email, first_name="Grace", last_name="Hopper")
    app.ingest()
    assert rescorer.step() == []  # the index lost the hold: nothing asks for it
    assert rescorer.sweep() >= 1
    assert [d.link for d in rescorer.step()] == [f"support:{herself}"]
    assert _golden_of(app, "support", herself) == account_gid
