"""Memory profiles: what a vLLM start-up really took, keyed by everything that changes it.

A `Profile` is one measured start (read from vLLM's own log, see gardenctl.measure): the
footprint outside the KV cache and the KV cache's bytes per token, on one GPU of a worker. Its
`ProfileKey` holds what changes those numbers: the model and revision, the vLLM release, the GPU
model, the tensor-parallel size, dtype, quantization, KV-cache dtype, max_num_seqs,
max_num_batched_tokens and enforce_eager. `max_model_len` and the concurrency are not in the
key: they change only the KV cache, which the profile gives per token.

Pure values; the SQLite store is gardenctl.profiles.store, the sizing gardenctl.profiles.sizing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

# Key fields that were not set are stored as this (SQLite's NULL never equals NULL).
UNSET = ""
RECENT = 5  # starts whose non-KV footprint counts for sizing


@dataclass(frozen=True, order=True)
class ProfileKey:
    model: str
    revision: str
    vllm_version: str
    gpu_name: str
    tensor_parallel_size: int
    dtype: str
    quantization: str
    kv_cache_dtype: str
    max_num_seqs: str  # "" = vLLM's default for that GPU and release
    max_num_batched_tokens: str
    enforce_eager: bool
    other: str = UNSET  # every other flag and VLLM_* variable (`other_settings`): a
    # --speculative-config, --cpu-offload-gb or VLLM_USE_V1=0 changes memory too

    def same_setup(self, other: ProfileKey) -> bool:
        """Same model and settings, perhaps another release or GPU (then only a hint)."""
        return self.setup() == other.setup()

    def setup(self) -> tuple[object, ...]:
        return (self.model, self.revision, self.tensor_parallel_size, self.dtype,
                self.quantization, self.kv_cache_dtype, self.max_num_seqs,
                self.max_num_batched_tokens, self.enforce_eager, self.other)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [self.model + (f"@{self.revision}" if self.revision else ""),
                 f"vLLM {self.vllm_version or '?'}", self.gpu_name or "unknown GPU",
                 f"TP {self.tensor_parallel_size}"]
        for label, value in (("dtype", self.dtype), ("quantization", self.quantization),
                             ("kv", self.kv_cache_dtype), ("max_num_seqs", self.max_num_seqs),
                             ("max_num_batched_tokens", self.max_num_batched_tokens)):
            if value and value != "auto":
                parts.append(f"{label} {value}")
        if self.enforce_eager:
            parts.append("eager")
        if self.other:
            parts.append(self.other)
        return ", ".join(parts)


_RELEASE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


def release_of(version: str | None) -> str:
    """A release as keys hold it: X.Y.Z, whatever the spelling (`0.19` and `v0.19.0` are
    0.19.0; a local build `0.9.2+cu126` is 0.9.2); '' when unknown."""
    match = _RELEASE.match(version or "")
    if not match:
        return UNSET
    major, minor, patch = match.groups()
    return f"{int(major)}.{int(minor)}.{int(patch or 0)}"


# Flags that are in the key already (--distributed-executor-backend follows from the tensor
# parallel size: gardenctl sets mp for TP > 1), or that change nothing on the GPU.
KEYED_OR_IRRELEVANT = frozenset({
    "--host", "--port", "--served-model-name", "--max-model-len", "--tensor-parallel-size",
    "--distributed-executor-backend",
    "--gpu-memory-utilization", "--shutdown-timeout", "--revision", "--dtype", "--quantization",
    "--kv-cache-dtype", "--max-num-seqs", "--max-num-batched-tokens", "--enforce-eager",
    "--trust-remote-code", "--api-key", "--model", "--model-tag",
})
# gardenctl's own variable (the same for every worker) is not a difference between them.
UNKEYED_ENV = frozenset({"VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS", "VLLM_API_KEY"})


def other_settings(flags: Mapping[str, str], env: Mapping[str, str]) -> str:
    """The flags and VLLM_* variables a worker ran with beyond the key's own fields, in one
    canonical line (sorted; secrets and ${references} left out); '' when there are none."""
    parts = [f"{name}={value}" if value else name
             for name, value in sorted(flags.items()) if name not in KEYED_OR_IRRELEVANT]
    parts += [f"{name}={value}" for name, value in sorted(env.items())
              if name.startswith("VLLM_") and name not in UNKEYED_ENV and "${" not in value]
    return " ".join(parts)


def make_key(*, model: str, revision: str | None, vllm_version: str | None, gpu_name: str | None,
             tensor_parallel_size: int, dtype: str | None, quantization: str | None,
             kv_cache_dtype: str | None, max_num_seqs: int | str | None,
             max_num_batched_tokens: int | str | None, enforce_eager: bool,
             other: str = UNSET) -> ProfileKey:
    return ProfileKey(
        model=model, revision=revision or UNSET, vllm_version=release_of(vllm_version),
        gpu_name=gpu_name or UNSET, tensor_parallel_size=int(tensor_parallel_size),
        dtype=dtype or "auto", quantization=quantization or UNSET,
        kv_cache_dtype=kv_cache_dtype or "auto",
        max_num_seqs=UNSET if max_num_seqs is None else str(max_num_seqs),
        max_num_batched_tokens=(UNSET if max_num_batched_tokens is None
                                else str(max_num_batched_tokens)),
        enforce_eager=bool(enforce_eager), other=other)


@dataclass(frozen=True)
class Profile:
    """One GPU of one measured start. Byte counts are per GPU (per tensor-parallel rank)."""

    key: ProfileKey
    gpu_total_bytes: int  # as the log (or the inventory) gave it
    gpu_memory_utilization: float  # the --gpu-memory-utilization of that start
    weights_bytes: int
    non_kv_bytes: int  # the budget minus the KV cache: weights, activation peak, non-torch,
    # and the CUDA-graph pool where the release counts it inside the budget
    kv_cache_bytes: int
    kv_cache_tokens: int
    kv_bytes_per_token: int  # per GPU, from the KV cache and its tokens
    cuda_graph_bytes: int | None
    max_model_len: int | None
    max_concurrency: float | None
    measured_at: float  # wall-clock time of the start
    source: str  # "worker <id>" or "imported <file>"
    # Whether that start's budget held the CUDA-graph pool (vLLM >= 0.18 with
    # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1, which gardenctl sets; its default from 0.20).
    graphs_in_budget: bool = True
    samples: int = 1  # how many starts agreed on this key
    # The non-KV footprints of the last RECENT starts, newest last ("a,b,c"): sizing takes the
    # largest, so one start that profiled small never shrinks a claim, and one disturbed by a
    # neighbour (vLLM measures device-wide) stops counting after RECENT more starts.
    recent_non_kv: str = ""
    # vLLM's own estimate of the graph pool (0.18+), which its budget held; what the capture
    # took beyond it sits outside the budget
    cuda_graph_estimated_bytes: int | None = None

    @property
    def sizing_non_kv_bytes(self) -> int:
        recent = [int(v) for v in self.recent_non_kv.split(",") if v]
        return max([self.non_kv_bytes, *recent])

    @property
    def graph_overflow_bytes(self) -> int:
        """What the captured graph pool took beyond the estimate the budget held."""
        if self.cuda_graph_bytes is None or self.cuda_graph_estimated_bytes is None:
            return 0
        return max(0, self.cuda_graph_bytes - self.cuda_graph_estimated_bytes)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "key"}
        return {"key": self.key.to_json(), **data}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Profile:
        key = ProfileKey(**{f.name: row[f.name] for f in fields(ProfileKey)})
        key = ProfileKey(**{**asdict(key), "enforce_eager": bool(key.enforce_eager)})
        values = {f.name: row[f.name] for f in fields(cls) if f.name != "key"}
        values["graphs_in_budget"] = bool(values["graphs_in_budget"])
        return cls(key=key, **values)


def kv_bytes_per_token(kv_cache_bytes: int, kv_cache_tokens: int) -> int:
    """vLLM rounds the cache down to whole blocks, so bytes / tokens is at most one block's
    worth above the true figure; the caller prefers the model's exact figure when they agree."""
    return -(-kv_cache_bytes // max(1, kv_cache_tokens))
