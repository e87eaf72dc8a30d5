"""Real Debezium messages captured from the stack (see capture.py), for unit tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from streams.codec import SchemaNotFound

DIR = Path(__file__).with_name("debezium")


@dataclass(frozen=True)
class Vector:
    name: str
    topic: str
    key: bytes | None
    value: bytes | None
    schemas: dict[int, str]

    def fetch(self, schema_id: int) -> str:
        """A registry stand-in that knows exactly this vector's schemas."""
        if schema_id not in self.schemas:
            raise SchemaNotFound(f"no schema {schema_id}")
        return self.schemas[schema_id]


def load(name: str) -> Vector:
    raw = json.loads((DIR / f"{name}.json").read_text())
    return Vector(
        name=name,
        topic=raw["topic"],
        key=bytes.fromhex(raw["key_hex"]) if raw["key_hex"] else None,
        value=bytes.fromhex(raw["value_hex"]) if raw["value_hex"] else None,
        schemas={int(k): v for k, v in raw["schemas"].items()},
    )


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.json"))


@dataclass
class Message:
    """A Kafka message as plain data, with confluent-kafka's accessors."""

    _topic: str
    _key: bytes | None
    _value: bytes | None
    _offset: int = 41
    _partition: int = 2

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return self._partition
