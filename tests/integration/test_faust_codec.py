"""Canonical records through the Faust codec, registered in the real registry."""

import datetime as dt
from decimal import Decimal

import pytest
from faust.serializers.codecs import get_codec, register

from streams.faust_codec import canonical_codec
from streams.registry import registry_client
from streams.settings import AccordSettings
from tests.support import isolated

pytestmark = pytest.mark.integration


def test_customer_change_round_trips_through_a_registered_faust_codec(
    stack: AccordSettings,
) -> None:
    settings = isolated(stack)
    codec = canonical_codec(
        settings, registry_client(settings), "dev.accord.CustomerChange", settings.topics.changes
    )
    register(settings.topics.changes, codec)
    now = dt.datetime(2026, 11, 22, 9, 30, 0, 123456, tzinfo=dt.UTC)
    change = {
        "change_id": "crm.public.customers|id=7|lsn:123",
        "system": "crm",
        "source_key": "7",
        "op": "UPSERT",
        "golden_id": None,
        "source_ts": now,
        "position": "lsn:123",
        "snapshot": False,
        "fields": {"email": "ada@example.com", "credit_limit": Decimal("10.50")},
        "present": ["email", "credit_limit"],
        "captured_at": now.replace(microsecond=123000),
    }
    payload = get_codec(settings.topics.changes).dumps(change)
    assert payload[0] == 0 and int.from_bytes(payload[1:5], "big") == codec.schema_id
    decoded = get_codec(settings.topics.changes).loads(payload)
    assert decoded["fields"]["email"] == "ada@example.com"
    assert decoded["fields"]["credit_limit"] == Decimal("10.50")
    assert decoded["fields"]["phone"] is None
    assert decoded["source_ts"] == now
    assert decoded["op"] == "UPSERT"
