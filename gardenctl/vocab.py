"""gardenctl's vocabularies, each a `str` enum so that a typo is an error, not a silent new value.

- `Phase`: where a worker is in its life (the legal moves between phases are in
  `gardenctl.phases`);
- `StepKind`: what a plan step does (see `gardenctl.plan.model.Step`);
- `Outcome`: how an executed step ended;
- `Cause`: why a worker failed, recognised from its log or from what gardenctl saw.

Members compare equal to their text and serialise to it in JSON, so documents stay plain strings.
"""

from __future__ import annotations

from enum import Enum


class _Text(str, Enum):
    def __str__(self) -> str:
        return str(self.value)


class Phase(_Text):
    """A worker's phase, as recorded and as observed."""

    STARTING = "starting"  # its process runs; not answering /health and /v1/models yet
    READY = "ready"  # answers /health 200 and lists its name in /v1/models
    UNHEALTHY = "unhealthy"  # was ready; /health failed failure_threshold probes in a row
    STOPPING = "stopping"  # gardenctl is stopping it
    CRASHED = "crashed"  # exited (or was stopped as unhealthy) after it had been ready
    FAILED = "failed"  # its start failed: exited before ready, timed out, or never spawned
    UNKNOWN = "unknown"  # alive, found by gardenctl's marker without a record (an orphan)

    @property
    def running(self) -> bool:
        """A process of the worker runs (and holds, or is about to hold, GPU memory)."""
        return self in _RUNNING

    @property
    def dead(self) -> bool:
        """The worker's run is over: it needs starting again (or removing)."""
        return self in (Phase.CRASHED, Phase.FAILED)


_RUNNING = frozenset({Phase.STARTING, Phase.READY, Phase.UNHEALTHY, Phase.STOPPING, Phase.UNKNOWN})


class StepKind(_Text):
    """What a plan step does. Every step names one worker."""

    START = "start"  # spawn a worker the garden wants; done when it is ready
    REPLACE = "replace"  # stop the running version, then start the new one; done when ready
    RESTART = "restart"  # stop what is left of a dead or unhealthy run, start it again
    ROLLBACK = "rollback"  # start the previous version again (its replacement failed)
    STOP = "stop"  # stop a worker the garden no longer wants; done when its memory is released
    STOP_LEFTOVERS = "stop_leftovers"  # end processes a dead worker left behind; keep its record
    AWAIT = "await"  # a worker loading (or an operation in flight) from before: done when ready
    ADOPT = "adopt"  # record a worker found running by its marker, as the garden wants it
    HOLD = "hold"  # crash-loop backoff: it may not start before a time
    WAIT = "wait"  # blocked by something outside gardenctl (an unset secret, a taken port)
    KEEP = "keep"  # nothing to do

    @property
    def acts(self) -> bool:
        """Executing it changes a worker or gardenctl's records of one."""
        return self not in (StepKind.AWAIT, StepKind.HOLD, StepKind.WAIT, StepKind.KEEP)

    @property
    def spawns(self) -> bool:
        """It starts a process, which then loads on its GPUs (one at a time per GPU)."""
        return self in (StepKind.START, StepKind.REPLACE, StepKind.RESTART, StepKind.ROLLBACK)


class Blocker(_Text):
    """What a wait step waits for, when it is outside this garden."""

    SECRET = "secret"  # an environment variable not set where gardenctl runs
    PORT = "port"  # a port another program (or another garden's worker) holds
    GPU = "gpu"  # another garden's worker loads or stops on one of its GPUs
    ROLLOUT = "rollout"  # the model's rollout was stopped by a failed replacement

    @property
    def passes(self) -> bool:
        """It may end with no event gardenctl hears: watch looks again shortly."""
        return self in (Blocker.PORT, Blocker.GPU)


class Outcome(_Text):
    """How an executed step ended."""

    READY = "ready"  # the worker it started answers
    SPAWNED = "spawned"  # started; readiness is watched by later passes (watch)
    OK = "ok"  # a stop, an adoption
    EXITED_BEFORE_READY = "exited_before_ready"
    KILLED_BY_SIGNAL = "killed_by_signal"
    HEALTH_TIMEOUT = "health_check_timed_out"
    SPAWN_FAILED = "spawn_failed"
    MISSING_SECRET = "missing_secret"
    INSUFFICIENT_FREE = "insufficient_free_memory"
    MEMORY_NOT_RELEASED = "memory_not_released"
    STOP_FAILED = "stop_failed"
    SKIPPED = "skipped"  # not run: what it depended on failed
    INTERRUPTED = "interrupted"
    DEFERRED = "deferred"  # not run now: its GPU is busy with another garden's worker
    NOT_NEEDED = "not_needed"  # a rollback whose replacement succeeded
    HELD = "held"  # a hold or wait step, reported as such

    @property
    def ok(self) -> bool:
        return self in (Outcome.READY, Outcome.SPAWNED, Outcome.OK, Outcome.NOT_NEEDED,
                        Outcome.INTERRUPTED)


class Cause(_Text):
    """Why a worker failed, in stable names that tools may match on."""

    OUT_OF_MEMORY = "out_of_memory"
    KV_CACHE_TOO_SMALL = "kv_cache_too_small"
    NO_CACHE_BLOCKS = "no_cache_blocks"
    PORT_IN_USE = "port_in_use"
    MODEL_NOT_FOUND = "model_not_found"
    FREE_MEMORY_CHECK = "insufficient_free_memory"
    PROFILING_RACE = "memory_profiling_race"
    UNRECOGNISED_FLAG = "unrecognised_flag"
    ENGINE_DEAD = "engine_dead"
    COMMAND_NOT_FOUND = "command_not_found"
    SPAWN_FAILED = "spawn_failed"
    START_TIMEOUT = "start_timeout"
    UNHEALTHY = "unhealthy"
    KILLED_BY_SIGNAL = "killed_by_signal"
    EXITED = "exited"
    UNKNOWN = "unknown"
    GATED_MODEL = "gated_model"
    HUB_UNREACHABLE = "hub_unreachable"
    ARCHITECTURE_UNSUPPORTED = "architecture_unsupported"
    MAX_MODEL_LEN_TOO_LONG = "max_model_len_too_long"
    TP_NOT_DIVISIBLE = "tensor_parallel_not_divisible"
    SAMPLER_OUT_OF_MEMORY = "sampler_out_of_memory"


__all__ = ["Cause", "Outcome", "Phase", "StepKind"]
