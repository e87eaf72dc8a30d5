"""A commit time far ahead of its capture time is clamped at ingest, stored and flagged."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from streams.debezium import SourceChange, SourcePosition
from streams.explain import explain
from streams.mapping import Mapped, Mapper, clamp_commit_time, load_mappings
from streams.merge import dumps, fold, loads
from streams.model import Change
from streams.rules import default_rules
from streams.schemas import load_local, resolution_problems
from streams.settings import WorkerSettings
from streams.topics import RAW_TOPICS
from tests.unit.test_merge import change

ROOT = Path(__file__).resolve().parents[2]
CONNECTORS = ROOT / "connectors"
RULES = default_rules()
CAPTURED_MS = 1_700_000_000_000  # when Debezium read the change from the log
HOUR_US = 3_600_000_000


def _crm(commit_us: int) -> SourceChange:
    position = SourcePosition("postgresql", "crm", "customers", commit_us, False, lsn=42)
    row = {"id": 7, "email": "ada@example.com", "first_name": "Ada"}
    return SourceChange(RAW_TOPICS["crm"], "c", {"id": 7}, None, row, position, CAPTURED_MS)


def _billing(updated_at: dt.datetime) -> SourceChange:
    position = SourcePosition("mysql", "billing", "accounts", CAPTURED_MS * 1000 - 5_000, False,
                              binlog_file="bin.000001", binlog_pos=4)  # fmt: skip
    row = {"account_no": "AC-1", "contact_email": "ada@example.com", "legal_name": "Ada Ltd",
           "billing_country": "GB", "currency": "GBP", "updated_at": updated_at}  # fmt: skip
    return SourceChange(RAW_TOPICS["billing"], "c", {"account_no": "AC-1"}, None, row, position,
                        CAPTURED_MS)  # fmt: skip


def _map(mapper: Mapper, source: SourceChange) -> Change:
    result = mapper.map(source)
    assert isinstance(result, Mapped), result.describe()
    return result.change


def _clamped(system: str) -> float:
    return REGISTRY.get_sample_value("accord_clock_skew_clamped_total", {"system": system}) or 0.0


@pytest.mark.parametrize(
    ("commit_us", "captured_us", "limit_us", "expected"),
    [
        (1_000 + 301, 1_000, 300, (1_000, 1_301)),  # too far ahead: the capture time
        (1_000 + 300, 1_000, 300, (1_300, None)),  # within the limit: as stated
        (500, 1_000, 300, (500, None)),  # behind the capture time: as stated
        (10**15, 1_000, None, (10**15, None)),  # no limit
        (10**15, 0, 300, (10**15, None)),  # no capture time to clamp to
        (1_001, 1_000, 0, (1_000, 1_001)),  # 0: any lead is clamped
    ],
)
def test_clamp_commit_time(
    commit_us: int, captured_us: int, limit_us: int | None, expected: tuple
) -> None:
    assert clamp_commit_time(commit_us, captured_us, limit_us) == expected


def test_a_source_clock_running_fast_is_clamped_to_the_capture_time_and_counted() -> None:
    mapper = Mapper(load_mappings(CONNECTORS), max_clock_skew_s=300)
    before = _clamped("crm")
    ahead = _map(mapper, _crm(CAPTURED_MS * 1000 + HOUR_US))
    assert (ahead.source_ts, ahead.clamped_from) == (
        CAPTURED_MS * 1000,
        CAPTURED_MS * 1000 + HOUR_US,
    )
    assert _clamped("crm") == before + 1
    on_time = _map(mapper, _crm(CAPTURED_MS * 1000 - 2_000))
    assert (on_time.source_ts, on_time.clamped_from) == (CAPTURED_MS * 1000 - 2_000, None)
    assert _clamped("crm") == before + 1
    # A replay reads the same envelope: clamped alike, whatever the wall clock says.
    assert _map(mapper, _crm(CAPTURED_MS * 1000 + HOUR_US)) == ahead


def test_a_billing_row_with_updated_at_in_the_future_is_clamped() -> None:
    future = dt.datetime.fromtimestamp(CAPTURED_MS / 1000, dt.UTC) + dt.timedelta(days=365)
    clamped = _map(Mapper(load_mappings(CONNECTORS), max_clock_skew_s=300), _billing(future))
    assert clamped.source_ts == CAPTURED_MS * 1000
    assert clamped.clamped_from == int(future.timestamp() * 1_000_000)
    unclamped = _map(Mapper(load_mappings(CONNECTORS)), _billing(future))
    assert unclamped.source_ts == int(future.timestamp() * 1_000_000)  # what it used to win by


def test_the_setting_defaults_to_five_minutes() -> None:
    assert WorkerSettings().max_clock_skew_s == 300


def test_a_clamped_change_no_longer_wins_lww_for_good_and_explain_says_so() -> None:
    stated = 10 * HOUR_US
    fast = replace(change("billing", key="AC-1", ts=2_000, email="fast@example.com"),
                   clamped_from=stated)  # fmt: skip
    later = change("crm", key="7", ts=3_000, email="later@example.com")
    state = fold("g-1", [fast, later], RULES)
    assert state.values()["email"] == "later@example.com"  # a later edit elsewhere wins
    assert loads(dumps(state)) == state  # the flag is stored
    email = {f.name: f for f in explain(state, RULES, []).fields}["email"]
    [loser] = email.losers
    assert (loser.system, loser.source_ts, loser.clamped_from) == ("billing", 2_000, stated)
    assert email.clamped_from is None
    alone = fold("g-2", [fast], RULES)
    email = {f.name: f for f in explain(alone, RULES, []).fields}["email"]
    assert email.clamped_from == stated
    shown = explain(alone, RULES, []).as_dict()["fields"]
    assert [f["clamped_from"] for f in shown if f["name"] == "email"] == [
        "1970-01-01T10:00:00+00:00"
    ]


def test_the_flag_survives_the_changes_topic_encoding() -> None:
    flagged = replace(change("crm", ts=5), clamped_from=HOUR_US)
    assert Change.from_record(flagged.to_record()) == flagged
    created = replace(change("support", key="u-1", ts=5, email="a@x.io"), created=True)
    assert Change.from_record(created.to_record()) == created


def test_the_change_schema_evolution_is_compatible_both_ways() -> None:
    """`created` and `clamped_from` have defaults: old changes read with the new schema,
    and readers still on the previous version read the new changes."""
    new = load_local(ROOT / "schemas", "dev.accord.CustomerChange")
    added = {"created", "clamped_from"}
    previous = {**new, "fields": [f for f in new["fields"] if f["name"] not in added]}
    assert resolution_problems(previous, new) == []  # BACKWARD
    assert resolution_problems(new, previous) == []  # FORWARD
