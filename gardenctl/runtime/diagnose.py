"""Recognise why a vLLM start failed from the whole log of that start, and say what to do.

Pure: text in, Diagnosis out. vLLM prints the root cause first (a ValueError, a Hub error, a
CUDA OOM...), then the tracebacks of several processes, then a generic error ("Engine core
initialization failed. See root cause above"), so the whole log of one start is read (the
caller bounds it) and the most specific cause found anywhere wins over the generic ones.
Warning lines, traceback frames, URLs and pydantic's "For further information visit" lines are
never reported as a cause. Messages are the ones of docs/vllm.md section 10; the tests replay
real failure logs quoted in public vLLM issues (tests/data/vllm-failures/README.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

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

NO_ERROR_MESSAGE = "exited without a recognised error (see its log: `gardenctl logs WORKER`)"
EVIDENCE_CHARS = 300
_BACKTRACK_LINES = 120  # how far above an OOM line its traceback frames are looked for


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    message: str  # one line, for people, with the log's numbers
    hint: str = ""  # the fix, in garden.yaml terms
    evidence: str = ""  # the log line the cause was read from (prefixes removed, <= 300 chars)
    suggested_max_model_len: int | None = None  # KV too small: vLLM's estimated maximum length
    kv_needed_bytes: int | None = None  # KV too small: needed for one max_model_len sequence
    kv_available_bytes: int | None = None  # KV too small / no cache blocks: what was available
    requested_bytes: int | None = None  # free-memory check: utilization x total vLLM wanted
    free_bytes: int | None = None  # free-memory check / OOM: free memory the log states
    total_bytes: int | None = None  # GPU total the log states
    tried_to_allocate_bytes: int | None = None  # CUDA OOM: "Tried to allocate X"
    during: str = ""  # OOM: "loading" | "sampler" | "profiling" | "graphs" | "kv_cache" | ""
    model_limit: int | None = None  # max_model_len too long: the derived limit in the message
    max_model_len: int | None = None  # the max_model_len the log says was asked for
    utilization: float | None = None  # free-memory check: the gpu_memory_utilization asked for
    sampler_requests: int | None = None  # sampler OOM: dummy requests warmed up (= max_num_seqs)
    tensor_parallel_size: int | None = None  # TP not divisible: the size asked for
    attention_heads: int | None = None  # TP not divisible: the model's count in the message
    architecture: str = ""  # architecture unsupported: the name(s) in the message
    flags: str = ""  # unrecognised flag: what vLLM did not know
    port: int | None = None  # port in use: the port in the message, where it says one

    def facts(self) -> dict[str, int | float | str]:
        """The numbers read from the log, for the record of the run (gardenctl.lessons
        learns from them): every field that is set, besides the texts for people."""
        texts = {"cause", "message", "hint", "evidence"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in texts and getattr(self, f.name) not in (None, "")}


# --- reading lines -------------------------------------------------------------------------

_PREFIXES = (
    re.compile(r"^\[\d{4}-\d\d-\d\dT[\d:.]+Z?\]\s*"),  # CI timestamps ([2025-03-10T15:07:20Z])
    re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:.,]+\S*\s*(\|\s*)?"),  # docker/compose timestamps
    re.compile(r"^[\w.-]+\s+\|\s"),  # docker compose service tag (vllm-1  | ...)
    re.compile(r"^\s*\|\s"),  # a stray table bar from a copied console
    re.compile(r"^\((?:[^()]*\bpid=\d+[^()]*)\)\s*"),  # (EngineCore_DP0 pid=1), (APIServer pid=1)
    re.compile(r"^\[rank\d+\]:\s?"),  # torch.distributed rank prefix
    re.compile(r"^(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+"
               r"(?:\[[^\]]*\]\s?|\S+:\d+\]\s?)"),  # vLLM's logger (both formats)
    re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+"),  # uvicorn's logger
    re.compile(r"^\[[\w.]+:\d+\]\s+"),  # a logger's [file.py:N] left after a cut prefix
)
_WARNING = re.compile(r"^(?:WARNING|WARN)\b|^\S*Warning:|warnings\.warn\(|UserWarning|"
                      r"FutureWarning|DeprecationWarning|RuntimeWarning|resource_tracker:")
_FRAME = re.compile(r"^\s*(?:File \"|Traceback \(most recent call last\)|\^+\s*$|~+\^*~*\s*$|"
                    r"\.\.\.<\d+ lines>\.\.\.|The above exception was the direct cause|"
                    r"During handling of the above exception|raise |return |self\.|await |f?[\"'])")
_URL_ONLY = re.compile(r"^\s*(?:<?https?://\S+>?|\(?https?://\S+\)?\.?)\s*$")
_PYDANTIC_FOOTER = re.compile(r"For further information visit")


@dataclass(frozen=True)
class _Line:
    index: int
    raw: str
    text: str  # prefixes removed, stripped
    warning: bool


def _strip_prefixes(line: str) -> tuple[str, bool]:
    """The line without its process/logger prefixes, and whether it was logged as a warning."""
    text = line.strip()
    warning = False
    for _ in range(6):
        before = text
        for prefix in _PREFIXES:
            match = prefix.match(text)
            if match:
                if match.group(0).lstrip().startswith(("WARNING", "WARN")):
                    warning = True
                text = text[match.end():].strip()
        if text == before:
            break
    return text, warning


def _lines(text: str) -> list[_Line]:
    out = []
    for index, raw in enumerate(text.splitlines()):
        stripped, warning = _strip_prefixes(raw)
        out.append(_Line(index, raw, stripped, warning or bool(_WARNING.search(stripped))))
    return out


def _is_noise(line: _Line) -> bool:
    """A line that may never be reported as a cause."""
    return (not line.text or line.warning or bool(_FRAME.match(line.text))
            or bool(_URL_ONLY.match(line.text)) or bool(_PYDANTIC_FOOTER.search(line.text)))


def _evidence(line: _Line) -> str:
    return line.text[:EVIDENCE_CHARS]


_UNITS = {"B": 1, "BYTES": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def _bytes(number: str, unit: str) -> int:
    """vLLM writes GiB figures as "GB" up to 0.8.2 (its GB meant GiB): both are binary."""
    factor = _UNITS[unit.upper()]
    if unit.upper() in ("GB", "MB", "KB", "TB"):
        factor = _UNITS[unit.upper()[0] + "IB"]
    return round(float(number) * factor)


# --- rules ---------------------------------------------------------------------------------

Rule = Callable[[list[_Line], int, "re.Match[str]"], Diagnosis]

_KV_TOO_SMALL = re.compile(
    r"max seq len \((\d+)\),?\s*\(?([\d.]+) (GiB|GB) KV cache is needed,? which is larger than "
    r"the available KV cache memory \(([\d.]+) (GiB|GB)\)\.?"
    r"(?:\s*Based on the available memory,\s*the estimated maximum model length is (\d+))?")
_KV_TOO_SMALL_V0 = re.compile(
    r"The model's max seq len \((\d+)\) is larger than the maximum number of tokens that can be "
    r"stored in KV cache \((\d+)\)")
_NO_CACHE_BLOCKS = re.compile(r"No available memory for the cache blocks")
_FREE_MEMORY = re.compile(
    r"Free memory on device\s*(\S*)\s*\(([\d.]+)/([\d.]+) GiB\) on startup is less than desired "
    r"GPU memory utilization \(([\d.]+), ([\d.]+) GiB\)")
_PROFILING_RACE = re.compile(r"Error in memory profiling")
_SAMPLER_OOM = re.compile(r"CUDA out of memory occurred when warming up sampler"
                          r"(?: with (\d+) dummy requests)?")
_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|"
                  r"HIP out of memory")
_OOM_NUMBERS = re.compile(
    r"Tried to allocate ([\d.]+) (\w+)\.? (?:\(GPU \d+; ([\d.]+) (\w+) total capacity; .*?"
    r"([\d.]+) (\w+) free|GPU \d+ has a total capac?ity of ([\d.]+) (\w+) of which "
    r"([\d.]+) (\w+) is free)?")
_MAX_LEN = re.compile(
    r"User-specified max_model_len \((\d+)\) is greater than the derived max_model_len "
    r"\((\w+)=([\d.]+)")
_MAX_LEN_LOOSE = re.compile(r"max_model_len \((\d+)\) is greater than the derived max_model_len"
                            r"(?:[^\d]+([\d.]+))?")
_TP_HEADS = re.compile(r"Total number of (attention|key[- ]value|KV) heads \((\d+)\) must be "
                       r"divisible by tensor parallel size \((\d+)\)")
_ARCH = re.compile(r"Model architectures? (\[[^\]]*\]|'[^']*') (?:are|is) not supported")
_ARCH_INSPECT = re.compile(r"Model architectures? (\[[^\]]*\]) failed to be inspected")
_ARCH_TRANSFORMERS = re.compile(
    r"model type [`']([\w.-]+)[`'] but Transformers does not recognize this architecture")
_HUB_UNREACHABLE = re.compile(
    r"We couldn't connect to '?https?://huggingface\.co|LocalEntryNotFoundError|"
    r"OfflineModeIsEnabled|cannot find the requested files in the local cache|"
    r"Failed to resolve '?huggingface\.co|Max retries exceeded with url.*huggingface|"
    r"Cannot find an appropriate cached snapshot folder|"
    r"outgoing traffic has been disabled")
_NOT_FOUND = re.compile(
    r"Repository Not Found|RepositoryNotFoundError|RevisionNotFoundError|"
    r"Invalid repository ID or local directory|is not a local folder and is not a valid model "
    r"identifier|does not appear to have a file named config\.json|"
    r"Repo id must (?:be in the form|use alphanumeric)|Invalid rev id|"
    r"No such file or directory: '[^']*config\.json'")
# Certain signs of a gated repository (checked before "not found", which often follows them),
# and a bare 401/403 (checked after: the Hub answers 401 for a repository that does not exist
# too, and every not-found message says "If you are trying to access a private or gated repo").
_GATED = re.compile(
    r"GatedRepoError|Cannot access gated repo|Access to model \S+ is restricted|"
    r"You are trying to access a gated repo|is gated\. You must be authenticated")
_REFUSED = re.compile(r"\b401 Client Error|\b403 Client Error")
_UNRECOGNISED = re.compile(r"error: unrecognized arguments: (.+)")
_PORT_BIND = re.compile(r"error while attempting to bind on address \(([^)]*)\): "
                        r"\[?(?:Errno 98\]?\s*)?address already in use", re.I)
_PORT = re.compile(r"\[Errno 98\] Address already in use|address already in use|EADDRINUSE",
                   re.I)
_ENGINE_DEAD = re.compile(r"EngineDeadError|Engine core proc \S+ died unexpectedly|"
                          r"EngineCore encountered (?:a fatal|an issue)")
_GENERIC = re.compile(
    r"Engine core initialization failed|EngineCore failed to start|WorkerProc hit an exception|"
    r"WorkerProc failed to start|Call to collective_rpc method failed|"
    r"Worker proc \S+ died unexpectedly|Failed core proc")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Exit)\b(?:\([^)]*\))?:\s*\S")


def _kv_too_small(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    length, needed, needed_unit, available, available_unit, suggested = match.groups()
    needed_b, available_b = _bytes(needed, needed_unit), _bytes(available, available_unit)
    estimate = (f"; vLLM estimates the longest that fits at {suggested}" if suggested else "")
    fix = (f"set max_model_len to {suggested} or less" if suggested
           else "lower max_model_len")
    return Diagnosis(
        KV_CACHE_TOO_SMALL,
        f"the KV cache cannot hold one sequence of max_model_len {length}: {needed} GiB needed, "
        f"{available} GiB available{estimate}",
        hint=f"{fix}, or give the worker more memory (raise gpu_memory_utilization, or "
        "tensor_parallel_size); min_concurrency sequences of max_model_len must fit",
        evidence=_evidence(lines[at]),
        suggested_max_model_len=int(suggested) if suggested else None,
        kv_needed_bytes=needed_b, kv_available_bytes=available_b, max_model_len=int(length))


def _kv_too_small_v0(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    length, tokens = match.groups()
    return Diagnosis(
        KV_CACHE_TOO_SMALL,
        f"the KV cache holds {tokens} tokens, less than one sequence of max_model_len {length}",
        hint=f"set max_model_len to {tokens} or less, or give the worker more memory (raise "
        "gpu_memory_utilization, or tensor_parallel_size)",
        evidence=_evidence(lines[at]), suggested_max_model_len=int(tokens),
        max_model_len=int(length))


def _no_cache_blocks(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    return Diagnosis(
        NO_CACHE_BLOCKS,
        "no memory left for the KV cache after the weights and the profile run's activations",
        hint="the worker's share is too small for this model: raise gpu_memory_utilization "
        "(or let gardenctl size it: gpu_memory_utilization: auto), lower max_num_seqs or "
        "max_num_batched_tokens, or raise tensor_parallel_size; see `gardenctl estimate`",
        evidence=_evidence(lines[at]))


def _free_memory(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    device, free, total, utilization, wanted = match.groups()
    where = f" on {device}" if device else ""
    return Diagnosis(
        FREE_MEMORY_CHECK,
        f"vLLM's start-up check failed{where}: {free}/{total} GiB free, {wanted} GiB wanted "
        f"(gpu_memory_utilization {utilization})",
        hint="something else holds memory on that GPU (see `gardenctl inventory`): free it, "
        "declare it as the GPU's `used:` in the inventory, or lower gpu_memory_utilization",
        evidence=_evidence(lines[at]), requested_bytes=_bytes(wanted, "GiB"),
        free_bytes=_bytes(free, "GiB"), total_bytes=_bytes(total, "GiB"),
        utilization=float(utilization))


def _profiling_race(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    return Diagnosis(
        PROFILING_RACE,
        "memory profiling was disturbed by another process on the GPU",
        hint="another worker started or stopped on the same GPU meanwhile; gardenctl retries; "
        "if it repeats, look for processes outside the garden (`gardenctl inventory`)",
        evidence=_evidence(lines[at]))


def _sampler_oom(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    requests = match.group(1)
    numbers = _oom_numbers(lines, at)
    with_requests = f" with {requests} dummy requests" if requests else ""
    return Diagnosis(
        Cause.SAMPLER_OUT_OF_MEMORY,
        f"CUDA out of memory while warming up the sampler{with_requests}",
        hint=(f"lower max_num_seqs (it was {requests}; it must stay >= min_concurrency)"
              if requests else "lower max_num_seqs (it must stay >= min_concurrency)")
        + ", or lower gpu_memory_utilization to leave the sampler room outside the budget",
        evidence=_evidence(lines[at]), during="sampler",
        sampler_requests=int(requests) if requests else None,
        tried_to_allocate_bytes=numbers.tried, free_bytes=numbers.free, total_bytes=numbers.total)


@dataclass(frozen=True)
class _OomFigures:
    tried: int | None = None
    free: int | None = None
    total: int | None = None
    text: str = ""  # the figures as the log writes them


def _oom_numbers(lines: list[_Line], at: int) -> _OomFigures:
    """The torch OOM figures of the line at ``at``, or of the nearest OOM line above it."""
    for line in (lines[i] for i in range(at, max(-1, at - _BACKTRACK_LINES), -1)):
        match = _OOM_NUMBERS.search(line.text)
        if match:
            tried, tried_unit, total_a, total_a_unit, free_a, free_a_unit, total_b, \
                total_b_unit, free_b, free_b_unit = match.groups()
            total = (total_a, total_a_unit) if total_a else (total_b, total_b_unit)
            free = (free_a, free_a_unit) if free_a else (free_b, free_b_unit)
            text = f": tried to allocate {tried} {tried_unit}"
            if free[0] and total[0]:
                text += f", {free[0]} {free[1]} free of {total[0]} {total[1]}"
            return _OomFigures(tried=_bytes(tried, tried_unit),
                               free=_bytes(*free) if free[0] else None,
                               total=_bytes(*total) if total[0] else None, text=text)
    return _OomFigures()


_DURING = (
    ("sampler", re.compile(r"_dummy_sampler_run|warming up sampler|sampler warm|"
                           r"[/.]sampler\.py|\bsampler\(|self\.sampler\b")),
    ("graphs", re.compile(r"capture_model|cuda_graph|CUDAGraph|Capturing CUDA graph|"
                          r"graph_capture")),
    ("kv_cache", re.compile(r"initialize_kv_cache|_allocate_kv_cache|init_kv_cache|"
                            r"initialize_from_config|_init_cache_engine|CacheEngine")),
    ("profiling", re.compile(r"profile_run|determine_available_memory|determine_num_available"
                             r"_blocks|_dummy_run|profile\(")),
    ("loading", re.compile(r"load_model|load_weights|get_model\(|create_weights|model_loader|"
                           r"weight_loader|initialize_model|Loading weights|Loading model|"
                           r"Failed to create \w+ linear weights")),
)


def _during(lines: list[_Line], at: int) -> str:
    """Where start-up was when the OOM at ``at`` happened: the innermost recognised traceback
    frame above it (frames run outer to inner), else the OOM line itself."""
    for pattern_name, pattern in _DURING:
        if pattern.search(lines[at].text):
            return pattern_name
    for i in range(at - 1, max(-1, at - _BACKTRACK_LINES), -1):
        text = lines[i].text
        for name, pattern in _DURING:
            if pattern.search(text):
                return name
        if text.startswith("Traceback (most recent call last)"):
            break
    return ""


def _oom(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    numbers = _oom_numbers(lines, at)
    during = _during(lines, at)
    # a wrapped sampler OOM: the RuntimeError below the torch error says so
    for line in lines[at + 1:at + _BACKTRACK_LINES]:
        wrapped = _SAMPLER_OOM.search(line.text)
        if wrapped and not _is_noise(line):
            return _sampler_oom(lines, line.index, wrapped)
    if during == "sampler":
        return Diagnosis(
            Cause.SAMPLER_OUT_OF_MEMORY,
            "CUDA out of memory while warming up the sampler" + _oom_figures(numbers),
            hint="lower max_num_seqs (it must stay >= min_concurrency), or lower "
            "gpu_memory_utilization to leave the sampler room outside the budget",
            evidence=_evidence(lines[at]), during="sampler", tried_to_allocate_bytes=numbers.tried,
            free_bytes=numbers.free, total_bytes=numbers.total)
    where = {"loading": " while loading the weights", "profiling": " during the profile run",
             "graphs": " while capturing CUDA graphs",
             "kv_cache": " while allocating the KV cache"}.get(during, "")
    hint = {
        "loading": "the weights do not fit in the worker's GPUs: raise tensor_parallel_size, "
        "use a quantized model (quantization) or a smaller dtype, or free the GPU",
        "graphs": "set enforce_eager: true, or lower gpu_memory_utilization to leave room for "
        "CUDA graphs outside the budget",
        "profiling": "lower max_num_batched_tokens or max_num_seqs, or raise "
        "tensor_parallel_size",
    }.get(during, "the estimate was too low for this model: raise safety_margin, or set "
              "gpu_memory_utilization for it; check `gardenctl inventory` for other processes")
    return Diagnosis(OOM, f"CUDA out of memory{where}" + _oom_figures(numbers), hint=hint,
                     evidence=_evidence(lines[at]), during=during,
                     tried_to_allocate_bytes=numbers.tried, free_bytes=numbers.free,
                     total_bytes=numbers.total)


def _oom_figures(numbers: _OomFigures) -> str:
    return numbers.text


def _max_len(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    asked, key, limit = match.groups()
    limit_int = int(float(limit))
    source = f" ({key} in its config.json)" if key != "None" else ""
    return Diagnosis(
        Cause.MAX_MODEL_LEN_TOO_LONG,
        f"max_model_len {asked} is above the model's limit of {limit_int}{source}",
        hint=f"set max_model_len to {limit_int} or less (or leave it unset)",
        evidence=_evidence(lines[at]), model_limit=limit_int, max_model_len=int(asked))


def _max_len_loose(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    asked, limit = match.groups()
    limit_int = int(float(limit)) if limit else None
    of = f" of {limit_int}" if limit_int else ""
    return Diagnosis(
        Cause.MAX_MODEL_LEN_TOO_LONG,
        f"max_model_len {asked} is above the model's limit{of}",
        hint=(f"set max_model_len to {limit_int} or less" if limit_int
              else "lower max_model_len") + " (or leave it unset)",
        evidence=_evidence(lines[at]), model_limit=limit_int, max_model_len=int(asked))


def _tp_heads(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    kind, heads, size = match.groups()
    count, tp = int(heads), int(size)
    fits = [d for d in range(1, 17) if count % d == 0]
    kind_text = "attention" if kind == "attention" else "KV"
    return Diagnosis(
        Cause.TP_NOT_DIVISIBLE,
        f"tensor_parallel_size {tp} does not divide the model's {count} {kind_text} heads",
        hint="set tensor_parallel_size to one that divides it: "
        + ", ".join(str(d) for d in fits),
        evidence=_evidence(lines[at]), tensor_parallel_size=tp, attention_heads=count)


def _quoted_names(match: re.Match[str]) -> str:
    """The architecture names a message quotes (['A', 'B'] -> "A, B"), else its text."""
    return ", ".join(re.findall(r"'([^']+)'", match.group(1))) or match.group(1)


def _architecture(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    names = _quoted_names(match)
    return Diagnosis(
        Cause.ARCHITECTURE_UNSUPPORTED,
        f"the installed vLLM does not support the model's architecture {names}",
        hint="point vllm_command at a vLLM release that supports it (or pin vllm_version), or "
        "choose another model; trust_remote_code with a pinned revision for custom code",
        evidence=_evidence(lines[at]), architecture=names)


def _architecture_inspect(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    names = _quoted_names(match)
    return Diagnosis(
        Cause.ARCHITECTURE_UNSUPPORTED,
        f"vLLM could not load the model class for {names} (its import failed; the log shows why)",
        hint="point vllm_command at a working vLLM install for this model (a broken or "
        "mismatched torch/flash-attn/transformers is the usual reason)",
        evidence=_evidence(lines[at]), architecture=names)


def _architecture_transformers(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    kind = match.group(1)
    return Diagnosis(
        Cause.ARCHITECTURE_UNSUPPORTED,
        f"the installed transformers does not know model type {kind}",
        hint="point vllm_command at an environment with a newer vLLM/transformers (or pin "
        "vllm_version), or choose another model",
        evidence=_evidence(lines[at]), architecture=kind)


def _hub_unreachable(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    offline = " (offline mode is on)" if re.search(r"offline mode is enabled|HF_HUB_OFFLINE",
                                                     lines[at].text) else ""
    return Diagnosis(
        Cause.HUB_UNREACHABLE,
        f"the Hugging Face Hub could not be reached and the model is not in the local "
        f"cache{offline}",
        hint="download the model where the Hub is reachable (or on this node with network), "
        "then keep env HF_HUB_OFFLINE=1 with the same HF_HOME; or set `model:` to a local "
        "folder; check revision: matches what is cached",
        evidence=_evidence(lines[at]))


def _not_found(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    return Diagnosis(
        MODEL_NOT_FOUND,
        "the model could not be found: " + _short_error(lines[at].text),
        hint="check `model:` (a Hugging Face id or an existing local folder with config.json) "
        "and `revision:`; a private repo also needs env HF_TOKEN",
        evidence=_evidence(lines[at]))


def _gated(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    repo = _gated_repo(lines, at)
    status = re.search(r"\b(401|403)\b", " ".join(line.text for line in lines[at:at + 6]))
    code = f" ({status.group(1)})" if status else ""
    return Diagnosis(
        Cause.GATED_MODEL,
        f"access to the gated model{' ' + repo if repo else ''} was refused{code}",
        hint="accept the model's licence on huggingface.co with your account, then give the "
        "worker a token: env HF_TOKEN in garden.yaml (or in gardenctl's environment)",
        evidence=_evidence(lines[at]))


def _gated_repo(lines: list[_Line], at: int) -> str:
    for line in lines[max(0, at - 3):at + 8]:
        match = (re.search(r"Access to model (\S+) is restricted", line.text)
                 or re.search(r"Repo model (\S+) is gated", line.text)
                 or re.search(r"huggingface\.co/([\w.-]+/[\w.-]+?)(?:/resolve|/api|\.?$|\s)",
                              line.text))
        if match:
            return match.group(1).rstrip(".")
    return ""


def _unrecognised(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    flags = match.group(1).strip()
    return Diagnosis(
        UNRECOGNISED_FLAG, f"vLLM does not know {flags}",
        hint="remove it from args, or point vllm_command at a vLLM release that has it",
        evidence=_evidence(lines[at]), flags=flags)


def _port_bind(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    address = match.group(1)
    port_match = re.search(r"(\d+)\s*$", address)
    port = int(port_match.group(1)) if port_match else None
    return Diagnosis(
        PORT_IN_USE, f"port {port} is already in use by another process" if port
        else "its port is already in use by another process",
        hint="set another port: for the model (or base_port), or stop the other process",
        evidence=_evidence(lines[at]), port=port)


def _port(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    return Diagnosis(
        PORT_IN_USE, "its port is already in use by another process",
        hint="set another port: for the model (or base_port), or stop the other process",
        evidence=_evidence(lines[at]))


def _engine_dead(lines: list[_Line], at: int, match: re.Match[str]) -> Diagnosis:
    return Diagnosis(
        ENGINE_DEAD, "vLLM's engine died while serving",
        hint="read the worker's log (`gardenctl logs WORKER --previous`) for what killed the "
        "engine", evidence=_evidence(lines[at]))


# Most specific first: the first rule that matches a line anywhere in the log decides; within a
# rule the first line matching (vLLM prints the root cause before the processes' tracebacks).
_RULES: Sequence[tuple[re.Pattern[str], Rule]] = (
    (_KV_TOO_SMALL, _kv_too_small),
    (_KV_TOO_SMALL_V0, _kv_too_small_v0),
    (_NO_CACHE_BLOCKS, _no_cache_blocks),
    (_FREE_MEMORY, _free_memory),
    (_PROFILING_RACE, _profiling_race),
    (_SAMPLER_OOM, _sampler_oom),
    (_OOM, _oom),
    (_MAX_LEN, _max_len),
    (_MAX_LEN_LOOSE, _max_len_loose),
    (_TP_HEADS, _tp_heads),
    (_ARCH, _architecture),
    (_ARCH_TRANSFORMERS, _architecture_transformers),
    (_ARCH_INSPECT, _architecture_inspect),
    (_HUB_UNREACHABLE, _hub_unreachable),
    (_GATED, _gated),  # before not-found: a gated repo's 401 is often followed by one
    (_NOT_FOUND, _not_found),
    (_REFUSED, _gated),
    (_UNRECOGNISED, _unrecognised),
    (_PORT_BIND, _port_bind),
    (_PORT, _port),
    (_ENGINE_DEAD, _engine_dead),
)


def _short_error(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:200]


def _candidates(lines: list[_Line]) -> list[_Line]:
    return [line for line in lines if not _is_noise(line)]


# A worker's log is written by the model's own code: numbers in it are bounded before they
# become facts a later start is sized from (a byte count beyond this is not believed).
MAX_FACT_BYTES = 1 << 44  # 16 TiB
MAX_FACT_COUNT = 1 << 24


def diagnose(text: str) -> Diagnosis:
    """The most specific known cause found anywhere in the log of one start."""
    lines = _lines(text)
    candidates = _candidates(lines)
    for pattern, rule in _RULES:
        for line in candidates:
            match = pattern.search(line.text)
            if match:
                try:
                    return _bounded(rule(lines, line.index, match))
                except (ValueError, OverflowError, ArithmeticError):
                    continue  # numbers no vLLM writes: not this rule's line
    return _unknown(candidates)


def _bounded(diagnosis: Diagnosis) -> Diagnosis:
    """The diagnosis with every number it read that is out of any real range dropped."""
    changes: dict[str, Any] = {}
    for f in fields(diagnosis):
        value = getattr(diagnosis, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        limit = MAX_FACT_BYTES if f.name.endswith("_bytes") else MAX_FACT_COUNT
        if not math.isfinite(value) or value < -limit or value > limit:
            changes[f.name] = None
    return replace(diagnosis, **changes) if changes else diagnosis


def _unknown(candidates: list[_Line]) -> Diagnosis:
    errors = [line for line in candidates if _ERROR_LINE.match(line.text)]
    specific = [line for line in errors if not _GENERIC.search(line.text)]
    chosen = (specific or errors)[-1:] if errors else []
    if not chosen:
        return Diagnosis(UNKNOWN, NO_ERROR_MESSAGE,
                         hint="read the worker's log: `gardenctl logs WORKER --previous`")
    line = chosen[0]
    return Diagnosis(UNKNOWN, _short_error(line.text),
                     hint="read the worker's log: `gardenctl logs WORKER --previous`",
                     evidence=_evidence(line))
