"""Cross-field checks of a garden: the rules one field's schema cannot express.

`check_garden` needs only the file (gardenctl.validation checks it against the hardware). It
returns issues (errors and warnings) rather than raising, so `validate` can report every
problem at once.

What a model's `args` and `env` may not say is one table each, ARG_RULES and ENV_RULES, with
the reason for every entry (checked against vLLM 0.32's `vllm serve` parser and its envs.py):
flags and variables that gardenctl sets itself, that would put a secret in argv, or that would
make a worker use other GPUs, or other GPU memory, than gardenctl's plan assigned it.

The work is bounded whatever the file holds (`validate` must answer at once on any file up to
the 1 MiB limit): each check costs a few dict lookups per value; at most MAX_ERRORS errors and
MAX_WARNINGS warnings are built in full, the rest counted into one summarising issue; and
"did you mean" suggestions (difflib, about a millisecond each) stop after MAX_SUGGESTIONS.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gardenctl.argv import SHORT_FLAGS, canonical_flag, flag_name, known_flags, long_flags
from gardenctl.errors import SpecIssue
from gardenctl.spec.models import (
    LOOPBACK_HOSTS,
    Garden,
    env_reference,
    looks_secret,
)
from gardenctl.spec.yamlsource import Path, SourceMap
from gardenctl.text import inline, quoted

API_KEY_ENV = "VLLM_API_KEY"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
VLLM_FLAGS_VERSION = "0.32"
MAX_ERRORS = 100  # errors built in full per file; the others are counted
MAX_WARNINGS = 100  # the same for warnings, so warnings never hide an error
MAX_SUGGESTIONS = 20  # "did you mean" lookups per file
MAX_SUGGESTED_LENGTH = 64  # longer names are not compared (difflib is quadratic in length)


@dataclass(frozen=True)
class Refusal:
    """Why a flag or an environment variable may not be in a garden file, and what to write
    instead. `why` completes a sentence that starts with the flag or variable's name."""

    why: str
    instead: str


def _managed(field: str) -> Refusal:
    return Refusal(f"is set by gardenctl from the model's `{field}` field",
                   f"set `{field}` instead")


def _secret(variable: str) -> Refusal:
    return Refusal("would put a secret in argv, readable by every local user",
                   f'set env: {{{variable}: "${{...}}"}} instead')


_KV_INSTEAD = ("set min_concurrency and max_model_len instead: gardenctl sizes the KV cache, "
               "and the memory it claims for the worker, from them")
_DATA_PARALLEL = Refusal(
    "configures data parallelism: vLLM would start engine ranks on GPUs of their own that "
    "gardenctl's plan never gave the worker",
    "use replicas: gardenctl places each replica on GPUs of its own")
_DEVICES_INSTEAD = "pin the model's GPUs with placement.gpus and placement.node instead"

# What `args` may not contain, by vLLM's long flag name (short spellings: SHORT_FLAGS).
# Considered and allowed: --decode-context-parallel-size (reuses the tensor-parallel GPUs),
# --mm-ipc-gpu-memory-gb (carved out of the KV cache, inside the budget), --cpu-offload-gb and
# --kv-offloading-size (host memory), the multi-node flags
# (--nnodes, --node-rank, --headless, --master-*: they spread a worker, never add GPUs here),
# and the --no- twins of the refused data-parallel and elastic-EP switches (they turn it off).
ARG_RULES: dict[str, Refusal] = {
    # Set by gardenctl from the model's fields: a second value would fight it.
    "--host": _managed("host"),
    "--port": _managed("port"),
    "--served-model-name": _managed("served_model_name"),
    "--max-model-len": _managed("max_model_len"),
    "--tensor-parallel-size": _managed("tensor_parallel_size"),
    "--gpu-memory-utilization": _managed("gpu_memory_utilization"),
    # vLLM 0.32's second name of --gpu-memory-utilization (same destination).
    "--device-memory-utilization": _managed("gpu_memory_utilization"),
    "--dtype": _managed("dtype"),
    "--quantization": _managed("quantization"),
    "--kv-cache-dtype": _managed("kv_cache_dtype"),
    "--max-num-seqs": _managed("max_num_seqs"),
    "--max-num-batched-tokens": _managed("max_num_batched_tokens"),
    "--enforce-eager": _managed("enforce_eager"),
    "--no-enforce-eager": _managed("enforce_eager"),
    "--revision": _managed("revision"),
    "--trust-remote-code": _managed("trust_remote_code"),
    "--no-trust-remote-code": _managed("trust_remote_code"),
    "--shutdown-timeout": _managed("shutdown_timeout"),
    "--model": _managed("model"),
    # Standby workers get it (and VLLM_SERVER_DEV_MODE=1 for the /sleep and /wake_up routes);
    # on any other worker sleep mode would be memory the plan cannot account for.
    "--enable-sleep-mode": _managed("standby"),
    # Tensor-parallel workers run vLLM's multiprocessing backend on the plan's GPUs: its Ray
    # backend (chosen by vLLM itself inside a Ray placement group) asks Ray for whole GPUs of
    # its own and ignores the plan's shares (docs/vllm.md section 15).
    "--distributed-executor-backend": Refusal(
        "is set by gardenctl (mp, for tensor_parallel_size > 1): a worker's ranks run as "
        "processes on the GPUs the plan gave it", "remove it from args"),
    # Secrets: argv is readable by every local user (ps, /proc).
    "--api-key": _secret(API_KEY_ENV),
    "--hf-token": _secret("HF_TOKEN"),
    # A config file could set anything above behind gardenctl's back.
    "--config": Refusal(
        "is not allowed in args: a vLLM config file could override what gardenctl sets "
        "(port, utilization, API key)", "put its settings in the model's fields and args"),
    # GPUs: a worker runs on exactly the tensor_parallel_size GPUs the plan gave it.
    "--pipeline-parallel-size": Refusal(
        "multiplies the GPUs a worker uses (pipeline x tensor parallel), beyond the "
        "tensor_parallel_size GPUs gardenctl's plan gives it",
        "set tensor_parallel_size to the number of GPUs a worker needs"),
    "--prefill-context-parallel-size": Refusal(
        "multiplies the GPUs a worker uses (vLLM's world size is pipeline x tensor x "
        "prefill-context parallel), beyond the tensor_parallel_size GPUs gardenctl's plan "
        "gives it", "set tensor_parallel_size to the number of GPUs a worker needs"),
    "--device-ids": Refusal(
        "chooses the worker's GPUs itself, but a worker must use the GPUs gardenctl's plan "
        "assigned it (given in CUDA_VISIBLE_DEVICES)", _DEVICES_INSTEAD),
    "--data-parallel-address": _DATA_PARALLEL,
    "--data-parallel-backend": _DATA_PARALLEL,
    "--data-parallel-external-lb": _DATA_PARALLEL,
    "--data-parallel-hybrid-lb": _DATA_PARALLEL,
    "--data-parallel-multi-port-external-lb": _DATA_PARALLEL,
    "--data-parallel-rank": _DATA_PARALLEL,
    "--data-parallel-rpc-port": _DATA_PARALLEL,
    "--data-parallel-size": _DATA_PARALLEL,
    "--data-parallel-size-local": _DATA_PARALLEL,
    "--data-parallel-start-rank": _DATA_PARALLEL,
    "--data-parallel-supervisor-port": _DATA_PARALLEL,
    # Elastic expert parallelism adds data-parallel ranks while the worker runs.
    "--enable-elastic-ep": _DATA_PARALLEL,
    "--elastic-ep-max-dp-size": _DATA_PARALLEL,
    # GPU memory: the worker's memory is what --gpu-memory-utilization gives it, no more.
    "--kv-cache-memory-bytes": Refusal(
        "sets the KV cache outside --gpu-memory-utilization, so the memory gardenctl claimed "
        "for the worker would be wrong", _KV_INSTEAD),
    "--num-gpu-blocks-override": Refusal(
        "forces the KV cache's size whatever memory gardenctl claimed for the worker (more "
        "blocks than that memory holds: out of memory on a shared GPU)", _KV_INSTEAD),
}


_MARKER = Refusal(
    "is one of gardenctl's markers, which tell its workers apart from other processes; a "
    "forged one could make gardenctl adopt or stop the wrong process",
    "remove it: gardenctl sets it on every worker")

# What `env` may not set (gardenctl sets these itself, or they select other GPUs or memory).
ENV_RULES: dict[str, Refusal] = {
    "CUDA_VISIBLE_DEVICES": Refusal(
        "selects the worker's GPUs, which gardenctl sets from its plan", _DEVICES_INSTEAD),
    "CUDA_DEVICE_ORDER": Refusal(
        "changes what GPU indexes mean; gardenctl sets PCI_BUS_ID so that they are NVML's "
        "indexes, the ones its plan uses", "remove it"),
    "NVIDIA_VISIBLE_DEVICES": Refusal(
        "selects GPUs in NVIDIA's container runtime, apart from gardenctl's plan",
        _DEVICES_INSTEAD),
    "HIP_VISIBLE_DEVICES": Refusal(
        "selects AMD GPUs apart from gardenctl's plan", _DEVICES_INSTEAD),
    "ROCR_VISIBLE_DEVICES": Refusal(
        "selects AMD GPUs apart from gardenctl's plan", _DEVICES_INSTEAD),
    "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS": Refusal(
        "is set by gardenctl so that the CUDA-graph pool is inside --gpu-memory-utilization; "
        "changed, the pool would sit outside the memory claimed for the worker",
        "remove it; enforce_eager: true turns CUDA graphs off"),
    "VLLM_PORT": Refusal(
        "is the base of vLLM's internal ports: two workers given the same one collide, so "
        "gardenctl leaves it unset", "remove it; the HTTP port is the model's `port` field"),
    "GARDENCTL_WORKER_ID": _MARKER,
    "GARDENCTL_SPEC_HASH": _MARKER,
    "GARDENCTL_STATE": _MARKER,
    "GARDENCTL_MEMORY_CAP_BYTES": Refusal(
        "is the hard memory limit gardenctl derives from the worker's claim when the model "
        "has `memory_cap: true`; set by hand it would cap the worker at a size the plan never "
        "booked", "remove it and set `memory_cap: true` on the model"),
}
RESERVED_ENV_PREFIX = Refusal(
    "starts with GARDENCTL_, a prefix reserved for gardenctl's own markers",
    "rename the variable")


class Findings:
    """The issues found in a file: the first MAX_ERRORS errors and MAX_WARNINGS warnings built
    in full, the others only counted (and summarised by `issues()`), so a file with 50,000
    mistakes costs no more to report than one with a hundred. Issues are passed as functions
    that build them, called only for the issues kept."""

    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.kept: list[SpecIssue] = []
        self.room = {"error": MAX_ERRORS, "warning": MAX_WARNINGS}
        self.hidden = {"error": 0, "warning": 0}
        self.first_hidden: dict[str, SpecIssue] = {}  # by severity
        self.suggestions_left = MAX_SUGGESTIONS

    def add(self, severity: str, build: Callable[[], SpecIssue]) -> None:
        if self.room[severity] > 0:
            self.room[severity] -= 1
            self.kept.append(build())
            return
        self.hidden[severity] += 1
        if severity not in self.first_hidden:
            self.first_hidden[severity] = build()

    def suggest(self, word: str, choices: Iterable[str], cutoff: float) -> str | None:
        """The closest choice to ``word``, while the file's suggestion budget lasts."""
        if self.suggestions_left <= 0 or len(word) > MAX_SUGGESTED_LENGTH:
            return None
        self.suggestions_left -= 1
        close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
        return close[0] if close else None

    def issues(self) -> list[SpecIssue]:
        """The kept issues, then one issue that counts the others (if any)."""
        first = self.first_hidden.get("error") or self.first_hidden.get("warning")
        summary = summarise_hidden(self.hidden["error"], self.hidden["warning"], first)
        return self.kept + ([summary] if summary else [])


def summarise_hidden(errors: int, warnings: int, first: SpecIssue | None) -> SpecIssue | None:
    """One issue standing for ``errors`` and ``warnings`` not reported one by one, located
    where ``first`` (the first hidden error, else the first hidden warning) is."""
    if (not errors and not warnings) or first is None:
        return None
    counts = [f"{n:,} more {kind}{'s' if n != 1 else ''}"
              for n, kind in ((errors, "error"), (warnings, "warning")) if n]
    return SpecIssue(
        message=f"{' and '.join(counts)} not shown (the first of them: {first.message})",
        path=first.path, file=first.file, line=first.line, column=first.column,
        hint=f"validate reports at most {MAX_ERRORS} errors and {MAX_WARNINGS} warnings one "
        "by one; fix these and run it again",
        severity="error" if errors else "warning")


class _Settings:
    """Models' values with `defaults:` applied (a model's own value wins), read one field at a
    time: building the resolved models would copy the merged env of every model."""

    def __init__(self, garden: Garden) -> None:
        self.models = garden.models
        self.defaults = garden.defaults
        self.inherited = garden.defaults.model_fields_set

    def get(self, index: int, field: str) -> Any:
        model = self.models[index]
        if field in self.inherited and field not in model.model_fields_set:
            return getattr(self.defaults, field)
        return getattr(model, field)


def _where(garden: Garden, index: int, field: str) -> Path:
    """The path where a resolved model's value was written: the model itself or `defaults`."""
    model = garden.models[index]
    if field in model.model_fields_set:
        return ("models", index, field)
    if field in garden.defaults.model_fields_set:
        return ("defaults", field)
    return ("models", index)


def check_garden(garden: Garden, source: SourceMap) -> list[SpecIssue]:
    """Every cross-field problem of a garden, most serious first within each check, with at
    most MAX_ERRORS errors and MAX_WARNINGS warnings one by one (then a summary)."""
    found = Findings(source)
    settings = _Settings(garden)
    _check_unique_names(garden, found)
    _check_ports(garden, settings, found)
    _check_env(garden.defaults.env, ("defaults", "env"), found)
    _check_args(garden.defaults.args, ("defaults", "args"), found)
    for index in range(len(garden.models)):
        _check_model(garden, settings, index, found)
    if garden.inventory is not None:
        seen: dict[str, int] = {}
        for i, node in enumerate(garden.inventory.nodes):
            if node.name in seen:
                first = seen[node.name]
                found.add("error", partial(
                    source.issue, ("inventory", "nodes", i, "name"),
                    f"node {quoted(node.name)} is declared twice",
                    hint=f"first at inventory.nodes[{first}]"))
            seen.setdefault(node.name, i)
    if garden.runtime.kind == "local" and garden.runtime.address:
        found.add("warning", partial(source.issue, ("runtime", "address"),
                                     "address is only used by kind: ray", severity="warning"))
    return found.issues()


def _check_unique_names(garden: Garden, found: Findings) -> None:
    seen: dict[str, int] = {}
    for i, model in enumerate(garden.models):
        if model.name not in seen:
            seen[model.name] = i
            continue
        found.add("error", partial(_duplicate_name, found.source, i, model.name, seen[model.name]))


def _duplicate_name(source: SourceMap, i: int, name: str, first: int) -> SpecIssue:
    return source.issue(("models", i, "name"), f"model name {quoted(name)} is used twice",
                        hint=f"first used by models[{first}]; names must be unique in a garden")


def _host_kind(host: str) -> str:
    """Which listeners a host overlaps: a wildcard every other, loopback names each other,
    any other address only itself."""
    if host in ("0.0.0.0", "::", ""):
        return "*"
    if host in LOOPBACK_HOSTS:
        return "loopback"
    return "host " + host


def _check_ports(garden: Garden, settings: _Settings, found: Findings) -> None:
    """Two workers on one host:port. Each model with a `port` holds the ports
    [port, port + replicas); sorted by first port, a model clashes with an earlier-starting
    one whose ports reach past its first port, on an overlapping host. Keeping, per kind of
    host, the model reaching furthest makes this O(models log models) whatever the file."""
    spans: list[tuple[int, int, int]] = []  # (first port, model index, end port)
    for i in range(len(garden.models)):
        port = settings.get(i, "port")
        replicas = settings.get(i, "replicas")
        if port is None or replicas == 0:
            continue
        if port + replicas - 1 > 65535:
            replica = 65536 - port
            found.add("error", partial(
                found.source.issue, _where(garden, i, "port"), f"replica {replica} would listen "
                f"on port {port + replica}, above 65535", hint="choose a lower port"))
        spans.append((port, i, min(port + replicas, 65536)))
    furthest: dict[str, tuple[int, int, int]] = {}  # host kind -> (end, first port, index)
    for start, i, end in sorted(spans):
        host = settings.get(i, "host")
        kind = _host_kind(host)
        overlapping = ("any",) if kind == "*" else ("*", kind)
        clash = max((furthest[k] for k in overlapping if k in furthest), default=None)
        if clash is not None and clash[0] > start:
            _report_clash(garden, found, i, host, start, clash)
        for k in ("any", kind):
            if k not in furthest or furthest[k][0] < end:
                furthest[k] = (end, start, i)


def _report_clash(garden: Garden, found: Findings, i: int, host: str, port: int,
                  clash: tuple[int, int, int]) -> None:
    _, other_start, other = clash
    name, other_name = garden.models[i].name, garden.models[other].name
    found.add("error", partial(
        found.source.issue, _where(garden, i, "port"),
        f"{name}/0 and {other_name}/{port - other_start} would both listen on "
        f"{inline(host)}:{port}",
        hint="each worker needs its own host:port; replica i of a model uses port + i"))


_FLAG_VALUES = {"revision": "branch, tag or commit", "quantization": "quantization method",
                "served_model_name": "name clients send as `model`"}


def _check_model(garden: Garden, settings: _Settings, i: int, found: Findings) -> None:
    source = found.source
    model = garden.models[i]
    if model.model.startswith("-"):
        found.add("error", partial(
            source.issue, ("models", i, "model"),
            f"model {quoted(model.model)} starts with '-', so vLLM would read it as a flag",
            hint="write ./NAME for a local folder"))
    for field in ("revision", "quantization", "served_model_name"):  # each the value of a flag
        value = settings.get(i, field)
        if isinstance(value, str) and value.startswith("-"):
            found.add("error", partial(
                source.issue, _where(garden, i, field),
                f"{field} {quoted(value)} starts with '-', so vLLM would read it as a flag",
                hint=f"{field} names a {_FLAG_VALUES[field]}; none starts with '-'"))
    host = settings.get(i, "host")
    if host not in LOOPBACK_HOSTS:
        ref = model.env.get(API_KEY_ENV, garden.defaults.env.get(API_KEY_ENV))
        if ref is None or env_reference(ref) is None:
            found.add("error", partial(
                source.issue, _where(garden, i, "host"),
                f"host {inline(host)} exposes the model beyond this machine without an "
                "API key", hint=f"add env: {{{API_KEY_ENV}: \"${{YOUR_KEY_VARIABLE}}\"}} (vLLM "
                "reads it as --api-key), or listen on 127.0.0.1"))
    revision = settings.get(i, "revision")
    if settings.get(i, "trust_remote_code") and not (revision and COMMIT_RE.match(revision)):
        found.add("error", partial(
            source.issue, _where(garden, i, "trust_remote_code"),
            "trust_remote_code runs the model repository's Python code, so it needs a pinned "
            "revision", hint="set revision to a 40-character commit hash of the model "
            "repository"))
    _check_env(model.env, ("models", i, "env"), found)
    _check_placement(garden, settings, i, found)
    if "args" in model.model_fields_set:
        _check_args(model.args, ("models", i, "args"), found)


def _check_placement(garden: Garden, settings: _Settings, i: int, found: Findings) -> None:
    placement = settings.get(i, "placement")
    if placement is None or placement.gpus is None:
        return
    gpus = placement.gpus
    path = _where(garden, i, "placement")
    tensor_parallel = settings.get(i, "tensor_parallel_size")
    if len(set(gpus)) != len(gpus):
        found.add("error", partial(found.source.issue, path, "placement.gpus lists a GPU twice"))
    if len(set(gpus)) < tensor_parallel:
        found.add("error", partial(
            found.source.issue, path,
            f"placement.gpus has {len(set(gpus))} GPU(s) but tensor_parallel_size is "
            f"{tensor_parallel}", hint="pin at least tensor_parallel_size GPUs"))


def _check_env(env: dict[str, str], base: Path, found: Findings) -> None:
    """One env mapping as written (a model's, or the defaults' once for every model)."""
    for key, value in env.items():
        refusal = ENV_RULES.get(key)
        if refusal is None and key.startswith("GARDENCTL_"):
            refusal = RESERVED_ENV_PREFIX
        if refusal is not None:
            found.add("error", partial(found.source.issue, base + (key,), f"{key} {refusal.why}",
                                       hint=refusal.instead, at_key=True))
        elif looks_secret(key) and env_reference(value) is None:
            found.add("error", partial(
                found.source.issue, base + (key,),
                f"{key} looks like a secret but is written in the file",
                hint=f"use a reference resolved at start-up: {key}: \"${{{key}}}\""))


def _check_args(args: list[str], base: Path, found: Findings) -> None:
    """One args list as written: refused flags are errors, unknown ones warnings."""
    known = known_flags()
    for j, arg in enumerate(args):
        name = flag_name(arg)
        if name is None:
            continue
        flag = name if name in known and name not in SHORT_FLAGS else canonical_flag(name)
        refusal = ARG_RULES.get(flag) if flag is not None else None
        if flag is not None and refusal is not None:
            found.add("error", partial(_refused_arg, found.source, base + (j,), name, flag,
                                       refusal))
        elif name not in known:
            found.add("warning", partial(_unknown_arg, found, base + (j,), name))


def _refused_arg(source: SourceMap, path: Path, name: str, flag: str,
                 refusal: Refusal) -> SpecIssue:
    """The issue of a refused flag, naming the flag as written and as vLLM reads it."""
    written = inline(name)
    if name == flag:
        spelled = written
    elif name.startswith("--") and flag.startswith(name):
        spelled = f"{written} (vLLM's parser completes it to {flag})"
    else:
        spelled = f"{written} ({flag})"
    return source.issue(path, f"{spelled} {refusal.why}", hint=refusal.instead)


def _unknown_arg(found: Findings, path: Path, name: str) -> SpecIssue:
    close = found.suggest(name, long_flags(), cutoff=0.7)
    return found.source.issue(
        path,
        f"{inline(name)} is not a `vllm serve` flag in vLLM {VLLM_FLAGS_VERSION}",
        hint=(f"did you mean {close}? " if close else "")
        + "vLLM will refuse to start if it does not know it",
        severity="warning",
    )
