"""Accord's pipeline written plainly on Quix Streams: the peer of the throughput benchmark.

    python bench/quix_peer.py --config peer.json   (in its own venv: see bench/peer.py)

The same events and the same pure logic as Accord's worker, wired the way a user who
chose Quix Streams would wire them, one message at a time in a StreamingDataFrame:

    raw topic (one dataframe each)
      -> decode by writer schema id and unwrap the envelope (`RawDecoder`)
      -> map and validate (`Mapper`); a refusal or an undecodable message branches off
         to the dead-letter topic
      -> dedupe in Quix state (RocksDB, changelog-backed), scoped by the raw message key
         (the source row): a change id first carried by another message is dropped, a
         redelivery of the same message is kept, as `streams.dedupe` decides it
      -> identity with Accord's `IdentityResolver` on Redis (this run's key prefix): the
         match rules need a lookup across systems and partitions, which a partitioned
         Quix store cannot give; a Quix user would keep that index in a shared store
         too. One round trip per message, since a dataframe sees one message at a time.
    concat of the three -> group_by(golden id) (Quix's repartition topic)
      -> merge into the golden state in Quix state (`merge.apply`, `plan_sinks`,
         `stage`; stored as `merge.dumps` text)
      -> the revision's outputs (`emit.outputs`) to golden, audit and sink.<target>
         topics, keyed by golden id.

Outputs and dead letters are JSON (orjson; decimals as text, bytes as base64), not
Avro: enough to count and inspect them, and the encoding is not what is compared. A
registry or Redis outage raises and stops the app (at-least-once: the batch is redone
after a restart); Accord instead pauses and retries.

The config file (JSON) names: bootstrap_servers, kafka (extra librdkafka settings, e.g.
security), raw_topics, registry_url, registry_auth (or null), redis_url, redis_prefix,
redis_credentials (username, password; or {}), output_prefix, consumer_group, state_dir,
connectors_dir, rules_file, commit_interval_s, status_file. Secrets sit in that file: it
lives in the run's git-ignored state folder and is deleted with it. The status file gets
one JSON line at the first consumed event (wall time and the process's CPU seconds then)
and one with the counts when the app stops.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka.schema_registry import SchemaRegistryClient
from quixstreams import Application, State, message_context
from quixstreams.models import TopicConfig
from quixstreams.models.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # works without the editable install too
    sys.path.insert(0, str(ROOT))

from streams.codec import AvroCodec, SchemaCache, registry_fetcher  # noqa: E402
from streams.dedupe import origin_of  # noqa: E402
from streams.dlq import DeadLetter  # noqa: E402
from streams.emit import outputs, plan_sinks, repair  # noqa: E402
from streams.identity import IdentityResolver  # noqa: E402
from streams.ingest import RawDecoder, ValidationFailed  # noqa: E402
from streams.mapping import Mapper, Rejected, load_mappings  # noqa: E402
from streams.merge import GoldenState, apply, dumps, loads, stage  # noqa: E402
from streams.model import DECIMAL_FIELDS, Change, Op  # noqa: E402
from streams.projection import load_sinks  # noqa: E402
from streams.registry import MAX_RETRIES, REQUEST_TIMEOUT_S  # noqa: E402
from streams.rules import load_rules  # noqa: E402

PARTITIONS = 6
GOLDEN_KEY = "golden"  # the merge store's one entry per golden id


# ------------------------------------------------------------------------ plumbing


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def json_dumps(value: Any) -> bytes:
    """orjson with Accord's value types: decimals as text, raw bytes as base64."""
    return orjson.dumps(value, default=_json_default)


def change_to_json(change: Change) -> dict[str, Any]:
    """A `Change` as the repartition topic's JSON (decimals as text)."""
    return {
        "change_id": change.change_id,
        "system": change.system,
        "source_key": change.source_key,
        "op": change.op.value,
        "source_ts": change.source_ts,
        "position": change.position,
        "values": {
            name: format(value, "f") if isinstance(value, Decimal) else value
            for name, value in change.values.items()
        },
        "snapshot": change.snapshot,
        "golden_id": change.golden_id,
        "captured_at_ms": change.captured_at_ms,
        "observed": change.observed,
    }


def change_from_json(data: dict[str, Any]) -> Change:
    values = {
        name: Decimal(value) if name in DECIMAL_FIELDS and value is not None else value
        for name, value in data["values"].items()
    }
    return Change(
        change_id=data["change_id"],
        system=data["system"],
        source_key=data["source_key"],
        op=Op(data["op"]),
        source_ts=data["source_ts"],
        position=data["position"],
        values=values,
        snapshot=data["snapshot"],
        golden_id=data["golden_id"],
        captured_at_ms=data["captured_at_ms"],
        observed=data["observed"],
    )


class _RawMessage:
    """The accessors `RawDecoder` and `DeadLetter.of` read (confluent-kafka's)."""

    __slots__ = ("_key", "_offset", "_partition", "_topic", "_value")

    def __init__(self, value: bytes | None, key: bytes | None) -> None:
        context = message_context()
        self._topic, self._partition, self._offset = (
            context.topic,
            context.partition,
            context.offset,
        )
        self._key, self._value = key, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value


def _cpu_s() -> float:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Counts:
    """What the peer did with what it read; written to the status file at the end."""

    consumed: int = 0
    tombstones: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    unknown_deletes: int = 0
    changes: int = 0
    merged: int = 0
    no_ops: int = 0
    golden: int = 0
    audit: int = 0
    sink: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


# ------------------------------------------------------------------------ the steps


class Steps:
    """The dataframe's callbacks: Accord's pure functions, one message at a time."""

    def __init__(self, config: dict[str, Any]) -> None:
        registry_config: dict[str, Any] = {
            "url": config["registry_url"],
            "timeout": REQUEST_TIMEOUT_S,
            "max.retries": MAX_RETRIES,
        }
        if config.get("registry_auth"):
            registry_config["basic.auth.user.info"] = config["registry_auth"]
        registry = SchemaRegistryClient(registry_config)
        connectors = Path(config["connectors_dir"])
        self.rules = load_rules(Path(config["rules_file"]))
        self.decoder = RawDecoder(AvroCodec(SchemaCache(registry_fetcher(registry))))
        self.mapper = Mapper(load_mappings(connectors))
        self.sinks = load_sinks(connectors)
        client = redis.Redis.from_url(
            config["redis_url"], **(config.get("redis_credentials") or {}), socket_timeout=5
        )
        self.identity = IdentityResolver(
            client,
            config["redis_prefix"],
            self.rules.match,
            key_secret=config["match_key_secret"].encode(),
        )
        self.counts = Counts()
        self.status_file = Path(config["status_file"])

    def decode(self, value: bytes | None, key: bytes | None, _ts: int, _h: Any) -> Any:
        """A change (JSON), a dead letter (its record, with "reason"), or None."""
        if self.counts.consumed == 0:
            self._first_event()
        self.counts.consumed += 1
        message = _RawMessage(value, key)
        decoded = self.decoder.decode(message)
        if decoded is None:
            self.counts.tombstones += 1
            return None
        if isinstance(decoded, DeadLetter):
            self.counts.dead_letters += 1
            return decoded.record()
        outcome = self.mapper.map(decoded)
        if isinstance(outcome, Rejected):
            self.counts.dead_letters += 1
            error = ValidationFailed(outcome.describe())
            return DeadLetter.of(message, outcome.reason, error, "map").record()
        change = change_to_json(outcome.change)
        change["origin"] = origin_of(message.topic(), message.partition(), message.offset())
        return change

    def dedupe(self, change: dict[str, Any], state: State) -> dict[str, Any] | None:
        """Drop a change id first carried by another message (a replay); keep redeliveries."""
        origin = change.pop("origin")
        first = state.get(change["change_id"])
        if first is None:
            state.set(change["change_id"], origin)
        elif first != origin:
            self.counts.duplicates += 1
            return None
        return change

    def resolve(self, change: dict[str, Any]) -> dict[str, Any] | None:
        """The golden id, from Redis; None (dropped) for a delete of a row never seen."""
        golden_id = self.identity.resolve([change_from_json(change)])[0]
        if golden_id is None:
            self.counts.unknown_deletes += 1
            return None
        self.counts.changes += 1
        change["golden_id"] = golden_id
        return change

    def merge(self, data: dict[str, Any], state: State) -> list[dict[str, Any]]:
        """Merge into the golden state; the new revision's outputs, if any."""
        change = change_from_json(data)
        stored = state.get(GOLDEN_KEY)
        golden = loads(stored.encode()) if stored else GoldenState(change.golden_id or "")
        if change.observed:
            outcome = repair(golden, change, self.sinks, self.rules)
        else:
            outcome = apply(golden, change, self.rules)
            if outcome.state_changed:
                stage(golden, change, outcome, plan_sinks(golden, change, self.sinks, self.rules))
        if not outcome.state_changed:
            self.counts.no_ops += 1
            return []
        self.counts.merged += 1
        state.set(GOLDEN_KEY, dumps(golden).decode())
        if not golden.fresh:
            return []
        result = outputs(golden, int(time.time() * 1000))
        records: list[dict[str, Any]] = []
        if result.golden is not None:
            records.append(result.golden)
            self.counts.golden += 1
        records += result.audit
        records += result.sinks
        self.counts.audit += len(result.audit)
        self.counts.sink += len(result.sinks)
        return records

    def _first_event(self) -> None:
        self._status({"first_event": time.time(), "cpu_s": _cpu_s()})

    def finish(self) -> None:
        self._status({"stopped": time.time(), "counts": self.counts.as_dict()})

    def _status(self, line: dict[str, Any]) -> None:
        with self.status_file.open("a") as out:
            out.write(json.dumps(line) + "\n")


# ---------------------------------------------------------------------- the pipeline


def build(config: dict[str, Any]) -> tuple[Application, Steps]:
    """The Application and its dataframes; `app.run()` starts them."""
    steps = Steps(config)
    kafka = dict(config.get("kafka") or {})
    app = Application(
        broker_address=config["bootstrap_servers"],
        consumer_group=config["consumer_group"],
        auto_offset_reset="earliest",
        commit_interval=float(config.get("commit_interval_s", 1.0)),
        state_dir=config["state_dir"],
        consumer_extra_config=kafka,
        producer_extra_config=kafka,
        loglevel="WARNING",
    )
    out = config["output_prefix"]
    made = TopicConfig(num_partitions=PARTITIONS, replication_factor=1)
    as_json = JSONSerializer(dumps=json_dumps)

    def output(name: str) -> Any:
        return app.topic(
            f"{out}{name}", key_serializer="str", value_serializer=as_json, config=made
        )

    dlq, golden, audit = output("dlq"), output("golden"), output("audit")
    sinks = {target: output(f"sink.{target}") for target in steps.sinks}

    def route(record: dict[str, Any], *_: Any) -> Any:
        if "audit_id" in record:
            return audit
        if "event_id" in record:
            return sinks[record["target"]]
        return golden

    ingested = None
    for name in config["raw_topics"]:
        raw = app.topic(name, key_deserializer="bytes", value_deserializer="bytes")
        sdf = app.dataframe(raw).apply(steps.decode, metadata=True)
        sdf = sdf.filter(lambda value: value is not None)
        dead = sdf.filter(lambda value: "reason" in value)
        dead.to_topic(dlq, key=lambda v: origin_of(v["topic"], v["partition"], v["offset"]))
        sdf = sdf.filter(lambda value: "reason" not in value)
        sdf = sdf.apply(steps.dedupe, stateful=True).filter(lambda value: value is not None)
        sdf = sdf.apply(steps.resolve).filter(lambda value: value is not None)
        ingested = sdf if ingested is None else ingested.concat(sdf)
    if ingested is None:
        raise SystemExit("no raw topics in the config")

    changes = ingested.group_by(
        lambda change: change["golden_id"],
        name="golden_id",
        key_serializer="str",
        key_deserializer="str",
    )
    changes.apply(steps.merge, stateful=True, expand=True).to_topic(route)
    return app, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    app, steps = build(config)
    try:
        app.run()  # until SIGTERM or SIGINT
    finally:
        steps.finish()


if __name__ == "__main__":
    main()
