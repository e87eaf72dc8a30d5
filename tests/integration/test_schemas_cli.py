"""`accord schemas` as an integrator runs it, against the real registry."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from streams.settings import AccordSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def integrator(stack: AccordSettings, tmp_path: Path):
    """Run `accord schemas ...` with a schema folder and topic names of this test's own."""
    schemas = tmp_path / "schemas"
    shutil.copytree(ROOT / "schemas", schemas)
    run = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "ACCORD_SCHEMAS__DIRECTORY": str(schemas),
        "ACCORD_TOPICS__CHANGES": f"test-{run}.changes",
        "ACCORD_TOPICS__GOLDEN": f"test-{run}.golden",
        "ACCORD_TOPICS__AUDIT": f"test-{run}.audit",
        "ACCORD_TOPICS__DLQ": f"test-{run}.dlq",
        "ACCORD_TOPICS__SINK_PREFIX": f"test-{run}.sink.",
    }

    def accord(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "streams.cli", "schemas", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    accord.schemas = schemas  # type: ignore[attr-defined]
    accord.subject = f"test-{run}.changes-value"  # type: ignore[attr-defined]
    return accord


def _states(result: subprocess.CompletedProcess) -> dict[str, dict]:
    return {r["subject"]: r for r in json.loads(result.stdout)}


def _edit_change_schema(folder: Path, new_field: dict) -> None:
    path = folder / "dev.accord.CustomerChange.avsc"
    schema = json.loads(path.read_text())
    schema["fields"].append(new_field)
    path.write_text(json.dumps(schema, indent=2))


def test_push_check_and_refuse_an_incompatible_change(integrator) -> None:
    subject = integrator.subject
    first = integrator("push", "--json")
    assert first.returncode == 0, first.stderr
    pushed = _states(first)
    assert {r["state"] for r in pushed.values()} == {"registered"}
    assert pushed[subject]["level"] == "BACKWARD" and pushed[subject]["versions"] == [1]

    again = integrator("check", "--json")
    assert again.returncode == 0 and _states(again)[subject]["state"] == "unchanged"

    _edit_change_schema(integrator.schemas, {"name": "tenant", "type": "string"})
    check = integrator("check")
    assert check.returncode == 1
    assert "incompatible" in check.stdout
    assert "+ tenant: added (string) WITHOUT a default" in check.stdout
    assert "No default value for field tenant" in check.stdout
    refused = integrator("push", "--json")
    assert refused.returncode == 1
    assert _states(refused)[subject]["state"] == "incompatible"
    assert _states(integrator("list", "--json"))[subject]["versions"] == [1]


def test_a_compatible_change_is_pushed_and_diffed(integrator) -> None:
    subject = integrator.subject
    assert integrator("push").returncode == 0
    _edit_change_schema(integrator.schemas, {"name": "tenant", "type": "string", "default": "main"})
    diff = _states(integrator("diff", "--json"))[subject]
    assert diff["state"] == "differs"
    assert diff["explanation"] == ['+ tenant: added (string) with default "main"']
    check = integrator("check", "--json")
    assert check.returncode == 0 and _states(check)[subject]["state"] == "compatible"
    pushed = integrator("push", "--json")
    assert pushed.returncode == 0
    assert _states(pushed)[subject]["versions"] == [1, 2]
    assert _states(integrator("diff", "--json"))[subject]["state"] == "unchanged"


def test_an_unreachable_registry_is_one_clear_line(integrator) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "schemas", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ACCORD_SCHEMA_REGISTRY_URL": "http://127.0.0.1:1/apis/ccompat/v7"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: schema registry at http://127.0.0.1:1")
    assert "Traceback" not in result.stderr
