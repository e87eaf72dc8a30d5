"""Personal data never reaches a log line or an error message unredacted."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from streams.dlq import DeadLetter
from streams.redact import install, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("'Ada.Lovelace@Example.com' is not an email", "'<email>' is not an email"),
        ("phone: '+44 20 7946 0018' is not a phone", "phone: '<phone>' is not a phone"),
        ("phone: '020 7946 0018' is not valid", "phone: '<phone>' is not valid"),
        ("first_name: 'Ada' is too long", "first_name: '<name>' is too long"),
        ('display_name="Grace Hopper" split', 'display_name="<name>" split'),
        ("legal_name = 'Cair Paravel Ltd'", "legal_name = '<name>'"),
    ],
)
def test_emails_phones_and_names_are_replaced(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "committed offset 1234567 on partition 3",
        "golden 3933c205-deb3-5758-8380-a1c4e3d34d6f version 12",
        "lsn:00000000000036171672 at 2026-11-23T09:34:13.763643+00:00",
        "country: unknown country 'Narnia'",
    ],
)
def test_what_is_not_personal_data_stays_readable(text: str) -> None:
    assert redact(text) == text


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
