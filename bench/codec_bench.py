"""Codec micro-benchmark: Accord's decode and encode beside fastavro's bare calls.

    make bench        (or: .venv/bin/python bench/codec_bench.py [--records N])

The payload is a Debezium change envelope shaped like the billing connector's, widened
to 40 columns of the types Debezium emits (strings, decimals, zoned timestamps, enums,
numbers, booleans). The ceiling is fastavro's `schemaless_reader`/`schemaless_writer` on
the same bytes, measured in the same run. Figures go to bench/results/<date>-codec.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import fastavro
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from figures import write_figures

from streams.codec import AvroCodec, SchemaCache
from streams.debezium import EnvelopeReader

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "tests" / "vectors" / "debezium" / "billing-c.json"
COLUMNS = 40
SCHEMA_ID = 4242


def wide_envelope() -> dict:
    """The captured billing envelope schema, its row widened to COLUMNS columns."""
    vector = json.loads(VECTOR.read_text())
    schema_id = int.from_bytes(bytes.fromhex(vector["value_hex"])[1:5], "big")
    envelope = json.loads(vector["schemas"][str(schema_id)])
    row = next(f for f in envelope["fields"] if f["name"] == "before")["type"][1]
    templates = [f["type"] for f in row["fields"]]
    extra_types = [
        ["null", "string"],
        ["null", "long"],
        ["null", "int"],
        ["null", "boolean"],
        [
            "null",
            {
                "type": "bytes",
                "scale": 2,
                "precision": 12,
                "logicalType": "decimal",
                "connect.name": "org.apache.kafka.connect.data.Decimal",
            },
        ],
        ["null", {"type": "string", "connect.name": "io.debezium.time.ZonedTimestamp"}],
    ]
    for index in range(len(row["fields"]), COLUMNS):
        row["fields"].append(
            {
                "name": f"extra_{index}",
                "type": extra_types[index % len(extra_types)],
                "default": None,
            }
        )
    assert len(row["fields"]) == COLUMNS and templates
    return envelope


def sample_row(rng: random.Random, index: int) -> dict:
    row = {
        "account_no": f"AC-{index:08d}",
        "legal_name": f"Company {index} Ltd",
        "contact_email": f"person{index}@example.com",
        "phone": "+442079460018",
        "tax_id": f"GB{rng.randrange(10**8, 10**9)}",
        "billing_street": f"{index} High St",
        "billing_city": "London",
        "billing_postal_code": "SW1Y 4JH",
        "billing_country": "GB",
        "currency": "GBP",
        "payment_terms": "NET30",
        "credit_limit": Decimal(rng.randrange(0, 10**8)) / 100,
        "status": "active",
        "updated_at": "2026-11-22T08:00:00.123456Z",
    }
    makers = [
        lambda: f"value-{rng.randrange(10**6)}",
        lambda: rng.randrange(2**40),
        lambda: rng.randrange(2**20),
        lambda: rng.random() < 0.5,
        lambda: Decimal(rng.randrange(10**7)) / 100,
        lambda: "2026-11-22T08:00:00Z",
    ]
    for column in range(len(row), COLUMNS):
        row[f"extra_{column}"] = makers[column % len(makers)]() if rng.random() < 0.85 else None
    return row


def envelope(rng: random.Random, index: int) -> dict:
    after = sample_row(rng, index)
    return {
        "before": None,
        "after": after,
        "source": {
            "version": "3.5.0.Final",
            "connector": "mariadb",
            "name": "billing",
            "ts_ms": 1795335786870,
            "snapshot": "false",
            "db": "billing",
            "sequence": None,
            "ts_us": 1795335786870123,
            "ts_ns": 1795335786870123000,
            "table": "accounts",
            "server_id": 1,
            "gtid": "0-1-42",
            "file": "accord-bin.000004",
            "pos": 8084 + index,
            "row": 0,
            "thread": 7,
            "query": None,
        },
        "transaction": None,
        "op": "c",
        "ts_ms": 1795335786900,
        "ts_us": 1795335786900123,
        "ts_ns": 1795335786900123000,
    }


def rate(fn: Callable[[], None], count: int, repeats: int) -> float:
    """Best of `repeats` runs, in records per second."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    schema = wide_envelope()
    parsed = parse_schema(schema)
    rng = random.Random(7)
    records = [envelope(rng, i) for i in range(args.records)]
    payloads = [AvroCodec.encode(r, SCHEMA_ID, parsed) for r in records]
    codec = AvroCodec(SchemaCache(lambda _id: json.dumps(schema)))
    codec.decode(payloads[0])  # the one registry fetch happens before timing
    envelopes = EnvelopeReader()
    decoded_first = codec.decode(payloads[0])

    def bare_decode() -> None:
        for payload in payloads:
            body = io.BytesIO(payload)
            body.seek(5)
            schemaless_reader(body, parsed, None)

    def accord_decode() -> None:
        for payload in payloads:
            codec.decode(payload)

    def accord_decode_unwrap() -> None:
        for payload in payloads:
            decoded = codec.decode(payload)
            envelopes.unwrap("billing.billing.accounts", {}, None, decoded.value, decoded.schema)

    def bare_encode() -> None:
        for record in records:
            out = io.BytesIO()
            out.write(b"\x00\x00\x00\x10\x92")
            schemaless_writer(out, parsed, record)

    def accord_encode() -> None:
        for record in records:
            AvroCodec.encode(record, SCHEMA_ID, parsed)

    assert decoded_first.value["after"]["account_no"] == "AC-00000000"
    n, k = args.records, args.repeats
    figures = {
        "decode_ceiling_per_s": rate(bare_decode, n, k),
        "decode_accord_per_s": rate(accord_decode, n, k),
        "decode_unwrap_accord_per_s": rate(accord_decode_unwrap, n, k),
        "encode_ceiling_per_s": rate(bare_encode, n, k),
        "encode_accord_per_s": rate(accord_encode, n, k),
    }
    figures["decode_ratio"] = figures["decode_accord_per_s"] / figures["decode_ceiling_per_s"]
    figures["encode_ratio"] = figures["encode_accord_per_s"] / figures["encode_ceiling_per_s"]
    result = {
        "benchmark": "codec",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "records": n,
        "repeats": k,
        "columns": COLUMNS,
        "payload_bytes_avg": sum(map(len, payloads)) / n,
        "python": sys.version.split()[0],
        "fastavro": fastavro.__version__,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "aim": "Accord at >= 80% of the ceiling",
        **figures,
    }
    out = write_figures(result, "codec")
    print(
        f"codec, {COLUMNS}-column Debezium envelope, {result['payload_bytes_avg']:.0f} B avg, "
        f"{n} records, best of {k}"
    )
    print(
        f"  decode   ceiling {figures['decode_ceiling_per_s']:>10,.0f}/s   "
        f"accord {figures['decode_accord_per_s']:>10,.0f}/s   "
        f"ratio {figures['decode_ratio']:.0%}"
    )
    print(
        f"  encode   ceiling {figures['encode_ceiling_per_s']:>10,.0f}/s   "
        f"accord {figures['encode_accord_per_s']:>10,.0f}/s   "
        f"ratio {figures['encode_ratio']:.0%}"
    )
    print(
        f"  decode + unwrap with Debezium type conversion: "
        f"{figures['decode_unwrap_accord_per_s']:,.0f}/s (no ceiling: fastavro has no equivalent)"
    )
    print(f"  written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
