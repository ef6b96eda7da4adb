"""What changes a worker's memory between vLLM releases, per release range (pure).

The estimator's constants were fitted on vLLM 0.19 start-ups (see overheads.py); what this
module adds is which *mechanisms* differ from one release range to the next, each read from
vLLM's source (docs/vllm.md, sections 1, 13 and 16, give the links and line anchors):

- the engine (V0 up to 0.7 by default, V1 from 0.8) and with it the profile run's defaults:
  V0 profiles `max(max_model_len, 2048)` tokens over 256 sequences unless told otherwise;
- the CUDA-graph capture: one full-model graph per batch size up to 256 (V0), piecewise graphs
  (one per layer and size) for 67 sizes up to 512 (V1 0.8-0.10), full and piecewise graphs for
  51 sizes up to 512 (0.11+); the pool grows with graphs x layers;
- whether the graph pool is inside `--gpu-memory-utilization`: from 0.18.0 when
  `VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1`, which gardenctl sets in every worker's
  environment (gardenctl.workers.worker_env); before 0.18.0 the variable does not exist and the
  pool is allocated after the KV cache, outside the budget;
- whether NCCL's buffers are outside the budget (created before vLLM's memory snapshot from
  0.11.0; after it, so inside as non-torch memory, up to 0.10.x);
- the default `--gpu-memory-utilization` (0.9; 0.92 from 0.20.0), `--kv-cache-memory-bytes`
  (from 0.10.2) and the start-up free-memory check (V1 from 0.9.1).

A version outside the modelled ranges (older than 0.6, newer than 0.32) or one that cannot be
parsed maps to the nearest range, with a note saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from gardenctl.errors import GardenError

Engine = Literal["V0", "V1"]
GraphMode = Literal["full", "piecewise", "full_and_piecewise"]
Version = tuple[int, int, int]

# The capture list the graph constants were fitted with (vLLM 0.19, FULL_AND_PIECEWISE):
# [1, 2, 4] + 8..248 step 8 + 256..512 step 16 = 51 sizes.
REFERENCE_CAPTURE_SIZES = 51
VERSION_FORM = "X.Y or X.Y.Z, e.g. 0.19.1 (a suffix such as .post1, rc1 or +cu124 is allowed)"
_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?([.+-]?[A-Za-z0-9.+-]*)?\s*$")
_GH = "https://github.com/vllm-project/vllm/blob"


@dataclass(frozen=True)
class ReleaseTraits:
    """What one range of vLLM releases does that changes a worker's memory."""

    label: str  # e.g. "0.20-0.27"
    first: Version  # first release of the range
    newest: Version  # the release of the range an unspecified version stands for
    engine: Engine
    graph_mode: GraphMode  # default capture with graphs enabled (not --enforce-eager)
    capture_sizes: int  # number of batch sizes captured by default
    max_capture_size: int
    graphs_in_budget: bool  # with gardenctl's VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1
    nccl_outside_budget: bool  # NCCL buffers created before the memory snapshot
    default_max_num_seqs: int  # serve default on an H100-class GPU
    # Serve default on an H100-class GPU; None: V0's max(max_model_len, 2048) (chunked prefill
    # off), 2048 above 32K tokens (V0 turns chunked prefill on there).
    default_max_num_batched_tokens: int | None
    default_gpu_memory_utilization: float
    kv_cache_memory_bytes: bool  # --kv-cache-memory-bytes exists
    startup_free_check: bool  # free memory >= ceil(T x F) checked before loading
    sources: tuple[str, ...]  # where each of the above was read (links to vLLM source)
    unread: str = ""  # what of this range could not be read (taken from the nearest one)

    @property
    def graph_factor(self) -> float:
        """Graphs captured per layer, relative to the 0.19 list the constants were fitted on."""
        return self.capture_sizes / REFERENCE_CAPTURE_SIZES

    @property
    def newest_label(self) -> str:
        return ".".join(str(n) for n in self.newest)


_THROUGH_0_17: tuple[ReleaseTraits, ...] = (
    ReleaseTraits(
        label="0.6-0.7",
        first=(0, 6, 0),
        newest=(0, 7, 3),
        engine="V0",
        graph_mode="full",
        capture_sizes=35,  # [1, 2, 4] + 8..256 step 8, capped at max_num_seqs 256
        max_capture_size=256,
        graphs_in_budget=False,
        nccl_outside_budget=False,
        default_max_num_seqs=256,
        default_max_num_batched_tokens=None,
        default_gpu_memory_utilization=0.9,
        kv_cache_memory_bytes=False,
        startup_free_check=False,
        sources=(
            f"{_GH}/v0.10.2/vllm/worker/worker.py#L274 (V0 profile run, last V0 release)",
            f"{_GH}/v0.10.2/vllm/worker/model_runner.py#L1083 (V0 dummy sampler / capture)",
        ),
        unread="0.6/0.7 wheels were not read: V0 as read in 0.10.2; V0 defaults not verified",
    ),
    ReleaseTraits(
        label="0.8-0.10",
        first=(0, 8, 0),
        newest=(0, 10, 2),
        engine="V1",
        graph_mode="piecewise",
        capture_sizes=67,  # [1, 2, 4] + 8..512 step 8
        max_capture_size=512,
        graphs_in_budget=False,
        nccl_outside_budget=False,
        default_max_num_seqs=1024,
        default_max_num_batched_tokens=8192,
        default_gpu_memory_utilization=0.9,
        kv_cache_memory_bytes=False,  # from 0.10.2; not used by the estimate
        startup_free_check=True,  # from 0.9.1
        sources=(
            f"{_GH}/v0.8.2/vllm/envs.py#L506 (V1 default)",
            f"{_GH}/v0.8.2/vllm/v1/worker/gpu_model_runner.py#L1186 (capture sizes, profile run)",
            f"{_GH}/v0.10.2/vllm/v1/worker/gpu_worker.py#L175 (snapshot before NCCL init)",
        ),
        unread="serve defaults (max_num_seqs / max_num_batched_tokens) not read: as 0.19",
    ),
    ReleaseTraits(
        label="0.11-0.17",
        first=(0, 11, 0),
        newest=(0, 17, 0),
        engine="V1",
        graph_mode="full_and_piecewise",
        capture_sizes=51,
        max_capture_size=512,
        graphs_in_budget=False,
        nccl_outside_budget=True,
        default_max_num_seqs=1024,
        default_max_num_batched_tokens=8192,
        default_gpu_memory_utilization=0.9,
        kv_cache_memory_bytes=True,
        startup_free_check=True,
        sources=(
            f"{_GH}/v0.11.0/vllm/v1/worker/gpu_worker.py#L165 (NCCL before the snapshot)",
            f"{_GH}/v0.11.0/vllm/v1/worker/gpu_model_runner.py#L2653 (graph capture)",
        ),
        unread="capture list of 0.11-0.17 not read: taken as 0.19's (51 sizes)",
    ),
)
# The V1 ranges from 0.18 differ from 0.11-0.17 (the last entry above) only as written here.
_V1_018 = replace(
    _THROUGH_0_17[-1],
    label="0.18-0.19",
    first=(0, 18, 0),
    newest=(0, 19, 1),
    graphs_in_budget=True,  # opt-in variable (default 0), set to 1 by gardenctl
    sources=(
        f"{_GH}/v0.18.0/vllm/envs.py#L1635 (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS)",
        f"{_GH}/v0.19.1/vllm/config/cache.py#L41 (F default 0.9)",
    ),
    unread="",
)
_V1_020 = replace(
    _V1_018,
    label="0.20-0.27",
    first=(0, 20, 0),
    newest=(0, 27, 0),
    default_gpu_memory_utilization=0.92,
    sources=(
        f"{_GH}/v0.20.0/vllm/envs.py#L1724 (graph estimate on by default)",
        f"{_GH}/v0.20.0/vllm/config/cache.py#L66 (F default 0.92)",
    ),
)
_V1_028 = replace(
    _V1_020,
    label="0.28-0.32",
    first=(0, 28, 0),
    newest=(0, 32, 0),
    # default_max_num_batched_tokens: 16384 on GPUs >= 160 GiB (not modelled)
    sources=(
        f"{_GH}/v0.32.0/vllm/v1/worker/gpu_worker.py#L700 (graph estimate inside F)",
        f"{_GH}/v0.32.0/vllm/engine/arg_utils.py#L2923 (serve defaults by GPU)",
        f"{_GH}/v0.32.0/vllm/v1/worker/gpu_model_runner.py#L6475 (graph estimate)",
    ),
)
RELEASES: tuple[ReleaseTraits, ...] = (*_THROUGH_0_17, _V1_018, _V1_020, _V1_028)
NEWEST = RELEASES[-1]


def parse_version(text: str) -> Version:
    """(major, minor, patch) of a vLLM version such as 0.19.1, 0.7.1.dev12 or v0.32.0+cu128.

    Raises GardenError naming the expected form when ``text`` is not a version."""
    match = _VERSION.match(text or "")
    if not match:
        raise GardenError(f"not a vLLM version: {text!r}; expected {VERSION_FORM}")
    major, minor, patch = match.group(1), match.group(2), match.group(3)
    return int(major), int(minor), int(patch or 0)


def traits_for(version: str | None) -> tuple[ReleaseTraits, bool, str]:
    """(traits, assumed, note): the modelled range ``version`` falls in.

    ``assumed`` is True when the version was not given, not understood or outside every
    modelled range; ``note`` then says what was assumed and why (for the estimate's warnings)."""
    if version is None:
        return (
            NEWEST,
            True,
            f"assumed vLLM {NEWEST.newest_label} (the newest modelled release): the release "
            "vllm_command runs was neither declared nor detected; set defaults.vllm_version "
            "(or the model's vllm_version) or pass --vllm-version",
        )
    parsed = parse_version(version)
    if parsed < RELEASES[0].first:
        oldest = RELEASES[0]
        return (
            oldest,
            True,
            f"vLLM {version} is older than every modelled release: estimated as "
            f"{oldest.label}, the oldest modelled range",
        )
    chosen = RELEASES[0]
    for traits in RELEASES:
        if parsed >= traits.first:
            chosen = traits
    if parsed > NEWEST.newest and (parsed[0], parsed[1]) != NEWEST.newest[:2]:
        return (
            NEWEST,
            True,
            f"vLLM {version} is newer than the newest modelled release "
            f"{NEWEST.newest_label}: estimated as {NEWEST.label}",
        )
    return chosen, False, ""


def describe(traits: ReleaseTraits) -> str:
    """One line for the estimate's text output."""
    graphs = "inside" if traits.graphs_in_budget else "OUTSIDE"
    return (
        f"vLLM {traits.label}: engine {traits.engine}, {traits.graph_mode} CUDA graphs "
        f"({traits.capture_sizes} sizes up to {traits.max_capture_size}) {graphs} the "
        f"--gpu-memory-utilization budget"
    )
