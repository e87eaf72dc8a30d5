"""Personal data never reaches a log line or an error message unredacted."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from streams.dlq import DeadLetter
from streams.redact import install, redact

EMAILS = {
    "valid": ("'Ada.Lovelace@Example.com' is not an email", "'<email>' is not an email"),
    "no dot in the domain": ("email 'ada@example' is not valid", "email '<email>' is not valid"),
    "two @": ("ada@@example.com refused", "<email> refused"),
    "a space before @": ("from ada @example.com", "from <email>"),
    "spaces around @": ("from ada @ example.com", "from <email>"),
    "quoted display name": ('to "Ada Lovelace" <ada@example.com>.', "to <email>."),
    "bare display name": ("to Ada Lovelace <ada@example.com>", "to <email>"),
    "angle brackets alone": ("to <ada@example.com>", "to <<email>>"),
    "plus tag": ("ada+billing@example.com bounced", "<email> bounced"),
    "unicode local part and domain": ("jörg.müller@bücher.de bounced", "<email> bounced"),
    "non-latin local part": ("用户@例子.广告 bounced", "<email> bounced"),
    "quoted local part": ('"ada lovelace"@example.com bounced', "<email> bounced"),
    "percent-encoded @": ("?to=ada%40example.com&x=1", "?to=<email>&x=1"),
    "percent-encoded plus and @": ("to=ada%2Bx%40example.com", "to=<email>"),
    "html entity @": ("ada&#64;example.com", "<email>"),
    "apostrophe, sentence end": ("mailto:o'brien@example.co.uk.", "mailto:<email>."),
    "address literal": ("ada@[192.168.0.1] refused", "<email> refused"),
}
PHONES = {
    "international, spaces": (
        "phone: '+44 20 7946 0018' is not a phone",
        "phone: '<phone>' is not a phone",
    ),
    "national, spaces": ("got '020 7946 0018' from crm", "got '<phone>' from crm"),
    "parentheses, dash, ext.": ("call +1 (212) 555-0193 ext. 12 now", "call <phone> now"),
    "parentheses, x extension": ("call (212) 555-0193 x7", "call <phone>"),
    "dots": ("call 212.555.0193", "call <phone>"),
    "trunk zero in parentheses": ("+44 (0)20 7946 0018", "<phone>"),
    "international, no separators": ("mobile +447700900123.", "mobile <phone>."),
    "national mobile": ("07700 900123 or 07700900123", "<phone> or <phone>"),
    "00 international prefix": ("dial 00442079460018", "dial <phone>"),
    "french pairs": ("tel 01 23 45 67 89", "tel <phone>"),
    "spanish mobile": ("movil 612 345 678", "movil <phone>"),
    "us toll free": ("1-800-555-0199", "<phone>"),
    "us local": ("555-0193", "<phone>"),
    "german dash": ("030 1234-5678", "<phone>"),
    "german slash": ("nr. 089/12345678", "nr. <phone>"),
    "german mobile": ("mobile 0170 1234567", "mobile <phone>"),
    "international, dashes": ("tel:+1-212-555-0193", "tel:<phone>"),
    "international, trunk zero and pairs": ("+33 (0)1 23 45 67 89", "<phone>"),
    "a phone field's bare digits": ("phone=2125550193", "phone=<phone>"),
    "a json phone field": ('{"mobile": "2125550193"}', '{"mobile": "<phone>"}'),
}
ROW_DUMPS = {
    "postgres failing row": (
        'new row for relation "customers" violates check constraint "c"\n'
        "DETAIL:  Failing row contains (7, Ada, Lovelace, ada@x, null, 2026-12-03 08:04:18+00).",
        'new row for relation "customers" violates check constraint "c"\n'
        "DETAIL:  Failing row contains (<redacted>).",
    ),
    "postgres failing row with parentheses and a newline inside": (
        "DETAIL:  Failing row contains (7, Ada (Countess), 10 Downing\nSt, x).\nCONTEXT: y",
        "DETAIL:  Failing row contains (<redacted>).\nCONTEXT: y",
    ),
    "postgres failing row cut short": (
        "DETAIL:  Failing row contains (7, Ada Lovelace, 10 Downi",
        "DETAIL:  Failing row contains (<redacted>)",
    ),
    "a postgres applier's error line": (
        'CheckViolation [23514]: new row for relation "c" violates check constraint "k" '
        "(Failing row contains (7, Ada, null).)",
        'CheckViolation [23514]: new row for relation "c" violates check constraint "k" '
        "(Failing row contains (<redacted>).)",
    ),
    "a postgres applier's unique violation": (
        'UniqueViolation [23505]: duplicate key value violates unique constraint "uq" '
        "(Key (email)=(ada@x.com) already exists.)",
        'UniqueViolation [23505]: duplicate key value violates unique constraint "uq" '
        "(Key (email)=(<redacted>) already exists.)",
    ),
    "psycopg key detail": (
        "DETAIL:  Key (email)=(ada@x.com) already exists.",
        "DETAIL:  Key (email)=(<redacted>) already exists.",
    ),
    "psycopg key detail, expression and two columns": (
        'Key (lower(email::text), tenant)=(Ada@X.com, 3) is not present in table "t".',
        'Key (lower(email::text), tenant)=(<redacted>) is not present in table "t".',
    ),
    "postgres exclusion conflict": (
        "Key (name)=(Ada) conflicts with existing key (name)=(Ada Lovelace).",
        "Key (name)=(<redacted>) conflicts with existing key (name)=(<redacted>).",
    ),
    "mariadb duplicate entry": (
        "(1062, \"Duplicate entry 'Ada Lovelace-3' for key 'uq_name'\")",
        "(1062, \"Duplicate entry '<redacted>' for key 'uq_name'\")",
    ),
    "mariadb data too long keeps the column": (
        "(1406, \"Data too long for column 'street' at row 1\")",
        "(1406, \"Data too long for column 'street' at row 1\")",
    ),
    "mariadb incorrect value": (
        "(1366, \"Incorrect integer value: 'Ada' for column `db`.`t`.`age` at row 1\")",
        "(1366, \"Incorrect integer value: '<redacted>' for column `db`.`t`.`age` at row 1\")",
    ),
    "mariadb syntax error quotes the row": (
        "(1064, \"... for the right syntax to use near 'Ada', 'Lovelace')' at line 1\")",
        "(1064, \"... for the right syntax to use near '<redacted>' at line 1\")",
    ),
    "sql values list": (
        "INSERT INTO c (id, street) VALUES (1, '10 Downing St'), (2, 'a)b') ON CONFLICT DO NOTHING",
        "INSERT INTO c (id, street) VALUES (<redacted>) ON CONFLICT DO NOTHING",
    ),
}
TAX_IDS = {
    "uk vat": ("vat GB123456789 refused", "vat <tax-id> refused"),
    "austrian vat": ("ATU12345678", "<tax-id>"),
    "dutch vat with letters": ("NL123456789B01.", "<tax-id>."),
    "lower-case vat": ("de123456789", "<tax-id>"),
    "us ein": ("ein 12-3456789 refused", "ein <tax-id> refused"),
    "ssn-shaped": ("ssn 123-45-6789", "ssn <tax-id>"),
    "a tax field": ("tax_id='X-1'", "tax_id='<tax-id>'"),
}
FIELDS = {
    "key=value": (
        "street=221B Baker Street, city=London postal_code=NW1 6XE",
        "street=<address>, city=<address> postal_code=<address>",
    ),
    "json": (
        '{"billing_street": "221B Baker St", "city": "Bath", "postal_code": 12345, "x": "GB"}',
        '{"billing_street": "<address>", "city": "<address>", "postal_code": <address>, "x": "GB"}',
    ),
    "python dict": (
        "{'street': '1 Main St', 'first_name': 'Ada'}",
        "{'street': '<address>', 'first_name': '<name>'}",
    ),
    "sql assignment": (
        "UPDATE t SET `street` = '1 Main St', city='Bath' WHERE id=3",
        "UPDATE t SET `street` = '<address>', city='<address>' WHERE id=3",
    ),
    "kafka connect struct": (
        "Struct{id=1,first_name=Ada,email=ada,city=London}",
        "Struct{id=1,first_name=<name>,email=<email>,city=<address>}",
    ),
    "escaped quote in a value": (
        r"address: 'Ada\'s House, 1 Main St' is too long",
        "address: '<address>' is too long",
    ),
    "quoted first name": ("first_name: 'Ada' is too long", "first_name: '<name>' is too long"),
    "double-quoted display name": (
        'display_name="Grace Hopper" split',
        'display_name="<name>" split',
    ),
    "legal name with spaces": ("legal_name = 'Cair Paravel Ltd'", "legal_name = '<name>'"),
}


def cases(table: dict[str, tuple[str, str]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("text", "expected"), list(table.values()), ids=list(table))


@cases(EMAILS)
def test_anything_shaped_like_an_email_is_replaced(text: str, expected: str) -> None:
    assert redact(text) == expected


@cases(PHONES)
def test_anything_shaped_like_a_phone_number_is_replaced(text: str, expected: str) -> None:
    assert redact(text) == expected


@cases(ROW_DUMPS)
def test_rows_quoted_by_database_errors_lose_their_values(text: str, expected: str) -> None:
    assert redact(text) == expected


@cases(TAX_IDS)
def test_tax_ids_are_replaced(text: str, expected: str) -> None:
    assert redact(text) == expected


@cases(FIELDS)
def test_names_and_street_fields_are_replaced_in_every_form(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "committed offset 1234567 on partition 3",
        "crm.public.customers: partition 3 offset 1234567",
        "[2026-12-03 08:04:18,123] [12345] [INFO] [^--Consumer]: started",
        "2026-12-03 08:04:18 ingest: 1,234 records/s, 1,234,567 in all",
        "lsn:00000000000036171672 at 2026-11-23T09:34:13.763643+00:00",
        "worker web on 127.0.0.1:16066, broker 192.168.100.200:9092",
        "address=127.0.0.1:16066",
        "golden 3933c205-deb3-5758-8380-a1c4e3d34d6f version 12",
        "golden ab123456-1234-1234-1234-ab1234567890 version 12",
        "emit: revision at accord.changes/2/1234567 dead-lettered",
        "crm.public.customers/0/12345 read again",
        "TopicPartition(topic='crm.public.customers', partition=3): 1234567",
        "took 1234.567 ms for 1048576 bytes at epoch 1764748800, backoff 12.5s",
        "Timer commit woke up too late, with a drift of +0.1234567 runtime=0.0001",
        "accord 0.4.1, librdkafka 2.6.1, hypothesis 6.170.15, phonenumbers 9.0.43",
        "redis://127.0.0.1:6379/0 kafka-broker:9092 3 partitions 12 events 4567 bytes",
        "due 03.12.2026 or 12/03/2026 or 2026/12/03 or 20261203",
        "x 3/1234567, 200 12345678, partition 3 offset 12345678",
        "country: unknown country 'Narnia'",
        "email: max_length must be a whole number from 1 to 1,000",
        "phone: missing 'column' (the source column it comes from)",
        "CONSTRAINT `fk` failed for `db`.`t`",
        "key 'uq_email' CONSTRAINT_NAME FOREIGN_KEY_CHECKS",
        "STATEMENT:  INSERT INTO content (id, hash) VALUES ($1, $2)",
        "INSERT INTO customers (id, email) VALUES (%s, %(email)s) ON CONFLICT DO NOTHING",
        "Started http_127.0.0.1@68a0c196{HTTP/1.1} and (1@0x7f5960267b90) Loader@1144503536",
        '"PUT /connectors/accord-crm/config HTTP/1.1" 201 1059 "" "python-httpx/0.28.1" 103',
        "identity: support:a9a0ea57-0f1d-4418-9003-db38c2fc39c0 held, not linked",
    ],
)
def test_what_is_not_personal_data_stays_readable(text: str) -> None:
    assert redact(text) == text


# Embedded means set apart by a space or punctuation: a phone glued to other digits
# (`5 020 7946 0018 3`, `5. 020 7946 0018`) is another number.
SEPARATORS = st.sampled_from([" ", ": ", " '", '"', "(", ", ", "\n", "\t", "<", " = "])
GLUE = frozenset(".-/+,:")


def apart(text: str, at_end: bool) -> bool:
    """Whether `text` ends (or starts) with neither a digit nor what joins digit groups."""
    edge = text[-1:] if at_end else text[:1]
    return not (edge.isdecimal() or edge in GLUE)


letters = st.characters(categories=["L", "Nd"])
local_parts = st.builds(
    lambda first, middle: first + middle,
    letters,
    st.text(st.one_of(letters, st.sampled_from("._+-")), max_size=12).filter(
        lambda s: not s.endswith(".")
    ),
)
labels = st.text(letters, min_size=1, max_size=10)
# One hexadecimal label after an @ is an object reference (`Loader@6ba7383d`), kept.
domains = (
    st.lists(labels, min_size=1, max_size=3)
    .map(".".join)
    .filter(lambda d: not re.fullmatch(r"(?=[0-9a-fx]*\d)(?:0x)?[0-9a-f]{5,16}", d))
)
email_forms = st.sampled_from(
    [
        "{l}@{d}",
        "{l}@@{d}",
        "{l}%40{d}",
        "{l}&#64;{d}",
        '"{l} {l}"@{d}',
        "<{l}@{d}>",
        '"Ada Lovelace" <{l}@{d}>',
        "{l} @{d}.com",
    ]
)


def groups(sizes: list[int]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*[st.text("0123456789", min_size=n, max_size=n) for n in sizes]).map(list)


phones = st.one_of(
    st.builds(  # international: +cc then groups, one separator throughout
        lambda cc, parts, sep: "+" + cc + sep + sep.join(parts),
        st.integers(1, 999).map(str),
        st.lists(st.text("0123456789", min_size=2, max_size=4), min_size=2, max_size=3),
        st.sampled_from([" ", "-", ".", ""]),
    ).filter(lambda phone: 7 <= sum(c.isdigit() for c in phone) <= 15),  # E.164's lengths
    st.builds(  # national: trunk 0, area, then groups
        lambda area, parts, sep: "0" + area + sep + sep.join(parts),
        st.text("123456789", min_size=1, max_size=1).flatmap(
            lambda d: st.text("0123456789", min_size=1, max_size=3).map(lambda t: d + t)
        ),
        st.lists(st.text("0123456789", min_size=3, max_size=4), min_size=2, max_size=2),
        st.sampled_from([" ", "-", "."]),
    ),
    st.builds(  # north american
        lambda p, ext: f"({p[0]}) {p[1]}-{p[2]}{ext}",
        groups([3, 3, 4]),
        st.sampled_from(["", " ext. 12", " x7", " #3"]),
    ),
)


@pytest.mark.property
@given(
    st.one_of(
        st.builds(
            lambda form, local, domain: form.format(l=local, d=domain),
            email_forms,
            local_parts,
            domains,
        ),
        phones,
    ),
    st.text(max_size=40),
    st.text(max_size=40),
    SEPARATORS,
    SEPARATORS,
)
def test_an_email_or_phone_in_any_text_never_survives(
    item: str, before: str, after: str, left: str, right: str
) -> None:
    assume(apart(before, at_end=True) and apart(after, at_end=False))
    assume(item not in before + after)
    redacted = redact(before + left + item + right + after)
    assert item not in redacted
    # Nor a telling part of it: the domain, or the phone's last digits.
    at = re.search(r"@+|%40|&#64;", item)
    tail = item[at.end() :].rstrip(">") if at else item[-7:]
    if tail not in before + after + left + right:
        assert tail not in re.sub(r"<(?:email|phone|name|address|tax-id|redacted)>", "", redacted)


@pytest.fixture
def restored_factory() -> Iterator[None]:
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)


@pytest.mark.usefixtures("restored_factory")
def test_every_log_record_is_redacted_once_installed(caplog: pytest.LogCaptureFixture) -> None:
    install()
    install()  # idempotent: one factory, not two
    log = logging.getLogger("anywhere.in.a.library")
    with caplog.at_level(logging.INFO):
        log.info("applied %s to row of %s", {"email": "a@b.io"}, "+1 212 555 0193")
        try:
            raise ValueError("first_name: 'Ada' refused")
        except ValueError:
            log.exception("failed")
    text = caplog.text
    assert "a@b.io" not in text and "555 0193" not in text and "'Ada'" not in text
    assert "<email>" in text and "<phone>" in text and "<name>" in text


def test_a_dead_letter_s_reason_is_redacted_and_its_bytes_are_not() -> None:
    class Message:
        def topic(self) -> str:
            return "crm.public.customers"

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return 9

        def key(self) -> bytes:
            return b"k"

        def value(self) -> bytes:
            return b"ada@example.com"

    letter = DeadLetter.of(
        Message(), "validation_failed", ValueError("'ada@example.com' bad"), "map"
    )
    assert letter.detail == "'<email>' bad" and letter.value == b"ada@example.com"
