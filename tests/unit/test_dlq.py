"""Dead letters too big for the DLQ topic: cut to fit, with coordinates and a digest."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader

from streams.dlq import DeadLetter, DeadLetterWriter, StoredLetter, cut_to_fit, replay
from streams.errors import AccordError
from streams.schemas import load_local
from streams.settings import AccordSettings

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA = parse_schema(load_local(SCHEMAS, "dev.accord.DeadLetter"))


class Registry:
    def register_schema(self, subject: str, schema: Any) -> int:
        return 42


class Producer:
    def __init__(self) -> None:
        self.produced: list[dict[str, Any]] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.produced.append({"topic": topic, **kwargs})

    def flush(self, timeout: float = 0) -> int:
        return 0


def _letter(value: bytes | None, key: bytes | None = b"golden-1") -> DeadLetter:
    return DeadLetter.at(
        ("accord.changes", 4, 123_456),
        key,
        value,
        "state_too_large",
        "golden state of 1500582 bytes is above 900000",
        stage="merge",
    )


def _writer(max_bytes: int = 900_000) -> tuple[DeadLetterWriter, Producer]:
    settings = AccordSettings()
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"max_record_bytes": max_bytes})}
    )
    producer = Producer()
    return DeadLetterWriter(settings, Registry(), producer), producer  # type: ignore[arg-type]


def _decoded(payload: bytes) -> dict[str, Any]:
    stream = io.BytesIO(payload)
    assert stream.read(5) == b"\x00" + (42).to_bytes(4, "big")
    return schemaless_reader(stream, SCHEMA, None)


def test_a_letter_that_fits_is_written_whole() -> None:
    writer, producer = _writer()
    letter = _letter(b"\x00" * 1000)
    writer.write(letter)
    (sent,) = producer.produced
    record = _decoded(sent["value"])
    assert record["value"] == letter.value and record["truncated"] is False
    assert record["replayable"] is True and record["value_sha256"] is None
    assert sent["key"] == b"accord.changes/4/123456"


def test_a_letter_of_1_2_mb_is_cut_to_fit_and_keeps_coordinates_and_digest() -> None:
    value = bytes(range(256)) * (1_200_000 // 256)
    writer, producer = _writer(900_000)
    writer.write(_letter(value))
    (sent,) = producer.produced
    assert len(sent["value"]) <= 900_000
    record = _decoded(sent["value"])
    assert (record["topic"], record["partition"], record["offset"]) == (
        "accord.changes",
        4,
        123_456,
    )
    assert record["reason"] == "state_too_large"
    assert record["truncated"] is True and record["replayable"] is False
    assert record["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert record["value_size"] == len(value)
    assert value.startswith(record["value"]) and len(record["value"]) > 800_000
    assert record["key"] == b"golden-1"
    assert "truncated" in record["detail"] and "900000" in record["detail"]  # original kept
    assert hashlib.sha256(value).hexdigest() in record["detail"]


def test_a_huge_key_is_cut_too() -> None:
    letter = cut_to_fit(_letter(b"v", key=b"k" * 50_000), 20_000, overhead=200)
    assert letter.key == b"k" * 1024 and letter.value == b"v"
    assert "key cut to 1024 of 50000 bytes" in letter.detail
    assert letter.value_sha256 == hashlib.sha256(b"v").hexdigest()


def test_a_limit_below_the_letters_own_fields_is_a_clear_error() -> None:
    writer, _ = _writer(16_384)
    letter = DeadLetter.at(("t", 0, 1), None, b"x" * 20_000, "r", "d" * 2000, "merge")
    assert len(writer.encode(letter)) <= 16_384  # fits once cut
    writer.max_bytes = 600
    with pytest.raises(AccordError, match="max_record_bytes"):
        writer.encode(letter)


def test_replay_refuses_letters_that_are_not_replayable() -> None:
    class Redis:
        def set(self, *args: Any, **kwargs: Any) -> bool:
            return True

    whole = StoredLetter(0, 1, {**_letter(b"v").record()})
    cut = StoredLetter(0, 2, cut_to_fit(_letter(b"v" * 10_000), 5_000, 100).record())
    old = StoredLetter(0, 3, {k: v for k, v in _letter(b"w").record().items()
                              if k not in ("truncated", "replayable")})  # fmt: skip
    producer = Producer()
    report = replay(AccordSettings(), [whole, cut, old], Redis(), producer)
    assert report.replayed == ["0:1", "0:3"] and report.refused == ["0:2"]
    assert [p["value"] for p in producer.produced] == [b"v", b"w"]
