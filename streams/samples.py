"""Deterministic, realistic and deliberately messy customers for the three sample systems.

One `Person` is the truth; each system renders it its own way (mixed-case emails, local
phone formats, country names instead of codes), as real CRM, billing and support data
does. The same (seed, index) always yields the same rows, so demos, tests and benchmarks
can regenerate exactly what they loaded.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from decimal import Decimal

from faker import Faker

# alpha-2, the spellings systems use for it, Faker locale, currency, phone builder
_COUNTRIES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "US": (("US", "USA", "United States", "united states of america"), "en_US", "USD"),
    "GB": (("GB", "GBR", "United Kingdom", "UK"), "en_GB", "GBP"),
    "DE": (("DE", "DEU", "Germany", "Deutschland"), "de_DE", "EUR"),
    "FR": (("FR", "FRA", "France", "france"), "fr_FR", "EUR"),
    "NL": (("NL", "NLD", "Netherlands", "The Netherlands"), "nl_NL", "EUR"),
    "ES": (("ES", "ESP", "Spain", "España"), "es_ES", "EUR"),
    "CA": (("CA", "CAN", "Canada", "canada"), "en_CA", "CAD"),
    "SE": (("SE", "SWE", "Sweden", "Sverige"), "sv_SE", "SEK"),
}
_COUNTRY_WEIGHTS = (40, 15, 12, 8, 7, 6, 7, 5)
_SEGMENTS = ("enterprise", "mid-market", "smb", "startup")
_TIERS = ("free", "standard", "premium", "enterprise")
_TERMS = ("NET15", "NET30", "NET45", "NET60", "PREPAID")
_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "proton.me", "icloud.com")
# Sample CRM ids live far above what the table's own sequence hands out, so seeded rows
# never collide with rows made by people, tests or Accord's own creates.
SAMPLE_CRM_ID_BASE = 1_000_000_000
_US_AREAS = ("212", "312", "415", "617", "206", "303", "512", "404", "646", "720")


@dataclass(frozen=True)
class Person:
    """The clean truth behind one customer, before any system mangles it."""

    index: int
    first_name: str
    last_name: str
    email: str
    phone_e164: str
    country: str
    company: str
    tax_id: str
    street: str
    city: str
    postal_code: str
    currency: str
    locale: str


class SampleGenerator:
    """Renders people into the column shapes of crm, billing and support."""

    def __init__(self, seed: int = 7) -> None:
        self.seed = seed
        self._faker = Faker(list({locale for _, locale, _ in _COUNTRIES.values()}))

    def _rng(self, index: int, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}:{index}:{purpose}")

    def person(self, index: int) -> Person:
        rng = self._rng(index, "person")
        country = rng.choices(list(_COUNTRIES), weights=_COUNTRY_WEIGHTS)[0]
        _, locale, currency = _COUNTRIES[country]
        fake = self._faker[locale]
        fake.seed_instance(f"{self.seed}:{index}")
        first, last = fake.first_name(), fake.last_name()
        company = fake.company()
        local = f"{_ascii(first)}.{_ascii(last)}".lower()
        domain = rng.choice((*_DOMAINS, _ascii(company.split()[0]).lower() + ".example.com"))
        return Person(
            index=index,
            first_name=first,
            last_name=last,
            email=f"{local}{index}@{domain}",
            phone_e164=_phone(country, rng),
            country=country,
            company=company,
            tax_id=f"{country}{rng.randrange(10**8, 10**9)}",
            street=fake.street_address().replace("\n", ", "),
            city=fake.city(),
            postal_code=fake.postcode(),
            currency=currency,
            locale=f"{locale.split('_')[0]}-{country}",
        )

    # -- rendering per system: the mess is deliberate --------------------------------

    def crm_row(self, person: Person) -> dict[str, object]:
        rng = self._rng(person.index, "crm")
        return {
            "id": SAMPLE_CRM_ID_BASE + person.index,
            "first_name": _maybe_pad(person.first_name, rng),
            "last_name": person.last_name.upper() if rng.random() < 0.1 else person.last_name,
            "email": _messy_email(person.email, rng),
            "phone": _messy_phone(person.phone_e164, person.country, rng),
            "company": person.company,
            "segment": rng.choice(_SEGMENTS),
            "country": rng.choice(_COUNTRIES[person.country][0]),
            "marketing_opt_in": rng.random() < 0.4,
        }

    def billing_row(self, person: Person) -> dict[str, object]:
        rng = self._rng(person.index, "billing")
        return {
            "account_no": f"AC-{self.seed:03d}-{person.index:07d}",
            "legal_name": person.company,
            "contact_email": _messy_email(person.email, rng),
            "phone": _messy_phone(person.phone_e164, person.country, rng),
            "tax_id": person.tax_id,
            "billing_street": person.street,
            "billing_city": person.city,
            "billing_postal_code": person.postal_code,
            "billing_country": rng.choice(_COUNTRIES[person.country][0]),
            "currency": person.currency,
            "payment_terms": rng.choice(_TERMS),
            "credit_limit": Decimal(rng.randrange(0, 500_000_00)) / 100,
            "status": rng.choices(("active", "suspended", "closed"), weights=(90, 7, 3))[0],
        }

    def support_row(self, person: Person) -> dict[str, object]:
        rng = self._rng(person.index, "support")
        name = f"{person.first_name} {person.last_name}"
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"accord:{self.seed}:{person.index}")),
            "email": _messy_email(person.email, rng),
            "display_name": name.lower() if rng.random() < 0.15 else name,
            "phone": _messy_phone(person.phone_e164, person.country, rng),
            "tier": rng.choice(_TIERS),
            "locale": person.locale,
        }

    def systems_for(self, index: int) -> tuple[str, ...]:
        """Which systems know this customer: most are in two or three, as in real life."""
        rng = self._rng(index, "presence")
        present = tuple(
            system
            for system, chance in (("crm", 0.8), ("billing", 0.6), ("support", 0.6))
            if rng.random() < chance
        )
        return present or ("crm",)


def _ascii(text: str) -> str:
    return "".join(ch for ch in text if ch.isascii() and ch.isalnum()) or "x"


def _phone(country: str, rng: random.Random) -> str:
    digits = lambda n: "".join(str(rng.randrange(10)) for _ in range(n))  # noqa: E731
    if country in ("US", "CA"):
        area = rng.choice(_US_AREAS) if country == "US" else rng.choice(("416", "604", "514"))
        return f"+1{area}{rng.randrange(2, 10)}{digits(2)}{digits(4)}"
    return {
        "GB": lambda: f"+442079460{rng.randrange(0, 1000):03d}",
        "DE": lambda: f"+4930{rng.randrange(2, 10)}{digits(7)}",
        "FR": lambda: f"+331{rng.randrange(40, 80)}{digits(6)}",
        "NL": lambda: f"+3120{rng.randrange(2, 8)}{digits(6)}",
        "ES": lambda: f"+3491{rng.randrange(2, 8)}{digits(6)}",
        "SE": lambda: f"+468{rng.randrange(5, 8)}{digits(6)}",
    }[country]()


def _messy_phone(e164: str, country: str, rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.05:
        return None
    if country in ("US", "CA"):
        n = e164[2:]
        return rng.choice(
            (
                f"({n[:3]}) {n[3:6]}-{n[6:]}",
                f"{n[:3]}.{n[3:6]}.{n[6:]}",
                f"+1 {n[:3]} {n[3:6]} {n[6:]}",
                f"1-{n[:3]}-{n[3:6]}-{n[6:]}",
                e164,
            )
        )
    code_len = 2
    national = "0" + e164[1 + code_len :]
    spaced = " ".join(national[i : i + 3] for i in range(0, len(national), 3))
    return rng.choice((national, spaced, e164, f"00{e164[1:]}", f"+{e164[1:3]} {spaced[1:]}"))


def _messy_email(email: str, rng: random.Random) -> str:
    local, domain = email.split("@")
    return rng.choice(
        (
            email,
            email.upper(),
            f"{local.title()}@{domain.upper()}",
            f"  {email} ",
            f"{local}@{domain.title()}",
        )
    )


def _maybe_pad(text: str, rng: random.Random) -> str:
    return f" {text}  " if rng.random() < 0.1 else text
