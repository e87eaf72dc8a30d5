"""Where the fault suite writes its figures, and the table it prints from them."""

from __future__ import annotations

import json
from pathlib import Path

REPORT = Path(".accord/reports/chaos.json")
COLUMNS = (
    ("scenario", "scenario"),
    ("faults", "faults"),
    ("changes_made", "changes"),
    ("delivered_duplicates", "delivered dup."),
    ("applied_duplicates", "applied dup."),
    ("lost", "lost"),
    ("equal_to_oracle", "= oracle"),
    ("converged_s", "converged (s)"),
    ("probe_max_s", "probe max (s)"),
)


def table() -> str:
    """The report as a Markdown table (for the terminal and the README)."""
    if not REPORT.exists():
        return ""
    results = json.loads(REPORT.read_text())
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for result in results.values():
        cells = []
        for key, _ in COLUMNS:
            value = result.get(key)
            cells.append(_cell(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return "yes" if value is True else "no" if value is False else str(value)
