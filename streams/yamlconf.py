"""YAML configuration files whose mistakes are reported as `path:line: message`.

Every hand-written config file (`connectors/<system>/mapping.yaml`,
`connectors/survivorship.yaml`) is read here, so they all behave alike: `read` returns
dicts and lists that remember the line of each key and item (`Map`, `Seq`, `line_of`),
refuses duplicate keys (plain YAML silently keeps the last one), and validation code
collects every mistake of a file in a `Problems` before raising them together, so a
user fixes a file in one pass instead of one error per start-up.

Lines are those of the keys themselves: `fields:` on line 4 is line 4, even when its
value (a block mapping) only starts on line 5.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import yaml

from streams.errors import ConfigError


class Map(dict):  # type: ignore[type-arg]
    """A YAML mapping that knows the (1-based) line of itself and of each key."""

    def __init__(self, line: int = 1) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        """The line of `key`; the mapping's own line when the key is absent."""
        return self.key_lines.get(key, self.line)


class Seq(list):  # type: ignore[type-arg]
    """A YAML sequence that knows the line of itself and of each item."""

    def __init__(self, line: int = 1, item_lines: list[int] | None = None) -> None:
        super().__init__()
        self.line = line
        self.item_lines = item_lines or []

    def line_of(self, index: int) -> int:
        """The line of item `index`; the sequence's own line when there is no such item."""
        if 0 <= index < len(self.item_lines):
            return self.item_lines[index]
        return self.line


def line_of(obj: Any, key: Any = None) -> int:
    """The line of `obj` (a `Map` or `Seq`), or of `key` in it (a key, or a list index).

    A scalar does not know its line (ask its container), so it gives 1.
    """
    if key is not None and isinstance(obj, Map):
        return obj.line_of(key)
    if isinstance(key, int) and isinstance(obj, Seq):
        return obj.line_of(key)
    return getattr(obj, "line", 1)


def plain(value: Any) -> Any:
    """Plain dicts and lists, for data handed to code that does not care about lines."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def did_you_mean(name: Any, choices: Iterable[Any]) -> str:
    """` (did you mean 'x'?)` for the closest choice, or nothing when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Problem(Exception):
    """A mistake at one line, raised where recording it and going on is not worth it."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class Problems:
    """Every mistake in one file, reported together, in line order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found: list[tuple[int, str]] = []

    def add(self, line: int, message: str) -> None:
        self.found.append((line, message))

    def fatal(self, line: int, message: str) -> ConfigError:
        """An error for a mistake that makes checking the rest pointless."""
        return ConfigError(f"{self.path}:{line}: {message}")

    def raise_any(self) -> None:
        """A ConfigError with one `path:line: message` line per mistake, if there was any."""
        if self.found:
            found = sorted(self.found, key=lambda item: item[0])
            raise ConfigError("\n".join(f"{self.path}:{line}: {msg}" for line, msg in found))


# -- the loader ---------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings and sequences remember where they were written.

    Duplicate and unhashable keys are collected in `problems` rather than raised, so
    `read` can name all of them at once.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.problems: list[tuple[int, str]] = []


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Any:
    data = Map(node.start_mark.line + 1)
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, Hashable):
            loader.problems.append((line, f"a key must be a plain value, not {key!r}"))
            continue
        if key in data:
            first = data.key_lines[key]
            loader.problems.append((line, f"duplicate key {key!r} (first at line {first})"))
            continue
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = line


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Any:
    data = Seq(node.start_mark.line + 1, [item.start_mark.line + 1 for item in node.value])
    yield data
    data.extend(loader.construct_object(item, deep=True) for item in node.value)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def read(path: Path) -> Any:
    """One YAML document of `Map`, `Seq` and scalars (None for an empty file).

    An unreadable file, invalid YAML or a duplicate key is a ConfigError naming the file
    and line: a document with a duplicate key is ambiguous, so it is never validated.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    loader = _LineLoader(text)  # a SafeLoader subclass: safe
    try:
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        started = exc.context_mark.line + 1 if exc.context_mark else line
        where = f" ({exc.context} at line {started})" if started != line else ""
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem or exc}{where}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    problems = Problems(path)
    for line, message in loader.problems:
        problems.add(line, message)
    problems.raise_any()
    return document
