"""Projections: which canonical fields a target receives, and how they become its columns.

A target is a connected system that Accord writes golden values back into. Its `sink:`
section (in `connectors/<system>/mapping.yaml`, or `connectors/<name>/sink.yaml` for a
target that is not also a source, such as a webhook) names its columns and the
canonical value each column is made from. Data minimisation follows: a target receives
only the fields its columns are made from.

    sink:
      kind: sql                       # sql (the system's own database) | webhook
      table: users
      key: {column: id, generate: uuid}
      create: true                    # insert rows for golden records it does not have
      adopt_by: [email]               # ...unless a row with that email is there already
      delete: true                    # apply deletes under the `propagate` policy
      columns:
        email: email                  # column: canonical field
        display_name: {join: [first_name, last_name], sep: " "}

Pure: parsing and `SinkSpec.project`; the appliers in `streams.sinks` do the writing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

from streams.errors import ConfigError
from streams.model import FIELDS, Value
from streams.yamlconf import Map, Problems, did_you_mean, line_of, read

SINK_FILE = "sink.yaml"


class SinkKind(StrEnum):
    SQL = "sql"
    WEBHOOK = "webhook"


# Options a sink of another kind refuses rather than ignores.
OPTION_KINDS = {"adopt_by": SinkKind.SQL}
WEBHOOK_OPTIONS = (
    "url", "secret_env", "timeout_s", "unsigned", "legacy_signature", "insecure_http",
    "log_maxlen",
)  # fmt: skip
OPTION_KINDS.update(dict.fromkeys(WEBHOOK_OPTIONS, SinkKind.WEBHOOK))
# Entries the webhook's applied-events stream (`<prefix>sinklog:<target>`) keeps, about.
DEFAULT_LOG_MAXLEN = 100_000


class KeyGeneration(StrEnum):
    """How an applier makes the key of a row it creates, before inserting it."""

    SEQUENCE = "sequence"  # nextval() of the key column's PostgreSQL sequence
    UUID = "uuid"  # uuid5 of the golden id: the same on every retry
    TEMPLATE = "template"  # str.format with golden_id, e.g. "AC-{golden_id:.8}"
    NONE = "none"  # the target cannot have rows created


@dataclass(frozen=True)
class Column:
    """One target column and the canonical value it is made from."""

    name: str
    fields: tuple[str, ...]  # canonical fields it depends on
    sep: str = " "  # for a join of several fields

    def value(self, values: Mapping[str, Value]) -> Value:
        if len(self.fields) == 1:
            return values.get(self.fields[0])
        parts = [str(values[f]) for f in self.fields if values.get(f) not in (None, "")]
        return self.sep.join(parts) or None


@dataclass(frozen=True)
class SinkSpec:
    target: str
    kind: SinkKind
    columns: tuple[Column, ...]
    table: str | None = None  # sql
    key_column: str | None = None  # sql
    key_generation: KeyGeneration = KeyGeneration.NONE
    key_template: str | None = None
    create: bool = False
    adopt_by: tuple[str, ...] = ()  # sql: columns that find a row to adopt, not create
    delete: bool = False
    url: str | None = None  # webhook
    secret_env: str | None = None  # webhook: environment variable holding the HMAC key
    timeout_s: float = 10.0  # webhook
    unsigned: bool = False  # webhook: no secret, requests unsigned (chosen explicitly)
    legacy_signature: bool = False  # webhook: also the body-only signature, for one release
    insecure_http: bool = False  # webhook: a plain http:// url allowed
    log_maxlen: int = DEFAULT_LOG_MAXLEN  # webhook: MAXLEN ~ of the applied-events stream

    @cached_property  # read for every sink of every merged change
    def fields(self) -> tuple[str, ...]:
        """The canonical fields this target receives, in canonical order."""
        used = {f for column in self.columns for f in column.fields}
        return tuple(f for f in FIELDS if f in used)

    def project(self, values: Mapping[str, Value]) -> dict[str, Value]:
        """Column name -> value, for every column."""
        return {column.name: column.value(values) for column in self.columns}

    def columns_for(self, changed: set[str] | frozenset[str]) -> tuple[Column, ...]:
        """The columns that depend on any of the changed fields."""
        return tuple(c for c in self.columns if changed.intersection(c.fields))


def load_sinks(connectors_dir: Path) -> dict[str, SinkSpec]:
    """Every target's sink spec: `sink:` in mapping.yaml files and stand-alone sink.yaml."""
    specs: dict[str, SinkSpec] = {}
    for path in sorted(connectors_dir.glob("*/mapping.yaml")) + sorted(
        connectors_dir.glob(f"*/{SINK_FILE}")
    ):
        document = read(path)
        if not isinstance(document, Map) or "sink" not in document:
            continue
        target = path.parent.name
        if target in specs:
            raise ConfigError(f"{path}: target {target!r} has a sink section already")
        specs[target] = parse_sink(target, document["sink"], path, line_of(document, "sink"))
    return specs


def parse_sink(target: str, raw: Any, path: Path, line: int = 1) -> SinkSpec:
    problems = Problems(path)
    if not isinstance(raw, Mapping):
        raise problems.fatal(line, "sink must be a mapping")

    def at(key: str) -> int:
        return line_of(raw, key) if isinstance(raw, Map) else line

    allowed = {
        "kind", "table", "key", "create", "adopt_by", "delete", "columns", "fields", "url",
        "secret_env", "timeout_s",
    }  # fmt: skip
    allowed.update(WEBHOOK_OPTIONS)
    for key in raw:
        if key not in allowed:
            problems.add(at(key), f"sink: unknown option {key!r}{did_you_mean(key, allowed)}")
    try:
        kind = SinkKind(raw.get("kind", "sql"))
    except ValueError:
        raise problems.fatal(at("kind"), "sink: kind must be sql or webhook") from None
    for option, only in OPTION_KINDS.items():
        if option in raw and kind is not only:
            problems.add(at(option), f"sink: {option} applies to kind {only} only")

    if kind is SinkKind.WEBHOOK:
        columns = _webhook_fields(raw, problems, at)
    else:
        columns = _columns(raw, problems, at)
    spec = SinkSpec(
        target=target,
        kind=kind,
        columns=columns,
        create=_bool(raw, "create", problems, at),
        delete=_bool(raw, "delete", problems, at),
    )
    if kind is SinkKind.SQL:
        spec = _sql(spec, raw, problems, at)
    else:
        spec = _webhook(spec, raw, problems, at)
    problems.raise_any()
    return spec


def _columns(raw: Mapping[str, Any], problems: Problems, at: Any) -> tuple[Column, ...]:
    columns = raw.get("columns")
    if not isinstance(columns, Mapping) or not columns:
        problems.add(at("columns"), "sink: columns must map target columns to canonical fields")
        return ()
    parsed = []
    for name, source in columns.items():
        where = line_of(columns, name) if isinstance(columns, Map) else at("columns")
        if isinstance(source, str):
            fields, sep = (source,), " "
        elif isinstance(source, Mapping) and isinstance(source.get("join"), list):
            fields, sep = tuple(source["join"]), str(source.get("sep", " "))
        else:
            problems.add(where, f"sink column {name!r}: a canonical field or {{join: [...]}}")
            continue
        unknown = [f for f in fields if f not in FIELDS]
        for field in unknown:
            problems.add(
                where, f"sink column {name!r}: unknown field {field!r}{did_you_mean(field, FIELDS)}"
            )
        if not unknown:
            parsed.append(Column(str(name), fields, sep))
    return tuple(parsed)


def _webhook_fields(raw: Mapping[str, Any], problems: Problems, at: Any) -> tuple[Column, ...]:
    fields = raw.get("fields")
    if not isinstance(fields, list) or not fields:
        problems.add(at("fields"), "sink: a webhook needs `fields: [canonical fields]`")
        return ()
    for field in fields:
        if field not in FIELDS:
            problems.add(
                at("fields"), f"sink: unknown field {field!r}{did_you_mean(field, FIELDS)}"
            )
    return tuple(Column(f, (f,)) for f in fields if f in FIELDS)


def _sql(spec: SinkSpec, raw: Mapping[str, Any], problems: Problems, at: Any) -> SinkSpec:
    table, key = raw.get("table"), raw.get("key")
    if not isinstance(table, str) or not table:
        problems.add(at("table"), "sink: kind sql needs `table`")
    if not isinstance(key, Mapping) or not isinstance(key.get("column"), str):
        problems.add(at("key"), "sink: kind sql needs `key: {column: ..., generate: ...}`")
        return spec
    try:
        generation = KeyGeneration(key.get("generate", "none"))
    except ValueError:
        problems.add(
            at("key"),
            "sink: key.generate must be one of " + ", ".join(g.value for g in KeyGeneration),
        )
        generation = KeyGeneration.NONE
    template = key.get("template")
    if generation is KeyGeneration.TEMPLATE and not isinstance(template, str):
        problems.add(at("key"), "sink: key.generate template needs key.template")
    if spec.create and generation is KeyGeneration.NONE:
        problems.add(at("create"), "sink: create needs a way to make keys (key.generate)")
    return SinkSpec(
        **{
            **spec.__dict__,
            "table": table,
            "key_column": key["column"],
            "key_generation": generation,
            "key_template": template,
            "adopt_by": _adopt_by(spec, raw, problems, at),
        }
    )


def _adopt_by(
    spec: SinkSpec, raw: Mapping[str, Any], problems: Problems, at: Any
) -> tuple[str, ...]:
    """Columns, each made from one canonical field, that find a row to adopt."""
    names = raw.get("adopt_by", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.add(at("adopt_by"), "sink: adopt_by must be a list of columns, e.g. [email]")
        return ()
    if names and not spec.create:
        problems.add(at("adopt_by"), "sink: adopt_by only applies with create: true")
    single = {column.name for column in spec.columns if len(column.fields) == 1}
    for name in names:
        if name not in single:
            problems.add(
                at("adopt_by"),
                f"sink: adopt_by column {name!r} must be one of the columns made from a single "
                f"canonical field{did_you_mean(name, sorted(single))}",
            )
    return tuple(names)


def _webhook(spec: SinkSpec, raw: Mapping[str, Any], problems: Problems, at: Any) -> SinkSpec:
    """Secure unless said otherwise: signed (`secret_env`) unless `unsigned: true`, https
    unless `insecure_http: true`; each exception is written in the sink, never implied."""
    name = f"sink {spec.target!r}"
    unsigned = _bool(raw, "unsigned", problems, at)
    legacy = _bool(raw, "legacy_signature", problems, at)
    insecure_http = _bool(raw, "insecure_http", problems, at)
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        problems.add(at("url"), f"{name}: a webhook needs `url: https://...`")
    elif url.startswith("http://") and not insecure_http:
        problems.add(
            at("url"),
            f"{name}: url {url!r} is plain http, which sends customer data and the signature "
            "in clear: use https://, or set `insecure_http: true` for a receiver on a "
            "trusted network",
        )
    secret_env = raw.get("secret_env")
    if secret_env is not None and (not isinstance(secret_env, str) or not secret_env):
        problems.add(at("secret_env"), f"{name}: secret_env names an environment variable")
    elif secret_env is None and not unsigned:
        problems.add(
            at("kind"),
            f"{name}: a webhook needs `secret_env` (the environment variable holding its "
            "HMAC secret), or `unsigned: true` to send requests anyone could forge",
        )
    elif secret_env is not None and unsigned:
        problems.add(at("unsigned"), f"{name}: unsigned: true contradicts secret_env")
    if legacy and unsigned:
        problems.add(at("legacy_signature"), f"{name}: legacy_signature needs a secret")
    maxlen = raw.get("log_maxlen", DEFAULT_LOG_MAXLEN)
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
        problems.add(at("log_maxlen"), f"{name}: log_maxlen must be a positive whole number")
        maxlen = DEFAULT_LOG_MAXLEN
    return SinkSpec(
        **{
            **spec.__dict__,
            "url": url,
            "secret_env": secret_env,
            "timeout_s": float(raw.get("timeout_s", 10.0)),
            "unsigned": unsigned,
            "legacy_signature": legacy,
            "insecure_http": insecure_http,
            "log_maxlen": maxlen,
        }
    )


def _bool(raw: Mapping[str, Any], key: str, problems: Problems, at: Any) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        problems.add(at(key), f"sink: {key} must be true or false")
        return False
    return value
