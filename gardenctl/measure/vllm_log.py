"""Read what vLLM reported in its start-up log: pure text in, values out.

``read_startup(text)`` returns a ``StartupReport`` of the **last** start in the text: the
memory figures vLLM logged (weights, KV cache, CUDA graphs, the profile's non-KV memory),
the flags it names, its version and whether the server went on to serve. It understands the
log lines of every vLLM release from 0.7 to 0.32 (the formats, with the source of each, are in
docs/vllm.md section 9); a line it does not know is ignored, and nothing is ever refused.

How the text is read:

- **Prefixes.** A line may start with a process tag (``(EngineCore_DP0 pid=7)``,
  ``(Worker_TP1 pid=9)``, ``(APIServer pid=1)``, ``(VllmWorker rank=1 pid=9)``, V0's
  ``(RayWorkerWrapper pid=9)``), a level and time stamp (``INFO 01-31 12:00:00
  [file.py:123]`` or the older ``INFO 01-31 12:00:00 file.py:123]``), ANSI colour codes, or a
  progress bar that did not end its line. Patterns are searched anywhere in a line, so all of
  these are read alike. V0's profile is one message over several lines; each of its lines is
  read on its own.
- **Ranks.** With tensor (or data) parallelism every rank logs its own memory lines. Only rank 0
  counts: lines tagged with another rank (``Worker_TP1``, ``EngineCore_DP1``, ``EngineCore_1``,
  ``VllmWorker TP1``, ``rank=1``) and V0's other-rank workers (``RayWorkerWrapper``,
  ``VllmWorkerProcess``) are skipped, and within a start the first value of each kind wins.
- **Starts.** A restarted worker appends to the same log. A new start begins at a version
  banner (``version X.Y.Z`` in the logo, ``vLLM (API) server version X``), or, after a start
  that ended (``Application startup complete.`` or an engine start-up failure), at the next
  engine line (``Initializing ... LLM engine``, or any memory line). Values of earlier starts
  are dropped.
- **Units.** vLLM always divides by 2**30: the ``GB`` of <= 0.8.2 (``Model loading took %.4f
  GB``, ``Loading model weights took %.4f GB``) is GiB, like the ``GiB`` of later releases.
  Token counts may be comma-grouped (``126,256``).
- **Size.** Only the last ``MAX_TEXT_CHARS`` characters of a text are read (a start-up's lines
  are near the end of a worker's log); ``read_startup_file`` reads only a file's last bytes.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

GiB = 1024**3
DEFAULT_BLOCK_SIZE = 16  # tokens per KV-cache block unless the log says otherwise
MAX_TEXT_CHARS = 16 * 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 8 * 1024 * 1024

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_GIB = _NUMBER + r"\s*GiB"
# vLLM's Worker.sleep (0.32 gpu_worker.py): what the sleep freed on this rank's GPU (the
# second figure is the whole device's use, other processes included: not this worker's)
_SLEEP_NEEDLE = "Sleep mode freed"
_SLEEP_FREED = re.compile(r"Sleep mode freed " + _GIB + r" memory, " + _GIB
                          + r" memory is still in use")
_INT = r"(\d[\d,]*)"


@dataclass(frozen=True)
class StartupReport:
    """What the last start in a vLLM log reported (None: not in the log)."""

    vllm_version: str | None = None
    engine: str | None = None  # "V0" | "V1"
    model: str | None = None
    gpu_memory_utilization: float | None = None
    gpu_total_bytes: int | None = None
    tensor_parallel_size: int | None = None
    weights_bytes: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    max_concurrency: float | None = None
    cuda_graph_bytes: int | None = None
    non_kv_bytes: int | None = None
    activation_bytes: int | None = None
    non_torch_bytes: int | None = None
    ready: bool = False
    # Added beyond the first API:
    failed: bool = False  # the start ended in an engine start-up failure
    starts: int = 0  # how many starts the text held (the report is the last one's)
    gpu_blocks: int | None = None  # V0 "# GPU blocks: N"
    block_size: int | None = None  # from non-default args, when given
    cuda_graph_estimated_bytes: int | None = None  # "Estimated CUDA graph memory: X GiB total"
    init_engine_seconds: float | None = None  # "init engine (...) took X s"
    weights_seconds: float | None = None  # "Model loading took X GiB ... and Y seconds"
    sleep_freed_bytes: int | None = None  # the first sleep after this start: what it freed
    # The `non-default args: {...}` dict (0.9.1+) as logged (vLLM masks secrets); its values
    # are Python literals; an entry that is not one is left out. Empty when not logged.
    args: dict[str, object] = field(default_factory=dict)

    def derived_non_kv_bytes(
        self, utilization: float | None = None, gpu_total_bytes: int | None = None
    ) -> int | None:
        """Memory of the budget that is not KV cache.

        The profile's own figure when the log states it (DEBUG ``Total non KV cache memory``,
        V0's weights + non-torch + activation); else ``ceil(total x utilization) - KV cache``,
        with the log's own utilization and total first and the arguments as fallback. Where
        vLLM subtracted a CUDA-graph estimate from the budget (>= 0.21, or 0.18-0.20 with
        VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1) the derived figure includes that estimate.
        None when the numbers are missing.
        """
        if self.non_kv_bytes is not None:
            return self.non_kv_bytes
        util = self.gpu_memory_utilization if self.gpu_memory_utilization is not None \
            else utilization
        total = self.gpu_total_bytes if self.gpu_total_bytes is not None else gpu_total_bytes
        if util is None or total is None or self.kv_cache_bytes is None:
            return None
        return math.ceil(total * util) - self.kv_cache_bytes


def _gib(text: str) -> int:
    return round(float(text) * GiB)


def _int(text: str) -> int:
    return int(text.replace(",", ""))


class _Start:
    """The values of one start, first value of each kind kept."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.memory_seen = False
        self.ended = False
        self.ready = False
        self.failed = False
        # V0 profile parts, summed into non_kv_bytes at the end
        self.v0_weights: int | None = None

    def set(self, name: str, value: object) -> None:
        if name not in self.values:
            self.values[name] = value


# A process tag anywhere in the line; group "name" and an optional "rank".
_PROCESS = re.compile(r"\((?P<name>[A-Za-z_]\w*(?: [A-Z]{2}\d+)*)(?: rank=(?P<rank>\d+))? "
                      r"pid=\d+\)")
# TP1 / DP1 in a name (Worker_TP1, EngineCore_DP1, "VllmWorker TP1"), or 0.10's EngineCore_1
_RANK_IN_NAME = re.compile(r"(?:TP|DP)(\d+)|^EngineCore_(\d+)$")
_OTHER_RANK_PROCESSES = ("RayWorkerWrapper", "VllmWorkerProcess")

_BANNER = (
    re.compile(r"vLLM (?:API )?server version (\S+?),?(?: serving model (\S+))?\s*$"),
    re.compile(r"(?:^|[█▀▄\]]\s*)version (\d+\.\d+[\w.+-]*)\s*$"),
)
_LOGO_MODEL = re.compile(r"[█▀▄]\s+model\s+(\S+)\s*$")
_ENGINE_INIT = re.compile(
    r"Initializing an? (?:(V[01]) )?LLM engine \(v?([^)]+)\) with config: model='([^']*)'"
)
_CONFIG_TP = re.compile(r"\btensor_parallel_size=(\d+)")
_READY = "Application startup complete."
_FAILURES = (
    "Engine core initialization failed",
    "EngineCore failed to start",
    "Engine process failed to start",
)

_NON_DEFAULT = re.compile(r"non-default args: (\{.*\})")
_ARG_ITEM = re.compile(r"'(\w+)': ('(?:[^'\\]|\\.)*'|\[[^\]]*\]|-?\d+(?:\.\d+)?(?:e-?\d+)?"
                       r"|True|False|None)")
_ARG_FLOAT = {"gpu_memory_utilization": re.compile(r"'gpu_memory_utilization': ([\d.]+)")}
_ARG_INT = {
    "tensor_parallel_size": re.compile(r"'tensor_parallel_size': (\d+)"),
    "block_size": re.compile(r"'block_size': (\d+)"),
    "max_model_len": re.compile(r"'max_model_len': (\d+)"),
}
_ARG_MODEL = re.compile(r"'model': '([^']*)'")

Handler = Callable[["re.Match[str]", _Start], None]


def _weights(m: re.Match[str], s: _Start) -> None:
    s.set("weights_bytes", _gib(m.group(1)))
    if m.group(2):
        s.set("weights_seconds", float(m.group(2)))


def _v0_budget(m: re.Match[str], s: _Start) -> None:
    s.set("gpu_total_bytes", _gib(m.group(1)))
    s.set("gpu_memory_utilization", float(m.group(2)))


def _v0_weights(m: re.Match[str], s: _Start) -> None:
    s.v0_weights = s.v0_weights if s.v0_weights is not None else _gib(m.group(1))


def _free_memory(m: re.Match[str], s: _Start) -> None:
    s.set("gpu_total_bytes", _gib(m.group(2)))
    s.set("gpu_memory_utilization", float(m.group(3)))


def _blocks(m: re.Match[str], s: _Start) -> None:
    if m.group(1).upper() != "CPU":
        s.set("gpu_blocks", _int(m.group(2)))
        s.set("engine", "V0")


def _kv_tokens(m: re.Match[str], s: _Start) -> None:
    if m.group(1).upper() != "CPU":
        s.set("kv_cache_tokens", _int(m.group(2)))


def _concurrency(m: re.Match[str], s: _Start) -> None:
    s.set("max_model_len", _int(m.group(1)))
    s.set("max_concurrency", float(m.group(2)))


def _setter(name: str, convert: Callable[[str], object], engine: str | None = None) -> Handler:
    def handle(m: re.Match[str], s: _Start) -> None:
        s.set(name, convert(m.group(1)))
        if engine is not None:
            s.set("engine", engine)
    return handle


# (substring that must be in the line, pattern, handler); the substring keeps reading cheap.
_MEMORY_LINES: tuple[tuple[str, re.Pattern[str], Handler], ...] = (
    ("took", re.compile(r"(?:Model loading|Loading model weights) took " + _NUMBER
                        + r"\s*Gi?B(?: memory)?(?: and ([\d.]+) seconds)?"), _weights),
    ("total_gpu_memory", re.compile(r"total_gpu_memory \(" + _GIB + r"\) x "
                                    r"gpu_memory_utilization \(([\d.]+)\)"), _v0_budget),
    ("model weights take", re.compile(r"model weights take " + _GIB), _v0_weights),
    ("non_torch_memory takes", re.compile(r"non_torch_memory takes " + _GIB),
     _setter("non_torch_bytes", _gib)),
    ("activation peak memory takes",
     re.compile(r"PyTorch activation peak memory takes " + _GIB),
     _setter("activation_bytes", _gib)),
    ("reserved for KV Cache", re.compile(r"the rest of the memory reserved for KV Cache is "
                                         + _GIB), _setter("kv_cache_bytes", _gib)),
    ("Available KV cache memory", re.compile(r"Available KV cache memory: " + _GIB),
     _setter("kv_cache_bytes", _gib, engine="V1")),
    ("Total non KV cache memory", re.compile(r"Total non KV cache memory: " + _GIB),
     _setter("non_kv_bytes", _gib)),
    ("torch peak memory increase", re.compile(r"torch peak memory increase: " + _GIB),
     _setter("activation_bytes", _gib)),
    ("non-torch forward increase memory",
     re.compile(r"non-torch forward increase memory: " + _GIB),
     _setter("non_torch_bytes", _gib)),
    ("total consumed", re.compile(r"total consumed \(from mem_get_info\): " + _GIB),
     _setter("total_consumed_bytes", _gib)),
    ("Free memory on device", re.compile(r"Free memory on device(?: \S+)? \(" + _NUMBER + r"/"
                                         + _NUMBER + r" GiB\) on startup(?: is less than|\.)"
                                         r" [Dd]esired GPU memory utilization (?:is )?\(([\d.]+)"),
     _free_memory),
    ("Requested memory", re.compile(r"Requested memory: ([\d.]+) \(util\)"),
     _setter("gpu_memory_utilization", float)),
    ("total_memory=", re.compile(r"total_memory=" + _NUMBER + r"\s*GiB"),
     _setter("gpu_total_bytes", _gib)),
    (" blocks: ", re.compile(r"# (\w+) blocks: (\d+), # CPU blocks: \d+"), _blocks),
    ("KV cache size", re.compile(r"(\w+) KV cache size: " + _INT + r" tokens"), _kv_tokens),
    ("Maximum concurrency", re.compile(r"Maximum concurrency for " + _INT
                                       + r" tokens per request: ([\d.]+)x"), _concurrency),
    ("Graph capturing finished", re.compile(r"Graph capturing finished in \d+ secs?, took "
                                            + _GIB), _setter("cuda_graph_bytes", _gib)),
    ("CUDA graph pool memory", re.compile(r"CUDA graph pool memory: " + _GIB + r" \(actual\)"),
     _setter("cuda_graph_bytes", _gib)),
    ("Estimated CUDA graph memory", re.compile(r"Estimated CUDA graph memory: " + _GIB
                                               + r" total"),
     _setter("cuda_graph_estimated_bytes", _gib)),
    ("init engine", re.compile(r"init engine \(profile, create kv cache, warmup model\) took "
                               r"([\d.]+) s"), _setter("init_engine_seconds", float)),
)


def _literal_dict(text: str) -> dict[str, object]:
    """The logged dict; entry by entry when the whole is not a literal (an enum, an object)."""
    try:
        whole = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        whole = None
    if isinstance(whole, dict):
        return {str(key): value for key, value in whole.items()}
    found: dict[str, object] = {}
    for m in _ARG_ITEM.finditer(text):
        try:
            found[m.group(1)] = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            continue
    return found


def _other_rank(line: str) -> bool:
    """True for a line tagged with a process of a rank other than 0."""
    for m in _PROCESS.finditer(line):
        name = m.group("name")
        if name in _OTHER_RANK_PROCESSES:
            return True
        if m.group("rank") is not None and m.group("rank") != "0":
            return True
        for rank in _RANK_IN_NAME.finditer(name):
            if (rank.group(1) or rank.group(2)) != "0":
                return True
    return False


class _Reader:
    def __init__(self) -> None:
        self.start = _Start()
        self.starts = 0

    def new_start(self) -> None:
        self.start = _Start()
        self.starts += 1

    def begin_engine_line(self) -> None:
        """An engine line: it opens a new start when the previous one had ended."""
        if self.start.ended or self.starts == 0:
            self.new_start()

    def feed(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r")
        if not line.strip():
            return
        for pattern in _BANNER:
            m = pattern.search(line)
            if m:
                self.new_start()
                self.start.set("vllm_version", m.group(1).lstrip("v"))
                if m.lastindex and m.lastindex >= 2 and m.group(2):
                    self.start.set("model", m.group(2))
                return
        if _READY in line:
            if self.start.memory_seen and not self.start.ended:
                self.start.ready = True
                self.start.ended = True
            return
        if any(failure in line for failure in _FAILURES):
            if self.starts and not self.start.ended:
                self.start.failed = True
                self.start.ended = True
            return
        if _other_rank(line):
            return
        if _SLEEP_NEEDLE in line:  # after ready: never opens a start (standby workers)
            m = _SLEEP_FREED.search(line)
            if m and self.starts and self.start.ready:
                self.start.set("sleep_freed_bytes", _gib(m.group(1)))
            return
        m = _LOGO_MODEL.search(line)
        if m:
            self.start.set("model", m.group(1))
            return
        m = _ENGINE_INIT.search(line)
        if m:
            self.begin_engine_line()
            self.start.set("engine", m.group(1) or "V0")
            self.start.set("vllm_version", m.group(2).lstrip("v"))
            self.start.set("model", m.group(3))
            tp = _CONFIG_TP.search(line)
            if tp:
                self.start.set("args_tensor_parallel_size", int(tp.group(1)))
            return
        m = _NON_DEFAULT.search(line)
        if m:
            self._non_default_args(m.group(1))
            return
        opened = False
        for needle, pattern, handle in _MEMORY_LINES:  # one line may hold several values
            if needle in line:
                m = pattern.search(line)
                if m:
                    if not opened:
                        self.begin_engine_line()
                        self.start.memory_seen = opened = True
                    handle(m, self.start)

    def _non_default_args(self, line: str) -> None:
        if self.starts == 0:
            self.new_start()
        self.start.set("args", _literal_dict(line))
        for name, pattern in _ARG_FLOAT.items():
            m = pattern.search(line)
            if m:
                self.start.set(name, float(m.group(1)))
        for name, pattern in _ARG_INT.items():
            m = pattern.search(line)
            if m:
                self.start.set("args_" + name, int(m.group(1)))
        m = _ARG_MODEL.search(line)
        if m:
            self.start.set("model", m.group(1))

    def report(self) -> StartupReport:
        s = self.start
        v = dict(s.values)
        args_len = v.pop("args_max_model_len", None)
        if "max_model_len" not in v and args_len is not None:
            v["max_model_len"] = args_len
        tp = v.pop("args_tensor_parallel_size", None)
        if tp is not None:
            v["tensor_parallel_size"] = tp
        block_size = v.pop("args_block_size", None)
        if block_size is not None:
            v["block_size"] = block_size
        weights = v.get("weights_bytes")
        if weights is None and s.v0_weights is not None:
            v["weights_bytes"] = weights = s.v0_weights
        consumed = v.pop("total_consumed_bytes", None)
        if "non_torch_bytes" not in v and isinstance(consumed, int) and isinstance(weights, int):
            v["non_torch_bytes"] = consumed - weights
        if "non_kv_bytes" not in v and s.v0_weights is not None:
            parts = (s.v0_weights, v.get("non_torch_bytes"), v.get("activation_bytes"))
            if all(isinstance(p, int) for p in parts):
                v["non_kv_bytes"] = sum(p for p in parts if isinstance(p, int))
        blocks = v.get("gpu_blocks")
        if "kv_cache_tokens" not in v and isinstance(blocks, int):
            size = v.get("block_size")
            v["kv_cache_tokens"] = blocks * (size if isinstance(size, int) else DEFAULT_BLOCK_SIZE)
        known = {f.name for f in fields(StartupReport)}
        kwargs = {name: value for name, value in v.items() if name in known}
        return StartupReport(ready=s.ready, failed=s.failed, starts=self.starts,
                             **kwargs)  # type: ignore[arg-type]


def read_startup(text: str) -> StartupReport:
    """The last start in a vLLM log (see the module docstring); an empty report if none."""
    if len(text) > MAX_TEXT_CHARS:
        text = text[-MAX_TEXT_CHARS:]
        text = text[text.find("\n") + 1:]  # drop the cut line
    reader = _Reader()
    for line in text.splitlines():
        reader.feed(line)
    return reader.report()


def read_startup_file(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES, *,
                      head: bool = False) -> StartupReport:
    """``read_startup`` of a log file's last ``max_bytes`` bytes (the whole file if smaller);
    with ``head``, of its first ``max_bytes``: a log of one run (gardenctl's per-run worker
    logs) holds its start-up at the top, and a long-lived server's request lines after it."""
    with open(path, "rb") as log:
        log.seek(0, 2)
        size = log.tell()
        log.seek(0 if head else max(0, size - max_bytes))
        data = log.read(max_bytes)
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        text = text[:text.rfind("\n") + 1] if head else text[text.find("\n") + 1:]
    return read_startup(text)


__all__ = ["StartupReport", "read_startup", "read_startup_file"]
