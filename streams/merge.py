"""Field-level survivorship: fold normalized changes into golden records. No I/O.

A golden record's state keeps every linked source row (a `Contribution`) and, per field,
the value that row last reported (a `Cell`). Each cell, and each row's alive/deleted
flag, is a last-writer-wins register ordered by (source commit time, log position,
change id). The golden value of a field is a pure function of the cells and the field's
rule. Registers merge commutatively and idempotently, so any permutation of a set of
changes, with any duplicates, gives the same golden record: the stream may replay,
redeliver and reorder across systems without changing the outcome.

`apply` mutates the state it is given (the hot path); `fold` builds a fresh one.

Merging two golden records (`accord merge GOLDEN_A GOLDEN_B`) is the same register merge
one level up: `absorb` takes every row of the loser into the survivor, a row known to
both merging cell by cell and lifecycle by lifecycle (the greater order wins), and then
resolves every field again by the rules. Because the registers commute, the survivor
ends up as if every row of both records had been linked to it from the start, and
absorbing the same loser again changes nothing. The loser's record of what Accord wrote
into target rows (`sent`, `sent_values`, `created`) goes along with its rows, so those
writes coming back through CDC are still recognised as Accord's echo and never compete.
`retire` then turns the loser into a tombstone: no rows, no values, inactive, and
`merged_into` pointing at the survivor, which is where callers follow anything still
addressed to the loser. A tombstone contributes nothing and is never merged again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import orjson

from streams.errors import AccordError
from streams.model import DECIMAL_FIELDS, Change, Op, Value
from streams.rules import DeletePolicy, Rule, Rules

# Values sent to a target row's field and not yet seen coming back, oldest first. An
# applier writes them in order, so an echo also settles every value sent before it. The
# cap bounds rows whose writes never echo (a webhook target, a write refused by
# compare-and-set) and is the longest backlog of one row an applier can catch up on
# without a stale echo competing; the state carries the list, so it stays small.
ECHO_MEMORY = 16
Order = tuple[int, str, str]  # source commit time (µs), log position, change id
NEVER: Order = (-1, "", "")


@dataclass(slots=True)
class Cell:
    """One field's value as one source row last reported it."""

    value: Value
    order: Order
    # The value Accord itself wrote into the row (its CDC echo): the row holds it
    # because Accord sent it, not as an opinion of its own, so it does not compete.
    echo: bool = False
    # The commit time the source stated, when it ran too far ahead of its capture time
    # and `order` holds the capture time instead (`Change.clamped_from`); 0 otherwise.
    clamped_from: int = 0


@dataclass(slots=True)
class Contribution:
    """One source row linked to a golden record."""

    system: str
    key: str
    alive: bool = True
    lifecycle: Order = NEVER  # order of the latest upsert or delete of the row
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def link(self) -> str:
        return f"{self.system}:{self.key}"


@dataclass(frozen=True, slots=True)
class Resolved:
    """A golden field's value and where it came from (its provenance)."""

    value: Value
    system: str
    key: str
    order: Order
    rule: Rule

    @property
    def source_ts(self) -> int:
        return self.order[0]

    @property
    def position(self) -> str:
        return self.order[1]

    @property
    def change_id(self) -> str:
        return self.order[2]


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    before: Value
    after: Value


@dataclass(frozen=True, slots=True)
class Cause:
    """The change that made a version: which row, and where in its log."""

    system: str
    key: str
    order: Order


@dataclass(frozen=True, slots=True)
class SinkOrder:
    """What one target must apply, decided by the merge (see `streams.emit.plan_sinks`)."""

    target: str
    op: Op
    target_key: str | None  # None: create the row
    values: dict[str, Value]  # the target's projection of the golden record
    changed: tuple[str, ...]  # the fields that differ in the target
    # What the row held for the changed fields when this was decided; None for a create.
    # The applier writes only if the row still holds it (see `streams.sinks`).
    expected: dict[str, Value] | None = None


@dataclass(slots=True)
class GoldenState:
    golden_id: str
    version: int = 0  # grows by one each time the golden record changes
    active: bool = True
    updated_ts: int = 0  # source commit time of the change that made this version
    contributions: dict[str, Contribution] = field(default_factory=dict)
    golden: dict[str, Resolved] = field(default_factory=dict)  # absent: no value
    last_changes: tuple[FieldChange, ...] = ()  # what this version changed
    status_changed: bool = False  # this version flipped `active`
    cause: Cause | None = None  # the change that made this version
    # The outbox, read by `emit` from the table's changelog: see `stage`.
    revision: int = 0  # grows with every write that has outputs
    version_revision: int = 0  # the revision at which `version` last grew
    fresh: bool = False  # this write advanced the revision: emit its outputs
    outbox: tuple[SinkOrder, ...] = ()  # sink events of the latest revision
    sent: dict[str, str] = field(default_factory=dict)  # target row -> projection last sent
    # Target row -> field -> the last values sent to it, so that their CDC echoes are
    # recognised even when a newer value was sent before the echo came back.
    sent_values: dict[str, dict[str, list[Value]]] = field(default_factory=dict)
    # Target row Accord created -> field -> the values its appliers reported inserting
    # there (`Change.created`): that row's cells holding them are Accord's echo.
    created: dict[str, dict[str, list[Value]]] = field(default_factory=dict)
    # This record was merged into that golden record and is a tombstone: it holds no
    # rows and no values, and anything addressed to it belongs to the survivor.
    merged_into: str | None = None

    def remember_sent(self, link: str, values: dict[str, Value]) -> None:
        fields = self.sent_values.setdefault(link, {})
        for name, value in values.items():
            # Kept in sending order, repeats included: A, B, A echo back as A, B, A.
            fields[name] = [*fields.get(name, [])[-(ECHO_MEMORY - 1) :], value]

    caused_by: str | None = None  # change id that made the latest revision
    caused_ts: int = 0  # its source commit time: where end-to-end latency starts

    @property
    def last_change_id(self) -> str | None:
        return self.cause.order[2] if self.cause else None

    def values(self) -> dict[str, Value]:
        return {name: resolved.value for name, resolved in self.golden.items()}

    def record(self) -> dict[str, Any]:
        """The golden record itself: what order-independence promises to be equal."""
        return {
            "golden_id": self.golden_id,
            "active": self.active,
            "fields": {
                name: (r.value, r.system, r.key, r.order, r.rule.value)
                for name, r in sorted(self.golden.items())
            },
            "links": sorted(self.contributions),
            "merged_into": self.merged_into,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    changed: tuple[FieldChange, ...]  # golden values that changed
    status_changed: bool  # active <-> inactive
    state_changed: bool  # anything at all to persist (provenance, a row's cells)
    rejected: tuple[str, ...]  # fields an `owner` rule refused from this change
    # The record's links changed: a source row joined it (or, for `retire`, every row
    # left it for the survivor).
    linked: bool = False

    @property
    def new_version(self) -> bool:
        return bool(self.changed) or self.status_changed or self.linked


def _settle_echo(sent: dict[str, list[Value]] | None, name: str, value: Value) -> bool:
    """Is `value` Accord's own write coming back? If so, forget what was sent before it:
    those writes have come back already, or were never made (folded or refused)."""
    if sent is None:
        return False
    outstanding = sent.get(name, [])
    for index, candidate in enumerate(outstanding):
        if _same(candidate, value):
            sent[name] = outstanding[index:]
            return True
    return False


def _created_value(reported: dict[str, list[Value]] | None, name: str, value: Value) -> bool:
    """Is `value` in this row's field Accord's doing, the row being one an applier
    created? Yes when the applier reported inserting it, and when the insert left the
    field out and it holds nothing: an empty column of a row Accord made is the table's
    default, nobody's opinion (without this, under `owner` a second row of the owning
    system that Accord created would clear the value the person's own row holds)."""
    if reported is None:
        return False
    if name not in reported:
        return value is None
    return any(_same(v, value) for v in reported[name])


def _note_created(state: GoldenState, change: Change, rules: Rules) -> Outcome:
    """An applier's report of a row it creates: that row's cells holding what it inserted
    are Accord's echo, whether they arrived before this report or arrive after it.

    The report names the row by its key, which only Accord's own insert carries, so a
    row made in the target by someone else with the same values still competes. Reports
    accumulate as sets of values per field: their order does not matter.
    """
    reported = state.created.setdefault(change.link, {})
    grew = False
    for name, value in change.values.items():
        known = reported.setdefault(name, [])
        if not _created_value(reported, name, value):
            known.append(value)
            known.sort(key=lambda v: (type(v).__name__, str(v)))
            grew = True
    if not grew:
        return Outcome((), False, False, ())
    touched: list[str] = []
    contribution = state.contributions.get(change.link)
    if contribution is not None:
        for name, cell in contribution.cells.items():
            if not cell.echo and _created_value(reported, name, cell.value):
                cell.echo = True
                touched.append(name)
    outcome = Outcome(tuple(_resolve(state, touched, rules)), False, True, ())
    if outcome.new_version:
        _new_version(state, outcome, _cause(change), change.source_ts)
    return outcome


def apply(state: GoldenState, change: Change, rules: Rules) -> Outcome:
    """Merge one change into `state` (in place)."""
    if change.created:
        return _note_created(state, change, rules)
    order: Order = (change.source_ts, change.position, change.change_id)
    contribution = state.contributions.get(change.link)
    linked = state_changed = contribution is None
    if contribution is None:
        contribution = Contribution(change.system, change.source_key)
        state.contributions[change.link] = contribution

    lifecycle_changed = False
    if order > contribution.lifecycle:
        alive = change.op is Op.UPSERT
        lifecycle_changed = alive != contribution.alive
        contribution.alive, contribution.lifecycle = alive, order
        state_changed = True

    touched: list[str] = []
    rejected: list[str] = []
    sent = state.sent_values.get(change.link)
    created = state.created.get(change.link)
    clamped_from = change.clamped_from or 0
    for name, value in change.values.items():
        cell = contribution.cells.get(name)
        if cell is not None and order <= cell.order:
            continue
        if cell is not None and _same(cell.value, value):
            echo = cell.echo  # the row still holds what it held: no new opinion, nor an echo
        else:
            # Sent to this row, or inserted by Accord when it created the row: an echo.
            echo = _settle_echo(sent, name, value) or _created_value(created, name, value)
        contribution.cells[name] = Cell(value, order, echo, clamped_from)
        touched.append(name)
        owner = rules.fields[name].owner
        if owner is not None and owner != change.system and value is not None:
            rejected.append(name)
    state_changed = state_changed or bool(touched)
    changed = _resolve(state, touched, rules)

    status_changed = False
    if lifecycle_changed:
        active = all(c.alive for c in state.contributions.values())
        status_changed = active != state.active
        state.active = active

    outcome = Outcome(tuple(changed), status_changed, state_changed, tuple(rejected), linked)
    if outcome.new_version:
        _new_version(state, outcome, _cause(change), change.source_ts)
    return outcome


def _resolve(state: GoldenState, names: Iterable[str], rules: Rules) -> list[FieldChange]:
    """Resolve the fields `names` again; the golden values that moved."""
    changed: list[FieldChange] = []
    for name in names:
        resolved = resolve_field(name, state.contributions.values(), rules)
        before = state.golden.get(name)
        before_value = before.value if before is not None else None
        after_value = resolved.value if resolved is not None else None
        if resolved is None:
            state.golden.pop(name, None)
        else:
            state.golden[name] = resolved
        if not _same(before_value, after_value):
            changed.append(FieldChange(name, before_value, after_value))
    return changed


def _cause(change: Change) -> Cause:
    return Cause(change.system, change.source_key, (*change.order, change.change_id))


def _new_version(state: GoldenState, outcome: Outcome, cause: Cause, source_ts: int) -> None:
    """Record a new version of the golden record, made by `cause` at commit time
    `source_ts`."""
    state.version += 1
    # An adopted row's report may carry no commit time (0): the record keeps its own.
    state.updated_ts = source_ts or state.updated_ts
    state.last_changes = outcome.changed
    state.status_changed = outcome.status_changed
    state.cause = cause


# ------------------------------------------------------------------- merging records


class MergeError(AccordError):
    """Two golden records cannot be merged as asked: one of them is a tombstone already
    (`merged_into` names where it went: follow the pointer), or both are one record."""

    def __init__(self, golden_id: str, merged_into: str | None, message: str) -> None:
        self.golden_id = golden_id
        self.merged_into = merged_into
        super().__init__(message)


def _merge_cause(survivor_id: str, loser: GoldenState, survivor_ts: int) -> Cause:
    """The cause of a version a merge makes (the survivor's, and the tombstone's): an
    `accord` event named after the loser, at the loser's latest commit time (the
    survivor's when the loser has none), the same for every replay of one merge."""
    order: Order = (
        loser.updated_ts or survivor_ts,
        "merge",
        f"merge:{loser.golden_id}:{survivor_id}",
    )
    return Cause("accord", f"merge:{loser.golden_id}", order)


def _copy_contribution(row: Contribution) -> Contribution:
    cells = {name: replace(cell) for name, cell in row.cells.items()}
    return Contribution(row.system, row.key, row.alive, row.lifecycle, cells)


def _created_key(value: Value) -> tuple[str, str]:
    return (type(value).__name__, str(value))


def absorb(survivor: GoldenState, loser: GoldenState, rules: Rules) -> Outcome:
    """Merge golden record `loser` into `survivor` (in place); `loser` is left as it is
    (`retire` makes it a tombstone).

    Every row of the loser joins the survivor. A row both already hold (a repeated
    absorb, or a row that moved between them) merges as the registers do: per field the
    cell with the greater order stands (equal: the survivor's), and so does the row's
    lifecycle. What Accord wrote into the loser's target rows goes along (`sent`: the
    survivor's entry stands; `sent_values`: the loser's values the survivor lacks, the
    latest `ECHO_MEMORY` kept; `created`: the union), so those writes still come back as
    echoes. Every field is then resolved again by `rules`: the survivor is what one record
    holding every row of both from the start would be. Absorbing the same loser again
    changes nothing.

    Raises `MergeError` when the loser (or the survivor) is a tombstone already, whose
    rows went elsewhere: the caller follows `merged_into` instead; and when both are the
    same record.
    """
    for state in (loser, survivor):
        if state.merged_into is not None:
            raise MergeError(
                state.golden_id,
                state.merged_into,
                f"golden record {state.golden_id!r} was merged into {state.merged_into!r} "
                f"already: its rows are there",
            )
    if loser.golden_id == survivor.golden_id:
        raise MergeError(
            loser.golden_id, None, f"cannot merge golden record {loser.golden_id!r} into itself"
        )

    linked = state_changed = False
    for link, row in loser.contributions.items():
        mine = survivor.contributions.get(link)
        if mine is None:
            survivor.contributions[link] = _copy_contribution(row)
            linked = state_changed = True
            continue
        for name, cell in row.cells.items():
            held = mine.cells.get(name)
            if held is None or cell.order > held.order:
                mine.cells[name] = replace(cell)
                state_changed = True
        if row.lifecycle > mine.lifecycle:
            mine.alive, mine.lifecycle = row.alive, row.lifecycle
            state_changed = True

    for target_row, projection in loser.sent.items():
        if target_row not in survivor.sent:
            survivor.sent[target_row] = projection
            state_changed = True
    for link, fields in loser.sent_values.items():
        for name, values in fields.items():
            outstanding = survivor.sent_values.get(link, {}).get(name, [])
            missing = [v for v in values if not any(_same(v, o) for o in outstanding)]
            if missing:
                # Kept in the loser's order, repeats included, after the survivor's own.
                merged = [*outstanding, *missing][-ECHO_MEMORY:]
                survivor.sent_values.setdefault(link, {})[name] = merged
                state_changed = True
    for link, fields in loser.created.items():
        for name, values in fields.items():
            reported = survivor.created.get(link)
            missing = [v for v in values if not _created_value(reported, name, v)]
            if missing:
                known = survivor.created.setdefault(link, {}).setdefault(name, [])
                known.extend(missing)
                known.sort(key=_created_key)
                state_changed = True
    # A created row's cells holding what Accord inserted there are its echo, whichever
    # record heard the report (as `_note_created` does for one report).
    for link, row in survivor.contributions.items():
        reported = survivor.created.get(link)
        if reported is None:
            continue
        for name, cell in row.cells.items():
            if not cell.echo and _created_value(reported, name, cell.value):
                cell.echo = True
                state_changed = True

    provenance = dict(survivor.golden)
    changed = _resolve(survivor, rules.fields, rules)
    state_changed = state_changed or survivor.golden != provenance
    active = all(c.alive for c in survivor.contributions.values())
    status_changed = active != survivor.active
    survivor.active = active

    outcome = Outcome(tuple(changed), status_changed, state_changed or status_changed, (), linked)
    if outcome.new_version:
        cause = _merge_cause(survivor.golden_id, loser, survivor.updated_ts)
        _new_version(survivor, outcome, cause, max(survivor.updated_ts, loser.updated_ts))
    return outcome


def retire(loser: GoldenState, survivor_id: str) -> Outcome:
    """Make `loser` (in place) a tombstone of its merge into golden record `survivor_id`,
    once `absorb` has taken its rows there.

    The tombstone keeps no rows, no values and nothing of what was sent to targets (all
    of it lives on in the survivor), is inactive, and points at the survivor through
    `merged_into`. Its new version says every value it had went to None. Retiring it into
    the same survivor again changes nothing; into another one raises `MergeError`: a
    record is merged once, and its rows are in the first survivor.
    """
    if loser.merged_into == survivor_id:
        return Outcome((), False, False, ())
    if loser.merged_into is not None:
        raise MergeError(
            loser.golden_id,
            loser.merged_into,
            f"golden record {loser.golden_id!r} was merged into {loser.merged_into!r} "
            f"already, not into {survivor_id!r}",
        )
    if survivor_id == loser.golden_id:
        raise MergeError(
            loser.golden_id, None, f"cannot merge golden record {loser.golden_id!r} into itself"
        )
    changed = tuple(
        FieldChange(name, resolved.value, None)
        for name, resolved in sorted(loser.golden.items())
        if resolved.value is not None
    )
    outcome = Outcome(changed, loser.active, True, (), linked=True)
    cause = _merge_cause(survivor_id, loser, loser.updated_ts)
    loser.merged_into = survivor_id
    loser.active = False
    loser.contributions = {}
    loser.golden = {}
    loser.sent = {}
    loser.sent_values = {}
    loser.created = {}
    _new_version(loser, outcome, cause, loser.updated_ts)
    return outcome


def stage(
    state: GoldenState, change: Change, outcome: Outcome, orders: Iterable[SinkOrder]
) -> None:
    """Put this write's outputs in the outbox; a write with outputs advances the revision.

    The table's changelog holds each revision exactly once (a replayed change is a no-op
    and writes nothing), so `emit` turns each fresh revision into its outputs once.
    """
    orders = tuple(orders)
    state.fresh = outcome.new_version or bool(orders)
    state.outbox = orders
    if state.fresh:
        state.revision += 1
        state.caused_by, state.caused_ts = change.change_id, change.source_ts
        if outcome.new_version:
            state.version_revision = state.revision


def fold(golden_id: str, changes: Iterable[Change], rules: Rules) -> GoldenState:
    state = GoldenState(golden_id)
    for change in changes:
        apply(state, change, rules)
    return state


def deletes_everywhere(state: GoldenState, rules: Rules) -> bool:
    """An inactive record under `propagate` is deleted in every system."""
    return not state.active and rules.delete_policy is DeletePolicy.PROPAGATE


def resolve_field(
    name: str, contributions: Iterable[Contribution], rules: Rules
) -> Resolved | None:
    """The winning value of one field among every linked row's cells, by the field's rule."""
    spec = rules.fields[name]
    best: tuple[Any, ...] | None = None
    winner: tuple[Contribution, Cell] | None = None
    for contribution in contributions:
        cell = contribution.cells.get(name)
        if cell is None or cell.echo:
            continue
        if spec.rule is Rule.LWW:
            if cell.value is None:
                continue  # a null never overwrites a value
            rank = (
                cell.order[0],
                rules.rank(contribution.system),
                cell.order[1:],
                contribution.key,
            )
        elif spec.rule is Rule.PRIORITY:
            if cell.value is None or contribution.system not in spec.order:
                continue
            preference = -spec.order.index(contribution.system)
            rank = (preference, cell.order, contribution.key)
        else:
            if contribution.system != spec.owner:
                continue
            rank = (cell.order, contribution.key)
        if best is None or rank > best:
            best, winner = rank, (contribution, cell)
    if winner is None:
        return None
    contribution, cell = winner
    return Resolved(cell.value, contribution.system, contribution.key, cell.order, spec.rule)


def _same(a: Value, b: Value) -> bool:
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------- serialization


STATE_FORMAT = 6  # bump on any incompatible change to `dumps`
# 3: before orders were stored once; 4: before created rows and clamped commit times;
# 5: before merged records (`mi`, written only for a tombstone: absent reads as None).
READABLE_FORMATS = (3, 4, 5, 6)


class StateFormatError(AccordError):
    """Golden state written by another version of Accord."""


def dumps(state: GoldenState) -> bytes:
    """Compact JSON for the table's changelog and RocksDB; `loads` reverses it.

    orjson, because every merge writes one and the emitter reads it back: the standard
    library's encoder was a tenth of the worker's time. Each distinct order (commit time,
    position, change id) is written once in `ord` and cells point to it by index: a row's
    cells mostly share one, and repeating it in each made orders most of a state's bytes.
    """
    orders: dict[Order, int] = {}

    def ref(order: Order) -> int:
        index = orders.get(order)
        if index is None:
            index = orders[order] = len(orders)
        return index

    contributions = {
        link: [
            c.system,
            c.key,
            c.alive,
            ref(c.lifecycle),
            {n: _cell_out(n, cell, ref(cell.order)) for n, cell in c.cells.items()},
        ]
        for link, c in state.contributions.items()
    }
    golden = {
        n: [_out(n, r.value), r.system, r.key, ref(r.order), r.rule.value]
        for n, r in state.golden.items()
    }
    cause = state.cause
    document: dict[str, Any] = {
        # Format 5 unless the record is a tombstone: a rollback reads every other state.
        "fmt": STATE_FORMAT if state.merged_into else 5,
        "id": state.golden_id,
        "v": state.version,
        "a": state.active,
        "u": state.updated_ts,
        "c": contributions,
        "g": golden,
        "l": [
            [f.field, _out(f.field, f.before), _out(f.field, f.after)] for f in state.last_changes
        ],
        "s": state.status_changed,
        "k": [cause.system, cause.key, ref(cause.order)] if cause else None,
        "ord": list(orders),
        "r": state.revision,
        "vr": state.version_revision,
        "f": state.fresh,
        "o": [
            [
                o.target,
                o.op.value,
                o.target_key,
                _values_out(o.values),
                list(o.changed),
                None if o.expected is None else _values_out(o.expected),
            ]
            for o in state.outbox
        ],
        "t": state.sent,
        "sv": {
            link: {n: [_out(n, v) for v in values] for n, values in fields.items()}
            for link, fields in state.sent_values.items()
        },
        "cb": [state.caused_by, state.caused_ts],
        "cr": {
            link: {n: [_out(n, v) for v in values] for n, values in fields.items()}
            for link, fields in state.created.items()
        },
    }
    if state.merged_into is not None:
        document["mi"] = state.merged_into  # only a tombstone: every other state saves it
    return orjson.dumps(document)


def _cell_out(name: str, cell: Cell, at: int) -> list[Any]:
    out = [_out(name, cell.value), at, cell.echo]
    if cell.clamped_from:
        out.append(cell.clamped_from)  # rare: written only when clamped
    return out


def _cell_in(name: str, raw: list[Any], order: Any) -> Cell:
    return Cell(_in(name, raw[0]), order(raw[1]), raw[2], raw[3] if len(raw) > 3 else 0)


def loads(payload: bytes, cells: bool = True) -> GoldenState:
    """The state `dumps` wrote. `cells=False` leaves out each row's cells and the values
    sent to it: the emitter needs neither, and they are most of what there is to read."""
    raw = orjson.loads(payload)
    fmt = raw.get("fmt")
    if fmt not in READABLE_FORMATS:
        raise StateFormatError(
            f"golden state of {raw.get('id')!r} has format {fmt!r}, this Accord reads "
            f"formats {', '.join(map(str, READABLE_FORMATS))}: rebuild the state "
            "(`accord reset`, then replay)"
        )
    if fmt == 3:  # each order written out in full where it is used
        order: Any = tuple
    else:
        order = [tuple(o) for o in raw["ord"]].__getitem__
    return GoldenState(
        golden_id=raw["id"],
        version=raw["v"],
        active=raw["a"],
        updated_ts=raw["u"],
        contributions={
            link: Contribution(
                system,
                key,
                alive,
                order(lifecycle),
                {n: _cell_in(n, raw_cell, order) for n, raw_cell in row_cells.items()}
                if cells
                else {},
            )
            for link, (system, key, alive, lifecycle, row_cells) in raw["c"].items()
        },
        golden={
            n: Resolved(_in(n, value), system, key, order(at), Rule(rule))
            for n, (value, system, key, at, rule) in raw["g"].items()
        },
        last_changes=tuple(
            FieldChange(n, _in(n, before), _in(n, after)) for n, before, after in raw["l"]
        ),
        status_changed=raw["s"],
        cause=Cause(raw["k"][0], raw["k"][1], order(raw["k"][2])) if raw["k"] else None,
        revision=raw["r"],
        version_revision=raw["vr"],
        fresh=raw["f"],
        outbox=tuple(
            SinkOrder(
                target,
                Op(op),
                key,
                _values_in(values),
                tuple(changed),
                None if expected is None else _values_in(expected),
            )
            for target, op, key, values, changed, expected in raw["o"]
        ),
        sent=raw["t"],
        sent_values={
            link: {n: [_in(n, v) for v in values] for n, values in fields.items()}
            for link, fields in raw["sv"].items()
        }
        if cells
        else {},
        caused_by=raw["cb"][0],
        caused_ts=raw["cb"][1],
        created={
            link: {n: [_in(n, v) for v in values] for n, values in fields.items()}
            for link, fields in raw.get("cr", {}).items()
        },
        merged_into=raw.get("mi"),
    )


def _values_out(values: dict[str, Value]) -> dict[str, Any]:
    return {name: _out(name, value) for name, value in values.items()}


def _values_in(values: dict[str, Any]) -> dict[str, Value]:
    return {name: _in(name, value) for name, value in values.items()}


def _out(name: str, value: Value) -> Any:
    return str(value) if name in DECIMAL_FIELDS and value is not None else value


def _in(name: str, value: Any) -> Value:
    return Decimal(value) if name in DECIMAL_FIELDS and value is not None else value


class StateCache:
    """Parsed golden states, each beside the bytes it was read from or written as.

    Parsing a state costs more than merging a change into it, and the table mostly
    hands back the bytes this worker wrote itself: a state whose bytes still match is
    reused. Other bytes (written by another worker before a rebalance, restored from
    the changelog) are parsed, so a stale entry can never be used. Least recently used
    entries go first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, tuple[bytes, GoldenState]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: bytes, stored: bytes | None) -> GoldenState:
        """The state `stored` holds (a new one when None), for the caller to change."""
        entry = self._entries.pop(key, None)
        if stored is None:
            return GoldenState(key.decode())
        if entry is not None and entry[0] == stored:
            self.hits += 1
            return entry[1]
        self.misses += 1
        return loads(stored)

    def put(self, key: bytes, payload: bytes, state: GoldenState) -> None:
        """Remember `state`, which the table now holds as `payload`."""
        if self.capacity <= 0:
            return
        self._entries[key] = (payload, state)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
