"""Where every benchmark writes its figures: `bench/results/<date>[-<name>].<ext>`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(name: str = "", ext: str = "json", day: str | None = None) -> Path:
    """Today's file of one bench; `day` keeps a long run's files under the day it began."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = day or dt.date.today().isoformat()
    return RESULTS / f"{stem}{'-' + name if name else ''}.{ext}"


def write_figures(result: dict[str, Any], name: str = "", day: str | None = None) -> Path:
    out = result_path(name, day=day)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
