"""Generates the built-in catalog (gardenctl/data/model-catalog.json) from model-configs.json.

    python -m gardenctl.estimate.catalog_build tests/data/model-configs.json \
        > gardenctl/data/model-catalog.json

tests/test_estimate_catalog.py proves that the committed file is what this produces. Entries keep
config.json's key names (a multimodal model's text numbers go under text_config); an alias whose
name announces a quantization (fp8-dynamic, w8a8, w4a16, AWQ, FP8) gets the quantization_config
such a checkpoint ships, and its source says the quantization was read from the name.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from typing import Any

CATALOG_FORMAT_VERSION = 1
# Keys of model-configs.json entries that are notes, not config.json keys.
NOTE_KEYS = {
    "aliases",
    "kv_check",
    "provenance",
    "attention",
    "params_b",
    "active_params_b",
    "vision",
    "quantization",
    "layer_pattern",
    "architecture",
    "text",
}
_ALIAS = re.compile(r"^(?P<id>\S+)(?:\s+\((?P<note>.*)\))?$")
_MAX_POS = re.compile(r"max_pos(?:ition_embeddings)?\s+(\d+)")

# Quantization a RedHatAI / Qwen alias name announces, as its config.json's quantization_config.
_CT_FP8_DYNAMIC = {
    "quant_method": "compressed-tensors",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
        }
    },
    "ignore": ["lm_head"],
}
_CT_W8A8 = {
    "quant_method": "compressed-tensors",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        }
    },
    "ignore": ["lm_head"],
}
_CT_W4A16 = {
    "quant_method": "compressed-tensors",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "strategy": "group",
                "group_size": 128,
                "symmetric": True,
            },
        }
    },
    "ignore": ["lm_head"],
}
_FP8_BLOCK = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
_AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
# The quantization_config of each scheme, as published models write it (tests reuse them).
QUANTIZATION_CONFIGS = {"fp8-dynamic": _CT_FP8_DYNAMIC, "w8a8": _CT_W8A8, "w4a16": _CT_W4A16,
                        "fp8": _FP8_BLOCK, "awq": _AWQ}
_MXFP4 = {"quant_method": "mxfp4"}


def build_catalog(model_configs: Mapping[str, Any]) -> dict[str, Any]:
    """The catalog document for ``model_configs`` (the parsed tests/data/model-configs.json)."""
    models: dict[str, Any] = {}
    aliases: dict[str, Any] = {}
    for model_id, entry in sorted(model_configs["models"].items()):
        config: dict[str, Any] = {"architectures": [entry["architecture"]]}
        config.update({k: v for k, v in entry.items() if k not in NOTE_KEYS})
        if isinstance(entry.get("text"), Mapping):
            config["text_config"] = _text_config(entry["text"])
        if "mxfp4" in str(entry.get("quantization", "")).lower():
            config["quantization_config"] = dict(_MXFP4)
        record: dict[str, Any] = {"config": config}
        if entry.get("params_b") is not None:
            record["params"] = round(float(entry["params_b"]) * 1e9)
        for note in ("vision", "layer_pattern", "attention"):
            if entry.get(note) is not None:
                record[note] = entry[note]
        models[model_id] = record
        for text in entry.get("aliases", []):
            match = _ALIAS.match(text.strip())
            if not match:
                continue
            alias: dict[str, Any] = {"of": model_id}
            note = match.group("note") or ""
            if note:
                alias["note"] = note
            max_pos = _MAX_POS.search(note)
            if max_pos:
                alias["config_overrides"] = {"max_position_embeddings": int(max_pos.group(1))}
            quantization = _quantization_from_name(match.group("id") + " " + note)
            if quantization:
                alias["quantization_config"] = quantization
            aliases[match.group("id")] = alias
    return {
        "format_version": CATALOG_FORMAT_VERSION,
        "generated_from": "tests/data/model-configs.json by gardenctl.estimate.catalog",
        "provenance": "published Hugging Face config.json values of public models; alias "
        "quantization_config inferred from the alias name (fp8-dynamic, w8a8, w4a16, AWQ, FP8)",
        "models": models,
        "aliases": dict(sorted(aliases.items())),
    }


def _text_config(text: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for key, value in text.items():
        if key == "model_type" and isinstance(value, str):
            config[key] = value.split()[0]  # "deepseek_v3 (Moonlight)" -> "deepseek_v3"
        elif isinstance(value, str):
            continue  # prose such as "every 4th layer global": the architecture rules know it
        else:
            config[key] = value
    return config


def _json_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a JSON object (through JSON, as the committed file holds it)."""
    copied: dict[str, Any] = json.loads(json.dumps(value))
    return copied


def _quantization_from_name(text: str) -> dict[str, Any] | None:
    lowered = text.lower()
    if "fp8-dynamic" in lowered or "fp8_dynamic" in lowered:
        return _json_copy(_CT_FP8_DYNAMIC)
    if "w8a8" in lowered:
        return _json_copy(_CT_W8A8)
    if "w4a16" in lowered:
        return _json_copy(_CT_W4A16)
    if "awq" in lowered:
        return dict(_AWQ)
    if re.search(r"[-_]fp8\b", lowered):
        return _json_copy(_FP8_BLOCK)
    return None


def render_catalog(catalog: Mapping[str, Any]) -> str:
    """The committed file's exact text (sorted keys, two-space indent, final newline)."""
    return json.dumps(catalog, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m gardenctl.estimate.catalog_build tests/data/model-configs.json",
            file=sys.stderr,
        )
        return 2
    with open(args[0], encoding="utf-8") as handle:
        sys.stdout.write(render_catalog(build_catalog(json.load(handle))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
