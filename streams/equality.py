"""One equality for "the target holds the golden value". Pure, no I/O.

Appliers (what differs in a row, compare-and-set) and reconcile (drift) ask the same
question of the same values, so they answer it with the same function: were they to
disagree, reconcile would report drift on a row the applier leaves alone, or the other way
round, and `--repair` would loop. Values come from database drivers (Decimal, int, float,
bool, date, datetime, uuid, str) on one side and from golden records (str, bool,
Decimal, None; text after an Avro round trip) on the other.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["holds"]

_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})


def holds(current: Any, wanted: Any) -> bool:
    """Does a target value `current` hold the golden value `wanted`?

    - None only equals None: an empty string is a value, not the absence of one.
    - A bool on either side compares as a truth value (`True`, 1, `'t'`, `'yes'`); text
      that is not a truth value never equals a bool.
    - A number on either side (Decimal, int, float) compares by numeric value, so
      `Decimal('1.50')` holds `'1.5'` and `1.5`; text that is not a number never does.
    - A date or datetime on either side compares as a point in time with text in ISO
      8601 (`2024-05-01`, `2024-05-01T10:00:00+00:00`); a naive datetime is taken as UTC.
    - A UUID compares with its text in any case.
    - Anything else compares as text, exactly: whitespace and case are data.
    """
    if current is None or wanted is None:
        return current is None and wanted is None
    if isinstance(current, bool) or isinstance(wanted, bool):
        truth = _as_bool(current)
        return truth is not None and truth == _as_bool(wanted)
    if _numeric(current) or _numeric(wanted):
        left, right = _as_decimal(current), _as_decimal(wanted)
        return left is not None and right is not None and left == right
    if isinstance(current, (dt.date, dt.datetime)) or isinstance(wanted, (dt.date, dt.datetime)):
        left_t, right_t = _as_time(current), _as_time(wanted)
        return left_t is not None and left_t == right_t
    if isinstance(current, uuid.UUID) or isinstance(wanted, uuid.UUID):
        left_u, right_u = _as_uuid(current), _as_uuid(wanted)
        return left_u is not None and left_u == right_u
    return str(current) == str(wanted)


def _numeric(value: Any) -> bool:
    return isinstance(value, (Decimal, int, float)) and not isinstance(value, bool)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if _numeric(value):
        number = _as_decimal(value)
        return None if number is None else number != 0
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def _as_decimal(value: Any) -> Decimal | None:
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return None if number.is_nan() else number


def _as_time(value: Any) -> dt.date | dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    try:
        if len(text) == 10:
            return dt.date.fromisoformat(text)
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _as_uuid(value: Any) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value).strip())
    except ValueError:
        return None
