"""Merging two golden records (`accord merge GOLDEN_A GOLDEN_B`): `absorb` and `retire`.

The survivor must end up as if every row of both records had been linked to it from the
start (the oracle: one fold of every change), a repeated merge must change nothing, and
Accord's own writes into the loser's target rows must still come back as echoes.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.emit import plan_sinks
from streams.errors import AccordError
from streams.merge import (
    ECHO_MEMORY,
    STATE_FORMAT,
    GoldenState,
    MergeError,
    absorb,
    apply,
    dumps,
    fold,
    loads,
    retire,
    stage,
)
from streams.model import Change, Op
from streams.projection import load_sinks
from streams.rules import load_rules

CONNECTORS = Path(__file__).resolve().parents[2] / "connectors"
RULES = load_rules(CONNECTORS / "survivorship.yaml")
SINKS = load_sinks(CONNECTORS)
_positions = itertools.count(1)


def change(
    system: str,
    key: str = "1",
    ts: int = 1_000,
    op: Op = Op.UPSERT,
    position: str | None = None,
    **values: object,
) -> Change:
    position = position or f"p{next(_positions):08d}"
    return Change(
        change_id=f"{system}|{key}|{position}",
        system=system,
        source_key=key,
        op=op,
        source_ts=ts,
        position=position,
        values=values,
    )


def merged(state: GoldenState, *changes: Change) -> GoldenState:
    """As the merge agent does: merge each change, then plan and stage the targets' writes
    (which is what fills `sent` and `sent_values`)."""
    for c in changes:
        outcome = apply(state, c, RULES)
        if outcome.state_changed:
            stage(state, c, outcome, plan_sinks(state, c, SINKS, RULES))
    return state


def without_id(state: GoldenState) -> dict[str, object]:
    record = state.record()
    del record["golden_id"]
    return record


def cells(state: GoldenState) -> dict[str, dict[str, tuple[object, bool]]]:
    return {
        link: {name: (cell.value, cell.echo) for name, cell in sorted(row.cells.items())}
        for link, row in sorted(state.contributions.items())
    }


# ------------------------------------------------------------------------ absorb


def test_the_survivor_resolves_every_field_again_from_both_records_rows() -> None:
    survivor = fold(
        "g-a",
        [change("support", "u-1", ts=300, first_name="ada", email="ada@support.example",
                phone="+441", segment="enterprise")],
        RULES,
    )  # fmt: skip
    loser = fold(
        "g-b",
        [
            change("crm", "1", ts=200, first_name="Ada", email="ada@crm.example",
                   phone="+442", segment="smb"),
            change("billing", "AC-1", ts=150, tax_id="GB123", company="Ada Ltd",
                   credit_limit=Decimal("10.50")),
            change("crm", "1", ts=400, phone="+443"),
        ],
        RULES,
    )  # fmt: skip
    loser_bytes = dumps(loser)
    version = survivor.version

    outcome = absorb(survivor, loser, RULES)

    values = survivor.values()
    assert values["first_name"] == "Ada"  # priority: the loser's crm beats support
    assert survivor.golden["first_name"].system == "crm"
    assert values["email"] == "ada@support.example"  # lww: support's commit is the latest
    assert values["phone"] == "+443"  # lww: the loser's crm row committed later
    assert values["segment"] == "smb"  # owner crm: support's value never stood
    assert values["tax_id"] == "GB123"  # owner billing: only the loser had billing's row
    assert values["credit_limit"] == Decimal("10.50") and values["company"] == "Ada Ltd"
    assert sorted(survivor.contributions) == ["billing:AC-1", "crm:1", "support:u-1"]

    assert outcome.linked and outcome.new_version and outcome.state_changed
    assert outcome.rejected == ()
    assert {c.field: (c.before, c.after) for c in outcome.changed}["first_name"] == (
        "ada",
        "Ada",
    )
    assert survivor.version == version + 1
    assert survivor.last_changes == outcome.changed
    assert survivor.updated_ts == 400
    assert survivor.cause is not None
    assert (survivor.cause.system, survivor.cause.key) == ("accord", "merge:g-b")
    assert survivor.cause.order == (400, "merge", "merge:g-b:g-a")
    assert dumps(loser) == loser_bytes  # absorb leaves the loser to `retire`


def test_absorbing_the_same_loser_again_changes_nothing() -> None:
    survivor = fold("g-a", [change("crm", "1", ts=1, email="a@x.io")], RULES)
    loser = fold("g-b", [change("billing", "AC-1", ts=2, email="b@x.io", tax_id="T")], RULES)
    absorb(survivor, loser, RULES)
    before = dumps(survivor)
    again = absorb(survivor, loser, RULES)
    assert not again.state_changed and not again.new_version
    assert again.changed == () and not again.linked
    assert dumps(survivor) == before


def test_a_row_both_records_hold_keeps_each_field_s_latest_cell_and_lifecycle() -> None:
    survivor = fold(
        "g-a",
        [change("crm", "1", ts=100, email="old@x.io", first_name="Ada"),
         change("crm", "1", ts=300, first_name="Augusta"),
         change("billing", "AC-1", ts=50, company="X")],
        RULES,
    )  # fmt: skip
    loser = fold(
        "g-b",
        [change("crm", "1", ts=100, email="old@x.io", first_name="Ada"),
         change("crm", "1", ts=200, email="new@x.io"),
         change("crm", "1", ts=400, op=Op.DELETE)],
        RULES,
    )  # fmt: skip
    outcome = absorb(survivor, loser, RULES)
    assert survivor.values()["email"] == "new@x.io"  # the loser's cell is later
    assert survivor.values()["first_name"] == "Augusta"  # the survivor's cell is later
    row = survivor.contributions["crm:1"]
    assert not row.alive and row.lifecycle[0] == 400  # the loser's delete is later
    assert not survivor.active and outcome.status_changed
    assert not outcome.linked  # no row joined: both held crm:1


def test_the_loser_s_writes_into_its_target_rows_still_come_back_as_echoes() -> None:
    """The loser sent a new email to its support row; that row's CDC echo arrives after
    the merge, behind a newer edit in the survivor. It must not win as the latest commit."""

    def loser() -> GoldenState:
        return merged(
            GoldenState("g-b"),
            change("support", "u-1", ts=100, email="first@x.io"),
            change("crm", "7", ts=200, email="sent@x.io"),  # sent to support:u-1
        )

    assert loser().sent_values["support:u-1"]["email"] == ["sent@x.io"]

    def after_merge(carried: GoldenState) -> GoldenState:
        survivor = merged(GoldenState("g-a"), change("crm", "1", ts=150, email="a@x.io"))
        absorb(survivor, carried, RULES)
        merged(survivor, change("crm", "1", ts=300, email="newer@x.io"))
        # The applier's write of the loser's value, committed late in support.
        return merged(survivor, change("support", "u-1", ts=400, email="sent@x.io"))

    survivor = after_merge(loser())
    assert survivor.contributions["support:u-1"].cells["email"].echo
    assert survivor.values()["email"] == "newer@x.io"

    forgetful = loser()
    forgetful.sent_values = {}
    assert after_merge(forgetful).values()["email"] == "sent@x.io"  # why it is carried


def test_a_row_accord_created_for_the_loser_is_its_echo_in_the_survivor() -> None:
    planned = {"email": "planned@x.io", "first_name": "Planned"}
    report = replace(change("support", "u-acc", ts=0, position="created", **planned),
                     created=True)  # fmt: skip
    echo = change("support", "u-acc", ts=500, position="000001", **planned)

    # The report reached the loser; the row's echo arrives after the merge.
    loser = fold("g-b", [change("crm", "1", ts=100, email="crm@x.io"), report], RULES)
    survivor = fold("g-a", [change("billing", "AC-1", ts=50, first_name="Bill")], RULES)
    absorb(survivor, loser, RULES)
    assert survivor.created["support:u-acc"] == {"email": ["planned@x.io"],
                                                 "first_name": ["Planned"]}  # fmt: skip
    apply(survivor, echo, RULES)
    assert survivor.values()["email"] == "crm@x.io"
    assert survivor.values()["first_name"] == "Bill"

    # The echo reached the survivor first, the report the loser: the merge marks it.
    survivor = fold("g-a", [change("billing", "AC-1", ts=50, first_name="Bill"), echo], RULES)
    assert survivor.values()["first_name"] == "Planned"  # competing, for now
    outcome = absorb(survivor, fold("g-b", [report], RULES), RULES)
    assert survivor.contributions["support:u-acc"].cells["first_name"].echo
    assert survivor.values()["first_name"] == "Bill"
    assert outcome.changed and outcome.new_version


def test_the_loser_s_bookkeeping_joins_the_survivor_s() -> None:
    survivor = GoldenState(
        "g-a",
        sent={"support:u-1": "mine"},
        sent_values={"support:u-1": {"email": ["a", "b"]}},
        created={"support:u-2": {"email": ["c"]}},
    )
    loser = GoldenState(
        "g-b",
        sent={"support:u-1": "theirs", "billing:AC-1": "fp"},
        sent_values={
            "support:u-1": {"email": ["b", "x", "y", "x"]},
            "billing:AC-1": {"phone": ["+1"]},
        },
        created={"support:u-2": {"email": ["a", "c"], "phone": ["+2"]}},
    )
    outcome = absorb(survivor, loser, RULES)
    assert outcome.state_changed and not outcome.new_version  # nothing the record shows
    assert survivor.sent == {"support:u-1": "mine", "billing:AC-1": "fp"}
    assert survivor.sent_values == {
        "support:u-1": {"email": ["a", "b", "x", "y", "x"]},
        "billing:AC-1": {"phone": ["+1"]},
    }
    assert survivor.created == {"support:u-2": {"email": ["a", "c"], "phone": ["+2"]}}
    assert survivor.version == 0
    assert not absorb(survivor, loser, RULES).state_changed


def test_sent_values_keep_only_the_latest_echo_memory() -> None:
    survivor = GoldenState("g-a", sent_values={"r": {"f": [f"s{i}" for i in range(ECHO_MEMORY)]}})
    loser = GoldenState("g-b", sent_values={"r": {"f": ["l1", "l2"]}})
    absorb(survivor, loser, RULES)
    kept = survivor.sent_values["r"]["f"]
    assert len(kept) == ECHO_MEMORY and kept[-2:] == ["l1", "l2"] and kept[0] == "s2"
    assert not absorb(survivor, loser, RULES).state_changed


def test_a_tombstone_or_the_record_itself_cannot_be_absorbed() -> None:
    survivor = fold("g-a", [change("crm", "1", ts=1, email="a@x.io")], RULES)
    loser = fold("g-b", [change("billing", "AC-1", ts=2, email="b@x.io")], RULES)
    absorb(survivor, loser, RULES)
    retire(loser, "g-a")
    before = dumps(survivor)

    with pytest.raises(MergeError, match="merged into 'g-a'") as refused:
        absorb(survivor, loser, RULES)
    assert (refused.value.golden_id, refused.value.merged_into) == ("g-b", "g-a")
    assert isinstance(refused.value, AccordError)

    other = fold("g-c", [change("support", "u-1", ts=3, email="c@x.io")], RULES)
    with pytest.raises(MergeError) as into_a_tombstone:
        absorb(loser, other, RULES)
    assert (into_a_tombstone.value.golden_id, into_a_tombstone.value.merged_into) == (
        "g-b",
        "g-a",
    )

    with pytest.raises(MergeError, match="into itself") as itself:
        absorb(survivor, survivor, RULES)
    assert itself.value.golden_id == "g-a" and itself.value.merged_into is None
    assert dumps(survivor) == before


# ------------------------------------------------------------------------ retire


def test_the_loser_becomes_a_tombstone_pointing_at_the_survivor() -> None:
    loser = merged(
        GoldenState("g-b"),
        change("crm", "1", ts=100, email="b@x.io", first_name="Bea", segment=None),
        change("support", "u-1", ts=200, email="s@x.io"),
    )
    assert loser.sent_values  # something was sent to support:u-1
    version, updated_ts = loser.version, loser.updated_ts

    outcome = retire(loser, "g-a")

    assert loser.merged_into == "g-a"
    assert not loser.active
    assert loser.contributions == {} and loser.golden == {}
    assert loser.sent == {} and loser.sent_values == {} and loser.created == {}
    assert loser.version == version + 1 and loser.updated_ts == updated_ts
    assert [(c.field, c.before, c.after) for c in outcome.changed] == [
        ("email", "s@x.io", None),  # lww: support committed later
        ("first_name", "Bea", None),
    ]  # segment held None: it goes nowhere
    assert loser.last_changes == outcome.changed
    assert outcome.status_changed and loser.status_changed
    assert outcome.state_changed and outcome.new_version
    assert loser.cause is not None and loser.cause.order == (200, "merge", "merge:g-b:g-a")
    assert loser.record() == {
        "golden_id": "g-b",
        "active": False,
        "fields": {},
        "links": [],
        "merged_into": "g-a",
    }


def test_retiring_again_into_the_same_survivor_changes_nothing() -> None:
    loser = fold("g-b", [change("crm", "1", ts=1, email="b@x.io")], RULES)
    retire(loser, "g-a")
    before = dumps(loser)
    again = retire(loser, "g-a")
    assert not again.state_changed and not again.new_version and again.changed == ()
    assert dumps(loser) == before


def test_an_inactive_record_retires_without_flipping_its_status() -> None:
    loser = fold("g-b", [change("crm", "1", ts=1), change("crm", "1", ts=2, op=Op.DELETE)], RULES)
    outcome = retire(loser, "g-a")
    assert not outcome.status_changed and outcome.new_version  # its rows left it


def test_a_tombstone_cannot_be_retired_into_another_record_nor_a_record_into_itself() -> None:
    loser = fold("g-b", [change("crm", "1", ts=1, email="b@x.io")], RULES)
    with pytest.raises(MergeError, match="into itself"):
        retire(loser, "g-b")
    retire(loser, "g-a")
    before = dumps(loser)
    with pytest.raises(MergeError, match="not into 'g-c'") as refused:
        retire(loser, "g-c")
    assert (refused.value.golden_id, refused.value.merged_into) == ("g-b", "g-a")
    assert dumps(loser) == before


# ------------------------------------------------------------------ serialization


def test_a_tombstone_survives_its_changelog_encoding() -> None:
    loser = fold("g-b", [change("crm", "1", ts=1, email="b@x.io")], RULES)
    assert "mi" not in orjson.loads(dumps(loser))  # written only for a tombstone
    retire(loser, "g-a")
    raw = orjson.loads(dumps(loser))
    assert raw["mi"] == "g-a" and raw["fmt"] == STATE_FORMAT == 6
    assert loads(dumps(loser)) == loser
    assert loads(dumps(loser), cells=False).merged_into == "g-a"


def test_a_state_written_in_format_5_is_still_read() -> None:
    state = merged(
        GoldenState("g-5"),
        change("crm", "1", ts=1, email="a@x.io", credit_limit=None),
        change("billing", "AC-1", ts=2, credit_limit=Decimal("1.50")),
    )
    raw = orjson.loads(dumps(state))
    raw["fmt"] = 5
    written_by_format_5 = orjson.dumps(raw)
    read = loads(written_by_format_5)
    assert read == state and read.merged_into is None


# --------------------------------------------------------------------- properties

SYSTEM_FIELDS = {
    "crm": ("first_name", "email", "phone", "company", "segment", "country", "marketing_opt_in"),
    "billing": ("company", "email", "phone", "country", "tax_id", "credit_limit"),
    "support": ("first_name", "email", "phone", "support_tier", "segment"),
}
POOLS = {
    "marketing_opt_in": st.sampled_from([True, False, None]),
    "credit_limit": st.sampled_from([Decimal("0.00"), Decimal("10.50"), None]),
}


@st.composite
def change_sets(draw: st.DrawFn) -> list[Change]:
    """Changes to several rows of one customer in three systems, with colliding commit
    times, each row's log in its own order."""
    logs: dict[str, int] = {}
    changes = []
    for _ in range(draw(st.integers(1, 14))):
        system = draw(st.sampled_from(sorted(SYSTEM_FIELDS)))
        key = draw(st.sampled_from(["1", "2", "3"]))
        logs[f"{system}:{key}"] = logs.get(f"{system}:{key}", 0) + draw(st.integers(1, 3))
        op = draw(st.sampled_from([Op.UPSERT] * 4 + [Op.DELETE]))
        fields = draw(st.lists(st.sampled_from(SYSTEM_FIELDS[system]), unique=True))
        values = {
            name: draw(POOLS.get(name, st.sampled_from(["a", "b", "c", None]))) for name in fields
        }
        changes.append(
            change(
                system,
                key=key,
                ts=draw(st.integers(0, 5)),
                op=op,
                position=f"{logs[f'{system}:{key}']:06d}",
                **(values if op is Op.UPSERT else {}),
            )
        )
    return changes


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")


@pytest.mark.property
@given(change_sets(), st.data())
def test_merging_two_records_equals_one_record_of_all_their_rows(
    changes: list[Change], data: st.DataObject
) -> None:
    """Each row belongs to A or to B; the merge is the fold of every change into one."""
    links = sorted({c.link for c in changes})
    side = dict(zip(links, data.draw(st.lists(st.booleans(), min_size=len(links),
                                              max_size=len(links))), strict=True))  # fmt: skip
    a = fold("g-a", [c for c in changes if side[c.link]], RULES)
    b = fold("g-b", [c for c in changes if not side[c.link]], RULES)
    oracle = fold("g-one", changes, RULES)
    absorb(a, b, RULES)
    assert without_id(a) == without_id(oracle)
    assert cells(a) == cells(oracle)


@pytest.mark.property
@given(change_sets(), st.data())
def test_rows_both_records_heard_of_merge_as_their_registers_do(
    changes: list[Change], data: st.DataObject
) -> None:
    """A row may have moved between the records, or been absorbed before: each change
    reached A, B or both, and the merge is still the fold of every change into one."""
    where = data.draw(st.lists(st.sampled_from(["a", "b", "ab"]), min_size=len(changes),
                               max_size=len(changes)))  # fmt: skip
    a = fold("g-a", [c for c, w in zip(changes, where, strict=True) if "a" in w], RULES)
    b = fold("g-b", [c for c, w in zip(changes, where, strict=True) if "b" in w], RULES)
    oracle = fold("g-one", changes, RULES)
    absorb(a, b, RULES)
    assert without_id(a) == without_id(oracle)
    assert cells(a) == cells(oracle)


@pytest.mark.property
@given(change_sets(), st.data())
def test_a_merge_is_idempotent_and_either_record_may_survive(
    changes: list[Change], data: st.DataObject
) -> None:
    where = data.draw(st.lists(st.sampled_from(["a", "b", "ab"]), min_size=len(changes),
                               max_size=len(changes)))  # fmt: skip
    a_changes = [c for c, w in zip(changes, where, strict=True) if "a" in w]
    b_changes = [c for c, w in zip(changes, where, strict=True) if "b" in w]
    a, b = fold("g-a", a_changes, RULES), fold("g-b", b_changes, RULES)
    first = absorb(a, b, RULES)
    assert first.new_version == (bool(first.changed) or first.status_changed or first.linked)
    before = dumps(a)
    again = absorb(a, b, RULES)
    assert not again.state_changed and not again.new_version
    assert dumps(a) == before

    other_way = fold("g-b", b_changes, RULES)
    absorb(other_way, fold("g-a", a_changes, RULES), RULES)
    assert without_id(other_way) == without_id(a)
