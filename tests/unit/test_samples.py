import re
from decimal import Decimal

import pytest

from streams.samples import _COUNTRIES, SampleGenerator

INDEXES = range(300)


@pytest.fixture(scope="module")
def generator() -> SampleGenerator:
    return SampleGenerator(seed=11)


def test_same_seed_same_rows(generator: SampleGenerator) -> None:
    again = SampleGenerator(seed=11)
    for index in (0, 17, 299):
        person = generator.person(index)
        assert person == again.person(index)
        assert generator.billing_row(person) == again.billing_row(again.person(index))


def test_other_seed_other_people(generator: SampleGenerator) -> None:
    other = SampleGenerator(seed=12)
    assert [generator.person(i).email for i in range(20)] != [
        other.person(i).email for i in range(20)
    ]


def test_every_system_renders_the_same_email_messily(generator: SampleGenerator) -> None:
    variants = set()
    for index in INDEXES:
        person = generator.person(index)
        for row, column in (
            (generator.crm_row(person), "email"),
            (generator.billing_row(person), "contact_email"),
            (generator.support_row(person), "email"),
        ):
            assert row[column].strip().lower() == person.email
            variants.add(row[column] == person.email)
    assert variants == {True, False}, "some emails must be messy and some clean"


def test_country_spellings_belong_to_the_country(generator: SampleGenerator) -> None:
    spellings = set()
    for index in INDEXES:
        person = generator.person(index)
        for value in (
            generator.crm_row(person)["country"],
            generator.billing_row(person)["billing_country"],
        ):
            assert value in _COUNTRIES[person.country][0]
            spellings.add(value)
    assert any(len(s) > 3 for s in spellings) and any(len(s) == 2 for s in spellings)


def test_phones_carry_the_same_number_in_local_formats(generator: SampleGenerator) -> None:
    formats = set()
    for index in INDEXES:
        person = generator.person(index)
        phone = generator.crm_row(person)["phone"]
        if phone is None:
            continue
        national = (
            person.phone_e164[3:] if person.country not in ("US", "CA") else person.phone_e164[2:]
        )
        assert re.sub(r"\D", "", phone).endswith(national)
        formats.add(re.sub(r"\d", "9", phone))
    assert len(formats) > 5


def test_rows_fit_their_columns(generator: SampleGenerator) -> None:
    for index in INDEXES:
        person = generator.person(index)
        billing = generator.billing_row(person)
        assert len(billing["account_no"]) <= 32
        assert Decimal("0") <= billing["credit_limit"] < Decimal("10000000000")
        assert billing["status"] in ("active", "suspended", "closed")
        assert len(billing["currency"]) == 3


def test_customers_overlap_across_systems(generator: SampleGenerator) -> None:
    presence = [generator.systems_for(i) for i in INDEXES]
    assert all(presence)
    assert sum(len(p) == 3 for p in presence) > 30
    assert {s for p in presence for s in p} == {"crm", "billing", "support"}
