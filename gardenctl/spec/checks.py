"""Cross-field checks of a garden: the rules one field's schema cannot express.

`check_garden` needs only the file; `check_inventory_fit` also needs the hardware (declared or
discovered). Both return issues (errors and warnings) rather than raising, so `validate` can
report every problem at once.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Iterable

from gardenctl.errors import SpecIssue
from gardenctl.spec.models import (
    LOOPBACK_HOSTS,
    Garden,
    ModelSpec,
    env_reference,
    looks_secret,
)
from gardenctl.spec.yamlsource import Path, SourceMap

API_KEY_ENV = "VLLM_API_KEY"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
VLLM_FLAGS_VERSION = "0.32"

# Flags gardenctl sets itself from the model's fields: giving them in `args` too would fight it.
MANAGED_FLAGS = {
    "--host": "host",
    "--port": "port",
    "--served-model-name": "served_model_name",
    "--max-model-len": "max_model_len",
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--dtype": "dtype",
    "--quantization": "quantization",
    "-q": "quantization",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--max-num-seqs": "max_num_seqs",
    "--max-num-batched-tokens": "max_num_batched_tokens",
    "--enforce-eager": "enforce_eager",
    "--no-enforce-eager": "enforce_eager",
    "--revision": "revision",
    "--trust-remote-code": "trust_remote_code",
    "--no-trust-remote-code": "trust_remote_code",
    "--shutdown-timeout": "shutdown_timeout",
    "--model": "model",
}
# Flags that would let something else decide what gardenctl must control.
FORBIDDEN_FLAGS = {
    "--config": "a vLLM config file could override what gardenctl sets (port, utilization, "
                "API key); put its settings in the model's fields and args",
}
# Flags whose value is a secret: argv is readable by every local user.
SECRET_FLAGS = {"--api-key": API_KEY_ENV, "--hf-token": "HF_TOKEN"}


@lru_cache(maxsize=1)
def known_vllm_flags() -> frozenset[str]:
    text = resources.files("gardenctl.data").joinpath("vllm-serve-flags-0.32.txt").read_text()
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def flag_name(arg: str) -> str | None:
    """`--foo_bar=1` -> `--foo-bar` (vLLM's parser reads '_' as '-' in flag names); values
    (not starting with '-') -> None."""
    if not arg.startswith("-") or arg == "-" or is_number(arg):
        return None
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _where(garden: Garden, index: int, field: str) -> Path:
    """The path where a resolved model's value was written: the model itself or `defaults`."""
    model = garden.models[index]
    if field in model.model_fields_set:
        return ("models", index, field)
    if field in garden.defaults.model_fields_set:
        return ("defaults", field)
    return ("models", index)


def worker_ports(model: ModelSpec) -> list[int]:
    """Explicit ports of a model's replicas: replica i listens on port + i."""
    if model.port is None:
        return []
    return [model.port + i for i in range(model.replicas)]


def check_garden(garden: Garden, source: SourceMap) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    resolved = garden.resolved_models()
    issues += _check_unique_names(garden, source)
    issues += _check_ports(garden, resolved, source)
    for index, model in enumerate(resolved):
        issues += _check_model(garden, index, model, source)
    if garden.inventory is not None:
        seen: dict[str, int] = {}
        for i, node in enumerate(garden.inventory.nodes):
            if node.name in seen:
                issues.append(source.issue(("inventory", "nodes", i, "name"),
                                           f"node {node.name!r} is declared twice",
                                           hint=f"first at inventory.nodes[{seen[node.name]}]"))
            seen.setdefault(node.name, i)
    if garden.runtime.kind == "local" and garden.runtime.address:
        issues.append(source.issue(("runtime", "address"), "address is only used by kind: ray",
                                   severity="warning"))
    return issues


def _check_unique_names(garden: Garden, source: SourceMap) -> Iterable[SpecIssue]:
    seen: dict[str, int] = {}
    for i, model in enumerate(garden.models):
        if model.name in seen:
            yield source.issue(("models", i, "name"), f"model name {model.name!r} is used twice",
                               hint=f"first used by models[{seen[model.name]}]; names must be "
                               "unique in a garden")
        else:
            seen[model.name] = i


def _check_ports(garden: Garden, resolved: list[ModelSpec],
                 source: SourceMap) -> Iterable[SpecIssue]:
    taken: dict[int, list[tuple[str, int, str]]] = {}  # port -> [(host, model index, worker)]
    for i, model in enumerate(resolved):
        for replica, port in enumerate(worker_ports(model)):
            if port > 65535:
                yield source.issue(_where(garden, i, "port"),
                                   f"replica {replica} would listen on port {port}, above 65535",
                                   hint="choose a lower port")
                continue
            for host, other, worker in taken.get(port, []):
                if _hosts_overlap(host, model.host):
                    yield source.issue(
                        _where(garden, i, "port"),
                        f"{model.name}/{replica} and {worker} would both listen on "
                        f"{model.host}:{port}",
                        hint="each worker needs its own host:port; replica i of a model "
                        "uses port + i",
                    )
            taken.setdefault(port, []).append((model.host, i, f"{model.name}/{replica}"))


def _hosts_overlap(a: str, b: str) -> bool:
    wildcard = {"0.0.0.0", "::", ""}
    loopback = set(LOOPBACK_HOSTS)
    if a in wildcard or b in wildcard or a == b:
        return True
    return a in loopback and b in loopback


def _check_model(garden: Garden, i: int, model: ModelSpec,
                 source: SourceMap) -> Iterable[SpecIssue]:
    if model.model.startswith("-"):
        yield source.issue(("models", i, "model"), f"model {model.model!r} starts with '-', so "
                           "vLLM would read it as a flag", hint="write ./NAME for a local folder")
    if model.host not in LOOPBACK_HOSTS:
        ref = model.env.get(API_KEY_ENV)
        if ref is None or env_reference(ref) is None:
            yield source.issue(
                _where(garden, i, "host"),
                f"host {model.host} exposes the model beyond this machine without an API key",
                hint=f"add env: {{{API_KEY_ENV}: \"${{YOUR_KEY_VARIABLE}}\"}} (vLLM reads it "
                "as --api-key), or listen on 127.0.0.1",
            )
    if model.trust_remote_code and not (model.revision and COMMIT_RE.match(model.revision)):
        yield source.issue(
            _where(garden, i, "trust_remote_code"),
            "trust_remote_code runs the model repository's Python code, so it needs a pinned "
            "revision",
            hint="set revision to a 40-character commit hash of the model repository",
        )
    for key, value in sorted(model.env.items()):
        if looks_secret(key) and env_reference(value) is None:
            path = ("models", i, "env", key) if key in garden.models[i].env else ("defaults", "env", key)
            yield source.issue(path, f"{key} looks like a secret but is written in the file",
                               hint=f"use a reference resolved at start-up: {key}: \"${{{key}}}\"")
    if model.placement and model.placement.gpus is not None:
        gpus = model.placement.gpus
        path = _where(garden, i, "placement")
        if len(set(gpus)) != len(gpus):
            yield source.issue(path, "placement.gpus lists a GPU twice")
        if len(set(gpus)) < model.tensor_parallel_size:
            yield source.issue(path, f"placement.gpus has {len(set(gpus))} GPU(s) but "
                               f"tensor_parallel_size is {model.tensor_parallel_size}",
                               hint="pin at least tensor_parallel_size GPUs")
    yield from _check_args(garden, i, model, source)


def _check_args(garden: Garden, i: int, model: ModelSpec,
                source: SourceMap) -> Iterable[SpecIssue]:
    known = known_vllm_flags()
    base = _where(garden, i, "args")
    for j, arg in enumerate(model.args):
        path = base + (j,) if base[-1] == "args" else base
        name = flag_name(arg)
        if name is None:
            continue
        if name in SECRET_FLAGS:
            yield source.issue(path, f"{name} would put a secret in argv, readable by every "
                               "local user", hint=f"set env: {{{SECRET_FLAGS[name]}: "
                               f"\"${{...}}\"}} instead")
        elif name in MANAGED_FLAGS:
            yield source.issue(path, f"{name} is set by gardenctl",
                               hint=f"use the model's `{MANAGED_FLAGS[name]}` field instead")
        elif name in FORBIDDEN_FLAGS:
            yield source.issue(path, f"{name} is not allowed in args",
                               hint=FORBIDDEN_FLAGS[name])
        elif name not in known:
            import difflib

            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)
            yield source.issue(
                path,
                f"{name} is not a `vllm serve` flag in vLLM {VLLM_FLAGS_VERSION}",
                hint=(f"did you mean {close[0]}? " if close else "")
                + "vLLM will refuse to start if it does not know it",
                severity="warning",
            )
