"""The committed JSON schema matches the code, and every shipped garden file is valid for both
the schema (what editors check) and gardenctl's loader (what gardenctl checks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO
from jsonschema import Draft202012Validator

from gardenctl.errors import SpecError
from gardenctl.spec import load_garden, parse_garden
from gardenctl.spec.yamlsource import read_yaml

SCHEMA_PATH = REPO / "schemas" / "garden.schema.json"
GARDEN_FILES = [REPO / "garden.yaml", *sorted(REPO.glob("examples/**/garden*.yaml"))]
SCHEMA_COMMENT = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")


def garden_id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(validator: Draft202012Validator, text: str, file: str) -> list[str]:
    data, _ = read_yaml(text, file)  # the values exactly as gardenctl reads them
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(data)]


def test_schema_command_prints_the_committed_schema(gardenctl):
    result = gardenctl("schema")

    assert result.code == 0
    assert result.out == SCHEMA_PATH.read_text(), (
        "schemas/garden.schema.json is stale: regenerate it with "
        "`gardenctl schema > schemas/garden.schema.json` and commit it")


def test_committed_schema_is_a_draft_2020_12_schema_of_the_garden_file(validator):
    schema = validator.schema

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name"}
    assert {"name", "defaults", "placement", "inventory", "runtime", "models"} <= set(
        schema["properties"])


def test_there_are_example_gardens_to_check():
    assert len(GARDEN_FILES) >= 4, GARDEN_FILES


@pytest.mark.parametrize("garden", GARDEN_FILES, ids=garden_id)
def test_shipped_garden_is_valid_for_the_schema(validator, garden):
    assert schema_errors(validator, garden.read_text(), str(garden)) == []


@pytest.mark.parametrize("garden", GARDEN_FILES, ids=garden_id)
def test_shipped_garden_loads_with_gardenctl(garden):
    loaded = load_garden(garden)

    assert loaded.garden.models, "an example garden should serve something"
    assert [w for w in loaded.warnings if w.severity == "error"] == []


@pytest.mark.parametrize("garden", GARDEN_FILES, ids=garden_id)
def test_shipped_garden_points_editors_at_the_schema(garden):
    first_line = garden.read_text().splitlines()[0]
    match = SCHEMA_COMMENT.match(first_line)

    assert match, f"{garden_id(garden)} must start with `# yaml-language-server: $schema=PATH`"
    target = (garden.parent / match.group(1)).resolve()
    assert target.is_file(), f"{match.group(1)} does not exist relative to {garden_id(garden)}"
    assert target == SCHEMA_PATH.resolve()


MISTAKES = {
    "unknown-key": "name: lab\nmodels:\n  - {name: a, model: org/a, max_model_lenn: 8}\n",
    "missing-name": "models: []\n",
    "text-for-a-number": 'name: lab\nmodels:\n  - {name: a, model: org/a, replicas: "2"}\n',
    "yaml-no-for-a-boolean": "name: lab\nmodels:\n  - {name: a, model: org/a, enforce_eager: no}\n",
    "utilization-above-1": "name: lab\nmodels:\n  - {name: a, model: org/a, "
                           "gpu_memory_utilization: 1.5}\n",
    "bad-size": "name: lab\nplacement: {reserve: lots}\nmodels: []\n",
    "bad-name": "name: my lab\nmodels: []\n",
    "bad-env-name": "name: lab\nmodels:\n  - {name: a, model: org/a, env: {1X: y}}\n",
    "unknown-policy": "name: lab\nplacement: {utilization_policy: greedy}\nmodels: []\n",
}


@pytest.mark.parametrize("text", MISTAKES.values(), ids=list(MISTAKES))
def test_schema_and_loader_both_refuse_common_mistakes(validator, text):
    refused_by_schema = schema_errors(validator, text, "garden.yaml")
    with pytest.raises(SpecError):
        parse_garden(text.encode(), "garden.yaml")

    assert refused_by_schema, "the schema accepts what gardenctl refuses: editors would not warn"


def test_schema_accepts_the_sizes_and_durations_gardenctl_accepts(validator):
    text = ("name: lab\nplacement: {reserve: 512MiB}\ninventory:\n  nodes:\n    - name: n\n"
            "      gpus: [{name: A10G, memory: 22.5GiB, used: 1073741824}]\n"
            "models:\n  - {name: a, model: org/a, start_timeout: 15m, shutdown_timeout: 30,\n"
            "     gpu_memory_utilization: auto}\n"
            "  - {name: b, model: org/b, gpu_memory_utilization: 0.45, start_timeout: 1.5h}\n")

    loaded = parse_garden(text.encode(), "garden.yaml")

    assert len(loaded.garden.models) == 2
    assert schema_errors(validator, text, "garden.yaml") == []
