"""The merge: concrete survivorship cases, then the properties that make it safe to replay.

Property tests run a small number of examples by default; the dedicated run
(`make test-property`) runs each with 10,000.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.emit import plan_sinks
from streams.merge import (
    GoldenState,
    StateCache,
    StateFormatError,
    apply,
    deletes_everywhere,
    dumps,
    fold,
    loads,
    stage,
)
from streams.model import FIELDS, Change, Op
from streams.projection import load_sinks
from streams.rules import DeletePolicy, Rules, default_rules

RULES = default_rules()
DATA = Path(__file__).parent / "data"
SINKS = load_sinks(Path(__file__).resolve().parents[2] / "connectors")
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


def golden(*changes: Change, rules: Rules = RULES) -> GoldenState:
    return fold("g-1", changes, rules)


# ------------------------------------------------------------------- the default rules


def test_same_customer_in_three_systems_follows_each_field_s_rule() -> None:
    state = golden(
        change("crm", ts=100, first_name="Ada", email="ada@crm.example", country="GB",
               segment="smb", company="Ada Ltd (crm)"),
        change("billing", ts=200, first_name="A.", email="ada@billing.example", country="FR",
               company="Ada Limited", tax_id="GB123", credit_limit=Decimal("10.50")),
        change("support", ts=300, first_name="ada", email="ada@support.example",
               support_tier="premium", segment="enterprise"),
    )  # fmt: skip
    values = state.values()
    assert values["first_name"] == "Ada"  # priority crm > support > billing
    assert values["email"] == "ada@support.example"  # lww: latest commit
    assert values["company"] == "Ada Limited"  # priority billing > crm
    assert values["country"] == "FR"  # priority billing > crm > support
    assert values["segment"] == "smb"  # owner crm: support's value refused
    assert values["tax_id"] == "GB123" and values["credit_limit"] == Decimal("10.50")
    assert values["support_tier"] == "premium"
    assert state.golden["email"].system == "support" and state.golden["email"].rule == "lww"


def test_owner_rule_rejects_and_counts_other_systems() -> None:
    state = golden(change("crm", ts=1, segment="smb"))
    outcome = apply(state, change("support", ts=2, segment="enterprise"), RULES)
    assert outcome.rejected == ("segment",)
    assert outcome.changed == ()
    assert state.values()["segment"] == "smb"


def test_lww_tie_goes_to_the_higher_priority_system() -> None:
    state = golden(
        change("support", ts=500, email="support@example.com"),
        change("crm", ts=500, email="crm@example.com"),
    )
    assert state.values()["email"] == "crm@example.com"


def test_lww_ignores_nulls_but_priority_falls_back_when_the_winner_clears() -> None:
    state = golden(
        change("billing", ts=1, phone="+441", first_name="Billing"),
        change("crm", ts=2, phone="+442", first_name="Crm"),
    )
    apply(state, change("crm", ts=3, phone=None, first_name=None), RULES)
    assert state.values()["phone"] == "+441"  # crm's row no longer has one: billing's stands
    assert state.values()["first_name"] == "Billing"


def test_an_older_change_arriving_late_moves_nothing() -> None:
    state = golden(change("crm", ts=200, email="new@example.com"))
    outcome = apply(state, change("crm", ts=100, email="old@example.com"), RULES)
    assert outcome.changed == () and state.values()["email"] == "new@example.com"


def test_a_new_row_joining_makes_a_version_and_its_echo_does_not() -> None:
    state = golden(change("crm", ts=100, email="a@example.com"))
    joined = apply(state, change("billing", ts=150, email="b@example.com"), RULES)
    assert joined.linked and joined.new_version  # the record's links changed
    apply(state, change("crm", ts=170, email="b@example.com"), RULES)  # crm applies it
    version = state.version
    outcome = apply(state, change("billing", ts=200, email="b@example.com"), RULES)
    assert outcome.changed == () and not outcome.new_version
    assert state.version == version
    assert outcome.state_changed  # billing's row is now known, and provenance moved


def test_a_delete_deactivates_and_records_a_version() -> None:
    state = golden(change("crm", ts=1, email="a@example.com"), change("billing", ts=2))
    outcome = apply(state, change("crm", ts=3, op=Op.DELETE), RULES)
    assert outcome.status_changed and not state.active
    assert not deletes_everywhere(state, RULES)
    assert state.values()["email"] == "a@example.com"  # inactive, not erased


def test_propagate_policy_deletes_everywhere() -> None:
    rules = Rules(RULES.fields, RULES.priority, DeletePolicy.PROPAGATE, RULES.match)
    state = golden(change("crm", ts=1), change("crm", ts=2, op=Op.DELETE), rules=rules)
    assert deletes_everywhere(state, rules)


def test_a_reinsert_with_a_newer_commit_revives_the_row() -> None:
    state = golden(change("crm", ts=1), change("crm", ts=2, op=Op.DELETE), change("crm", ts=3))
    assert state.active


def test_version_grows_only_when_the_record_changes() -> None:
    state = GoldenState("g")
    apply(state, change("crm", ts=1, email="a@example.com"), RULES)
    apply(state, change("crm", ts=2, email="a@example.com"), RULES)
    apply(state, change("crm", ts=3, email="b@example.com"), RULES)
    assert state.version == 2
    assert [(c.field, c.before, c.after) for c in state.last_changes] == [
        ("email", "a@example.com", "b@example.com")
    ]


def test_serialization_round_trips() -> None:
    state = golden(
        change("billing", ts=1, credit_limit=Decimal("1234.50"), company="X"),
        change("crm", ts=2, marketing_opt_in=True, email="a@example.com"),
        change("support", ts=3, op=Op.DELETE),
    )
    assert loads(dumps(state)) == state


def test_a_state_written_in_format_3_is_still_read() -> None:
    """After an upgrade, the changelog and RocksDB still hold the previous format."""
    state = GoldenState("g-v3")
    for system, key, ts, values in (
        ("crm", "1", 1, {"email": "a@x.io", "first_name": "Ada", "last_name": "Lovelace",
                         "phone": "+442079460001"}),
        ("billing", "AC-1", 2, {"email": "a@x.io", "company": "Analytical Engines",
                                "credit_limit": Decimal("1500.00")}),
        ("support", "u-1", 3, {"email": "a@x.io", "first_name": "Ada"}),
        ("crm", "1", 4, {"phone": "+442079460002"}),
    ):  # fmt: skip
        position = f"p{ts:08d}"
        made = Change(f"{system}|{key}|{position}", system, key, Op.UPSERT, ts, position, values)
        if system == "support":  # format 3 knew support's row as the create's echo
            report = replace(made, change_id="created", created=True)
            apply(state, report, RULES)
        outcome = apply(state, made, RULES)
        stage(state, made, outcome, plan_sinks(state, made, SINKS, RULES))
    written_by_format_3 = (DATA / "golden-state-v3.json").read_bytes()

    # Format 3 knew no created rows, and kept the values of a pending create.
    pending = {"first_name": ["Ada"], "last_name": ["Lovelace"], "email": ["a@x.io"],
               "phone": ["+442079460001"]}  # fmt: skip
    assert loads(written_by_format_3) == replace(
        state, created={}, sent_values={**state.sent_values, "support:+": pending}
    )
    assert loads(dumps(state)) == state
    # The order of three of crm's cells and of the two golden fields they still win.
    first_change = b'"crm|1|p00000001"'
    assert written_by_format_3.count(first_change) == 5
    assert dumps(state).count(first_change) == 1


def test_a_state_of_an_unknown_format_is_refused_with_what_to_do() -> None:
    with pytest.raises(StateFormatError, match="accord reset"):
        loads(b'{"fmt": 99, "id": "g"}')


# ------------------------------------------------------------------------- properties

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
    """Changes to one customer's rows in three systems, with colliding commit times."""
    logs = dict.fromkeys(SYSTEM_FIELDS, 0)
    changes = []
    for _ in range(draw(st.integers(1, 12))):
        system = draw(st.sampled_from(sorted(SYSTEM_FIELDS)))
        logs[system] += draw(st.integers(1, 3))
        op = draw(st.sampled_from([Op.UPSERT] * 4 + [Op.DELETE]))
        fields = draw(st.lists(st.sampled_from(SYSTEM_FIELDS[system]), unique=True))
        values = {
            name: draw(POOLS.get(name, st.sampled_from(["a", "b", "c", None]))) for name in fields
        }
        changes.append(
            change(
                system,
                key=draw(st.sampled_from(["1", "2"])),
                ts=draw(st.integers(0, 5)),
                op=op,
                position=f"{logs[system]:06d}",
                **(values if op is Op.UPSERT else {}),
            )
        )
    return changes


def reference_fold(changes: list[Change], rules: Rules) -> dict[str, object]:
    """The rules written the obvious, slow way: sort every change, keep the last word."""
    rows: dict[str, dict] = {}
    unique = {c.change_id: c for c in changes}.values()
    for c in sorted(unique, key=lambda c: (c.source_ts, c.position, c.change_id)):
        row = rows.setdefault(c.link, {"system": c.system, "key": c.source_key, "fields": {}})
        row["alive"] = c.op is Op.UPSERT
        for name, value in c.values.items():
            row["fields"][name] = (value, (c.source_ts, c.position, c.change_id))

    fields = {}
    for name, spec in rules.fields.items():
        cells = [(row, *row["fields"][name]) for row in rows.values() if name in row["fields"]]
        if spec.rule == "lww":
            candidates = sorted(
                (o[0], rules.rank(r["system"]), o[1], o[2], r["key"], v, r, o)
                for r, v, o in cells
                if v is not None
            )
            best = candidates[-1][5:] if candidates else None
        elif spec.rule == "priority":
            best = None
            for system in spec.order:
                mine = sorted(
                    (o, r["key"], v, r)
                    for r, v, o in cells
                    if r["system"] == system and v is not None
                )
                if mine:
                    best = (mine[-1][2], mine[-1][3], mine[-1][0])
                    break
        else:
            mine = sorted((o, r["key"], v, r) for r, v, o in cells if r["system"] == spec.owner)
            best = (mine[-1][2], mine[-1][3], mine[-1][0]) if mine else None
        if best is not None:
            value, row, order = best
            fields[name] = (value, row["system"], row["key"], order, spec.rule.value)
    return {
        "golden_id": "g-1",
        "active": all(row["alive"] for row in rows.values()),
        "fields": dict(sorted(fields.items())),
        "links": sorted(rows),
        "merged_into": None,
    }


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")


@pytest.mark.property
@given(change_sets(), st.data())
def test_any_permutation_with_any_duplicates_gives_the_same_golden_record(
    changes: list[Change], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(changes))
    duplicated = shuffled + data.draw(st.lists(st.sampled_from(changes), max_size=6))
    reordered = data.draw(st.permutations(duplicated))
    assert golden(*reordered).record() == golden(*changes).record()


@pytest.mark.property
@given(change_sets())
def test_applying_a_change_twice_changes_nothing(changes: list[Change]) -> None:
    state = golden(*changes)
    before = dumps(state)
    for again in changes:
        outcome = apply(state, again, RULES)
        assert not outcome.state_changed and not outcome.new_version
    assert dumps(state) == before


@pytest.mark.property
@given(change_sets())
def test_the_merge_equals_a_single_threaded_reference_fold(changes: list[Change]) -> None:
    assert golden(*changes).record() == reference_fold(changes, RULES)


@pytest.mark.property
@given(change_sets())
def test_state_survives_its_changelog_encoding(changes: list[Change]) -> None:
    state = golden(*changes)
    assert loads(dumps(state)) == state


def test_every_canonical_field_has_a_default_rule() -> None:
    assert set(RULES.fields) == set(FIELDS)


def test_state_cache_reuses_a_state_only_while_the_table_holds_its_bytes() -> None:
    cache = StateCache(capacity=2)
    state = cache.get(b"g", None)
    apply(state, change("crm", "1", 1, email="a@x.io"), RULES)
    written = dumps(state)
    cache.put(b"g", written, state)

    assert cache.get(b"g", written) is state  # the bytes this worker wrote: no parse
    cache.put(b"g", written, state)
    other = GoldenState("g")
    apply(other, change("crm", "1", 2, email="b@x.io"), RULES)
    elsewhere = dumps(other)  # e.g. another worker's write before a rebalance
    reread = cache.get(b"g", elsewhere)
    assert reread is not state and reread == loads(elsewhere)
    assert (cache.hits, cache.misses) == (1, 1)


def test_state_cache_forgets_what_was_taken_and_not_put_back_and_its_oldest() -> None:
    cache = StateCache(capacity=2)
    states, payloads = {}, {}
    for key in (b"a", b"b", b"c"):
        states[key] = GoldenState(key.decode())
        payloads[key] = dumps(states[key])
        cache.put(key, payloads[key], states[key])
    assert len(cache) == 2
    assert cache.get(b"a", payloads[b"a"]) is not states[b"a"]  # the oldest went: parsed
    taken = cache.get(b"b", payloads[b"b"])
    assert taken is states[b"b"]
    apply(taken, change("crm", "1", 1, email="a@x.io"), RULES)  # changed, never written
    assert cache.get(b"b", payloads[b"b"]) == loads(payloads[b"b"]) != taken


# ------------------------------------------------- creates, their echoes and edits

# Support fields an applier inserts when it creates a support row for the record.
CREATED_FIELDS = ("email", "first_name", "phone")


@st.composite
def create_histories(draw: st.DrawFn) -> dict[str, list[Change]]:
    """Each source row's own log, in its order, around one create in support.

    CRM and billing edit the record; Accord creates support row `u-acc` (the applier's
    report, then the row's CDC echo of those values, then its users' edits); someone
    else makes support row `u-own` with the very values Accord planned. Every edit
    writes values never written before, so no edit is mistaken for an update's echo.
    """
    fresh = itertools.count(1)
    logs: dict[str, list[Change]] = {}

    def edits(system: str, key: str, fields: tuple[str, ...], first: int) -> list[Change]:
        made = []
        for index in range(first, first + draw(st.integers(0, 3))):
            chosen = draw(st.lists(st.sampled_from(fields), min_size=1, unique=True))
            values = {name: f"{system}-{next(fresh)}" for name in chosen}
            made.append(change(system, key, ts=draw(st.integers(0, 6)),
                               position=f"{index:06d}", **values))  # fmt: skip
        return made

    planned = {name: f"planned-{name}" for name in CREATED_FIELDS}
    crm_first = change("crm", "1", ts=draw(st.integers(0, 6)), position="000000", **planned)
    logs["crm:1"] = [crm_first, *edits("crm", "1", ("email", "phone", "first_name"), 1)]
    logs["billing:AC-1"] = edits("billing", "AC-1", ("email", "phone", "company"), 0)
    echo = change("support", "u-acc", ts=draw(st.integers(0, 6)), position="000000", **planned)
    logs["support:u-acc"] = [echo, *edits("support", "u-acc", CREATED_FIELDS, 1)]
    own = change("support", "u-own", ts=draw(st.integers(0, 6)), position="000000", **planned)
    logs["support:u-own"] = [own, *edits("support", "u-own", CREATED_FIELDS, 1)]
    report = replace(change("support", "u-acc", ts=0, position="created", **planned),
                     created=True)  # fmt: skip
    logs["report"] = [report]
    return logs


def interleave(data: st.DataObject, logs: dict[str, list[Change]]) -> list[Change]:
    """One arrival order: each row's log stays in its order (one Kafka partition), the
    rows interleave arbitrarily, and some changes are delivered again later."""
    queues = {link: list(log) for link, log in logs.items() if log}
    arrived: list[Change] = []
    while queues:
        link = data.draw(st.sampled_from(sorted(queues)))
        arrived.append(queues[link].pop(0))
        if not queues[link]:
            del queues[link]
        if data.draw(st.integers(0, 4)) == 0:
            arrived.append(data.draw(st.sampled_from(arrived)))  # a redelivery
    return arrived


def cells(state: GoldenState) -> dict[str, dict[str, tuple[object, bool]]]:
    return {
        link: {name: (cell.value, cell.echo) for name, cell in row.cells.items()}
        for link, row in sorted(state.contributions.items())
    }


def target_plans(state: GoldenState) -> list:
    """What every target needs now, decided afresh from the state (nothing sent yet)."""
    fresh = loads(dumps(state))
    fresh.sent, fresh.sent_values = {}, {}
    plans = plan_sinks(fresh, change("probe", "-"), SINKS, RULES)
    return sorted(plans, key=lambda o: (o.target, o.target_key or ""))  # rows in any order


def run_merge(arrived: list[Change]) -> GoldenState:
    """As the merge agent does: merge, then plan and stage what the targets need."""
    state = GoldenState("g-1")
    for c in arrived:
        outcome = apply(state, c, RULES)
        if outcome.state_changed:
            stage(state, c, outcome, plan_sinks(state, c, SINKS, RULES))
    return state


@pytest.mark.property
@given(create_histories(), st.data())
def test_creates_echoes_and_edits_in_any_interleaving_give_the_same_record_and_plans(
    logs: dict[str, list[Change]], data: st.DataObject
) -> None:
    in_log_order = run_merge([c for log in logs.values() for c in log])
    state = run_merge(interleave(data, logs))
    assert state.record() == in_log_order.record()
    assert cells(state) == cells(in_log_order)
    assert target_plans(state) == target_plans(in_log_order)
    # Accord's insert never competes; the row someone else made with the same values does.
    for name, (value, echo) in cells(state)["support:u-own"].items():
        assert not echo, (name, value)
    echoed = cells(state)["support:u-acc"]
    assert all(echo == value.startswith("planned-") for value, echo in echoed.values())


@pytest.mark.property
@given(create_histories(), st.data())
def test_any_permutation_of_creates_and_echoes_gives_the_same_golden_record(
    logs: dict[str, list[Change]], data: st.DataObject
) -> None:
    """The registers alone: any order at all, a row's own changes included."""
    changes = [c for log in logs.values() for c in log]
    shuffled = data.draw(st.permutations(changes))
    again = data.draw(st.permutations(shuffled + data.draw(st.lists(st.sampled_from(changes)))))
    assert golden(*again).record() == golden(*changes).record()
    assert cells(golden(*again)) == cells(golden(*changes))
