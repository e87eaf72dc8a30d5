import json
import re
from pathlib import Path

import pytest

from streams.connect import SYSTEMS, load_connector
from streams.errors import ConfigError
from streams.settings import load_settings
from streams.stack.components import Connect, StackPaths
from streams.topics import RAW_TOPICS

ROOT = Path(__file__).resolve().parents[2]
CONNECTORS = ROOT / "connectors"


@pytest.mark.parametrize("system", SYSTEMS)
def test_connector_topic_is_the_documented_raw_topic(system: str) -> None:
    config = load_connector(CONNECTORS, system).config
    table = config["table.include.list"]
    schema_or_db = table.split(".")[0]
    assert f"{config['topic.prefix']}.{schema_or_db}.{table.split('.')[1]}" == RAW_TOPICS[system]


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_env_reference_is_provided_by_the_connect_worker(system: str, tmp_path: Path) -> None:
    text = (CONNECTORS / system / "source.json").read_text()
    referenced = set(re.findall(r"\$\{env:([A-Z0-9_]+)\}", text))
    provided = Connect(load_settings(), StackPaths(tmp_path)).worker_env()
    assert referenced, "hosts and secrets must come from the worker's environment"
    assert referenced <= set(provided)
    assert "password" not in {
        k.lower() for k, v in json.loads(text)["config"].items() if not v.startswith("${env:")
    }


def test_invalid_json_points_at_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "crm").mkdir()
    (tmp_path / "crm" / "source.json").write_text('{\n  "name": "x",\n  "config": {,}\n}')
    with pytest.raises(ConfigError, match=r"source.json:3:\d+: invalid JSON"):
        load_connector(tmp_path, "crm")


def test_non_string_values_are_named(tmp_path: Path) -> None:
    (tmp_path / "crm").mkdir()
    (tmp_path / "crm" / "source.json").write_text(
        json.dumps({"name": "x", "config": {"tasks.max": 1, "topic.prefix": "crm"}})
    )
    with pytest.raises(ConfigError, match=r"tasks\.max"):
        load_connector(tmp_path, "crm")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such connector file"):
        load_connector(tmp_path, "billing")
