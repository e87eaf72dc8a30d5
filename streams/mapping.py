"""Declarative column-to-canonical mappings: `connectors/<system>/mapping.yaml`.

Each connected system says, in one YAML file, which of its columns feeds which canonical
field and how the value is cleaned on the way (trim, validate an email, format a phone
as E.164, ...). The files are checked completely at start-up, so a typo is a
`ConfigError` naming file and line, never a surprise on the hot path.

`Mapper.map` turns one `SourceChange` into a canonical `Change` (`Mapped`), or refuses
it (`Rejected`, for the dead-letter topic) when a hard rule fails. Transforms are pure
functions of one value; the expensive ones (email, phone, country) are cached, because
mapping runs for every event a worker consumes.

Every text field has a length limit (`Limit`): by default the tightest target column
that receives it (`field_limits`, read from the targets' sinks and `schema.sql`), else
`DEFAULT_MAX_LENGTH`. A longer value dead-letters its record (rule `field_too_long`) or
is truncated, as the mapping says (`on_too_long`): one oversized value must not travel
on into the golden state, Kafka messages and targets that cannot hold it.

The format and every transform are documented in `connectors/README.md` ("Mappings").
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import unicodedata
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any

import phonenumbers
import pycountry
from email_validator import EmailNotValidError, validate_email
from prometheus_client import Counter

from streams.debezium import SourceChange, SourcePosition
from streams.errors import ConfigError
from streams.missing_columns import MissingColumns
from streams.model import FIELDS, Change, Op, Value, sortable_position
from streams.projection import SinkKind, load_sinks
from streams.yamlconf import Map, Problem, Problems, Seq, did_you_mean, plain, read

DROPPED = Counter(
    "accord_mapping_dropped_total",
    "Fields left out of a mapped change because a soft rule (on_invalid: drop) failed",
    ["system", "field", "rule"],
)
REJECTED = Counter(
    "accord_mapping_rejected_total",
    "Records refused by mapping, counted once per failed hard rule",
    ["system", "rule"],
)
TRUNCATED = Counter(
    "accord_mapping_truncated_total",
    "Field values cut to their length limit (on_too_long: truncate)",
    ["system", "field"],
)
CLAMPED = Counter(
    "accord_clock_skew_clamped_total",
    "Changes whose commit time was further ahead of their capture time than "
    "worker.max_clock_skew_s, clamped to the capture time",
    ["system"],
)

MAPPING_FILE = "mapping.yaml"
TOP_LEVEL_KEYS = ("system", "topic", "key", "commit_time", "on_too_long", "fields", "sink")
REQUIRED_TOP_LEVEL = ("system", "topic", "key", "fields")
FIELD_KEYS = ("column", "transforms", "required", "on_invalid", "max_length", "on_too_long")

# Dead-letter reasons of a refused record: `field_too_long` when a value passed its
# length limit (a fix is a limit or `on_too_long: truncate`), else `validation_failed`.
FIELD_TOO_LONG = "field_too_long"
VALIDATION_FAILED = "validation_failed"
# The limit of a text field no target column bounds (a PostgreSQL `text`, a webhook):
# longer than any name, address or email a person types, yet at most 16 KB of UTF-8, a
# small part of a Kafka message (1 MB by default), which the golden state of a record
# and its changes must fit in. `max_length` may raise it, up to MAX_LENGTH_CEILING.
DEFAULT_MAX_LENGTH = 4096
MAX_LENGTH_CEILING = 65_536


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldIssue:
    """One failed rule on one field: `rule` is the transform name, `required` or `key`."""

    field: str
    rule: str
    message: str


@dataclass(frozen=True)
class Mapped:
    """A change that went through; `dropped` lists the soft failures left out of it."""

    change: Change
    dropped: tuple[FieldIssue, ...] = ()
    truncated: tuple[str, ...] = ()  # fields cut to their limit (on_too_long: truncate)


@dataclass(frozen=True)
class Rejected:
    """A record refused by every hard rule it failed (not just the first)."""

    system: str
    reasons: tuple[FieldIssue, ...]

    @property
    def reason(self) -> str:
        """The dead letter's reason: `field_too_long` when a value was too long."""
        too_long = any(issue.rule == FIELD_TOO_LONG for issue in self.reasons)
        return FIELD_TOO_LONG if too_long else VALIDATION_FAILED

    def describe(self) -> str:
        """One line for the dead letter's detail, naming every failed rule."""
        failed = "; ".join(f"[{issue.field}] {issue.message}" for issue in self.reasons)
        return f"{self.system or 'unknown system'} record rejected: {failed}"


class FieldError(ValueError):
    """A transform could not handle its input; the message starts with the rule's name."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule


# -- transforms: pure functions of one value --------------------------------------------
#
# None passes through every transform untouched, and blank text (empty or whitespace
# only) becomes None, so "no value" has a single canonical spelling.


def _text(value: Any, rule: str) -> str | None:
    """The input as text, or None when blank; anything but text is the rule's error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError(rule, f"expected text, got {type(value).__name__} {value!r}")
    return value if value.strip() else None


def _stripped(value: Any, rule: str) -> str | None:
    text = _text(value, rule)
    return text.strip() if text is not None else None


def trim(value: Any) -> str | None:
    """Leading and trailing whitespace removed."""
    return _stripped(value, "trim")


def lower(value: Any) -> str | None:
    text = _text(value, "lower")
    return text.lower() if text is not None else None


def upper(value: Any) -> str | None:
    text = _text(value, "upper")
    return text.upper() if text is not None else None


def collapse_spaces(value: Any) -> str | None:
    """Every run of whitespace becomes one space; the ends are trimmed."""
    text = _text(value, "collapse_spaces")
    return " ".join(text.split()) if text is not None else None


# Stay lower-case when another word follows ("van der Berg"); `split_name` keeps them
# (and a word ending in an apostrophe, "d'") with the last name.
_NAME_PARTICLES = frozenset(
    {"van", "von", "der", "den", "de", "del", "della", "des", "du", "ten", "ter", "zu"}
)
_ARTICLES = frozenset({"la", "le", "las", "los"})  # particles only after one: "de la Cruz"
_SPLIT_PARTICLES = _NAME_PARTICLES | _ARTICLES | {"da", "di", "dos", "das"}
_ROMAN_SUFFIXES = frozenset({"ii", "iii", "iv"})
_APOSTROPHES = "'\u2019"
_NAME_PART = re.compile(rf"[^\s\-{_APOSTROPHES}]+")


def name_case(value: Any) -> str | None:
    """A name typed in one case ("o'brien", "VAN DER BERG") in title case; mixed case kept.

    Mixed case is how a person writes their own name ("McDONALD", "deVries"), so only
    all-lower and all-upper input is changed. Each part after a space, hyphen or
    apostrophe is capitalized ("Anne-Marie", "O'Brien", "McDonald"), except: particles
    followed by another word stay lower-case ("van der Berg", "de la Cruz", as most
    databases store them; a lone "van" is "Van"), letters after an apostrophe inside a
    word ("Jack's"), and roman numeral suffixes are upper-cased ("Koch II").
    """
    text = _text(value, "name_case")
    if text is None or not (text.islower() or text.isupper()):
        return text
    lowered = text.lower()
    # Where the text proper starts and ends: asked of every word, so computed once (a
    # slice per word would make a long name quadratic).
    first, last = len(lowered) - len(lowered.lstrip()), len(lowered.rstrip())
    return _NAME_PART.sub(lambda match: _case_name_part(lowered, match, first, last), lowered)


def _case_name_part(text: str, match: re.Match[str], first: int, last: int) -> str:
    word, start, end = match.group(), match.start(), match.end()
    before = text[start - 1] if start else ""
    after = text[end] if end < len(text) else ""
    whole_word = before in ("", " ") or before.isspace()
    if whole_word and after.isspace() and end < last:  # another word follows
        if word in _NAME_PARTICLES:
            return word
        if word in _ARTICLES and _word_before(text, start) in _NAME_PARTICLES:
            return word
    if whole_word and start > first and word in _ROMAN_SUFFIXES:
        return word.upper()
    if before and before in _APOSTROPHES and start >= 2 and text[start - 2].isalpha():
        prefix_start = start - 2
        if prefix_start > 0 and text[prefix_start - 1].isalpha():
            return word  # an apostrophe inside a word ("jack's"), not an O'-prefix
    if word.startswith("mc") and len(word) > 2 and word[2].isalpha():
        return "Mc" + _capitalize(word[2:])
    return _capitalize(word)


def _word_before(text: str, start: int) -> str:
    """The whitespace-separated word before position `start`, or ""."""
    end = start
    while end > 0 and text[end - 1].isspace():
        end -= 1
    begin = end
    while begin > 0 and not text[begin - 1].isspace():
        begin -= 1
    return text[begin:end]


def _capitalize(word: str) -> str:
    """Title-case the first cased letter (not the first character: "(ada" -> "(Ada")."""
    for i, char in enumerate(word):
        if char.lower() != char.upper():
            return word[:i] + char.title() + word[i + 1 :]
    return word


def split_name(value: Any, part: str) -> str | None:
    """The `first` or `last` part of a display name.

    The last word is the last name and everything before it the first name ("Jean Paul
    Sartre" -> "Jean Paul" / "Sartre"), except that particles before the last word go
    with the last name ("Jan van der Berg" -> "Jan" / "van der Berg", "Olivier d' Heripon"
    -> "Olivier" / "d' Heripon"). A single word is a first name only; its last name is
    None. Two-word surnames without a particle ("Ana García López") cannot be told apart
    from a middle name and are split before the last word.
    """
    text = _text(value, "split_name")
    if text is None:
        return None
    words = text.split()
    start = len(words) - 1
    while start > 1 and _is_split_particle(words[start - 1]):
        start -= 1
    if len(words) == 1:
        first, last = words[0], None
    else:
        first, last = " ".join(words[:start]), " ".join(words[start:])
    return first if part == "first" else last


def _is_split_particle(word: str) -> bool:
    return word.casefold() in _SPLIT_PARTICLES or word.endswith(tuple(_APOSTROPHES))


def email(value: Any) -> str | None:
    """A syntactically valid address, normalized and fully lower-cased (no DNS lookup)."""
    text = _stripped(value, "email")
    if text is None:
        return None
    normalized, reason = _email(text)
    if normalized is None:
        raise FieldError("email", f"{text!r} is not a valid email address ({reason})")
    return normalized


@functools.lru_cache(maxsize=65_536)
def _email(text: str) -> tuple[str | None, str]:
    try:
        result = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        return None, str(exc)
    return result.normalized.lower(), ""


def phone(value: Any, region: Any = None) -> str | None:
    """A phone number in E.164 form ("+14155550142").

    `region` (an upper-case alpha-2 country such as "US", or a locale such as "en-US") says
    how to read a national number like "(415) 555-0142"; numbers written with "+" or "00"
    need none. The number must be valid for its country, not merely of a plausible length.
    Two common slips are forgiven: "00" for "+" whatever the region, and a trunk "0" in
    front of a number of a country that has none ("0912 345 678" in Spain).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _stripped(value, "phone")
    if text is None:
        return None
    formatted, problem = _phone(text, region_code(region))
    if formatted is None:
        raise FieldError("phone", problem)
    return formatted


def region_code(value: Any) -> str | None:
    """The ISO region of a country code or locale ("GB", "en-GB", "en_gb" -> "GB"), else None.

    A lone lower-case code is a language, not a region: "sv" is Swedish, not El Salvador.
    """
    if not isinstance(value, str):
        return None
    parts = re.split(r"[-_]", value.strip())
    if len(parts) == 1:
        candidate = parts[0] if parts[0].isupper() else ""
    else:
        candidate = next((p.upper() for p in parts[1:] if len(p) == 2 and p.isalpha()), "")
    return candidate if candidate in _region_codes() else None


@functools.lru_cache(maxsize=65_536)
def _phone(text: str, region: str | None) -> tuple[str | None, str]:
    where = f" (region {region})" if region else " (no region)"
    candidates = [text]
    if text.startswith("00"):  # international prefix of most of the world, not the US
        candidates.append("+" + text[2:])
    elif text.startswith("0") and region and not _trunk_prefix(region):
        candidates.append(text[1:])
    problem = f"{text!r} is not a valid phone number{where}"
    for candidate in candidates:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException as exc:
            problem = f"cannot parse {text!r}{where}: {exc}"
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), ""
        problem = f"{text!r} is not a valid phone number{where}"
    return None, problem


def _trunk_prefix(region: str) -> str | None:
    """The national (trunk) prefix dialled before area codes: "0" in GB, none in ES."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    return metadata.national_prefix if metadata is not None else None


# Native and colloquial spellings pycountry does not know, keyed like `_country_key`.
_COUNTRY_ALIASES = {
    "uk": "GB",
    "great britain": "GB",
    "britain": "GB",
    "america": "US",
    "deutschland": "DE",
    "espana": "ES",
    "sverige": "SE",
    "nederland": "NL",
    "holland": "NL",
    "schweiz": "CH",
    "suisse": "CH",
    "osterreich": "AT",
    "italia": "IT",
    "belgie": "BE",
    "belgique": "BE",
    "danmark": "DK",
    "norge": "NO",
    "suomi": "FI",
    "polska": "PL",
    "russia": "RU",
}


def _country_key(text: str) -> str:
    """Case, accents, dots, spacing and a leading "the" do not tell countries apart."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch)).replace(".", "")
    return " ".join(folded.split()).removeprefix("the ")


@functools.cache
def _country_index() -> dict[str, str]:
    """Every code and name of every country -> alpha-2; pycountry's fuzzy search is slow."""
    index: dict[str, str] = {}
    countries = list(pycountry.countries)
    for country in countries:
        for code in (country.alpha_2, country.alpha_3, country.numeric):
            index[_country_key(code)] = country.alpha_2
    for country in countries:
        for attr in ("name", "official_name", "common_name"):
            name = getattr(country, attr, None)
            if not name:
                continue
            index.setdefault(_country_key(name), country.alpha_2)
            if ", " in name:  # "Korea, Republic of" -> "Republic of Korea"
                head, tail = name.split(", ", 1)
                index.setdefault(_country_key(f"{tail} {head}"), country.alpha_2)
    for alias, code in _COUNTRY_ALIASES.items():
        index.setdefault(alias, code)
    return index


def country(value: Any) -> str | None:
    """ISO 3166-1 alpha-2 from a code, a name or a common variant ("UK", "España")."""
    text = _stripped(value, "country")
    if text is None:
        return None
    code = _country(text)
    if code is None:
        raise FieldError("country", f"unknown country {text!r}")
    return code


@functools.lru_cache(maxsize=4_096)
def _country(text: str) -> str | None:
    return _country_index().get(_country_key(text))


@functools.cache
def _currency_codes() -> frozenset[str]:
    return frozenset(currency.alpha_3 for currency in pycountry.currencies)


def currency(value: Any) -> str | None:
    """An ISO 4217 currency code, upper-cased."""
    text = _stripped(value, "currency")
    if text is None:
        return None
    code = text.upper()
    if code not in _currency_codes():
        raise FieldError("currency", f"{text!r} is not an ISO 4217 currency code")
    return code


@functools.cache
def _language_codes() -> frozenset[str]:
    codes = set()
    for language in pycountry.languages:
        codes.add(language.alpha_3)
        if hasattr(language, "alpha_2"):
            codes.add(language.alpha_2)
    return frozenset(codes)


@functools.cache
def _region_codes() -> frozenset[str]:
    return frozenset(c.alpha_2 for c in pycountry.countries)


_LOCALE = re.compile(r"([a-z]{2,3})(?:[-_]([a-z]{4}))?(?:[-_]([a-z]{2}|[0-9]{3}))?", re.I)


def locale(value: Any) -> str | None:
    """A BCP 47 tag `ll-RR` ("en_us" -> "en-US"); a script is kept ("zh-Hant-TW").

    POSIX suffixes (".UTF-8", "@euro") are dropped; the language must be ISO 639 and the
    region ISO 3166-1 alpha-2 (or a UN M.49 number such as 419).
    """
    text = _stripped(value, "locale")
    if text is None:
        return None
    bare = re.split(r"[.@]", text, maxsplit=1)[0]
    match = _LOCALE.fullmatch(bare)
    if match is None:
        raise FieldError("locale", f"{text!r} is not a locale like en-US")
    language, script, region = match.groups()
    if language.lower() not in _language_codes():
        raise FieldError("locale", f"{text!r}: unknown language {language!r}")
    if region and region.isalpha() and region.upper() not in _region_codes():
        raise FieldError("locale", f"{text!r}: unknown region {region!r}")
    tag = language.lower()
    if script:
        tag += "-" + script.title()
    if region:
        tag += "-" + region.upper()
    return tag


def enum(value: Any, mapping: Mapping[Any, Any]) -> Any:
    """The mapped value; a value outside the map is an error listing the allowed ones."""
    if value is None:
        return None
    if isinstance(value, Hashable) and value in mapping:
        return mapping[value]
    allowed = ", ".join(str(key) for key in mapping)
    raise FieldError("enum", f"{value!r} is not one of {allowed}")


_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})


def boolean(value: Any) -> bool | None:
    """True/False from a boolean, 0/1, or text such as yes/no, true/false, on/off."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise FieldError("boolean", f"{value!r} is not a boolean")


def decimal(value: Any, scale: int = 2, precision: int = 12) -> Decimal | None:
    """A Decimal rounded (half-even) to `scale` places; the canonical money is (12, 2).

    More than `precision` digits is an error: the canonical Avro decimal could not hold it.
    """
    if value is None:
        return None
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise FieldError("decimal", f"{value!r} is not a number") from None
    else:
        raise FieldError("decimal", f"expected a number, got {type(value).__name__} {value!r}")
    if not number.is_finite():
        raise FieldError("decimal", f"{value!r} is not a finite number")
    try:
        rounded = number.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_EVEN)
    except InvalidOperation:
        rounded = None
    if rounded is None or len(rounded.as_tuple().digits) > precision:
        raise FieldError("decimal", f"{number} has more than {precision} digits at scale {scale}")
    return rounded


# -- parsed specs -------------------------------------------------------------------------

Apply = Callable[[Any, Mapping[str, Value]], Any]  # (value, canonical values so far)


class OnInvalid(StrEnum):
    REJECT = "reject"  # the whole record goes to the dead-letter topic
    DROP = "drop"  # the field is left out of the change; the record goes on


class OnTooLong(StrEnum):
    DEAD_LETTER = "dead_letter"  # the record goes to the DLQ, reason field_too_long
    TRUNCATE = "truncate"  # the value is cut to the limit (counted); the record goes on


@dataclass(frozen=True)
class Limit:
    """The most characters a field's canonical text may have, and why: `source` is for
    people ("billing.accounts.contact_email varchar(255), filled from email by billing's
    sink"). Characters, as PostgreSQL's and MariaDB's (utf8mb4) varchar(n) count them."""

    length: int
    source: str


DEFAULT_LIMIT = Limit(
    DEFAULT_MAX_LENGTH, f"the default cap of {DEFAULT_MAX_LENGTH:,}: no target column bounds it"
)


@dataclass(frozen=True)
class TransformSpec:
    """One step of a field's pipeline, with its options as written in the file."""

    name: str
    apply: Apply = field(repr=False, compare=False)
    options: Mapping[str, Any] = field(default_factory=dict)
    region_from: str | None = None  # a canonical field this step reads
    line: int = field(default=0, compare=False)  # where it was written


@dataclass(frozen=True)
class FieldSpec:
    """How one canonical field is computed from one source column."""

    name: str
    column: str
    transforms: tuple[TransformSpec, ...] = ()
    required: bool = False
    on_invalid: OnInvalid = OnInvalid.REJECT
    line: int = 0
    limit: Limit = DEFAULT_LIMIT  # on the canonical text, after the transforms
    on_too_long: OnTooLong = OnTooLong.DEAD_LETTER

    def too_long(self, length: int) -> str:
        """What a dead letter says of a value of `length` characters; never the value."""
        return (
            f"{FIELD_TOO_LONG}: {self.name} (from column {self.column}) is {length:,} "
            f"characters; the limit is {self.limit.length:,} ({self.limit.source}); "
            "on_too_long: truncate in the mapping would keep the record, cut to the limit"
        )

    @property
    def depends_on(self) -> tuple[str, ...]:
        return tuple(t.region_from for t in self.transforms if t.region_from)


@dataclass(frozen=True)
class SystemMapping:
    """One system's mapping file, fully validated."""

    system: str
    topic: str
    key: tuple[str, ...]
    fields: Mapping[str, FieldSpec]  # in file order
    sink: dict[str, Any] | None
    path: Path
    order: tuple[str, ...] = ()  # evaluation order: a field after those it depends on
    commit_time: str | None = None  # a row column finer than the log's commit time


# -- loading ------------------------------------------------------------------------------


def load_mappings(connectors_dir: Path) -> dict[str, SystemMapping]:
    """Every `connectors/<system>/mapping.yaml`, keyed by system; any mistake is fatal.

    Text fields are limited by the tightest target column that receives them
    (`field_limits`), unless a field sets `max_length`.
    """
    paths = sorted(connectors_dir.glob(f"*/{MAPPING_FILE}"))
    if not paths:
        raise ConfigError(f"{connectors_dir}: no <system>/{MAPPING_FILE} found")
    try:
        bounds, sink_error = field_limits(connectors_dir), None
    except ConfigError as exc:  # a broken sink section: the files' own mistakes first
        bounds, sink_error = {}, exc
    mappings: dict[str, SystemMapping] = {}
    topics: dict[str, SystemMapping] = {}
    for path in paths:
        mapping = load_mapping(path, bounds)
        other = topics.get(mapping.topic)
        if other is not None:
            raise ConfigError(f"{path}: topic {mapping.topic!r} is already mapped by {other.path}")
        topics[mapping.topic] = mappings[mapping.system] = mapping
    if sink_error is not None:
        raise sink_error
    return mappings


def load_mapping(path: Path, bounds: Mapping[str, Limit] | None = None) -> SystemMapping:
    """One mapping file; the system name must be the name of its directory.

    `bounds` are the target columns' limits by canonical field (`field_limits`); a field
    neither bounded there nor given `max_length` gets `DEFAULT_MAX_LENGTH`.
    """
    document = read(path)
    problems = Problems(path)
    if not isinstance(document, Map):
        raise problems.fatal(getattr(document, "line", 1), "expected a mapping of settings")
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            problems.add(
                document.line_of(key),
                f"unknown key {key!r} (expected one of {', '.join(TOP_LEVEL_KEYS)})",
            )
    missing = [key for key in REQUIRED_TOP_LEVEL if key not in document]
    if missing:
        problems.add(document.line, f"missing {', '.join(missing)}")
    problems.raise_any()

    system = document["system"]
    if system != path.parent.name:
        problems.add(
            document.line_of("system"),
            f"system {system!r} does not match its directory {path.parent.name!r}",
        )
    topic = document["topic"]
    if not isinstance(topic, str) or not topic:
        problems.add(document.line_of("topic"), "topic must be a topic name")
    columns = _table_columns(path.parent / "schema.sql")
    key = _parse_key(document, problems)
    for column in key:
        if columns and column not in columns:
            problems.add(document.line_of("key"), _not_a_column(column, columns))
    on_too_long = document.get("on_too_long", OnTooLong.DEAD_LETTER.value)
    if on_too_long not in {o.value for o in OnTooLong}:
        problems.add(document.line_of("on_too_long"), _bad_on_too_long("", on_too_long))
        on_too_long = OnTooLong.DEAD_LETTER.value
    defaults = _FieldDefaults(path, bounds or {}, OnTooLong(on_too_long))
    fields = _parse_fields(document, columns, problems, defaults)
    order = _evaluation_order(fields, problems)
    sink = document.get("sink")
    if sink is not None and not isinstance(sink, dict):
        problems.add(document.line_of("sink"), "sink must be a mapping")
    commit_time = document.get("commit_time")
    if commit_time is not None and (
        not isinstance(commit_time, str) or (columns and commit_time not in columns)
    ):
        problems.add(
            document.line_of("commit_time"),
            _not_a_column(str(commit_time), columns) if columns else "commit_time: a column",
        )
    problems.raise_any()
    return SystemMapping(
        system=system,
        topic=topic,
        key=key,
        fields=fields,
        sink=plain(sink) if sink is not None else None,
        path=path,
        order=order,
        commit_time=commit_time,
    )


def _parse_key(document: Map, problems: Problems) -> tuple[str, ...]:
    key = document["key"]
    if isinstance(key, list) and key and all(isinstance(c, str) and c for c in key):
        return tuple(key)
    problems.add(document.line_of("key"), "key must be a list of primary key columns")
    return ()


@dataclass(frozen=True)
class _FieldDefaults:
    """What a field of one file gets unless it says otherwise."""

    path: Path
    bounds: Mapping[str, Limit]  # the target columns' limits, by canonical field
    on_too_long: OnTooLong  # the file's `on_too_long`


def _bad_on_too_long(name: str, value: Any) -> str:
    where = f"{name}: " if name else ""
    return f"{where}on_too_long must be dead_letter or truncate, not {value!r}"


def _parse_fields(
    document: Map, columns: frozenset[str], problems: Problems, defaults: _FieldDefaults
) -> dict[str, FieldSpec]:
    raw = document["fields"]
    if not isinstance(raw, Map) or not raw:
        problems.add(document.line_of("fields"), "fields must map canonical fields to columns")
        return {}
    fields: dict[str, FieldSpec] = {}
    for name, spec in raw.items():
        line = raw.line_of(name)
        if name not in FIELDS:
            problems.add(line, f"unknown canonical field {name!r}{did_you_mean(name, FIELDS)}")
            continue
        parsed = _parse_field(name, spec, line, columns, problems, defaults)
        if parsed is not None:
            fields[name] = parsed
    for spec in fields.values():
        for transform in spec.transforms:
            if transform.region_from and transform.region_from not in fields:
                problems.add(
                    transform.line,
                    f"{spec.name}: region_from {transform.region_from!r} is not a field "
                    "mapped in this file",
                )
    return fields


def _parse_field(
    name: str,
    spec: Any,
    line: int,
    columns: frozenset[str],
    problems: Problems,
    defaults: _FieldDefaults,
) -> FieldSpec | None:
    """One field's settings; every problem is recorded, None when there was any."""
    if not isinstance(spec, Map):
        problems.add(line, f"{name}: expected a mapping with at least 'column'")
        return None
    before = len(problems.found)
    for key in spec:
        if key not in FIELD_KEYS:
            problems.add(
                spec.line_of(key),
                f"{name}: unknown setting {key!r} (expected one of {', '.join(FIELD_KEYS)})",
            )
    column = spec.get("column")
    if "column" not in spec:
        problems.add(line, f"{name}: missing 'column' (the source column it comes from)")
    elif not isinstance(column, str) or not column:
        problems.add(spec.line_of("column"), f"{name}: column must be a column name")
    elif columns and column not in columns:
        problems.add(spec.line_of("column"), _not_a_column(column, columns))
    required = spec.get("required", False)
    if not isinstance(required, bool):
        problems.add(spec.line_of("required"), f"{name}: required must be true or false")
    on_invalid = spec.get("on_invalid", OnInvalid.REJECT.value)
    if on_invalid not in {o.value for o in OnInvalid}:
        problems.add(
            spec.line_of("on_invalid"),
            f"{name}: on_invalid must be reject or drop, not {on_invalid!r}",
        )
    on_too_long = spec.get("on_too_long", defaults.on_too_long.value)
    if on_too_long not in {o.value for o in OnTooLong}:
        problems.add(spec.line_of("on_too_long"), _bad_on_too_long(name, on_too_long))
    limit = _field_limit(name, spec, defaults, problems)
    transforms = _parse_transforms(name, spec, problems)
    if len(problems.found) > before:
        return None
    return FieldSpec(
        name=name,
        column=column,
        transforms=transforms,
        required=required,
        on_invalid=OnInvalid(on_invalid),
        line=line,
        limit=limit,
        on_too_long=OnTooLong(on_too_long),
    )


def _field_limit(name: str, spec: Map, defaults: _FieldDefaults, problems: Problems) -> Limit:
    """The field's `max_length`, which may not exceed the target column bounding it;
    else that column's limit, else the default cap."""
    bound = defaults.bounds.get(name)
    if "max_length" not in spec:
        return bound or DEFAULT_LIMIT
    wanted, line = spec["max_length"], spec.line_of("max_length")
    ceiling = bound.length if bound else MAX_LENGTH_CEILING
    if not isinstance(wanted, int) or isinstance(wanted, bool) or not 1 <= wanted <= ceiling:
        why = (
            f"a longer value would not fit {bound.source}"
            if bound
            else "the most any text field may hold"
        )
        problems.add(
            line,
            f"{name}: max_length must be a whole number from 1 to {ceiling:,}, "
            f"not {wanted!r} ({why})",
        )
        return DEFAULT_LIMIT
    where = f"{defaults.path.parent.name}/{defaults.path.name}"
    return Limit(wanted, f"max_length of {name} in {where}")


def _parse_transforms(name: str, spec: Map, problems: Problems) -> tuple[TransformSpec, ...]:
    raw = spec.get("transforms")
    if raw is None:
        return ()
    if not isinstance(raw, Seq):
        problems.add(spec.line_of("transforms"), f"{name}: transforms must be a list")
        return ()
    parsed: list[TransformSpec] = []
    for item, line in zip(raw, raw.item_lines, strict=True):
        try:
            parsed.append(_parse_transform(name, item, line))
        except Problem as problem:
            problems.add(problem.line, problem.message)
    return tuple(parsed)


def _parse_transform(field_name: str, item: Any, line: int) -> TransformSpec:
    if isinstance(item, str):
        name, options, options_line = item, None, line
    elif isinstance(item, Map) and len(item) == 1:
        name, options = next(iter(item.items()))
        options_line = item.line_of(name)
    else:
        raise Problem(line, f"{field_name}: a transform is a name or {{name: options}}")
    builder = TRANSFORMS.get(name)
    if builder is None:
        raise Problem(
            line,
            f"{field_name}: unknown transform {name!r}{did_you_mean(str(name), TRANSFORMS)}"
            f" (known: {', '.join(TRANSFORMS)})",
        )
    return builder(f"{field_name}: {name}", options, options_line)


def _no_options(function: Callable[[Any], Any]) -> Callable[[str, Any, int], TransformSpec]:
    def build(where: str, options: Any, line: int) -> TransformSpec:
        if options not in (None, {}):
            first = next(iter(options)) if isinstance(options, Map) else options
            at = options.line_of(first) if isinstance(options, Map) else line
            raise Problem(at, f"{where}: unknown transform option {first!r} (takes none)")
        return TransformSpec(function.__name__, lambda value, _values: function(value))

    return build


def _options(
    where: str, options: Any, line: int, allowed: tuple[str, ...], required: tuple[str, ...] = ()
) -> Map:
    if options is None:
        options = Map(line)
    if not isinstance(options, Map):
        raise Problem(line, f"{where}: options must be a mapping of {', '.join(allowed)}")
    for key in options:
        if key not in allowed:
            raise Problem(
                options.line_of(key),
                f"{where}: unknown transform option {key!r} (expected {', '.join(allowed)})",
            )
    for key in required:
        if key not in options:
            raise Problem(line, f"{where}: missing option {key!r}")
    return options


def _build_phone(where: str, options: Any, line: int) -> TransformSpec:
    opts = _options(where, options, line, ("region", "region_from"))
    if "region" in opts and "region_from" in opts:
        raise Problem(opts.line_of("region"), f"{where}: give region or region_from, not both")
    if "region" in opts:
        region = region_code(str(opts["region"]).upper())
        if region is None:
            raise Problem(
                opts.line_of("region"),
                f"{where}: region {opts['region']!r} is not a country code or locale",
            )
        return TransformSpec("phone", lambda value, _values: phone(value, region), dict(opts))
    source = opts.get("region_from")
    if source is None:
        return TransformSpec("phone", lambda value, _values: phone(value), {})
    if source not in FIELDS:
        raise Problem(
            opts.line_of("region_from"),
            f"{where}: region_from {source!r} is not a canonical field"
            f"{did_you_mean(str(source), FIELDS)}",
        )
    return TransformSpec(
        "phone",
        lambda value, values: phone(value, values.get(source)),
        dict(opts),
        region_from=source,
        line=opts.line_of("region_from"),
    )


def _build_enum(where: str, options: Any, line: int) -> TransformSpec:
    opts = _options(where, options, line, ("map",), required=("map",))
    table = opts["map"]
    if not isinstance(table, dict) or not table:
        raise Problem(opts.line_of("map"), f"{where}: map must be a non-empty mapping")
    table = plain(table)
    return TransformSpec("enum", lambda value, _values: enum(value, table), {"map": table})


def _build_split_name(where: str, options: Any, line: int) -> TransformSpec:
    if options not in ("first", "last"):
        raise Problem(line, f"{where}: expected first or last, not {options!r}")
    return TransformSpec(
        "split_name", lambda value, _values: split_name(value, options), {"part": options}
    )


def _build_decimal(where: str, options: Any, line: int) -> TransformSpec:
    opts = _options(where, options, line, ("scale", "precision"))
    settings = {"scale": opts.get("scale", 2), "precision": opts.get("precision", 12)}
    for key, number in settings.items():
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 38:
            raise Problem(opts.line_of(key), f"{where}: {key} must be a whole number 0-38")
    scale, precision = settings["scale"], settings["precision"]
    return TransformSpec(
        "decimal", lambda value, _values: decimal(value, scale, precision), settings
    )


TRANSFORMS: dict[str, Callable[[str, Any, int], TransformSpec]] = {
    "trim": _no_options(trim),
    "lower": _no_options(lower),
    "upper": _no_options(upper),
    "collapse_spaces": _no_options(collapse_spaces),
    "name_case": _no_options(name_case),
    "email": _no_options(email),
    "phone": _build_phone,
    "country": _no_options(country),
    "currency": _no_options(currency),
    "locale": _no_options(locale),
    "enum": _build_enum,
    "split_name": _build_split_name,
    "boolean": _no_options(boolean),
    "decimal": _build_decimal,
}


def _evaluation_order(fields: Mapping[str, FieldSpec], problems: Problems) -> tuple[str, ...]:
    """File order, except that a field comes after the fields it reads (region_from)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name not in fields:
            return
        if name in visiting:
            problems.add(fields[name].line, f"{name}: region_from forms a cycle")
            return
        visiting.add(name)
        for dependency in fields[name].depends_on:
            visit(dependency)
        visiting.discard(name)
        if name not in order:
            order.append(name)

    for name in fields:
        visit(name)
    return tuple(order)


_CREATE_TABLE = re.compile(r"create\s+table\s+(?:if\s+not\s+exists\s+)?([^\s(]+)\s*\(", re.I)
_CONSTRAINT = re.compile(r"(primary|unique|key|index|constraint|foreign|check|fulltext)\b", re.I)
# Types that bound a text's length in characters: varchar(n), character varying(n),
# char(n), nvarchar(n)... Others (text, json, MariaDB's byte-counted *text) bound nothing.
_BOUNDED_TYPE = re.compile(
    r"(?:national\s+)?(?:n?varchar|varchar2|character\s+varying|n?char|character)"
    r"\s*\(\s*(\d+)\s*\)",
    re.I,
)


def _tables(schema_sql: Path) -> dict[str, dict[str, str]]:
    """Every CREATE TABLE in a schema.sql: table -> column -> its type and constraints as
    written. The table's name is unquoted and without its schema ("public.users" -> "users")."""
    if not schema_sql.is_file():
        return {}
    text = re.sub(r"--[^\n]*", "", schema_sql.read_text())
    tables: dict[str, dict[str, str]] = {}
    for match in _CREATE_TABLE.finditer(text):
        name = match.group(1).replace("`", "").replace('"', "").rsplit(".", 1)[-1]
        tables.setdefault(name, _column_definitions(text, match.end()))
    return tables


def _column_definitions(text: str, start: int) -> dict[str, str]:
    """Column -> definition, from just inside a CREATE TABLE's opening parenthesis."""
    pieces, depth, quoted, begin = [], 0, False, start
    for i in range(start, len(text)):  # top-level commas only: decimal(12,2), 'a,b'
        char = text[i]
        if char == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")" and depth == 0:  # the table's closing parenthesis
            pieces.append(text[begin:i])
            break
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(text[begin:i])
            begin = i + 1
    columns = {}
    for piece in pieces:
        words = piece.split(maxsplit=1)
        if words and not _CONSTRAINT.match(words[0]):
            columns[words[0].strip('`"')] = words[1] if len(words) > 1 else ""
    return columns


def _table_columns(schema_sql: Path) -> frozenset[str]:
    """Column names of the (first) CREATE TABLE in the system's schema.sql, if it has one.

    Sample systems ship their DDL next to the mapping; a column typo is then caught at
    load time. Systems without a schema.sql are not checked.
    """
    tables = _tables(schema_sql)
    return frozenset(next(iter(tables.values()))) if tables else frozenset()


def char_limit(definition: str) -> tuple[int, str] | None:
    """(n, "varchar(n)") when a column definition bounds its text to n characters."""
    match = _BOUNDED_TYPE.match(definition.strip())
    if match is None:
        return None
    return int(match.group(1)), " ".join(match.group(0).lower().split()).replace(" (", "(")


def field_limits(connectors_dir: Path) -> dict[str, Limit]:
    """Canonical field -> the tightest target column that receives it.

    Each SQL target's sink says which canonical fields fill which of its columns (a
    column may join several: each of them is bounded by it), and the target's
    `schema.sql` gives the columns' types. A target without a schema.sql, or a webhook,
    bounds nothing. On a tie the first target in name order is named.
    """
    limits: dict[str, Limit] = {}
    for target, sink in sorted(load_sinks(connectors_dir).items()):
        if sink.kind is not SinkKind.SQL or not sink.table:
            continue
        table = sink.table.replace("`", "").replace('"', "").rsplit(".", 1)[-1]
        definitions = _tables(connectors_dir / target / "schema.sql").get(table, {})
        for column in sink.columns:
            bounded = char_limit(definitions.get(column.name, ""))
            if bounded is None:
                continue
            length, type_name = bounded
            how = (
                f"filled from {column.fields[0]}"
                if len(column.fields) == 1
                else f"joined from {' and '.join(column.fields)}"
            )
            for name in column.fields:
                if name not in limits or length < limits[name].length:
                    source = f"{target}.{table}.{column.name} {type_name}, {how} by {target}'s sink"
                    limits[name] = Limit(length, source)
    return limits


def _not_a_column(column: str, columns: frozenset[str]) -> str:
    return f"column {column!r} is not in the source table{did_you_mean(column, columns)}"


# -- mapping changes ----------------------------------------------------------------------


class Mapper:
    """Source changes to canonical changes, by the mapping of the change's topic."""

    def __init__(
        self,
        mappings: dict[str, SystemMapping],
        missing: MissingColumns | None = None,
        max_clock_skew_s: float | None = None,
    ) -> None:
        self.mappings = mappings
        self.missing = missing  # reports mapped columns a source's rows no longer have
        # None: commit times are taken as stated (`clamp_commit_time`).
        self.max_skew_us = None if max_clock_skew_s is None else int(max_clock_skew_s * 1e6)
        self._by_topic: dict[str, SystemMapping] = {}
        for mapping in mappings.values():
            other = self._by_topic.get(mapping.topic)
            if other is not None:
                raise ConfigError(
                    f"{mapping.path}: topic {mapping.topic!r} is already mapped by {other.path}"
                )
            self._by_topic[mapping.topic] = mapping
        self._plans = {
            topic: tuple(m.fields[name] for name in (m.order or tuple(m.fields)))
            for topic, m in self._by_topic.items()
        }

    def for_topic(self, topic: str) -> SystemMapping | None:
        return self._by_topic.get(topic)

    def map(self, change: SourceChange) -> Mapped | Rejected:
        """The canonical change, or every hard rule it failed. A delete needs only its key."""
        mapping = self._by_topic.get(change.topic)
        if mapping is None:
            issue = FieldIssue("topic", "topic", f"topic: no mapping for topic {change.topic!r}")
            return self._reject("", [issue])
        source_key, key_issues = _source_key(mapping.key, change)
        if key_issues:
            return self._reject(mapping.system, key_issues)
        op = Op.DELETE if change.op == "d" else Op.UPSERT
        values: dict[str, Value] = {}
        hard: list[FieldIssue] = []
        soft: list[FieldIssue] = []
        truncated: list[str] = []
        if op is Op.UPSERT:
            _map_values(self._plans[mapping.topic], change.row, values, hard, soft, truncated)
            if self.missing is not None:  # an absent column is left out: say so
                columns = (spec.column for spec in self._plans[mapping.topic])
                self.missing.observe(mapping.system, mapping.topic, columns, change.row)
        if hard:
            return self._reject(mapping.system, hard)
        for issue in soft:
            DROPPED.labels(mapping.system, issue.field, issue.rule).inc()
        for name in truncated:
            TRUNCATED.labels(mapping.system, name).inc()
        if change.op == "u" and change.before is not None:
            values = _changed_only(self._plans[mapping.topic], change.before, values)
        source_ts = _commit_time(mapping, change)
        for name, micros in (("commit_time", source_ts), ("ts_ms", change.captured_ms * 1000)):
            if not MIN_COMMIT_US <= micros <= MAX_COMMIT_US:
                issue = FieldIssue(name, name, f"{name}: {micros} µs since 1970 is not a date")
                return self._reject(mapping.system, [issue])
        source_ts, clamped_from = clamp_commit_time(
            source_ts, change.captured_ms * 1000, self.max_skew_us
        )
        if clamped_from is not None:
            CLAMPED.labels(mapping.system).inc()
        position = change.position
        return Mapped(
            Change(
                change_id=change.identity,
                system=mapping.system,
                source_key=source_key,
                op=op,
                source_ts=source_ts,
                position=sortable_position(position),
                values=values,
                snapshot=position.snapshot,
                captured_at_ms=change.captured_ms,
                clamped_from=clamped_from,
            ),
            tuple(soft),
            tuple(truncated),
        )

    @staticmethod
    def _reject(system: str, issues: list[FieldIssue]) -> Rejected:
        for rule in dict.fromkeys(issue.rule for issue in issues):
            REJECTED.labels(system, rule).inc()
        return Rejected(system, tuple(issues))


# Commit times a timestamp can hold (years 1970 to 9999): anything else is a broken record.
MIN_COMMIT_US = 0
MAX_COMMIT_US = 253_402_300_799_999_999


def _commit_time(mapping: SystemMapping, change: SourceChange) -> int:
    """When the change was made, in microseconds.

    MariaDB's binlog stamps events with whole seconds, which would make every change of
    a second look older than a PostgreSQL change of the same second. A `commit_time`
    column (an `updated_at timestamp(6)` maintained by the database) gives the row's own
    microseconds; a delete carries the last update's value and is then ordered after it
    by its log position.
    """
    logged = change.position.commit_ts_us
    if mapping.commit_time is None:
        return logged
    stamp = change.row.get(mapping.commit_time)
    if not isinstance(stamp, dt.datetime):
        return logged
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return max(logged, int(stamp.timestamp() * 1_000_000))


def clamp_commit_time(
    commit_us: int, captured_us: int, max_skew_us: int | None
) -> tuple[int, int | None]:
    """The commit time to order a change by, and the stated one if it was clamped.

    A commit time more than `max_skew_us` ahead of the change's capture time (Debezium's
    `ts_ms`: when the connector read it from the log) cannot be true: the source's clock
    runs fast, or a `commit_time` column holds a future date. Taken as stated, it would
    win `lww` against every edit made elsewhere until that time. It is clamped to the
    capture time, which the change carries itself, so a replay clamps it alike and the
    merge stays deterministic. No capture time (0) or no limit (None): as stated.
    """
    if max_skew_us is None or captured_us <= 0 or commit_us - captured_us <= max_skew_us:
        return commit_us, None
    return captured_us, commit_us


def _source_key(columns: tuple[str, ...], change: SourceChange) -> tuple[str, list[FieldIssue]]:
    """The key columns as text, "|"-joined; taken from the message key, else the row."""
    parts: list[str] = []
    issues: list[FieldIssue] = []
    row = change.row
    for column in columns:
        value = change.key.get(column)
        if value is None:
            value = row.get(column)
        if value is None or value == "":
            issues.append(
                FieldIssue(column, "key", f"key: primary key column {column!r} is missing")
            )
        else:
            parts.append(str(value))
    return "|".join(parts), issues


def _changed_only(
    plan: tuple[FieldSpec, ...], before: Mapping[str, Any], after: dict[str, Value]
) -> dict[str, Value]:
    """The fields an update actually changed.

    A row update re-sends every column. Were the untouched ones carried too, they would
    look freshly written at this commit and win last-writer-wins against a newer edit
    of the same field made in another system. So an update carries only what differs
    from its before image (by canonical value); an insert or a snapshot read carries all.
    """
    previous: dict[str, Value] = {}
    _map_values(plan, before, previous, [], [])
    return {
        name: value
        for name, value in after.items()
        if name not in previous
        or type(previous[name]) is not type(value)
        or previous[name] != value
    }


def _map_values(
    plan: tuple[FieldSpec, ...],
    row: Mapping[str, Any],
    values: dict[str, Value],
    hard: list[FieldIssue],
    soft: list[FieldIssue],
    truncated: list[str] | None = None,
) -> None:
    """Fill `values` field by field; failures go to `hard` (reject) or `soft` (drop).

    Text longer than its field's limit is a hard failure (`field_too_long`), or is cut
    to the limit and its field named in `truncated`, as the field's `on_too_long` says.
    """
    for spec in plan:
        if spec.column not in row:
            if spec.required:
                message = f"required: column {spec.column!r} is missing"
                hard.append(FieldIssue(spec.name, "required", message))
            continue
        value = row[spec.column]
        try:
            for transform in spec.transforms:
                value = transform.apply(value, values)
        except FieldError as exc:
            issue = FieldIssue(spec.name, exc.rule, str(exc))
            (hard if spec.on_invalid is OnInvalid.REJECT else soft).append(issue)
            continue
        except Exception as exc:  # a transform bug must not stop the worker: dead-letter it
            issue = FieldIssue(spec.name, transform.name, f"{transform.name}: {exc!r}")
            (hard if spec.on_invalid is OnInvalid.REJECT else soft).append(issue)
            continue
        if isinstance(value, str) and len(value) > spec.limit.length:
            if spec.on_too_long is OnTooLong.DEAD_LETTER:
                hard.append(FieldIssue(spec.name, FIELD_TOO_LONG, spec.too_long(len(value))))
                continue
            value = value[: spec.limit.length]
            if truncated is not None:
                truncated.append(spec.name)
        if spec.required and (value is None or (isinstance(value, str) and not value.strip())):
            hard.append(FieldIssue(spec.name, "required", f"required: {spec.column!r} is empty"))
            continue
        values[spec.name] = value


def canonical_row(
    mapping: SystemMapping, key: str, row: Mapping[str, Any]
) -> dict[str, Value] | None:
    """A row as it stands in its table, read through the system's mapping.

    What Accord would make of this row if it arrived as a snapshot read; None when the
    row breaks a hard rule. Appliers and reconcile compare target rows with it.
    """
    position = SourcePosition("table", "", "", 0, True, lsn=0)
    keys = dict(zip(mapping.key, key.split("|"), strict=False))
    result = Mapper({mapping.system: mapping}).map(
        SourceChange(mapping.topic, "r", keys, None, dict(row), position, 0)
    )
    return dict(result.change.values) if isinstance(result, Mapped) else None
