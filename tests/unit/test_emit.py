"""What the merge decides to send each target, and the records emit makes of a revision."""

from __future__ import annotations

import itertools
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from streams.emit import outputs, plan_sinks, repair
from streams.merge import GoldenState, apply, dumps, loads, stage
from streams.model import Change, Op
from streams.projection import load_sinks
from streams.rules import DeletePolicy, Rules, default_rules

RULES = default_rules()
SINKS = load_sinks(Path(__file__).resolve().parents[2] / "connectors")
_positions = itertools.count(1)


def change(system: str, key: str, ts: int, op: Op = Op.UPSERT, **values: object) -> Change:
    position = f"p{next(_positions):08d}"
    return Change(f"{system}|{key}|{position}", system, key, op, ts, position, values)


def merge(state: GoldenState, c: Change, rules: Rules = RULES) -> list:
    outcome = apply(state, c, rules)
    orders = plan_sinks(state, c, SINKS, rules) if outcome.state_changed else []
    stage(state, c, outcome, orders)
    return orders


def test_a_new_crm_customer_is_created_in_support_but_not_in_billing() -> None:
    state = GoldenState("g")
    orders = merge(state, change("crm", "1", 1, email="a@x.io", first_name="Ada",
                                 last_name="Lovelace", phone="+442079460001"))  # fmt: skip
    assert [(o.target, o.op, o.target_key) for o in orders] == [("support", Op.UPSERT, None)]
    (create,) = orders
    assert set(create.changed) == {"email", "first_name", "last_name", "phone"}
    assert "company" not in create.values  # data minimisation: support's fields only


def test_a_pending_create_is_not_sent_twice_for_the_same_projection() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io"))
    assert merge(state, change("crm", "1", 2, segment="smb")) == []  # support gets no segment
    again = merge(state, change("crm", "1", 3, email="b@x.io"))
    assert [(o.target, o.target_key) for o in again] == [("support", None)]


def test_the_system_that_made_a_change_gets_no_echo_of_it() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io"))
    merge(state, change("support", "u-1", 2, email="a@x.io"))  # the create, echoed back
    orders = merge(state, change("support", "u-1", 3, email="new@x.io"))
    assert [(o.target, o.target_key, o.changed) for o in orders] == [("crm", "1", ("email",))]
    # crm applies it; its echo changes nothing and sends nothing anywhere.
    assert merge(state, change("crm", "1", 4, email="new@x.io")) == []


def test_an_edit_that_loses_is_corrected_in_its_own_system() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", first_name="Ada"))
    merge(state, change("support", "u-1", 2, email="a@x.io", first_name="Ada"))
    orders = merge(state, change("support", "u-1", 3, first_name="Adeline"))  # crm has priority
    assert [(o.target, o.target_key, o.changed) for o in orders] == [
        ("support", "u-1", ("first_name",))
    ]
    assert orders[0].values["first_name"] == "Ada"


def test_a_lossy_round_trip_is_resent_only_when_the_row_reports_again() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", first_name="Mary", last_name="Smith Jones"))
    # support splits "Mary Smith Jones" its own way: it can never hold the golden names.
    first = merge(state, change("support", "u-1", 2, email="a@x.io", first_name="Mary Smith",
                                last_name="Jones"))  # fmt: skip
    assert [o.target for o in first] == ["support"]
    # A change elsewhere with the same projection does not resend it...
    assert merge(state, change("crm", "1", 3, segment="smb")) == []
    # ...the row reporting again does: its applier then finds nothing to write.
    again = merge(state, change("support", "u-1", 4, first_name="Mary Smith", last_name="Jones"))
    assert [o.target for o in again] == ["support"]


def test_propagate_deletes_every_other_row_once() -> None:
    rules = Rules(RULES.fields, RULES.priority, DeletePolicy.PROPAGATE, RULES.match)
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io"), rules)
    merge(state, change("billing", "AC-1", 2, email="a@x.io"), rules)
    merge(state, change("support", "u-1", 3, email="a@x.io"), rules)
    orders = merge(state, change("crm", "1", 4, op=Op.DELETE), rules)
    assert sorted((o.target, o.op, o.target_key) for o in orders) == [
        ("billing", Op.DELETE, "AC-1"),
        ("support", Op.DELETE, "u-1"),
    ]
    assert merge(state, change("billing", "AC-1", 5, op=Op.DELETE), rules) == []


def test_deactivate_sends_no_delete_and_recreates_nothing() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io"))
    merge(state, change("support", "u-1", 2, email="a@x.io"))
    assert merge(state, change("support", "u-1", 3, op=Op.DELETE)) == []
    assert not state.active
    assert merge(state, change("crm", "1", 4, email="b@x.io")) == []  # support row is gone


def test_a_revision_emits_sink_events_and_only_changed_records() -> None:
    state = GoldenState("g")
    merge(state, change("billing", "AC-1", 1, email="a@x.io", credit_limit=Decimal("10.00")))
    merge(state, change("crm", "1", 2, email="a@x.io"))  # echo-free: nothing changes
    merge(state, change("crm", "1", 3, email="b@x.io"))
    result = outputs(loads(dumps(state)), now_ms=0)
    assert result.golden is not None and result.golden["fields"]["email"] == "b@x.io"
    assert [a["field"] for a in result.audit] == ["email"]
    targets = {e["target"]: e for e in result.sinks}
    assert set(targets) == {"billing", "support"}
    billing = targets["billing"]
    assert billing["target_key"] == "AC-1" and billing["changed"] == ["email"]
    assert billing["golden_version"] == state.revision
    assert billing["fields"]["credit_limit"] is None  # not billing's to receive back
    assert billing["source_ts"] is not None and billing["caused_by"] == state.caused_by


def test_the_emitters_lean_read_of_a_state_gives_the_same_outputs() -> None:
    state = GoldenState("g")
    merge(state, change("billing", "AC-1", 1, email="a@x.io", credit_limit=Decimal("10.00")))
    merge(state, change("support", "u-1", 2, email="b@x.io", first_name="Ada"))
    lean = loads(dumps(state), cells=False)
    assert all(not row.cells for row in lean.contributions.values()) and not lean.sent_values
    assert outputs(lean, now_ms=5) == outputs(loads(dumps(state)), now_ms=5)


def test_a_revision_without_golden_changes_emits_no_golden_record() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", first_name="Ada"))
    merge(state, change("support", "u-1", 2, email="a@x.io", first_name="Ada"))
    merge(state, change("support", "u-1", 3, first_name="Adeline"))  # loses: correction only
    result = outputs(state, now_ms=0)
    assert result.golden is None and result.audit == []
    assert [e["target"] for e in result.sinks] == ["support"]


def test_an_update_says_what_the_row_held_when_it_was_planned() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io"))
    merge(state, change("support", "u-1", 2, email="a@x.io"))
    (order,) = merge(state, change("support", "u-1", 3, email="b@x.io"))
    assert (order.target, order.changed, order.expected) == ("crm", ("email",), {"email": "a@x.io"})
    (create,) = merge(GoldenState("h"), change("crm", "2", 1, email="c@x.io"))
    assert create.expected is None


def test_an_echo_of_accord_s_own_write_does_not_outvote_a_newer_edit() -> None:
    """crm's value is written into support; billing edits in between; support's echo
    (committed last) must not bring crm's older value back."""
    state = GoldenState("g")
    merge(state, change("billing", "AC-1", 1, email="a@x.io", phone="+1"))
    merge(state, change("support", "u-1", 2, email="a@x.io", phone="+1"))
    orders = merge(state, change("crm", "1", 3, email="a@x.io", phone="+3"))
    assert {o.target for o in orders} == {"support", "billing"}
    merge(state, change("billing", "AC-1", 4, phone="+4"))  # a newer edit, in billing
    merge(state, change("support", "u-1", 5, phone="+3"))  # the echo of Accord's write
    assert state.values()["phone"] == "+4"
    assert state.contributions["support:u-1"].cells["phone"].echo


def test_a_value_a_row_holds_of_its_own_still_competes() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", phone="+1"))
    merge(state, change("support", "u-1", 2, email="a@x.io", phone="+1"))
    merge(state, change("support", "u-1", 3, phone="+9"))  # a user's own edit
    assert state.values()["phone"] == "+9"
    assert not state.contributions["support:u-1"].cells["phone"].echo


def test_a_late_echo_of_a_long_superseded_write_is_still_an_echo() -> None:
    """An applier stalled by a broker restart writes support's queued revisions late:
    the echo of a value sent many revisions ago arrives last, with the newest commit time,
    and must not bring that value back (the Kafka restart scenario of `make chaos`)."""
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", phone="+1"))
    merge(state, change("support", "u-1", 2, email="a@x.io", phone="+1"))
    for ts in range(3, 13):  # ten crm edits, each sent to support, none applied yet
        merge(state, change("crm", "1", ts, phone=f"+{ts}"))
    merge(state, change("support", "u-1", 13, phone="+3"))  # the first of them, echoed
    assert state.values()["phone"] == "+12"
    assert state.contributions["support:u-1"].cells["phone"].echo
    merge(state, change("support", "u-1", 14, phone="+12"))  # the last, echoed
    assert state.values()["phone"] == "+12"


def test_echoes_of_a_value_sent_twice_are_each_recognised() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", phone="+1"))
    merge(state, change("support", "u-1", 2, email="a@x.io", phone="+1"))
    for ts, phone in ((3, "+2"), (4, "+3"), (5, "+2")):  # A, B, A sent to support
        merge(state, change("crm", "1", ts, phone=phone))
    for ts, phone in ((6, "+2"), (7, "+3"), (8, "+2")):  # and echoed back in that order
        merge(state, change("support", "u-1", ts, phone=phone))
        assert state.contributions["support:u-1"].cells["phone"].echo, phone
    assert state.values()["phone"] == "+2"


def created(system: str, key: str, **values: object) -> Change:
    """The applier's report of the row it creates (`streams.sinks`)."""
    return replace(change(system, key, 1, **values), created=True)


@pytest.mark.parametrize("report_first", [True, False])
def test_the_echo_of_a_created_row_is_recognised_by_its_key(report_first: bool) -> None:
    state = GoldenState("g")
    (create,) = merge(state, change("crm", "1", 1, email="a@x.io", first_name="Ada"))
    assert create.target == "support" and create.target_key is None
    report = created("support", "u-new", email="a@x.io", first_name="Ada")
    echo = change("support", "u-new", 2, email="a@x.io", first_name="Ada")
    for c in (report, echo) if report_first else (echo, report):
        merge(state, c)
    cells = state.contributions["support:u-new"].cells
    assert cells["email"].echo and cells["first_name"].echo
    assert state.golden["email"].system == "crm"  # the echo does not compete


def test_a_row_someone_else_made_with_the_planned_values_is_not_an_echo() -> None:
    """A pending create is no licence to read any new row of that system as its echo."""
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", first_name="Ada"))  # create planned
    merge(state, change("support", "u-own", 2, email="a@x.io", first_name="Ada"))
    cells = state.contributions["support:u-own"].cells
    assert not cells["email"].echo and not cells["first_name"].echo
    assert state.golden["email"].system == "support"  # its own, later, opinion


def observed(system: str, key: str, **values: object) -> Change:
    """A repair request: what reconcile read in the row, not an edit."""
    return replace(change(system, key, 10**9, **values), observed=True)


def test_a_repair_request_corrects_the_row_it_observed_without_moving_the_golden_record() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", company="Acme"))
    merge(state, change("billing", "AC-1", 2, email="a@x.io", company="Acme"))
    before, version, revision = state.values(), state.version, state.revision
    # Someone changed the billing row and its binlog did not carry it: the cells still
    # say "Acme", the row holds "Evil Corp".
    outcome = repair(state, observed("billing", "AC-1", email="a@x.io", company="Evil Corp"),
                     SINKS, RULES)  # fmt: skip
    assert outcome.state_changed and not outcome.new_version
    assert state.values() == before and state.version == version
    assert state.revision == revision + 1
    [order] = state.outbox
    assert (order.target, order.op, order.target_key, order.changed) == (
        "billing", Op.UPSERT, "AC-1", ("company",)
    )  # fmt: skip
    assert order.values["company"] == "Acme" and order.expected == {"company": "Evil Corp"}
    assert outputs(state, now_ms=0).golden is None  # a correction, not a new version
    # The corrected row's CDC echo repeats the row's own value: it still competes, and
    # the golden record neither moves nor sends anything.
    assert merge(state, change("billing", "AC-1", 3, company="Acme")) == []
    assert state.values() == before and state.golden["company"].system == "billing"


def test_a_repair_request_for_a_row_in_accord_or_unknown_plans_nothing() -> None:
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io", company="Acme"))
    merge(state, change("billing", "AC-1", 2, email="a@x.io", company="Acme"))
    revision = state.revision
    in_accord = observed("billing", "AC-1", email="a@x.io", company="Acme")
    assert not repair(state, in_accord, SINKS, RULES).state_changed
    assert not repair(state, observed("billing", "AC-9", company="X"), SINKS, RULES).state_changed
    assert state.revision == revision


def test_a_repair_request_deletes_a_row_that_propagate_already_deleted_everywhere() -> None:
    rules = Rules(RULES.fields, RULES.priority, DeletePolicy.PROPAGATE, RULES.match)
    state = GoldenState("g")
    merge(state, change("crm", "1", 1, email="a@x.io"), rules)
    merge(state, change("support", "u-1", 2, email="a@x.io"), rules)
    merge(state, change("crm", "1", 3, op=Op.DELETE), rules)
    merge(state, change("support", "u-1", 4, op=Op.DELETE), rules)
    # The support row came back behind the pipeline's back (a restore from backup).
    state.contributions["support:u-1"].alive = True
    repair(state, observed("support", "u-1", email="a@x.io"), SINKS, rules)
    assert [(o.target, o.op, o.target_key) for o in state.outbox] == [("support", Op.DELETE, "u-1")]
