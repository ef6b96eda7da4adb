"""max_model_len against the length vLLM derives from config.json.

vLLM's rule (`_get_and_verify_max_len`, vllm/config/model.py; vllm/config.py before 0.10): a
requested max_model_len above the derived length is refused at start-up ("User-specified
max_model_len (...) is greater than the derived max_model_len ...") unless it is at most
config.json's `model_max_length`, or VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 is set (then vLLM only
warns, and positions past the limit give NaNs or out-of-bounds errors). The derivation itself
is shared with the estimator: gardenctl.estimate.architecture.derive_context_limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gardenctl.estimate.architecture import derive_context_limit, text_config
from gardenctl.preflight.findings import Finding, error, warning

VLLM_DEFAULT_WHEN_UNKNOWN = 2048  # what vLLM assumes when no key gives a length
ALLOW_LONG = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"


def check_context(max_model_len: int | None, config: Mapping[str, Any], where: str,
                  env: Mapping[str, str]) -> list[Finding]:
    derived = derive_context_limit(text_config(config))
    if max_model_len is None:
        if derived.limit is None:
            return [warning("max_model_len",
                            f"max_model_len is unknown: it is not set and the model's "
                            f"config.json ({where}) gives no length (none of "
                            "max_position_embeddings, n_positions, max_seq_len, seq_length, "
                            "model_max_length, ...); vLLM assumes "
                            f"{VLLM_DEFAULT_WHEN_UNKNOWN:,}",
                            hint="set max_model_len")]
        return []
    if derived.limit is None or max_model_len <= derived.limit:
        return []
    if derived.model_max_length and max_model_len <= derived.model_max_length:
        return []
    message = (f"max_model_len {max_model_len:,} is above the model's limit {derived.limit:,} "
               f"({derived.source}; {where})")
    allowed = env.get(ALLOW_LONG, "").strip().lower() in ("1", "true")
    if allowed:
        return [warning("max_model_len", message + f"; {ALLOW_LONG}=1 lets vLLM start, but "
                        "positions past the limit give NaNs (RoPE) or out-of-bounds errors",
                        hint=f"lower max_model_len to {derived.limit:,} or less")]
    return [error("max_model_len", message + ": vLLM refuses to start",
                  hint=f"lower max_model_len to {derived.limit:,} or less (or set "
                  f"{ALLOW_LONG}=1 in env, at your own risk)")]
