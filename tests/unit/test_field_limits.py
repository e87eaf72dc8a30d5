"""Length limits on text fields: derived from the target columns, overridden per field,
and enforced at mapping time by dead-lettering the record or truncating the value."""

import re
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from streams.debezium import SourceChange, SourcePosition
from streams.dlq import DeadLetter
from streams.errors import ConfigError
from streams.ingest import ValidationFailed
from streams.mapping import (
    DEFAULT_MAX_LENGTH,
    FIELD_TOO_LONG,
    MAX_LENGTH_CEILING,
    VALIDATION_FAILED,
    Mapped,
    Mapper,
    OnTooLong,
    Rejected,
    char_limit,
    field_limits,
    load_mappings,
)
from streams.topics import RAW_TOPICS

ROOT = Path(__file__).resolve().parents[2]
PG = SourcePosition("postgresql", "support", "users", 1_700_000_000_000_001, False, lsn=42)


def _change(system: str, row: dict, op: str = "c", before: dict | None = None) -> SourceChange:
    return SourceChange(RAW_TOPICS[system], op, {"id": 1}, before, row, PG, 1_700_000_000_123)


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- limits derived from the targets ------------------------------------------------------


def test_the_shipped_targets_bound_the_fields_billing_receives() -> None:
    limits = field_limits(ROOT / "connectors")
    assert {name: limit.length for name, limit in limits.items()} == {
        "email": 255,  # billing.accounts.contact_email
        "company": 255,  # legal_name: a column of another name, through the sink's columns
        "phone": 64,
        "country": 64,
    }
    assert limits["company"].source == (
        "billing.accounts.legal_name varchar(255), filled from company by billing's sink"
    )


def test_every_shipped_field_gets_its_limit(tmp_path: Path) -> None:
    mappings = load_mappings(ROOT / "connectors")
    crm, support = mappings["crm"].fields, mappings["support"].fields
    assert crm["company"].limit.length == 255  # CRM's own column is text; billing's is not
    assert crm["email"].limit == support["email"].limit
    assert support["first_name"].limit.length == DEFAULT_MAX_LENGTH  # text everywhere
    assert "no target column bounds it" in support["first_name"].limit.source
    assert all(spec.on_too_long is OnTooLong.DEAD_LETTER for spec in crm.values())


@pytest.mark.parametrize(
    ("definition", "expected"),
    [
        ("varchar(255) NOT NULL PRIMARY KEY", (255, "varchar(255)")),
        ("VARCHAR (32)", (32, "varchar(32)")),
        ("character varying(80)", (80, "character varying(80)")),
        ("char(3)", (3, "char(3)")),
        ("character(2) DEFAULT 'x'", (2, "character(2)")),
        ("nvarchar(10)", (10, "nvarchar(10)")),
        ("text", None),
        ("varchar", None),  # PostgreSQL: no length, no bound
        ("decimal(12,2)", None),
        ("tinytext", None),
        ("", None),
    ],
)
def test_column_types_that_bound_text(definition: str, expected: tuple | None) -> None:
    assert char_limit(definition) == expected


def _system(root: Path, system: str, mapping: str, schema: str | None = None) -> None:
    (root / system).mkdir(parents=True, exist_ok=True)
    (root / system / "mapping.yaml").write_text(textwrap.dedent(mapping))
    if schema is not None:
        (root / system / "schema.sql").write_text(textwrap.dedent(schema))


SHOP = """\
system: shop
topic: shop.public.people
key: [id]
{extra}
fields:
  first_name: {{column: given, transforms: [trim]{first}}}
  last_name: {{column: family, transforms: [trim]}}
  company: {{column: org, transforms: [trim]}}
sink:
  table: 'public."people"'
  key: {{column: id, generate: uuid}}
  create: true
  columns:
    full_name: {{join: [first_name, last_name]}}
    org: company
"""
SHOP_SCHEMA = """\
-- the shop's people
CREATE TABLE IF NOT EXISTS "public"."people" (
    id        uuid PRIMARY KEY,
    given     text,
    family    text,
    full_name character varying(40),  -- joined: each part bounded by it
    org       varchar(200),
    CONSTRAINT org_check CHECK (org <> 'a,b')
);
CREATE TABLE IF NOT EXISTS audit (org varchar(5));
"""
LEDGER = """\
system: ledger
topic: ledger.accounts
key: [num]
fields:
  company: {column: name}
sink:
  table: accounts
  key: {column: num}
  columns: {name: company}
"""
LEDGER_SCHEMA = "CREATE TABLE accounts (num varchar(9), name varchar(120));\n"


def _shop(root: Path, extra: str = "", first: str = "") -> Path:
    _system(root, "shop", SHOP.format(extra=extra, first=first), SHOP_SCHEMA)
    return root / "shop" / "mapping.yaml"


def test_a_joined_column_bounds_each_field_and_the_tightest_target_wins(tmp_path: Path) -> None:
    _shop(tmp_path)
    _system(tmp_path, "ledger", LEDGER, LEDGER_SCHEMA)
    limits = field_limits(tmp_path)
    assert limits["first_name"].length == limits["last_name"].length == 40
    assert limits["last_name"].source == (
        "shop.people.full_name character varying(40), joined from first_name and last_name "
        "by shop's sink"
    )
    assert limits["company"].length == 120  # ledger's 120 beats the shop's 200
    assert "ledger.accounts.name varchar(120)" in limits["company"].source
    # Only the sink's own table counts, not another table's column of the same name.
    assert load_mappings(tmp_path)["shop"].fields["company"].limit.length == 120


def test_targets_without_a_schema_or_of_another_kind_bound_nothing(tmp_path: Path) -> None:
    _system(tmp_path, "ledger", LEDGER)  # no schema.sql
    (tmp_path / "partner").mkdir()
    (tmp_path / "partner" / "sink.yaml").write_text(
        "sink:\n  kind: webhook\n  url: https://partner.example/hook\n  fields: [company]\n"
        "  unsigned: true\n"
    )
    assert field_limits(tmp_path) == {}
    assert load_mappings(tmp_path)["ledger"].fields["company"].limit.length == DEFAULT_MAX_LENGTH


# -- per-field settings -------------------------------------------------------------------


def test_max_length_lowers_the_limit_and_says_where_it_comes_from(tmp_path: Path) -> None:
    _shop(tmp_path, first=", max_length: 12, on_too_long: truncate")
    spec = load_mappings(tmp_path)["shop"].fields["first_name"]
    assert (spec.limit.length, spec.on_too_long) == (12, OnTooLong.TRUNCATE)
    assert spec.limit.source == "max_length of first_name in shop/mapping.yaml"


def test_on_too_long_for_the_whole_file_and_a_field_overriding_it(tmp_path: Path) -> None:
    _shop(tmp_path, extra="on_too_long: truncate", first=", on_too_long: dead_letter")
    fields = load_mappings(tmp_path)["shop"].fields
    assert fields["first_name"].on_too_long is OnTooLong.DEAD_LETTER
    assert fields["last_name"].on_too_long is fields["company"].on_too_long is OnTooLong.TRUNCATE


def _error(root: Path, **kwargs: str) -> str:
    path = _shop(root, **kwargs)
    with pytest.raises(ConfigError) as caught:
        load_mappings(root)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message
    return message


@pytest.mark.parametrize(
    ("first", "message"),
    [
        (", max_length: 41", "first_name: max_length must be a whole number from 1 to 40, not "
         "41 [(]a longer value would not fit shop.people.full_name character varying[(]40[)], "
         "joined from first_name and last_name by shop's sink[)]$"),
        (", max_length: 0", "from 1 to 40, not 0"),
        (", max_length: -3", "not -3"),
        (", max_length: true", "not True"),
        (", max_length: '30'", "not '30'"),
        (", max_length: 12.5", "not 12.5"),
        (", on_too_long: cut", "first_name: on_too_long must be dead_letter or truncate, "
         "not 'cut'"),
        (", max_length: 9, maxlength: 8", "unknown setting 'maxlength'"),
    ],
)  # fmt: skip
def test_bad_field_settings_are_named_with_file_and_line(
    tmp_path: Path, first: str, message: str
) -> None:
    error = _error(tmp_path, first=first)
    assert error.split(":")[1] == "6", error  # the line of first_name
    assert re.search(message, error), error


def test_max_length_of_an_unbounded_field_stops_at_the_ceiling(tmp_path: Path) -> None:
    text = LEDGER.replace("{column: name}", f"{{column: name, max_length: {MAX_LENGTH_CEILING}}}")
    _system(tmp_path, "ledger", text)
    assert load_mappings(tmp_path)["ledger"].fields["company"].limit.length == MAX_LENGTH_CEILING
    _system(tmp_path, "ledger", text.replace(str(MAX_LENGTH_CEILING), str(MAX_LENGTH_CEILING + 1)))
    with pytest.raises(
        ConfigError, match=r":5: company: max_length .* 1 to 65,536, not 65537 \(the most any "
    ):
        load_mappings(tmp_path)


def test_a_bad_on_too_long_for_the_file(tmp_path: Path) -> None:
    assert ":4: on_too_long must be dead_letter or truncate, not 'never'" in _error(
        tmp_path, extra="on_too_long: never"
    )


# -- enforcement --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mapper() -> Mapper:
    return Mapper(load_mappings(ROOT / "connectors"))


def _support_row(display_name: str) -> dict:
    return {"id": 1, "email": "ada@example.com", "display_name": display_name, "tier": "gold"}


def test_a_400_kb_display_name_dead_letters_its_record_naming_the_field(mapper: Mapper) -> None:
    secret = "Zq" + "x" * 399_998  # one word: the whole name is the first name
    before = _counter("accord_mapping_rejected_total", system="support", rule=FIELD_TOO_LONG)
    result = mapper.map(_change("support", _support_row(secret)))
    assert isinstance(result, Rejected) and result.reason == FIELD_TOO_LONG
    assert [(i.field, i.rule) for i in result.reasons] == [("first_name", FIELD_TOO_LONG)]
    assert result.describe() == (
        "support record rejected: [first_name] field_too_long: first_name (from column "
        "display_name) is 400,000 characters; the limit is 4,096 (the default cap of 4,096: "
        "no target column bounds it); on_too_long: truncate in the mapping would keep the "
        "record, cut to the limit"
    )
    assert (
        _counter("accord_mapping_rejected_total", system="support", rule=FIELD_TOO_LONG)
        == before + 1
    )

    class Message:  # what ingest hands DeadLetter.of: the raw message's accessors
        def topic(self) -> str:
            return RAW_TOPICS["support"]

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return 9

        def key(self) -> bytes:
            return b"k"

        def value(self) -> bytes:
            return secret.encode()

    letter = DeadLetter.of(Message(), result.reason, ValidationFailed(result.describe()), "map")
    assert letter.reason == "field_too_long" and letter.value == secret.encode()
    assert "first_name" in letter.detail and "Zq" not in letter.detail  # no PII echoed


def test_a_400_kb_name_of_many_words_is_refused_quickly(mapper: Mapper) -> None:
    """The transforms see the value before its limit does: they must be linear in it
    (name_case once sliced the rest of the text for every word: minutes for this one)."""
    for name in ("ab " * 133_333, "van la " * 57_142, "ii " * 133_333):
        started = time.perf_counter()
        result = mapper.map(_change("support", _support_row(name)))
        assert time.perf_counter() - started < 5.0
        assert isinstance(result, Rejected) and result.reason == FIELD_TOO_LONG


def test_a_too_long_company_names_the_target_column_that_bounds_it(mapper: Mapper) -> None:
    row = {"id": 7, "email": "ada@example.com", "company": "Ünïcode Ltd " * 25}  # 300 chars
    result = mapper.map(SourceChange(RAW_TOPICS["crm"], "c", {"id": 7}, None, row, PG, 0))
    assert isinstance(result, Rejected) and result.reason == FIELD_TOO_LONG
    assert "company (from column company) is 299 characters; the limit is 255 " in (
        result.describe()
    )  # trimmed first: the limit applies to the canonical value
    assert "(billing.accounts.legal_name varchar(255), filled from company" in result.describe()


def test_a_record_failing_other_rules_too_is_still_field_too_long(mapper: Mapper) -> None:
    result = mapper.map(_change("support", {**_support_row("x" * 5000), "email": "nope"}))
    assert isinstance(result, Rejected) and result.reason == FIELD_TOO_LONG
    assert {i.rule for i in result.reasons} == {"email", FIELD_TOO_LONG}
    assert mapper.map(_change("support", {**_support_row("Ada"), "email": "nope"})).reason == (
        VALIDATION_FAILED
    )


def test_the_limit_counts_characters_not_bytes(mapper: Mapper) -> None:
    fits = "Ωmega Ünïcode 株式会社 😀" * 10  # 200 characters, 420 bytes of UTF-8
    row = {"id": 7, "email": "ada@example.com", "company": fits + "é" * 55}  # 255
    assert len(row["company"]) == 255 and len(row["company"].encode()) > 255
    result = mapper.map(SourceChange(RAW_TOPICS["crm"], "c", {"id": 7}, None, row, PG, 0))
    assert isinstance(result, Mapped) and result.change.values["company"] == row["company"]
    row["company"] += "😀"
    assert mapper.map(SourceChange(RAW_TOPICS["crm"], "c", {"id": 7}, None, row, PG, 0)).reason == (
        FIELD_TOO_LONG
    )


def _truncating(tmp_path: Path, max_length: int = 10) -> Mapper:
    _shop(tmp_path, extra="on_too_long: truncate", first=f", max_length: {max_length}")
    return Mapper(load_mappings(tmp_path))


def _shop_change(row: dict, op: str = "c", before: dict | None = None) -> SourceChange:
    return SourceChange("shop.public.people", op, {"id": 1}, before, row, PG, 0)


def test_truncate_cuts_to_the_limit_in_characters_and_counts_it(tmp_path: Path) -> None:
    mapper = _truncating(tmp_path)
    before = _counter("accord_mapping_truncated_total", system="shop", field="first_name")
    result = mapper.map(_shop_change({"id": 1, "given": " 😀é" * 6, "family": "Lovelace"}))
    assert isinstance(result, Mapped)
    assert result.change.values["first_name"] == "😀é 😀é 😀é 😀"  # 10 characters, 22 bytes
    assert result.change.values["last_name"] == "Lovelace"
    assert result.truncated == ("first_name",)
    assert (
        _counter("accord_mapping_truncated_total", system="shop", field="first_name") == before + 1
    )
    huge = mapper.map(_shop_change({"id": 1, "given": "x" * 400_000}))
    assert isinstance(huge, Mapped) and huge.change.values["first_name"] == "x" * 10


def test_an_update_past_the_limit_only_changes_nothing_when_truncated(tmp_path: Path) -> None:
    mapper = _truncating(tmp_path)
    old, new = {"id": 1, "given": "Augusta Ada K"}, {"id": 1, "given": "Augusta Ada B"}
    result = mapper.map(_shop_change(new, "u", before=old))
    assert isinstance(result, Mapped) and "first_name" not in result.change.values


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300), limit=st.integers(1, 40))  # full_name holds 40
def test_a_truncated_value_never_exceeds_its_limit(
    tmp_path_factory: pytest.TempPathFactory, text: str, limit: int
) -> None:
    mapper = _cached_mapper(tmp_path_factory, limit)
    result = mapper.map(_shop_change({"id": 1, "given": text, "family": text, "org": text}))
    assert isinstance(result, Mapped)
    values = result.change.values
    assert values["first_name"] is None or len(values["first_name"]) <= limit
    assert values["first_name"] == (text.strip()[:limit] or None)
    for name in ("last_name", "company"):  # bounded by the shop's columns (40, 200)
        assert values[name] is None or len(values[name]) <= (40 if name == "last_name" else 200)


_MAPPERS: dict[int, Mapper] = {}


def _cached_mapper(factory: pytest.TempPathFactory, limit: int) -> Mapper:
    if limit not in _MAPPERS:
        _MAPPERS[limit] = _truncating(factory.mktemp(f"limit{limit}"), limit)
    return _MAPPERS[limit]
