"""The merge agent's helpers that lean on Faust internals, against the installed Faust."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from faust.events import Event
from faust.types.tuples import Message

from streams.app import ack_now


def _event(app: faust.App, offset: int) -> Event:
    message = Message("accord.changes", 0, offset, 0.0, 0, None, b"k", b"v", None, None)
    message.incref()
    return Event(app, b"k", b"v", {}, message)


def test_ack_now_acks_through_fausts_own_stream_ack() -> None:
    async def ack_one() -> bool:
        app = faust.App("unit-ack", broker="kafka://127.0.0.1:1")  # never connected
        event = _event(app, 7)
        ack_now(app.stream(app.channel()), event)
        return event.message.acked

    assert asyncio.run(ack_one()) is True


def test_ack_now_refuses_an_ack_that_awaits() -> None:
    class AwaitingStream:
        async def ack(self, event: Any) -> bool:
            await asyncio.sleep(0)
            return True

    with pytest.raises(RuntimeError, match="awaited"):
        ack_now(AwaitingStream(), object())  # type: ignore[arg-type]
