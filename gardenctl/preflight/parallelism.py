"""tensor_parallel_size against what vLLM divides by it when it loads the model.

- attention heads: `ModelConfig.verify_with_parallel_config` raises "Total number of attention
  heads (H) must be divisible by tensor parallel size (T)" (vllm/config/model.py; vllm/config.py
  before 0.10);
- KV heads: the attention layers (e.g. `LlamaAttention.__init__`, vllm/model_executor/models/
  llama.py, and `QKVParallelLinear`) assert that KV heads divide by TP when there are at least
  as many KV heads as ranks, and otherwise that TP divides by the KV heads (each KV head is
  replicated); MLA models (DeepSeek-V2/V3, Kimi) have no KV heads to split;
- vocabulary: `VocabParallelEmbedding` pads the vocabulary to a multiple of 64 x TP, so it never
  refuses a TP (nothing to check).
"""

from __future__ import annotations

from gardenctl.estimate.architecture import Architecture
from gardenctl.preflight.findings import Finding, error


def check_parallelism(tp: int, arch: Architecture) -> list[Finding]:
    if tp <= 1:
        return []
    findings: list[Finding] = []
    heads = arch.heads
    if heads and heads % tp:
        findings.append(error(
            "tensor_parallel_size",
            f"tensor_parallel_size {tp} does not divide the model's {heads} attention heads: "
            "vLLM refuses to start",
            hint=f"use one of {_divisors(heads, tp)}"))
    kv = arch.kv_heads
    if kv and not arch.is_mla and kv != heads:
        if kv >= tp and kv % tp:
            findings.append(error(
                "tensor_parallel_size",
                f"tensor_parallel_size {tp} does not divide the model's {kv} KV heads: "
                "vLLM's attention layer refuses it",
                hint=f"use one of {_divisors(kv, tp)}"))
        elif kv < tp and tp % kv:
            findings.append(error(
                "tensor_parallel_size",
                f"tensor_parallel_size {tp} is not a multiple of the model's {kv} KV heads "
                "(with fewer KV heads than GPUs, each KV head is copied to TP / KV GPUs): "
                "vLLM's attention layer refuses it",
                hint=f"use a multiple of {kv} or a divisor of it"))
    return findings


def _divisors(n: int, around: int) -> str:
    """The valid sizes near ``around`` (at most 64, the garden's limit)."""
    valid = [d for d in range(1, min(n, 64) + 1) if n % d == 0]
    near = sorted(valid, key=lambda d: (abs(d - around), d))[:4]
    return ", ".join(str(d) for d in sorted(near))
