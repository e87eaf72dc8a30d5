"""Errors a user can act on: each says what failed and where to look."""

from __future__ import annotations

from pathlib import Path


class AccordError(Exception):
    """An expected failure with a message fit for a terminal, never a stack trace."""


class StackError(AccordError):
    """A stack component could not be installed, configured, started or reached."""

    def __init__(self, component: str, message: str, log: Path | None = None) -> None:
        self.component = component
        self.log = log
        hint = f" (log: {log})" if log else ""
        super().__init__(f"{component}: {message}{hint}")


class ConfigError(AccordError):
    """A configuration file or value is wrong; the message names it."""
