"""The committed built-in catalog is exactly what tests/data/model-configs.json generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gardenctl.estimate.catalog import catalog_metadata, load_catalog
from gardenctl.estimate.catalog_build import build_catalog, render_catalog

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = json.loads((REPO / "tests" / "data" / "model-configs.json").read_text())
COMMITTED = REPO / "gardenctl" / "data" / "model-catalog.json"
CATALOG = load_catalog()


def test_committed_catalog_is_regenerated_from_model_configs():
    # Regenerate with: python -m gardenctl.estimate.catalog_build tests/data/model-configs.json
    #   > gardenctl/data/model-catalog.json
    assert COMMITTED.read_text() == render_catalog(build_catalog(MODEL_CONFIGS))


@pytest.mark.parametrize("model", sorted(MODEL_CONFIGS["models"]))
def test_every_architecture_number_equals_model_configs(model):
    entry = MODEL_CONFIGS["models"][model]
    config = CATALOG["models"][model]["config"]

    for key, value in entry.items():
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and key not in ("params_b", "active_params_b")
        ):
            assert config[key] == value, key
    for key, value in entry.get("text", {}).items():
        if isinstance(value, (int, float)):
            assert config["text_config"][key] == value, key
    assert config["architectures"] == [entry["architecture"]]
    assert CATALOG["models"][model]["params"] == round(entry["params_b"] * 1e9)


def test_every_alias_points_at_its_model():
    for model, entry in MODEL_CONFIGS["models"].items():
        for alias in entry.get("aliases", []):
            assert CATALOG["aliases"][alias.split(" (")[0]]["of"] == model


def test_lookup_is_case_insensitive_and_names_the_source():
    metadata = catalog_metadata("qwen/qwen2.5-7b-instruct", CATALOG)

    assert (
        metadata.config_source == "built-in catalog: config.json values of Qwen/Qwen2.5-7B-Instruct"
    )
    assert metadata.published_params == 7_620_000_000


def test_alias_annotations_override_config_values():
    metadata = catalog_metadata("meta-llama/Meta-Llama-3-8B", CATALOG)

    assert metadata.config["max_position_embeddings"] == 8192
    assert "(for meta-llama/Meta-Llama-3-8B: same architecture)" in metadata.config_source


@pytest.mark.parametrize(
    ("alias", "method"),
    [
        ("RedHatAI/Qwen2.5-7B-Instruct-fp8-dynamic", "compressed-tensors"),
        ("Qwen/Qwen2.5-72B-Instruct-AWQ", "awq"),
        ("Qwen/Qwen3-235B-A22B-FP8", "fp8"),
        ("moonshotai/Kimi-Dev-72B", None),
    ],
)
def test_alias_quantization_comes_from_its_name(alias, method):
    metadata = catalog_metadata(alias, CATALOG)

    assert (metadata.config.get("quantization_config") or {}).get("quant_method") == method


def test_catalog_lookups_return_private_copies():
    first = catalog_metadata("microsoft/phi-2", CATALOG)
    first.config["hidden_size"] = 1

    assert catalog_metadata("microsoft/phi-2", CATALOG).config["hidden_size"] == 2560


def test_unknown_model_is_not_in_the_catalog():
    assert catalog_metadata("someone/else", CATALOG) is None


def test_alias_lookups_return_private_quantization_configs():
    alias = "RedHatAI/Qwen2.5-7B-Instruct-fp8-dynamic"
    catalog_metadata(alias, CATALOG).config["quantization_config"]["quant_method"] = "changed"

    assert catalog_metadata(alias, CATALOG).config["quantization_config"]["quant_method"] == (
        "compressed-tensors"
    )
