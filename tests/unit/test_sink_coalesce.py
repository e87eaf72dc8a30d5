"""An applier that fell behind folds a row's queued updates into the newest one."""

from __future__ import annotations

from typing import Any

from streams.sinks import coalesce


def event(
    version: int,
    changed: dict[str, Any],
    expected: dict[str, Any] | None,
    key: str | None = "r1",
    op: str = "UPSERT",
    golden: str = "g1",
) -> dict[str, Any]:
    return {
        "target": "support",
        "golden_id": golden,
        "target_key": key,
        "op": op,
        "golden_version": version,
        "changed": list(changed),
        "fields": dict(changed),
        "expected": expected,
    }


def test_queued_updates_of_one_row_are_skipped_for_the_newest_that_covers_them() -> None:
    records = [
        event(12, {"phone": "+1"}, {"phone": "+0"}),
        event(14, {"phone": "+2", "display_name": "Ada"}, {"phone": "+0", "display_name": "a"}),
        event(16, {"phone": "+3", "display_name": "Ada L"}, {"phone": "+0", "display_name": "a"}),
    ]
    assert coalesce(records) == {0: 2, 1: 2}  # each waits for the event that is applied
    assert records[2]["changed"] == ["phone", "display_name"]  # left as it was


def test_an_update_with_a_field_the_next_does_not_change_is_applied() -> None:
    records = [
        event(12, {"phone": "+1", "display_name": "Ada"}, {"phone": "+0", "display_name": "a"}),
        event(14, {"phone": "+2"}, {"phone": "+0"}),
    ]
    assert coalesce(records) == {}


def test_other_rows_creates_deletes_and_tombstones_are_not_folded() -> None:
    records = [
        event(1, {"phone": "+1"}, None, key=None),  # a create: its key is not known yet
        event(2, {"phone": "+2"}, {"phone": "+1"}, golden="g2"),
        None,  # a tombstone
        event(3, {"phone": "+3"}, {"phone": "+2"}),
        event(4, {}, None, op="DELETE"),
        event(5, {"phone": "+5"}, {"phone": "+4"}),
        event(6, {"phone": "+6"}, {"phone": "+5"}, golden="g2"),
    ]
    assert coalesce(records) == {1: 6}  # only g2's two updates, across the others
