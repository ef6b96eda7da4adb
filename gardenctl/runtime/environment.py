"""The environment a worker starts with: a documented allowlist of the controller's variables,
then the garden's `env` (secret references resolved), then what gardenctl sets itself.

A worker never inherits the whole environment of the shell or service that runs gardenctl: an
unrelated secret exported there (a cloud key, a database password) must not reach every vLLM
process (its environment is readable in /proc by the same user, and vLLM logs some of it).
What a `vllm serve` legitimately needs from the host passes through:

- the basics: PATH, HOME, USER, LOGNAME, SHELL, TMPDIR, TZ, LANG, LANGUAGE, LC_*;
- proxies and certificate bundles: http(s)_proxy, no_proxy, all_proxy (either case),
  SSL_CERT_FILE, SSL_CERT_DIR, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE;
- libraries and caches: LD_LIBRARY_PATH, CUDA_HOME, CUDA_PATH, XDG_CACHE_HOME, VIRTUAL_ENV;
- Hugging Face, vLLM and GPU tuning: HF_*, HUGGING_FACE_HUB_*, VLLM_*, CUDA_*, NCCL_*,
  TORCH_*, PYTORCH_*, TRITON_*.

Never passed through (gardenctl sets them, or they would break what it controls):
CUDA_VISIBLE_DEVICES (the plan's GPUs), VLLM_PORT (two instances must never share it),
VLLM_API_KEY (a worker's key comes only from the garden's `env`, where gardenctl sees it and
uses it for health checks), and gardenctl's own GARDENCTL_* markers. Anything else a worker
needs goes in the model's `env:`. PYTHONPATH is not inherited either: a worker gets the one its
model's `env` sets, and with `memory_cap: true` the planned env puts the cap hook's directory in
front of it and sets GARDENCTL_MEMORY_CAP_BYTES (and GARDENCTL_MEMORY_CAP_PYTHONPATH for a
PYTHONPATH given as a ${NAME} reference); they reach the worker as part of its planned `env`, which
the GARDENCTL_ prefix rule does not filter (it applies only to the controller's own variables).
"""

from __future__ import annotations

from collections.abc import Mapping

ALLOWED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "TZ", "LANG", "LANGUAGE",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "XDG_CACHE_HOME", "VIRTUAL_ENV",
})
ALLOWED_PREFIXES = ("LC_", "HF_", "HUGGING_FACE_HUB_", "VLLM_", "CUDA_", "NCCL_", "TORCH_",
                    "PYTORCH_", "TRITON_")
NEVER_INHERITED = frozenset({"CUDA_VISIBLE_DEVICES", "VLLM_PORT", "VLLM_API_KEY"})
NEVER_INHERITED_PREFIXES = ("GARDENCTL_",)


def inherited(name: str) -> bool:
    """May the controller's variable ``name`` pass to a worker?"""
    if name in NEVER_INHERITED or name.startswith(NEVER_INHERITED_PREFIXES):
        return False
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)


def worker_environment(controller: Mapping[str, str], garden_env: Mapping[str, str],
                       markers: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a worker: allowed inherited variables, then the garden's
    (resolved) `env`, then gardenctl's markers, each overriding the one before."""
    env = {name: value for name, value in controller.items() if inherited(name)}
    env.update(garden_env)
    env.update(markers)
    return env


__all__ = ["ALLOWED_NAMES", "ALLOWED_PREFIXES", "inherited", "worker_environment"]
