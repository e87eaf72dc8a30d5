"""Survivorship, identity and delete rules, loaded from `connectors/survivorship.yaml`.

Every canonical field must have a rule, every system named must be known: a rules file
that would silently leave a field unmerged is refused at start-up, with every mistake in
it reported at once as `path:line: message` (read by `streams.yamlconf`, which also
refuses duplicate keys). The format is documented in `connectors/README.md`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from streams import yamlconf
from streams.errors import ConfigError
from streams.identity import DEFAULT_ROLE_ADDRESSES, IdentityPolicy, MatchRule
from streams.matchpolicy import DEFAULT_TRUST, MatchPolicy, MatchScoring, PolicyError, Trust
from streams.model import FIELDS, SYSTEMS
from streams.yamlconf import Map, Seq


class Rule(StrEnum):
    LWW = "lww"
    PRIORITY = "priority"
    OWNER = "owner"


class DeletePolicy(StrEnum):
    DEACTIVATE = "deactivate"
    PROPAGATE = "propagate"


@dataclass(frozen=True)
class FieldRule:
    rule: Rule
    order: tuple[str, ...] = ()  # priority: systems, highest first
    owner: str | None = None  # owner: the only system that may set it


@dataclass(frozen=True)
class Rules:
    fields: dict[str, FieldRule]
    priority: tuple[str, ...] = SYSTEMS
    delete_policy: DeletePolicy = DeletePolicy.DEACTIVATE
    match: tuple[MatchRule, ...] = ()
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    _rank: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._rank.update({system: -i for i, system in enumerate(self.priority)})

    def rank(self, system: str) -> int:
        """Higher is more important; unknown systems rank below every listed one."""
        return self._rank.get(system, -len(self.priority))


def default_rules() -> Rules:
    """The sample systems' rules, as shipped in connectors/survivorship.yaml."""
    return load_rules(Path(__file__).resolve().parents[1] / "connectors" / "survivorship.yaml")


TOP_LEVEL_KEYS = ("priority", "delete_policy", "match", "identity", "fields")
MATCH_KEYS = ("field", "systems")
IDENTITY_KEYS = ("max_rows_per_record", "role_addresses", "trust", "scoring")
SCORING_KEYS = tuple(f.name for f in fields(MatchScoring))
FIELD_OPTIONS = {
    Rule.LWW: ("rule",),
    Rule.PRIORITY: ("rule", "order"),
    Rule.OWNER: ("rule", "owner"),
}
ALL_FIELD_OPTIONS = ("rule", "order", "owner")


def load_rules(path: Path) -> Rules:
    """The rules file, fully checked: every mistake in it is reported at once."""
    document = yamlconf.read(path)
    problems = yamlconf.Problems(path)
    if not isinstance(document, Map):
        raise problems.fatal(
            yamlconf.line_of(document), f"expected a mapping of {', '.join(TOP_LEVEL_KEYS)}"
        )
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            problems.add(
                document.line_of(key),
                f"unknown key {key!r}{yamlconf.did_you_mean(key, TOP_LEVEL_KEYS)} "
                f"(expected one of {', '.join(TOP_LEVEL_KEYS)})",
            )
    priority = SYSTEMS
    if "priority" in document:
        priority = _systems(document, "priority", "priority", problems)
    policy = _delete_policy(document, problems)
    match = _match_rules(document, problems)
    identity = _identity_policy(document, match, problems)
    fields = _field_rules(document, problems)
    problems.raise_any()
    return Rules(fields, priority, policy, match, identity)


def _delete_policy(document: Map, problems: yamlconf.Problems) -> DeletePolicy:
    value = document.get("delete_policy", DeletePolicy.DEACTIVATE.value)
    if isinstance(value, str) and value in {p.value for p in DeletePolicy}:
        return DeletePolicy(value)
    problems.add(
        document.line_of("delete_policy"),
        f"delete_policy {value!r} is not one of: {', '.join(p.value for p in DeletePolicy)}",
    )
    return DeletePolicy.DEACTIVATE


def _match_rules(document: Map, problems: yamlconf.Problems) -> tuple[MatchRule, ...]:
    """Identity match rules, in file order (the order they are tried in)."""
    specs = document.get("match")
    if specs is None:
        return ()
    if not isinstance(specs, Seq):
        problems.add(document.line_of("match"), "match must be a list of {field: ...} rules")
        return ()
    rules: list[MatchRule] = []
    for i, spec in enumerate(specs):
        line = specs.line_of(i)
        if not isinstance(spec, Map) or "field" not in spec:
            problems.add(line, "match: each rule needs `field: <canonical field>`")
            continue
        before = len(problems.found)
        for key in spec:
            if key not in MATCH_KEYS:
                problems.add(
                    spec.line_of(key),
                    f"match: unknown option {key!r} (expected {', '.join(MATCH_KEYS)})",
                )
        name = spec["field"]
        if not isinstance(name, str) or name not in FIELDS:
            problems.add(
                spec.line_of("field"),
                f"match: {name!r} is not a canonical field{yamlconf.did_you_mean(name, FIELDS)}",
            )
        systems = None
        if spec.get("systems") is not None:
            systems = _systems(spec, "systems", f"match on {name}: systems", problems)
        if len(problems.found) == before:
            rules.append(MatchRule(name, systems))
    return tuple(rules)


def _identity_policy(
    document: Map, match: tuple[MatchRule, ...], problems: yamlconf.Problems
) -> IdentityPolicy:
    """When a row is held rather than linked, and how matches are scored; defaults for
    what the file leaves out."""
    spec = document.get("identity")
    if spec is None:
        return IdentityPolicy()
    if not isinstance(spec, Map):
        problems.add(
            document.line_of("identity"),
            f"identity must be a mapping of {', '.join(IDENTITY_KEYS)}",
        )
        return IdentityPolicy()
    before = len(problems.found)
    for key in spec:
        if key not in IDENTITY_KEYS:
            problems.add(
                spec.line_of(key),
                f"identity: unknown option {key!r}{yamlconf.did_you_mean(key, IDENTITY_KEYS)} "
                f"(expected {', '.join(IDENTITY_KEYS)})",
            )
    cap = spec.get("max_rows_per_record", IdentityPolicy().max_rows_per_record)
    names = spec.get("role_addresses", list(DEFAULT_ROLE_ADDRESSES))
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        problems.add(
            spec.line_of("role_addresses"),
            "identity: role_addresses must be a list of mailbox names such as `info`",
        )
        return IdentityPolicy()
    matching = _match_policy(spec, match, problems)
    if len(problems.found) > before:
        return IdentityPolicy()
    try:
        return IdentityPolicy(cap, frozenset(names), matching)
    except ConfigError as exc:
        line = spec.line_of("max_rows_per_record" if "max_rows" in str(exc) else "role_addresses")
        problems.add(line, str(exc))
        return IdentityPolicy()


def _match_policy(
    spec: Map, match: tuple[MatchRule, ...], problems: yamlconf.Problems
) -> MatchPolicy:
    """`identity.trust` and `identity.scoring`: which keys each system links on, how far
    each is trusted, and the weights and thresholds of the score."""
    trust: dict[str, dict[str, Trust]] | None = None
    levels = ", ".join(t.value for t in Trust)
    raw_trust = spec.get("trust")
    if raw_trust is not None and not isinstance(raw_trust, Map):
        problems.add(
            spec.line_of("trust"),
            f"identity.trust must map systems to {{match field: {levels}}}",
        )
    elif raw_trust is not None:
        trust = {}
        for system, keys in raw_trust.items():
            at = raw_trust.line_of(system)
            if not isinstance(system, str) or system not in SYSTEMS:
                problems.add(
                    at,
                    f"identity.trust: unknown system {system!r}"
                    f"{yamlconf.did_you_mean(system, SYSTEMS)} (expected one of "
                    f"{', '.join(SYSTEMS)})",
                )
                continue
            if not isinstance(keys, Map):
                problems.add(at, f"identity.trust.{system}: expected {{match field: {levels}}}")
                continue
            trust[system] = {}
            for name, level in keys.items():
                line = keys.line_of(name)
                rule = next((rule for rule in match if rule.field == name), None)
                if rule is None:
                    fields_ = [rule.field for rule in match]
                    problems.add(
                        line,
                        f"identity.trust.{system}: {name!r} is not a match rule's field"
                        f"{yamlconf.did_you_mean(name, fields_)} (match: "
                        f"{', '.join(fields_) or 'none'})",
                    )
                elif not rule.applies_to(system):
                    problems.add(
                        line,
                        f"identity.trust.{system}: the match rule on {name} does not apply "
                        f"to {system} (its systems: {', '.join(rule.systems or ())})",
                    )
                elif not isinstance(level, str) or level not in {t.value for t in Trust}:
                    problems.add(
                        line, f"identity.trust.{system}.{name}: {level!r} is not one of {levels}"
                    )
                else:
                    trust[system][name] = Trust(level)
    scoring = MatchScoring()
    raw_scoring = spec.get("scoring")
    if raw_scoring is not None and not isinstance(raw_scoring, Map):
        problems.add(
            spec.line_of("scoring"),
            f"identity.scoring must be a mapping of {', '.join(SCORING_KEYS)}",
        )
    elif raw_scoring is not None:
        known = {key: value for key, value in raw_scoring.items() if key in SCORING_KEYS}
        for key in raw_scoring:
            if key not in SCORING_KEYS:
                problems.add(
                    raw_scoring.line_of(key),
                    f"identity.scoring: unknown option {key!r}"
                    f"{yamlconf.did_you_mean(key, SCORING_KEYS)} "
                    f"(expected {', '.join(SCORING_KEYS)})",
                )
        try:
            scoring = MatchScoring(**known)
        except PolicyError as exc:
            problems.add(raw_scoring.line_of(exc.option), str(exc))
    return MatchPolicy(DEFAULT_TRUST if trust is None else trust, scoring)


def _field_rules(document: Map, problems: yamlconf.Problems) -> dict[str, FieldRule]:
    specs = document.get("fields")
    if not isinstance(specs, Map) or not specs:
        what = "missing fields" if "fields" not in document else "fields"
        problems.add(
            document.line_of("fields"), f"{what}: must map every canonical field to its rule"
        )
        return {}
    rules: dict[str, FieldRule] = {}
    for name, spec in specs.items():
        line = specs.line_of(name)
        if not isinstance(name, str) or name not in FIELDS:
            problems.add(
                line,
                f"unknown canonical field {name!r}{yamlconf.did_you_mean(name, FIELDS)}",
            )
            continue
        rule = _field_rule(name, spec, line, problems)
        if rule is not None:
            rules[name] = rule
    missing = [name for name in FIELDS if name not in specs]
    if missing:
        problems.add(
            document.line_of("fields"), f"no rule for canonical field(s): {', '.join(missing)}"
        )
    return rules


def _field_rule(name: str, spec: Any, line: int, problems: yamlconf.Problems) -> FieldRule | None:
    """One field's rule; every problem is recorded, None when there was any."""
    if not isinstance(spec, Map) or "rule" not in spec:
        problems.add(line, f"{name}: expected {{rule: lww|priority|owner, ...}}")
        return None
    value = spec["rule"]
    if not isinstance(value, str) or value not in {r.value for r in Rule}:
        problems.add(
            spec.line_of("rule"),
            f"{name}: rule {value!r} is not one of: {', '.join(r.value for r in Rule)}",
        )
        return None
    rule = Rule(value)
    before = len(problems.found)
    for key in spec:
        if key not in ALL_FIELD_OPTIONS:
            problems.add(
                spec.line_of(key),
                f"{name}: unknown option {key!r} (expected {', '.join(FIELD_OPTIONS[rule])})",
            )
        elif key not in FIELD_OPTIONS[rule]:
            problems.add(spec.line_of(key), f"{name}: option {key!r} does not apply to {rule}")
    if rule is Rule.PRIORITY:
        if spec.get("order") is None:
            problems.add(spec.line_of("rule"), f"{name}: a priority rule needs `order: [systems]`")
            return None
        order = _systems(spec, "order", f"{name}: order", problems)
        return FieldRule(rule, order=order) if len(problems.found) == before else None
    if rule is Rule.OWNER:
        owner = spec.get("owner")
        if "owner" not in spec:
            problems.add(
                spec.line_of("rule"),
                f"{name}: an owner rule needs `owner: <system>` ({', '.join(SYSTEMS)})",
            )
            return None
        if not isinstance(owner, str) or owner not in SYSTEMS:
            problems.add(
                spec.line_of("owner"),
                f"{name}: owner must be one of {', '.join(SYSTEMS)}, not {owner!r}",
            )
            return None
        return FieldRule(rule, owner=owner) if len(problems.found) == before else None
    return FieldRule(rule) if len(problems.found) == before else None


def _systems(parent: Map, key: str, what: str, problems: yamlconf.Problems) -> tuple[str, ...]:
    """`parent[key]`, a non-empty list of distinct known systems; () when it is not."""
    value = parent[key]
    if not isinstance(value, Seq) or not value:
        problems.add(parent.line_of(key), f"{what}: expected a list of systems")
        return ()
    before = len(problems.found)
    seen: list[Any] = []
    for i, system in enumerate(value):
        if system in seen:
            problems.add(value.line_of(i), f"{what}: {system!r} is listed twice")
        elif not isinstance(system, str) or system not in SYSTEMS:
            problems.add(
                value.line_of(i),
                f"{what}: unknown system {system!r}{yamlconf.did_you_mean(system, SYSTEMS)} "
                f"(expected one of {', '.join(SYSTEMS)})",
            )
        seen.append(system)
    return tuple(value) if len(problems.found) == before else ()
