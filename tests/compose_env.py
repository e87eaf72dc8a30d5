"""docker-compose.yml as compose reads it: its variable interpolation and the .env that
docker/make-env.sh writes, for the tests that check the file without a compose plugin."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BRACED",
    "COMPOSE",
    "HOW_TO",
    "MAKE_ENV",
    "MissingVariable",
    "interpolate",
    "interpolate_all",
    "make_env",
    "references",
    "required_reference",
]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
MAKE_ENV = ROOT / "docker" / "make-env.sh"
HOW_TO = "docker/make-env.sh"  # every required variable's message names it

# `$$` is a literal `$` (left to the container's shell); `${NAME...}` and `$NAME` read the
# environment (with `.env`); inside braces `:-`/`-` give a default, `:?`/`?` an error
# message when unset (`:` also when empty), `:+`/`+` an alternative.
REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")
BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


class MissingVariable(Exception):
    """A `${NAME:?message}` (or `?`) whose variable is unset: compose refuses to start."""

    def __init__(self, name: str, message: str) -> None:
        self.name, self.message = name, message
        super().__init__(f"required variable {name} is missing a value: {message}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """`value` as compose interpolates it from `env`; MissingVariable for a `?` form."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["bare"]:
            return env.get(match["bare"], "")
        braced = BRACED.fullmatch(match["braced"])
        if braced is None:
            raise ValueError(f"invalid interpolation format: ${{{match['braced']}}}")
        name, op, arg = braced["name"], braced["op"], braced["arg"] or ""
        given = env.get(name)
        unset = given is None or (op is not None and op.startswith(":") and given == "")
        if op is None:
            return given or ""
        if op.endswith("?"):
            if unset:
                raise MissingVariable(name, arg)
            return given or ""
        if op.endswith("-"):
            return arg if unset else (given or "")
        return "" if unset else arg  # `+`

    return REFERENCE.sub(replace, value)


def interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value of a loaded compose file, interpolated (keys stay as they are)."""
    if isinstance(node, dict):
        return {key: interpolate_all(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_all(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def references(node: Any) -> list[str]:
    """What every reference in the string values of `node` reads: the body of `${...}`,
    or NAME for a bare `$NAME` (`$$` excluded)."""
    if isinstance(node, dict):
        return [ref for value in node.values() for ref in references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    if isinstance(node, str):
        return [m["braced"] or m["bare"] for m in REFERENCE.finditer(node) if not m["escaped"]]
    return []


def make_env(path: Path) -> dict[str, str]:
    """Run docker/make-env.sh to write `path`; its variables."""
    subprocess.run([str(MAKE_ENV), str(path)], check=True, capture_output=True)
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {name: value for name, value in (p for p in pairs if len(p) == 2)}


def required_reference(value: object) -> str | None:
    """The variable of a value that is exactly `${NAME:?message}`, else None."""
    if not isinstance(value, str):
        return None
    whole = re.fullmatch(r"\$\{([^}]*)\}", value)
    braced = whole and BRACED.fullmatch(whole[1])
    return braced["name"] if braced and braced["op"] == ":?" else None
