"""The stand-in's scheduler and sleep mode, as vLLM 0.32's EngineCore runs them.

Read from vLLM 0.32.0's source (``vllm/entrypoints/serve/dev/sleep/api_router.py``,
``vllm/v1/engine/core.py`` ``sleep``/``wake_up``/``pause_scheduler``, ``vllm/v1/executor/
abstract.py``, ``vllm/v1/worker/gpu_worker.py`` ``sleep``, ``vllm/device_allocator/cumem.py``
and ``sleep_mode_backend.py``):

- ``POST /sleep?level=L&mode=M`` (L 0..2, default 1; M abort|wait|keep, default abort) first
  pauses the scheduler: new requests are accepted but queued until the engine wakes (they
  block, they are not refused); ``abort`` finishes every request already added with
  finish_reason ``abort``, ``wait`` lets them finish first, ``keep`` freezes them until the
  wake-up. Level 0 stops there (no memory change). Levels 1 and 2 then free the sleep-mode
  pool: level 1 backs the weights up in host RAM, level 2 discards them; the KV cache is
  discarded at both. Answer ``{"status": "sleeping", "level": L}``.
- The pool holds only what was allocated under ``--enable-sleep-mode`` (weights and KV cache,
  plus the CUDA-graph pool with ``--sleep-mode-offload-cudagraph``, always backed up). Without
  ``--enable-sleep-mode`` the routes still exist (they need only VLLM_SERVER_DEV_MODE=1) and a
  sleep pauses scheduling but frees nothing. The CUDA context, NCCL/non-torch memory and the
  CUDA-graph pool stay on the GPU.
- ``POST /wake_up`` (``tags=`` repeatable: ``weights``, ``kv_cache``, ``scheduling``) restores
  the tags asked for (all by default) and resumes scheduling once nothing sleeps any more.
  Answer ``{"status": "awake"|"sleeping", "tags": [...]|null}``. ``GET /is_sleeping``: true
  while the scheduler is paused or any tag sleeps.
- Log lines (EngineCore): ``CuMemAllocator: sleep freed %.2f GiB memory in total, of which
  %.2f GiB is backed up in CPU and the rest %.2f GiB is discarded directly.``, ``Sleep mode
  freed %s GiB memory, %s GiB memory is still in use.`` (vLLM's ``format_gib``: ``round(x, 2)``
  printed with %s, from 0.14.0; ``%.2f`` up to 0.13), ``It took %.6f seconds to fall
  asleep.``, ``It took %.6f seconds to wake up tags %s.``, the scheduler's ``setting pause
  state to PAUSED_NEW|PAUSED_ALL|UNPAUSED``; the API server logs ``wake up the engine with
  tags: %s``. The freed bytes are what the GPU's free memory grew by; "still in use" is the
  whole device's use (here: this stand-in's only, one rank).
- After a level-2 sleep the weights come back as uninitialised memory: until ``POST
  /collective_rpc`` with ``{"method": "reload_weights"}`` the engine generates garbage (the
  stand-in answers ``<weights not loaded>``). The worker logs gpu_model_runner's ``Reloading
  weights inplace...`` and ``Reloading and processing weights took %.2f seconds`` (vLLM's
  ``GPUModelRunner.reload_weights``). ``POST /reset_prefix_cache`` empties the prefix cache
  (the stand-in has none: nothing to do).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gardenctl.testing.standin_engine import GiB, format_gib
from gardenctl.testing.standin_log import VllmLog

PAUSE_MODES = ("abort", "wait", "keep")
SLEEP_TAGS = ("weights", "kv_cache")  # the executor's sleeping tags, in log order
_POLL_S = 0.05


class SleepGpu(Protocol):
    """Real GPU memory (STANDIN_VLLM_ALLOCATE=1) that follows the simulated sleep."""

    def release(self, tags: Sequence[str]) -> None: ...

    def restore(self, tags: Sequence[str]) -> None:
        """Allocate the released blocks of ``tags`` again; raises on out of memory."""


@dataclass(frozen=True)
class SleepMemory:
    """One rank's bytes that sleep mode can see (from the start-up profile)."""

    weights: int = 0
    kv_cache: int = 0
    cuda_graphs: int = 0
    fixed: int = 0  # CUDA context + non-torch (NCCL) memory: never freed
    sleep_mode: bool = True  # --enable-sleep-mode: weights and KV cache are in the pool
    offload_cudagraph: bool = False  # --sleep-mode-offload-cudagraph
    version: tuple[int, ...] = (0, 32, 0)

    @property
    def in_use(self) -> int:
        return self.fixed + self.weights + self.kv_cache + self.cuda_graphs

    def pooled(self, tags: Sequence[str]) -> int:
        """Bytes of the sleep-mode pool under ``tags`` (weights, kv_cache, cudagraph)."""
        if not self.sleep_mode:
            return 0
        sizes = {"weights": self.weights, "kv_cache": self.kv_cache,
                 "cudagraph": self.cuda_graphs if self.offload_cudagraph else 0}
        return sum(sizes.get(tag, 0) for tag in tags)

    def gib(self, n_bytes: int) -> str:
        return format_gib(n_bytes) if self.version >= (0, 14) else f"{n_bytes / GiB:.2f}"


@dataclass
class Request:
    """One generation the engine has been given (a completion prompt or a chat)."""

    request_id: str  # the engine's (internal) id: the external id plus 8 random characters
    aborted: bool = False


@dataclass
class _State:
    pause: str = "UNPAUSED"  # vLLM's PauseState: UNPAUSED, PAUSED_NEW, PAUSED_ALL
    sleeping_tags: set[str] = field(default_factory=set)
    level: int = 0
    weights_valid: bool = True  # False from a level-2 sleep until reload_weights
    running: dict[str, Request] = field(default_factory=dict)


class Scheduler:
    """Admits, pauses and aborts the stand-in's generations; runs sleep and wake-up."""

    def __init__(self, log: VllmLog, memory: SleepMemory | None = None,
                 sleep_delay: float = 0.0, wake_delay: float = 0.0,
                 wake_delay_level2: float = 0.0) -> None:
        self._log = log
        self.memory = memory or SleepMemory()
        self.sleep_delay = sleep_delay
        self.wake_delay = wake_delay
        self.wake_delay_level2 = wake_delay_level2
        self.gpu: SleepGpu | None = None  # set once real memory is held
        self._cond = threading.Condition()
        self._state = _State()
        self._operation = threading.Lock()  # one sleep or wake-up at a time

    # --- generations --------------------------------------------------------------------------

    def add(self, request_id: str, gone: Callable[[], bool],
            idle: Callable[[], None] = lambda: None) -> Request | None:
        """Wait until scheduling runs (not while paused), then register; None if ``gone()``."""
        with self._cond:
            while self._state.pause != "UNPAUSED":
                if gone():
                    return None
                self._cond.wait(_POLL_S)
                idle()
            request = Request(request_id)
            self._state.running[request_id] = request
            return request

    def step(self, request: Request, gone: Callable[[], bool],
             idle: Callable[[], None] = lambda: None) -> bool:
        """Before each token: False once the request was aborted; waits while PAUSED_ALL."""
        with self._cond:
            while self._state.pause == "PAUSED_ALL" and not request.aborted and not gone():
                self._cond.wait(_POLL_S)
                idle()
            return not request.aborted

    def finish(self, request: Request) -> None:
        with self._cond:
            self._state.running.pop(request.request_id, None)
            self._cond.notify_all()

    # --- sleep mode ---------------------------------------------------------------------------

    def is_sleeping(self) -> bool:
        with self._cond:
            return self._state.pause != "UNPAUSED" or bool(self._state.sleeping_tags)

    @property
    def weights_valid(self) -> bool:
        """False after a level-2 sleep until the weights are reloaded: output is garbage."""
        with self._cond:
            return self._state.weights_valid

    def reload_weights(self) -> None:
        """The worker's ``reload_weights`` (``collective_rpc``): the weights from disk again."""
        started = time.monotonic()
        self._log.engine("INFO", "gpu_model_runner.py", "Reloading weights inplace...")
        with self._cond:
            self._state.weights_valid = True
        self._log.engine("INFO", "gpu_model_runner.py",
                         f"Reloading and processing weights took "
                         f"{time.monotonic() - started:.2f} seconds")

    def sleep(self, level: int, mode: str) -> dict[str, Any]:
        with self._operation:
            self._pause(mode)
            if level >= 1:
                self._sleep_executor(level)
        return {"status": "sleeping", "level": level}

    def wake_up(self, tags: list[str] | None) -> dict[str, Any]:
        """Restore ``tags`` (all if None); raises MemoryError if real memory did not fit."""
        self._log.api("INFO", "api_router.py", f"wake up the engine with tags: {tags}")
        with self._operation:
            executor_tags = tags
            if executor_tags is not None and "scheduling" in executor_tags:
                executor_tags = [tag for tag in executor_tags if tag != "scheduling"]
            if executor_tags is None or executor_tags:
                self._wake_executor(executor_tags)
            with self._cond:
                fully_awake = not self._state.sleeping_tags
            if fully_awake:
                self._set_pause("UNPAUSED")
        return {"status": "awake" if fully_awake else "sleeping", "tags": tags}

    def _set_pause(self, state: str) -> None:
        with self._cond:
            self._state.pause = state
            self._cond.notify_all()
        self._log.engine("INFO", "scheduler.py", f"setting pause state to {state}")

    def _pause(self, mode: str) -> None:
        """vLLM's pause_scheduler: queue new requests; abort, drain or freeze the others."""
        with self._cond:
            if mode == "abort":
                for request in self._state.running.values():
                    request.aborted = True
        self._set_pause("PAUSED_ALL" if mode == "keep" else "PAUSED_NEW")
        if mode == "keep":
            return
        with self._cond:
            if self._state.running:
                self._log.engine("INFO", "core.py",
                                 "Waiting for in-flight requests to complete before sleeping...")
            while self._state.running:
                self._cond.wait(_POLL_S)

    def _sleep_executor(self, level: int) -> None:
        with self._cond:
            if "weights" in self._state.sleeping_tags:
                already = True
            else:
                already = False
        if already:
            self._log.engine("WARNING", "abstract.py", "Executor is already sleeping.")
            return
        started = time.monotonic()
        memory = self.memory
        offloaded = ("weights", "cudagraph") if level == 1 else ("cudagraph",)
        total = memory.pooled(("weights", "kv_cache", "cudagraph"))
        backed_up = memory.pooled(offloaded)
        time.sleep(self.sleep_delay)
        if self.gpu is not None and memory.sleep_mode:
            self.gpu.release(("weights", "kv_cache", "cudagraph") if memory.offload_cudagraph
                             else SLEEP_TAGS)
        self._log.engine(
            "INFO", "cumem.py",
            f"CuMemAllocator: sleep freed {total / GiB:.2f} GiB memory in total, of which "
            f"{backed_up / GiB:.2f} GiB is backed up in CPU and the rest "
            f"{(total - backed_up) / GiB:.2f} GiB is discarded directly.")
        self._log.engine(
            "INFO", "gpu_worker.py",
            f"Sleep mode freed {memory.gib(total)} GiB memory, "
            f"{memory.gib(memory.in_use - total)} GiB memory is still in use.")
        with self._cond:
            self._state.sleeping_tags = set(SLEEP_TAGS)
            self._state.level = level
            if level >= 2 and memory.sleep_mode:
                self._state.weights_valid = False  # discarded: woken, the memory is garbage
        self._log.engine("INFO", "abstract.py",
                         f"It took {time.monotonic() - started:.6f} seconds to fall asleep.")

    def _wake_executor(self, tags: list[str] | None) -> None:
        with self._cond:
            sleeping = [tag for tag in SLEEP_TAGS if tag in self._state.sleeping_tags]
            level = self._state.level
        if not sleeping:
            self._log.engine("WARNING", "abstract.py", "Executor is not sleeping.")
            return
        for tag in tags or ():
            if tag not in sleeping:
                shown = "{" + ", ".join(repr(t) for t in sleeping) + "}"
                self._log.engine("WARNING", "abstract.py",
                                 f"Tag {tag} is not in sleeping tags {shown}")
                return
        waking = list(tags) if tags else sleeping
        started = time.monotonic()
        if "weights" in waking:
            time.sleep(self.wake_delay_level2 if level == 2 else self.wake_delay)
        if self.gpu is not None and self.memory.sleep_mode:
            gpu_tags = [*waking, "cudagraph"] if (
                self.memory.offload_cudagraph and "weights" in waking) else waking
            self.gpu.restore(gpu_tags)  # raises: the tags stay asleep
        shown = (str(tags) if tags is not None
                 else "{" + ", ".join(repr(t) for t in sleeping) + "}")
        self._log.engine("INFO", "abstract.py",
                         f"It took {time.monotonic() - started:.6f} seconds to wake up "
                         f"tags {shown}.")
        with self._cond:
            self._state.sleeping_tags.difference_update(waking)
            if not self._state.sleeping_tags:
                self._state.level = 0
