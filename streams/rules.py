"""Survivorship, identity and delete rules, loaded from `connectors/survivorship.yaml`.

Every canonical field must have a rule, every system named must be known: a rules file
that would silently leave a field unmerged is refused at start-up, with file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from streams import yamlconf
from streams.identity import MatchRule
from streams.model import FIELDS, SYSTEMS


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
    _rank: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._rank.update({system: -i for i, system in enumerate(self.priority)})

    def rank(self, system: str) -> int:
        """Higher is more important; unknown systems rank below every listed one."""
        return self._rank.get(system, -len(self.priority))


def default_rules() -> Rules:
    """The sample systems' rules, as shipped in connectors/survivorship.yaml."""
    return load_rules(Path(__file__).resolve().parents[1] / "connectors" / "survivorship.yaml")


def load_rules(path: Path) -> Rules:
    data, where = yamlconf.load(path)
    if not isinstance(data, dict):
        raise where.error((), "expected a mapping with priority, delete_policy, match, fields")
    unknown = set(data) - {"priority", "delete_policy", "match", "fields"}
    if unknown:
        key = sorted(unknown)[0]
        raise where.error(
            (key,), f"unknown key {key!r}; expected priority, delete_policy, match, fields"
        )

    priority = _systems(data.get("priority", list(SYSTEMS)), where, ("priority",))
    try:
        policy = DeletePolicy(data.get("delete_policy", DeletePolicy.DEACTIVATE))
    except ValueError:
        raise where.error(
            ("delete_policy",),
            f"delete_policy {data['delete_policy']!r} is not one of: "
            + ", ".join(p.value for p in DeletePolicy),
        ) from None

    match = []
    for i, spec in enumerate(data.get("match") or []):
        if not isinstance(spec, dict) or spec.get("field") not in FIELDS:
            raise where.error(("match", i), "each match rule needs `field: <canonical field>`")
        extra = set(spec) - {"field", "systems"}
        if extra:
            raise where.error(("match", i), f"unknown match option {sorted(extra)[0]!r}")
        systems = spec.get("systems")
        match.append(
            MatchRule(
                spec["field"],
                _systems(systems, where, ("match", i, "systems")) if systems else None,
            )
        )

    specs = data.get("fields")
    if not isinstance(specs, dict):
        raise where.error(("fields",), "`fields` must map every canonical field to its rule")
    rules = {name: _field_rule(name, spec, where) for name, spec in specs.items()}
    missing = [name for name in FIELDS if name not in rules]
    if missing:
        raise where.error(("fields",), f"no rule for canonical field(s): {', '.join(missing)}")
    return Rules(rules, priority, policy, tuple(match))


def _field_rule(name: str, spec: Any, where: yamlconf.Locator) -> FieldRule:
    at = ("fields", name)
    if name not in FIELDS:
        raise where.error(at, f"{name!r} is not a canonical field")
    if not isinstance(spec, dict) or "rule" not in spec:
        raise where.error(at, f"{name}: expected {{rule: lww|priority|owner, ...}}")
    try:
        rule = Rule(spec["rule"])
    except ValueError:
        raise where.error(
            at, f"{name}: rule {spec['rule']!r} is not one of: lww, priority, owner"
        ) from None
    allowed = {Rule.LWW: {"rule"}, Rule.PRIORITY: {"rule", "order"}, Rule.OWNER: {"rule", "owner"}}
    extra = set(spec) - allowed[rule]
    if extra:
        raise where.error(at, f"{name}: option {sorted(extra)[0]!r} does not apply to {rule}")
    if rule is Rule.PRIORITY:
        if not spec.get("order"):
            raise where.error(at, f"{name}: a priority rule needs `order: [systems...]`")
        return FieldRule(rule, order=_systems(spec["order"], where, (*at, "order")))
    if rule is Rule.OWNER:
        owner = spec.get("owner")
        if owner not in SYSTEMS:
            raise where.error(at, f"{name}: owner must be one of {', '.join(SYSTEMS)}")
        return FieldRule(rule, owner=owner)
    return FieldRule(rule)


def _systems(value: Any, where: yamlconf.Locator, at: tuple[str | int, ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise where.error(at, "expected a list of systems")
    for system in value:
        if system not in SYSTEMS:
            raise where.error(at, f"unknown system {system!r}; expected {', '.join(SYSTEMS)}")
    if len(set(value)) != len(value):
        raise where.error(at, "a system is listed twice")
    return tuple(value)
