"""YAML configuration files whose errors point at the file and line.

`load` returns the plain data and a `Locator`; validation code asks the locator for the
line of the offending key, so a user reads `connectors/survivorship.yaml:14: ...`
instead of a stack trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from streams.errors import ConfigError

PathInFile = Sequence[str | int]


class Locator:
    """Line numbers (1-based) of the keys and items of one YAML document."""

    def __init__(self, path: Path, root: yaml.Node | None) -> None:
        self.path = path
        self._root = root

    def line(self, where: PathInFile = ()) -> int:
        node = self._root
        line = node.start_mark.line + 1 if node is not None else 1
        for step in where:
            node = _child(node, step)
            if node is None:
                break
            line = node.start_mark.line + 1
        return line

    def error(self, where: PathInFile, message: str) -> ConfigError:
        return ConfigError(f"{self.path}:{self.line(where)}: {message}")


def _child(node: yaml.Node | None, step: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == step:
                return key if isinstance(value, yaml.ScalarNode) and value.value == "" else value
    if isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
        return node.value[step]
    return None


def load(path: Path) -> tuple[Any, Locator]:
    """Parse one YAML file; a missing file or bad syntax is a ConfigError naming the line."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem or exc}") from exc
    return data, Locator(path, root)
