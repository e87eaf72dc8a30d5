"""The merge agent's helpers that lean on Faust internals, against the installed Faust."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from confluent_kafka import KafkaError, KafkaException
from faust.events import Event
from faust.types.tuples import Message

from streams import app as app_module
from streams.app import UNDECODABLE, AcksAfterWrites, ack_now, decode_change
from streams.codec import DecodeError, DecodeReason, RegistryUnavailable
from streams.model import Change, Op
from streams.refusal import Refusal, RefusedWrites


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


# ------------------------------------------------------------ poison in the merge


def _change_record() -> dict[str, Any]:
    return Change("crm|1|p1", "crm", "1", Op.UPSERT, 1, "p1", {"email": "a@x.io"}).to_record()


class _Codec:
    schema_id = 7

    def __init__(self, *results: Any) -> None:
        self.results = list(results)

    def loads(self, value: bytes) -> Any:
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


def _decode(codec: _Codec, value: bytes | None) -> Any:
    return asyncio.run(decode_change(codec, value))  # type: ignore[arg-type]


def test_an_undecodable_change_is_a_refusal_not_a_crash() -> None:
    garbage = DecodeError(DecodeReason.BAD_MAGIC, "first byte is 0x67, not 0x00")
    refusal = _decode(_Codec(garbage), b"garbage")
    assert refusal == Refusal(UNDECODABLE, "bad_magic_byte: first byte is 0x67, not 0x00")
    assert _decode(_Codec(), None).reason == UNDECODABLE  # no value at all
    not_a_change = _decode(_Codec({"fields": {}}), b"\x00\x00\x00\x00\x01")
    assert not_a_change.reason == UNDECODABLE and "not a change record" in not_a_change.detail


def test_an_unreachable_registry_is_waited_for_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "REGISTRY_RETRY_S", (0.0,))
    outage = RegistryUnavailable("registry unreachable")
    change = _decode(_Codec(outage, outage, _change_record()), b"\x00...")
    assert isinstance(change, Change) and change.values == {"email": "a@x.io"}


class _Table:
    def __init__(self) -> None:
        self.undone: list[tuple[Any, ...]] = []
        self.refused_writes = RefusedWrites()

    def undo(self, *args: Any) -> None:
        self.undone.append(args)


class _Letters:
    def __init__(self) -> None:
        self.refused: list[tuple[Any, Refusal]] = []

    async def refuse(self, event: Any, refusal: Refusal) -> None:
        self.refused.append((event, refusal))


class _App:
    def __init__(self) -> None:
        self.crashed: list[BaseException] = []

    async def crash(self, error: BaseException) -> None:
        self.crashed.append(error)


def _write_fails(error: BaseException | None) -> tuple[_App, _Table, _Letters, Event]:
    async def run() -> tuple[_App, _Table, _Letters, Event]:
        app = faust.App("unit-acks", broker="kafka://127.0.0.1:1")  # never connected
        stream = app.stream(app.channel())
        fake_app, table, letters = _App(), _Table(), _Letters()
        acks = AcksAfterWrites(fake_app, stream, table, letters)  # type: ignore[arg-type]
        event = _event(app, 9)
        write = asyncio.get_running_loop().create_future()
        acks.after(write, event, b"k", b"refused-state", b"state-before")
        if error is None:
            write.set_result(9)
        else:
            write.set_exception(error)
        for _ in range(3):  # the callback, then the task it keeps
            await asyncio.sleep(0)
        return fake_app, table, letters, event

    return asyncio.run(run())


def test_a_write_the_broker_refuses_is_undone_and_its_change_dead_lettered() -> None:
    too_big = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    app, table, letters, event = _write_fails(too_big)
    assert app.crashed == []
    assert table.undone == [(0, b"k", b"refused-state", b"state-before")]
    ((refused_event, refusal),) = letters.refused
    assert refused_event is event and refusal.reason == "produce_refused"


def test_a_write_that_fails_for_another_reason_still_stops_the_worker() -> None:
    timed_out = KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT))
    app, table, letters, event = _write_fails(timed_out)
    assert app.crashed == [timed_out]
    assert table.undone == [] and letters.refused == [] and not event.message.acked


def test_a_confirmed_write_acks_its_change() -> None:
    app, _table, letters, event = _write_fails(None)
    assert event.message.acked and app.crashed == [] and letters.refused == []
