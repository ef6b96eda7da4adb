"""Fixture model folders and Hugging Face caches, built from tests/data/model-configs.json.

`make_model_folder(tmp_path, "Qwen/Qwen2.5-7B-Instruct")` writes what a downloaded model has:
a config.json with the model's published values and safetensors files whose HEADERS are real
(the tensor names, dtypes, shapes and offsets of that architecture, sharded with an index like
the Hub's) and whose data section is SPARSE: the files are 15 GB on paper and take no disk.
`make_hf_cache(hf_home, ...)` lays the same files out as huggingface_hub's cache does
(hub/models--org--name/{blobs,refs/main,snapshots/<commit>}), so offline resolution is tested
with real files. Other tests (placement, plan) reuse these builders.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gardenctl.estimate.catalog_build import NOTE_KEYS
from gardenctl.estimate.catalog_build import QUANTIZATION_CONFIGS as CATALOG_QUANTIZATION

MODEL_CONFIGS = Path(__file__).resolve().parent / "data" / "model-configs.json"
GiB = 1024**3
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
TORCH_TO_SAFETENSORS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Values of real config.json files that model-configs.json leaves out.
MISSING_REAL_VALUES = {
    "openai/gpt-oss-20b": {"intermediate_size": 2880},
    "openai/gpt-oss-120b": {"intermediate_size": 2880},
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


def model_entry(model_id: str) -> dict[str, Any]:
    return json.loads(MODEL_CONFIGS.read_text())["models"][model_id]


def config_json(model_id: str, *, dtype: str = "bfloat16", quantization: str | None = None) -> dict:
    """config.json of ``model_id`` with its published values (and a quantization_config)."""
    entry = model_entry(model_id)
    config: dict[str, Any] = {"architectures": [entry["architecture"]], "torch_dtype": dtype}
    config.update({k: v for k, v in entry.items() if k not in NOTE_KEYS})
    config.update(MISSING_REAL_VALUES.get(model_id, {}))
    if "text" in entry:
        config["text_config"] = {k: v for k, v in entry["text"].items() if not isinstance(v, str)}
    quantization = quantization or _default_quantization(entry)
    if quantization:
        config["quantization_config"] = QUANTIZATION_CONFIGS[quantization]
    return config


QUANTIZATION_CONFIGS: dict[str, dict[str, Any]] = {
    **CATALOG_QUANTIZATION,
    # gpt-oss's own config.json keeps attention, router and embeddings unquantized
    "mxfp4": {"quant_method": "mxfp4",
              "modules_to_not_convert": ["self_attn", "router", "embedding"]},
}


def _default_quantization(entry: dict[str, Any]) -> str | None:
    return "mxfp4" if "mxfp4" in str(entry.get("quantization", "")) else None


def model_tensors(
    model_id: str, *, dtype: str = "bfloat16", quantization: str | None = None
) -> list[Tensor]:
    """A plausible tensor list (HF names, shapes) for ``model_id``'s architecture."""
    entry = model_entry(model_id)
    cfg = config_json(model_id, dtype=dtype, quantization=quantization)
    text = {**cfg, **cfg.get("text_config", {})}
    quantization = quantization or _default_quantization(entry)
    float_dtype = TORCH_TO_SAFETENSORS[dtype]
    prefix = "language_model.model" if "text_config" in cfg else "model"
    h, layers, vocab = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim") or h // heads
    tensors = [Tensor(f"{prefix}.embed_tokens.weight", float_dtype, (vocab, h))]

    def linear(name: str, out_features: int, in_features: int) -> list[Tensor]:
        return _linear(name, out_features, in_features, float_dtype, quantization)

    experts = (
        text.get("num_local_experts") or text.get("num_experts") or text.get("n_routed_experts")
    )
    for i in range(layers):
        p = f"{prefix}.layers.{i}"
        tensors += [
            Tensor(f"{p}.input_layernorm.weight", float_dtype, (h,)),
            Tensor(f"{p}.post_attention_layernorm.weight", float_dtype, (h,)),
        ]
        if text.get("kv_lora_rank"):
            rope, nope, v = text["qk_rope_head_dim"], text["qk_nope_head_dim"], text["v_head_dim"]
            rank = text["kv_lora_rank"]
            tensors += linear(f"{p}.self_attn.q_proj", heads * (nope + rope), h)
            tensors += linear(f"{p}.self_attn.kv_a_proj_with_mqa", rank + rope, h)
            tensors += [Tensor(f"{p}.self_attn.kv_a_layernorm.weight", float_dtype, (rank,))]
            tensors += linear(f"{p}.self_attn.kv_b_proj", heads * (nope + v), rank)
            tensors += linear(f"{p}.self_attn.o_proj", h, heads * v)
        else:
            for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                tensors += linear(f"{p}.self_attn.{name}_proj", rows * head_dim, h)
            tensors += linear(f"{p}.self_attn.o_proj", h, heads * head_dim)
        if experts and i >= text.get("first_k_dense_replace", 0):
            tensors += _moe(p, text, experts, float_dtype, quantization)
        elif entry["architecture"] == "PhiForCausalLM":
            tensors += linear(f"{p}.mlp.fc1", text["intermediate_size"], h)
            tensors += linear(f"{p}.mlp.fc2", h, text["intermediate_size"])
        else:
            width = text["intermediate_size"]
            tensors += linear(f"{p}.mlp.gate_proj", width, h) + linear(f"{p}.mlp.up_proj", width, h)
            tensors += linear(f"{p}.mlp.down_proj", h, width)
    tensors.append(Tensor(f"{prefix}.norm.weight", float_dtype, (h,)))
    if not _tied(entry, text):
        tensors.append(Tensor("lm_head.weight", float_dtype, (vocab, h)))
    if "text_config" in cfg:
        tensors += _vision_tower(entry, sum(math.prod(t.shape) for t in tensors), float_dtype)
    return tensors


def _tied(entry: dict[str, Any], text: dict[str, Any]) -> bool:
    tied = text.get("tie_word_embeddings")
    return bool(tied) if tied is not None else "gemma" in entry["architecture"].lower()


def _linear(
    name: str, out_f: int, in_f: int, float_dtype: str, quantization: str | None
) -> list[Tensor]:
    if quantization == "w4a16":
        return [
            Tensor(f"{name}.weight_packed", "I32", (out_f, in_f // 8)),
            Tensor(f"{name}.weight_scale", float_dtype, (out_f, in_f // 128)),
            Tensor(f"{name}.weight_shape", "I64", (2,)),
        ]
    if quantization in ("w8a8", "fp8-dynamic"):
        kind = "I8" if quantization == "w8a8" else "F8_E4M3"
        return [
            Tensor(f"{name}.weight", kind, (out_f, in_f)),
            Tensor(f"{name}.weight_scale", float_dtype, (out_f, 1)),
        ]
    if quantization == "awq":
        return [
            Tensor(f"{name}.qweight", "I32", (in_f, out_f // 8)),
            Tensor(f"{name}.qzeros", "I32", (in_f // 128, out_f // 8)),
            Tensor(f"{name}.scales", "F16", (in_f // 128, out_f)),
        ]
    return [Tensor(f"{name}.weight", float_dtype, (out_f, in_f))]


def _moe(
    p: str, text: dict[str, Any], experts: int, float_dtype: str, quantization: str | None
) -> list[Tensor]:
    """Experts stored fused per layer (as gpt-oss does): one tensor per projection."""
    h = text["hidden_size"]
    width = text.get("moe_intermediate_size") or text["intermediate_size"]
    tensors = [Tensor(f"{p}.mlp.router.weight", float_dtype, (experts, h))]
    if quantization == "mxfp4":
        tensors += [
            Tensor(f"{p}.mlp.experts.gate_up_proj_blocks", "U8", (experts, 2 * width, h // 32, 16)),
            Tensor(f"{p}.mlp.experts.gate_up_proj_scales", "U8", (experts, 2 * width, h // 32)),
            Tensor(f"{p}.mlp.experts.gate_up_proj_bias", float_dtype, (experts, 2 * width)),
            Tensor(f"{p}.mlp.experts.down_proj_blocks", "U8", (experts, h, width // 32, 16)),
            Tensor(f"{p}.mlp.experts.down_proj_scales", "U8", (experts, h, width // 32)),
            Tensor(f"{p}.mlp.experts.down_proj_bias", float_dtype, (experts, h)),
        ]
    else:
        tensors += [
            Tensor(f"{p}.mlp.experts.gate_up_proj", float_dtype, (experts, 2 * width, h)),
            Tensor(f"{p}.mlp.experts.down_proj", float_dtype, (experts, h, width)),
        ]
    shared = (text.get("n_shared_experts") or 0) * width + (
        text.get("shared_expert_intermediate_size") or 0
    )
    if shared:
        tensors += [
            Tensor(f"{p}.mlp.shared_experts.gate_up_proj.weight", float_dtype, (2 * shared, h)),
            Tensor(f"{p}.mlp.shared_experts.down_proj.weight", float_dtype, (h, shared)),
        ]
    return tensors


def _vision_tower(entry: dict[str, Any], text_params: int, float_dtype: str) -> list[Tensor]:
    """Vision tensors for the published total minus the text model (a few big blobs)."""
    remaining = int(entry["params_b"] * 1e9) - text_params
    tensors = []
    width = 1152
    for i in range(4):
        rows = max(1, remaining // 4 // width)
        tensors.append(
            Tensor(f"vision_tower.encoder.layers.{i}.mlp.fc1.weight", float_dtype, (rows, width))
        )
    return tensors


def write_safetensors(path: Path, tensors: list[Tensor]) -> int:
    """Write a safetensors file with a real header and a sparse data section; return data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads headers to 8 bytes with spaces
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)  # sparse: no data blocks are written
    return offset


def make_model_folder(
    tmp_path: Path,
    model_id: str,
    *,
    dtype: str = "bfloat16",
    quantization: str | None = None,
    shard_bytes: int = 5 * GiB,
    folder: Path | None = None,
) -> Path:
    """A downloaded-looking folder for ``model_id``; returns its path."""
    target = folder or tmp_path / model_id.replace("/", "--")
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(
        json.dumps(config_json(model_id, dtype=dtype, quantization=quantization), indent=2)
    )
    shards = _shard(model_tensors(model_id, dtype=dtype, quantization=quantization), shard_bytes)
    if len(shards) == 1:
        write_safetensors(target / "model.safetensors", shards[0])
        return target
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(target / name, shard)
        weight_map.update({t.name: name for t in shard})
    total = sum(t.nbytes for shard in shards for t in shard)
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return target


def make_hf_cache(
    hf_home: Path,
    model_id: str,
    *,
    revision: str = "main",
    commit: str = DEFAULT_COMMIT,
    **folder_options: Any,
) -> Path:
    """``model_id`` in a Hugging Face cache under ``hf_home``; returns the snapshot folder.

    Files live in blobs/ (named by content hash) and the snapshot links to them, as
    huggingface_hub lays them out; refs/<revision> holds the commit.
    """
    repo = hf_home / "hub" / f"models--{model_id.replace('/', '--')}"
    staging = repo / "staging"
    make_model_folder(hf_home, model_id, folder=staging, **folder_options)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for source in sorted(staging.iterdir()):
        with open(source, "rb") as handle:
            digest = hashlib.sha256(handle.read(65536) + source.name.encode()).hexdigest()
        blob = repo / "blobs" / digest
        os.replace(source, blob)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def _shard(tensors: list[Tensor], shard_bytes: int) -> list[list[Tensor]]:
    shards: list[list[Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def isolate_hf_cache(monkeypatch: Any, root: Path) -> Path:
    """Point HF_HOME at an empty folder under ``root`` (and unset overrides); return HF_HOME."""
    hf_home = root / "hf-home"
    hf_home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    return hf_home
