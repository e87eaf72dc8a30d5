"""Accord's own logic per event, stage by stage, with no Kafka, Redis or Faust around it.

    .venv/bin/python bench/stages_bench.py [--customers N]

The same generated Debezium events as the pipeline bench, each taken through the pure
functions the worker calls: decode (wire bytes -> Debezium change), map (normalise and
validate), the accord.changes record out and back in (Avro), the merge (read the state,
apply, plan sink orders, write the state), and what the emitter does with each new
revision (read it, build its outputs, encode them). Dedupe and identity are left out:
they are one Redis round trip per batch, not per-event work. A golden id is derived as
for a row that matches nothing.

The sum is the most one worker process could do if Kafka and Faust cost nothing: a floor
for the per-event cost, and where it goes. Figures go to
bench/results/<date>-stages.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fastavro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from figures import write_figures  # noqa: E402
from pipeline_bench import Template, _parsed, generate  # noqa: E402

from streams.codec import AvroCodec, SchemaCache  # noqa: E402
from streams.emit import outputs, plan_sinks  # noqa: E402
from streams.identity import golden_id_for  # noqa: E402
from streams.ingest import RawDecoder  # noqa: E402
from streams.mapping import Mapper, Rejected, load_mappings  # noqa: E402
from streams.merge import StateCache, apply, dumps, loads, stage  # noqa: E402
from streams.model import Change  # noqa: E402
from streams.projection import load_sinks  # noqa: E402
from streams.rules import load_rules  # noqa: E402
from streams.schemas import load_local  # noqa: E402
from streams.settings import load_settings  # noqa: E402
from tests import vectors  # noqa: E402


class Message:
    """A raw message with confluent-kafka's accessors, as `RawDecoder` reads them."""

    __slots__ = ("_key", "_offset", "_topic", "_value")

    def __init__(self, topic: str, key: bytes, value: bytes, offset: int) -> None:
        self._topic, self._key, self._value, self._offset = topic, key, value, offset

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def local_templates() -> tuple[dict[str, Template], dict[int, str]]:
    """The captured vectors with their own schema ids: no registry needed."""
    templates, schemas = {}, {}
    for system in ("crm", "billing", "support"):
        vector = vectors.load(f"{system}-c")
        key_id, key_schema, _ = _parsed(vector, vector.key)
        value_id, value_schema, envelope = _parsed(vector, vector.value)
        schemas[key_id], schemas[value_id] = vector.schemas[key_id], vector.schemas[value_id]
        templates[system] = Template(
            vector.topic, key_schema, value_schema, key_id, value_id, envelope
        )
    return templates, schemas


class Clock:
    """Seconds spent per stage, summed over events."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage_name: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        self.spent[stage_name] = self.spent.get(stage_name, 0.0) + time.perf_counter() - began


def measure(customers: int) -> dict[str, Any]:
    settings = load_settings()
    templates, schemas = local_templates()
    messages = [
        Message(topic, key, value, offset)
        for offset, (topic, key, value) in enumerate(generate(customers, templates))
    ]
    decoder = RawDecoder(AvroCodec(SchemaCache(schemas.__getitem__)))
    mapper = Mapper(load_mappings(settings.connectors_dir))
    rules = load_rules(settings.worker.rules_file)
    sinks = load_sinks(settings.connectors_dir)

    def parsed(name: str) -> Any:
        return fastavro.parse_schema(load_local(settings.schemas.directory, name))

    change_schema = parsed("dev.accord.CustomerChange")
    encoders = {
        kind: parsed(name)
        for kind, name in (
            ("golden", "dev.accord.Customer"),
            ("audit", "dev.accord.AuditEntry"),
            ("sink", "dev.accord.SinkEvent"),
        )
    }

    def encode(schema: Any, record: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, record)
        return out.getvalue()

    def emit(payload: bytes) -> int:
        result = outputs(loads(payload, cells=False), now_ms=0)
        records = [encode(encoders["audit"], entry) for entry in result.audit]
        records += [encode(encoders["sink"], event) for event in result.sinks]
        if result.golden is not None:
            records.append(encode(encoders["golden"], result.golden))
        return len(records)

    clock, table, states = Clock(), {}, StateCache(settings.worker.state_cache_size)
    revisions = records = 0
    for message in messages:
        with clock("decode"):
            source = decoder.decode(message)
        with clock("map"):
            mapped = mapper.map(source)
        if isinstance(mapped, Rejected):
            continue
        change = mapped.change.with_golden_id(
            golden_id_for(mapped.change.system, mapped.change.source_key)
        )
        with clock("change_encode"):
            wire = encode(change_schema, change.to_record())
        with clock("change_decode"):
            change = Change.from_record(fastavro.schemaless_reader(io.BytesIO(wire), change_schema))
        key = change.golden_id.encode()
        with clock("state_read"):
            state = states.get(key, table.get(key))
        with clock("merge"):
            outcome = apply(state, change, rules)
            if outcome.state_changed:
                stage(state, change, outcome, plan_sinks(state, change, sinks, rules))
        if not outcome.state_changed:
            continue
        with clock("state_write"):
            payload = dumps(state)
        table[key] = payload
        states.put(key, payload, state)
        revisions += 1
        with clock("emit"):
            records += emit(payload)

    events = len(messages)
    total = sum(clock.spent.values())
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "customers": customers,
        "events": events,
        "revisions": revisions,
        "output_records": records,
        "us_per_event": {name: round(s / events * 1e6, 1) for name, s in clock.spent.items()},
        "total_us_per_event": round(total / events * 1e6, 1),
        "events_per_s_floor": round(events / total, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=20_000)
    args = parser.parse_args()
    result = measure(args.customers)
    out = write_figures(result, "stages")
    print(json.dumps(result, indent=2))
    print(f"figures: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
