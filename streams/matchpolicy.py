"""Match policy: which keys a system may link on, how far each is trusted, and the score
that decides whether a new row links to a candidate golden record, is held for review,
or founds a record of its own.

An exact match on a key is evidence as strong as the key is trusted: CRM's email, a
billing tax id (`trusted`) link alone; a support email typed into a self-service sign-up
form (`low`) proves nothing by itself (anyone can type anyone's address), so it links
only when the candidate's rows corroborate it: a similar name, the same phone.

The score of a candidate (`score`) adds up, all plain numbers from `MatchScoring`:

- per matched key, the weight of its trust level (`trusted`, `low`); the trust of a match
  is the lower of the two sides': the row's system's trust in the key, and the trust of
  the system that indexed the value on the candidate's side (a support sign-up that
  founded a record does not vouch for a CRM row either);
- `name` times the name similarity (0..1, `name_similarity`), when that is at least
  `name_min`; below, nothing (a family sharing an address shares the last name);
- `phone` when both carry the same phone (E.164, as the mappings normalized it).

`decide`: at least `auto_link` links; at least `review` (and below `auto_link`) is held
for review; below `review` the row founds its own golden record. Everything here is
pure: identity (`streams.identity`) gathers the candidate's match profile from Redis and
applies the decision atomically; the sinks' `adopt_by` asks the same question.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rapidfuzz import fuzz, utils

from streams.errors import ConfigError
from streams.model import SYSTEMS

__all__ = [
    "DEFAULT_TRUST",
    "Decision",
    "MatchPolicy",
    "MatchScoring",
    "MatchSide",
    "PolicyError",
    "Score",
    "Trust",
    "decide",
    "name_similarity",
    "normalized_name",
    "profile_entry",
    "score",
]


class PolicyError(ConfigError):
    """A match policy value is wrong; `option` names the `identity.scoring` (or
    `identity.trust`) option, so the rules loader can point at its line."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


class Trust(StrEnum):
    """How far a system's value of a key identifies a person."""

    TRUSTED = "trusted"  # links alone (a verified address, a tax id)
    LOW = "low"  # links only with corroboration (self-service sign-ups)


_RANK = {Trust.LOW: 0, Trust.TRUSTED: 1}


class Decision(StrEnum):
    LINK = "link"  # join the candidate golden record
    REVIEW = "review"  # held until a person decides (`accord review`)
    NEW = "new"  # found a golden record of its own


@dataclass(frozen=True)
class MatchScoring:
    """Weights and thresholds (`identity.scoring` in the survivorship rules).

    Defaults: a trusted key alone reaches `auto_link` (1.0); a low-trust key alone (0.6)
    lands in the review band; with a similar name (+0.5 x similarity >= 0.85, so at
    least +0.425) or the same phone (+0.5) it links.
    """

    trusted: float = 1.0
    low: float = 0.6
    name: float = 0.5
    name_min: float = 0.85
    phone: float = 0.5
    auto_link: float = 1.0
    review: float = 0.5

    def __post_init__(self) -> None:
        for name in ("trusted", "low", "name", "phone", "auto_link", "review", "name_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise PolicyError(
                    f"identity.scoring.{name} must be a number >= 0, got {value!r}", option=name
                )
            object.__setattr__(self, name, float(value))
        if self.name_min > 1:
            raise PolicyError(
                f"identity.scoring.name_min is a similarity from 0 to 1, got {self.name_min}",
                option="name_min",
            )
        if not 0 < self.review <= self.auto_link:
            raise PolicyError(
                f"identity.scoring: need 0 < review <= auto_link, got review {self.review} "
                f"and auto_link {self.auto_link}",
                option="review",
            )
        if self.low >= self.auto_link:
            raise PolicyError(
                f"identity.scoring.low ({self.low}) must be below auto_link "
                f"({self.auto_link}): a low-trust key alone must not link",
                option="low",
            )

    def weight(self, trust: Trust) -> float:
        return self.trusted if trust is Trust.TRUSTED else self.low

    def thresholds(self) -> dict[str, float]:
        """What a hold records of the policy that decided it."""
        return {"auto_link": self.auto_link, "review": self.review}


# The sample systems' trust (what `identity.trust` defaults to): CRM's and billing's
# addresses are entered by staff or verified, a tax id is a legal identifier; support's
# addresses come from self-service sign-up forms, where anyone can type anyone's.
DEFAULT_TRUST: Mapping[str, Mapping[str, Trust]] = {
    "crm": {"email": Trust.TRUSTED},
    "billing": {"email": Trust.TRUSTED, "tax_id": Trust.TRUSTED},
    "support": {"email": Trust.LOW},
}


@dataclass(frozen=True)
class MatchPolicy:
    """Per system, the keys it may link on and how far each is trusted.

    `trust`: system -> {match field -> Trust}, `DEFAULT_TRUST` unless given. A system
    listed links (and indexes) only on the fields listed for it; a system not listed
    trusts every match rule that applies to it (how identity matched before policies).
    """

    trust: Mapping[str, Mapping[str, Trust]] = field(default_factory=lambda: DEFAULT_TRUST)
    scoring: MatchScoring = field(default_factory=MatchScoring)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.trust) - set(SYSTEMS))
        if unknown:
            raise PolicyError(
                f"identity.trust: unknown system(s) {', '.join(unknown)} "
                f"(expected some of {', '.join(SYSTEMS)})",
                option="trust",
            )
        frozen = {
            system: {name: Trust(level) for name, level in keys.items()}
            for system, keys in self.trust.items()
        }
        object.__setattr__(self, "trust", frozen)

    def trust_of(self, system: str, name: str) -> Trust | None:
        """How far `system`'s value of match field `name` is trusted; None: it may not
        link on it at all."""
        keys = self.trust.get(system)
        if keys is None:
            return Trust.TRUSTED
        return keys.get(name)

    def may_link(self, system: str, name: str) -> bool:
        return self.trust_of(system, name) is not None


def _fold(text: str) -> str:
    """Lower-cased, accents dropped (`Zoë` -> `zoe`), punctuation to blanks, blanks
    collapsed: how names are compared."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(utils.default_process(plain).split())


def normalized_name(first: object, last: object) -> str:
    """A person's name as scoring compares it: first and last folded (`_fold`), joined;
    "" when both are empty."""
    parts = [_fold(str(part)) for part in (first, last) if part not in (None, "")]
    return " ".join(part for part in parts if part)


def name_similarity(a: str, b: str) -> float:
    """How alike two normalized names are, from 0 to 1: rapidfuzz's token sort ratio, so
    the order of the words does not count (`Lovelace Ada` is `Ada Lovelace`); 0 when
    either is empty. Symmetric."""
    if not a or not b:
        return 0.0
    return fuzz.token_sort_ratio(a, b) / 100.0


@dataclass(frozen=True)
class MatchSide:
    """What scoring knows of one row: its system, its normalized name and phone, and the
    match values it carries (field -> digest of the value: `streams.matchkeys`)."""

    system: str
    name: str = ""
    phone: str = ""
    keys: Mapping[str, str] = field(default_factory=dict)
    # False for a row an applier linked (created or adopted in a target): its values are
    # the record's, copied, so its system's trust says nothing about a match value.
    vouches: bool = True

    @classmethod
    def of(cls, system: str, values: Mapping[str, object], keys: Mapping[str, str]) -> MatchSide:
        phone = values.get("phone")
        return cls(
            system,
            normalized_name(values.get("first_name"), values.get("last_name")),
            str(phone) if phone else "",
            dict(keys),
        )

    @classmethod
    def parse(cls, text: str | bytes) -> MatchSide | None:
        """A profile entry (`profile_entry`) back; None when it is not one."""
        try:
            data = json.loads(text)
            return cls(
                str(data["s"]),
                normalized_name(data.get("f"), data.get("l")),
                str(data.get("p") or ""),
                {str(k): str(v) for k, v in (data.get("k") or {}).items()},
                not data.get("a"),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def profile_entry(system: str, values: Mapping[str, object], keys: Mapping[str, str]) -> str:
    """The match profile entry of one linked row, as kept in Redis (`<prefix>profile:
    {golden_id}`, field `system:key`): its system, its own normalized first and last name
    and phone, and the digests of its match values. Only what the change carries: the
    resolve script merges it into the entry it finds."""
    entry: dict[str, Any] = {"s": system, "k": dict(keys)}
    for name, short in (("first_name", "f"), ("last_name", "l")):
        if name in values:
            entry[short] = _fold(str(values[name])) if values[name] else ""
    if "phone" in values:
        entry["p"] = str(values["phone"]) if values["phone"] else ""
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Score:
    """Why a candidate scored what it did."""

    total: float
    key: float  # points from exact key matches
    name: float  # points from the name (0 below name_min)
    phone: float  # points from the phone
    name_similarity: float
    phone_equal: bool
    keys: tuple[tuple[str, Trust], ...]  # the matched keys and the trust each counted at

    def as_dict(self) -> dict[str, Any]:
        """The `scores` object of a hold (`accord explain`, `accord review`)."""
        return {
            "total": round(self.total, 4),
            "key": round(self.key, 4),
            "name": round(self.name, 4),
            "phone": round(self.phone, 4),
            "name_similarity": round(self.name_similarity, 4),
            "phone_equal": self.phone_equal,
            "keys": {name: trust.value for name, trust in self.keys},
        }


def score(
    policy: MatchPolicy,
    row: MatchSide,
    matched: Sequence[str],
    profile: Iterable[MatchSide],
) -> Score:
    """The score of one candidate golden record for `row`.

    `matched`: the match fields whose value of `row` is indexed to the candidate.
    `profile`: the candidate's linked rows (empty when unknown: a record indexed before
    profiles were kept, which is trusted as identity trusted every record before).
    The candidate's side of a key match is vouched for by its best-trusted row carrying
    the value; when none carries it any more (the row that indexed it changed), by its
    least-trusted row. Rows an applier linked (`vouches` False) vouch for nothing. A
    matched field `row`'s system may not link on counts nothing. The name and phone
    count once, at their best over the candidate's rows.
    """
    weights = policy.scoring
    entries = list(profile)
    keys: list[tuple[str, Trust]] = []
    for name in dict.fromkeys(matched):
        mine = policy.trust_of(row.system, name)
        if mine is None:
            continue
        digest = row.keys.get(name)
        vouching = [entry for entry in entries if entry.vouches and entry.system]
        theirs = [
            policy.trust_of(entry.system, name)
            for entry in vouching
            if digest is not None and entry.keys.get(name) == digest
        ]
        known = [trust for trust in theirs if trust is not None]
        if known:  # the best-trusted row carrying the value vouches for it
            mine = min(mine, max(known, key=_RANK.__getitem__), key=_RANK.__getitem__)
        else:  # no row carries it now (it changed since): the least-trusted row's word
            rows = [policy.trust_of(entry.system, name) for entry in vouching]
            rows = [trust for trust in rows if trust is not None]
            if rows:
                mine = min(mine, *rows, key=_RANK.__getitem__)
        keys.append((name, mine))
    key_points = sum(weights.weight(trust) for _, trust in keys)
    similarity = max((name_similarity(row.name, entry.name) for entry in entries), default=0.0)
    name_points = weights.name * similarity if similarity >= weights.name_min else 0.0
    phone_equal = bool(row.phone) and any(entry.phone == row.phone for entry in entries)
    phone_points = weights.phone if phone_equal else 0.0
    return Score(
        key_points + name_points + phone_points,
        key_points,
        name_points,
        phone_points,
        similarity,
        phone_equal,
        tuple(keys),
    )


def decide(scoring: MatchScoring, result: Score) -> Decision:
    """Link at `auto_link` and above; review in [`review`, `auto_link`); else new. A
    candidate no allowed key matched is never linked, whatever else it shares."""
    if not result.keys:
        return Decision.NEW
    if result.total >= scoring.auto_link:
        return Decision.LINK
    if result.total >= scoring.review:
        return Decision.REVIEW
    return Decision.NEW
