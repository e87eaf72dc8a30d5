"""Sink sections: `adopt_by` is checked against the columns it must look rows up by."""

from pathlib import Path

import pytest

from streams.errors import ConfigError
from streams.projection import load_sinks

ROOT = Path(__file__).resolve().parents[2]

SINK = """\
sink:
  kind: sql
  table: users
  key: {column: id, generate: uuid}
  create: true
  adopt_by: %s
  columns:
    email: email
    display_name: {join: [first_name, last_name]}
"""


def sinks_of(tmp_path: Path, text: str) -> dict:
    (tmp_path / "support").mkdir()
    (tmp_path / "support" / "mapping.yaml").write_text(text)
    return load_sinks(tmp_path)


def test_adopt_by_names_columns_made_from_one_field(tmp_path: Path) -> None:
    spec = sinks_of(tmp_path, SINK % "[email]")["support"]
    assert spec.adopt_by == ("email",)


@pytest.mark.parametrize(
    ("adopt_by", "problem"),
    [
        ("[emial]", r"mapping.yaml:6: sink: adopt_by column 'emial' .*did you mean 'email'"),
        ("[display_name]", r"adopt_by column 'display_name' must be one of the columns made"),
        ("email", r"mapping.yaml:6: sink: adopt_by must be a list of columns"),
    ],
)
def test_adopt_by_mistakes_point_at_their_line(tmp_path: Path, adopt_by: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        sinks_of(tmp_path, SINK % adopt_by)


def test_adopt_by_needs_create(tmp_path: Path) -> None:
    text = (SINK % "[email]").replace("create: true", "create: false")
    with pytest.raises(ConfigError, match=r"adopt_by only applies with create: true"):
        sinks_of(tmp_path, text)


def test_adopt_by_is_refused_on_a_webhook(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sink.yaml").write_text(
        "sink:\n  kind: webhook\n  url: https://example.test/hook\n"
        "  fields: [email]\n  adopt_by: [email]\n  secret_env: HOOKS_SECRET\n"
    )
    with pytest.raises(ConfigError, match=r"sink.yaml:5: sink: adopt_by applies to kind sql"):
        load_sinks(tmp_path)


def test_the_sample_systems_that_create_rows_adopt_by_email() -> None:
    specs = load_sinks(ROOT / "connectors")
    assert {t: s.adopt_by for t, s in specs.items() if s.create} == {
        "crm": ("email",),
        "support": ("email",),
    }
    for target in ("crm", "support"):  # and the lookup has its index
        schema = (ROOT / "connectors" / target / "schema.sql").read_text()
        assert "(lower(trim(email)))" in schema
