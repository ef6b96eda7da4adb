"""Recognise why a vLLM worker failed from the end of its log, and say what to do.

Pure: text in, Diagnosis out. Messages checked against vLLM 0.32 (docs/vllm.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gardenctl.vocab import Cause

OOM = Cause.OUT_OF_MEMORY
KV_CACHE_TOO_SMALL = Cause.KV_CACHE_TOO_SMALL
NO_CACHE_BLOCKS = Cause.NO_CACHE_BLOCKS
PORT_IN_USE = Cause.PORT_IN_USE
MODEL_NOT_FOUND = Cause.MODEL_NOT_FOUND
FREE_MEMORY_CHECK = Cause.FREE_MEMORY_CHECK
PROFILING_RACE = Cause.PROFILING_RACE
UNRECOGNISED_FLAG = Cause.UNRECOGNISED_FLAG
ENGINE_DEAD = Cause.ENGINE_DEAD
UNKNOWN = Cause.UNKNOWN


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    message: str  # one line, for people
    hint: str = ""
    suggested_max_model_len: int | None = None


_KV_TOO_SMALL = re.compile(
    r"max seq len \((\d+)\).*?\(([\d.]+) GiB KV cache is needed.*?available KV cache memory "
    r"\(([\d.]+) GiB\).*?estimated maximum model length is (\d+)", re.S)
_FREE_MEMORY = re.compile(r"Free memory on device \S+ \(([\d.]+)/([\d.]+) GiB\) on startup is "
                          r"less than desired GPU memory utilization \(([\d.]+), ([\d.]+) GiB\)")
_UNRECOGNISED = re.compile(r"unrecognized arguments: (.+)")


def diagnose(log_tail: str) -> Diagnosis:
    """The most specific known cause found in the log tail (last lines of the worker's log)."""
    match = _KV_TOO_SMALL.search(log_tail)
    if match:
        length, needed, available, suggested = match.groups()
        return Diagnosis(
            KV_CACHE_TOO_SMALL,
            f"the KV cache cannot hold one sequence of max_model_len {length}: {needed} GiB "
            f"needed, {available} GiB available",
            hint=f"vLLM suggests max_model_len {suggested}; or raise the worker's memory "
            "(min_concurrency is already satisfied only if this fits)",
            suggested_max_model_len=int(suggested),
        )
    if "No available memory for the cache blocks" in log_tail:
        return Diagnosis(NO_CACHE_BLOCKS,
                         "no memory left for the KV cache after weights and activations",
                         hint="the model needs a larger share of the GPU; check its estimate "
                         "with `gardenctl estimate`")
    match = _FREE_MEMORY.search(log_tail)
    if match:
        free, total, utilization, wanted = match.groups()
        return Diagnosis(FREE_MEMORY_CHECK,
                         f"vLLM's start-up check failed: {free}/{total} GiB free, "
                         f"{wanted} GiB wanted (utilization {utilization})",
                         hint="another process took GPU memory; see `gardenctl inventory`")
    if "Error in memory profiling" in log_tail:
        return Diagnosis(PROFILING_RACE,
                         "memory profiling was disturbed by another process on the GPU",
                         hint="another worker started or stopped on the same GPU meanwhile")
    if re.search(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory", log_tail):
        return Diagnosis(OOM, "CUDA out of memory",
                         hint="the estimate was too low for this model; raise safety_margin "
                         "or set gpu_memory_utilization for it")
    if "address already in use" in log_tail.lower():
        return Diagnosis(PORT_IN_USE, "its port is already in use by another process",
                         hint="choose another port or stop the other process")
    if re.search(r"Repository Not Found|is not a local folder and is not a valid model "
                 r"identifier|does not appear to have a file named config\.json|401 Client Error",
                 log_tail):
        return Diagnosis(MODEL_NOT_FOUND, "the model could not be found or downloaded",
                         hint="check `model:` and `revision:`, and HF_TOKEN for gated models")
    match = _UNRECOGNISED.search(log_tail)
    if match:
        return Diagnosis(UNRECOGNISED_FLAG, f"vLLM does not know {match.group(1).strip()}",
                         hint="remove it from args, or point vllm_command at a newer vLLM")
    if re.search(r"EngineDeadError|Engine core .*died|EngineCore encountered", log_tail):
        return Diagnosis(ENGINE_DEAD, "vLLM's engine died while serving",
                         hint="read the worker's log (`gardenctl logs WORKER`) for what killed "
                         "the engine")
    last = next((line.strip() for line in reversed(log_tail.splitlines()) if line.strip()), "")
    return Diagnosis(UNKNOWN, last[:300] or "no output")
