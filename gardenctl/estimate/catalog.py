"""The built-in catalog: config.json numbers of well-known public models, for machines without them.

CI machines and planning laptops have no models in their Hugging Face cache; for a model in the
catalog (or one of its aliases, such as RedHatAI's quantized variants of the same architecture)
`read_model_metadata` still gets the real architecture numbers, and every source string says they
came from here ("built-in catalog: config.json values of Qwen/Qwen2.5-7B-Instruct").

The catalog is package data (gardenctl/data/model-catalog.json), generated from
tests/data/model-configs.json by `gardenctl.estimate.catalog_build` and committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

from gardenctl.estimate.types import ModelMetadata

CATALOG_RESOURCE = "model-catalog.json"


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, Any]:
    """The catalog shipped with gardenctl (package data), read once; callers must not change
    it."""
    text = resources.files("gardenctl.data").joinpath(CATALOG_RESOURCE).read_text(encoding="utf-8")
    catalog: dict[str, Any] = json.loads(text)
    return catalog


def _lowercase_names(catalog: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """{lowercase name: name} of the catalog's models and of its aliases; built once for the
    shipped catalog (a garden of thousands of models looks it up once per model)."""
    if catalog is load_catalog():
        return _shipped_names()
    return _names_of(catalog)


def _names_of(catalog: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    return ({key.lower(): key for key in catalog["models"]},
            {key.lower(): key for key in catalog["aliases"]})


@lru_cache(maxsize=1)
def _shipped_names() -> tuple[dict[str, str], dict[str, str]]:
    return _names_of(load_catalog())


def catalog_metadata(model_id: str, catalog: Mapping[str, Any]) -> ModelMetadata | None:
    """Metadata for ``model_id`` (case-insensitive, model or alias) from ``catalog``, or None."""
    models, aliases = _lowercase_names(catalog)
    wanted = model_id.strip().lower()
    alias = catalog["aliases"][aliases[wanted]] if wanted in aliases else None
    canonical = alias["of"] if alias else models.get(wanted)
    if canonical is None:
        return None
    record = catalog["models"][canonical]
    config = json.loads(json.dumps(record["config"]))  # a private copy
    source = f"built-in catalog: config.json values of {canonical}"
    if alias:
        config.update(alias.get("config_overrides", {}))
        if alias.get("quantization_config"):
            config["quantization_config"] = json.loads(json.dumps(alias["quantization_config"]))
            source += (
                f" (for {aliases[wanted]}: same architecture; quantization_config inferred "
                "from the name)"
            )
        else:
            source += f" (for {aliases[wanted]}: same architecture)"
    params = record.get("params")
    return ModelMetadata(
        ref=model_id,
        config=config,
        config_source=source,
        published_params=params,
        published_params_source=(
            f"built-in catalog: published parameter count of {canonical}" if params else None
        ),
    )
