"""Which standby workers may be awake at once, and which to put to sleep (pure).

The plan books on each GPU the asleep bytes of every standby worker there plus one *wake slot*:
the largest (awake - asleep) among them (gardenctl.placement.standby). So any set of standby
workers whose (awake - asleep) sum stays within the slot on every GPU they use may be awake at
once. The slot is computed here from the standby workers observed on the GPU, asleep or awake.

`make_room` answers a wake-up of one worker: it fits now; or these awake workers must be put
to sleep first (only idle ones: no request in flight, none waiting for them; least recently
used first, ties to the lower priority, then the lower worker id; as many as the workers already
going to sleep leave short); or it must wait (those going to sleep free enough; or what can be
put to sleep now is not enough: a worker busy with requests, one waking or going to sleep).
A worker whose state is not known yet counts as awake (its memory may be in use) but is never
chosen. A `standby: stop` worker (``stops``) is the same to the rule, with nothing asleep: awake
while it runs and a request wants it, asleep while stopped, waking while it starts, sleeping
while it is being stopped.
`overcommitted` names the idle workers to put to sleep where the awake ones exceed a GPU's
slot (the garden changed under them); `expired` those idle past their idle timeout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GpuKey = tuple[str, int]  # (node, GPU index)

AWAKE = "awake"
ASLEEP = "asleep"
WAKING = "waking"
SLEEPING = "sleeping"  # being put to sleep: its memory is in use until it is asleep
UNKNOWN = "unknown"  # not asked yet, or it did not answer
HOLDING = frozenset({AWAKE, WAKING, SLEEPING, UNKNOWN})  # memory counted as awake


@dataclass(frozen=True)
class Policy:
    """A standby model's settings the gateway follows, read live from the garden file."""

    idle_timeout: float = 300.0
    priority: int = 0


@dataclass(frozen=True)
class Sleeper:
    """One standby worker as the rule sees it."""

    worker_id: str
    gpus: tuple[GpuKey, ...]
    awake_bytes: int  # per GPU, awake (its claim)
    asleep_bytes: int  # per GPU, asleep
    state: str
    in_flight: int = 0  # requests being answered, or waiting for it to wake
    last_used: float = 0.0  # when a request last began or ended (any monotonic clock)
    priority: int = 0
    idle_timeout: float = math.inf  # seconds idle before it is put to sleep
    stops: bool = False  # `standby: stop`: stopped instead of put to sleep, started to wake

    @property
    def growth(self) -> int:
        """What waking it adds on each of its GPUs."""
        return max(0, self.awake_bytes - self.asleep_bytes)

    @property
    def idle(self) -> bool:
        """Awake with nothing to do: it may be put to sleep."""
        return self.state == AWAKE and self.in_flight == 0


@dataclass(frozen=True)
class Fits:
    """Wake it now."""


@dataclass(frozen=True)
class Evict:
    """Put these to sleep first (in this order), then wake it."""

    victims: tuple[str, ...]


@dataclass(frozen=True)
class Wait:
    """Not now: ``blockers`` hold the memory and cannot be put to sleep yet."""

    blockers: tuple[str, ...]
    why: str


Decision = Fits | Evict | Wait
_ORDER = {AWAKE: 0, WAKING: 1, SLEEPING: 2, UNKNOWN: 3}  # how a Wait lists its blockers


_WAITING_ON = {AWAKE: "answering requests", WAKING: "waking", SLEEPING: "going to sleep",
               UNKNOWN: "not saying whether it sleeps"}
_WAITING_ON_STOP = {AWAKE: "answering requests", WAKING: "starting (standby: stop)",
                    SLEEPING: "being stopped (standby: stop)",
                    UNKNOWN: "running, not ready (standby: stop)"}


def _waiting_on(worker: Sleeper) -> str:
    return (_WAITING_ON_STOP if worker.stops else _WAITING_ON)[worker.state]


def wake_slots(workers: Iterable[Sleeper]) -> dict[GpuKey, int]:
    """Per GPU, the wake slot: the largest (awake - asleep) of its standby workers."""
    slots: dict[GpuKey, int] = {}
    for worker in workers:
        for key in worker.gpus:
            slots[key] = max(slots.get(key, 0), worker.growth)
    return slots


def awake_use(workers: Iterable[Sleeper], states: frozenset[str] = HOLDING,
              leave_out: str | None = None) -> dict[GpuKey, int]:
    """Per GPU, the sum of (awake - asleep) of the workers in ``states``."""
    used: dict[GpuKey, int] = {}
    for worker in workers:
        if worker.state in states and worker.worker_id != leave_out:
            for key in worker.gpus:
                used[key] = used.get(key, 0) + worker.growth
    return used


def _lru(workers: Iterable[Sleeper]) -> list[Sleeper]:
    """Idle workers, the first to put to sleep first."""
    return sorted((w for w in workers if w.idle),
                  key=lambda w: (w.last_used, w.priority, w.worker_id))


def _relieve(over: dict[GpuKey, int],
             candidates: Sequence[Sleeper]) -> tuple[tuple[str, ...], bool]:
    """Victims (in order) that bring every GPU of ``over`` (bytes beyond its slot) to 0 or
    below, as far as the candidates go, and whether that was enough."""
    left = dict(over)
    victims: list[str] = []
    for candidate in candidates:
        if all(amount <= 0 for amount in left.values()):
            break
        if not any(left.get(key, 0) > 0 for key in candidate.gpus):
            continue  # it frees nothing where memory is short
        victims.append(candidate.worker_id)
        for key in candidate.gpus:
            if key in left:
                left[key] -= candidate.growth
    return tuple(victims), all(amount <= 0 for amount in left.values())


def make_room(target_id: str, workers: Sequence[Sleeper]) -> Decision:
    """Whether the standby worker ``target_id`` (asleep) can be woken now, and at what cost."""
    by_id = {w.worker_id: w for w in workers}
    target = by_id[target_id]
    if target.state in (AWAKE, WAKING):
        return Fits()
    if target.state == SLEEPING:
        return Wait((target_id,), "it is being stopped" if target.stops
                    else "it is being put to sleep")
    slots = wake_slots(workers)
    used = awake_use(workers, leave_out=target_id)
    over = {key: used.get(key, 0) + target.growth - slots.get(key, 0) for key in target.gpus}
    over = {key: amount for key, amount in over.items() if amount > 0}
    if not over:
        return Fits()
    # those going to sleep (or being stopped) free their memory soon: only the rest needs victims
    going = awake_use(workers, frozenset({SLEEPING}), leave_out=target_id)
    rest = {key: amount - going.get(key, 0) for key, amount in over.items()
            if amount > going.get(key, 0)}
    if not rest:
        return _wait([w for w in workers if w.state == SLEEPING and w.worker_id != target_id
                      and any(key in over for key in w.gpus)])
    victims, enough = _relieve(rest, _lru(w for w in workers if w.worker_id != target_id))
    if enough:
        return Evict(victims)
    blockers = [w for w in workers
                if w.worker_id != target_id and w.state in HOLDING and not w.idle
                and any(key in over for key in w.gpus)]
    if not blockers:
        return Wait((), "its GPUs' wake slot is too small")
    return _wait(blockers)


def _wait(blockers: Sequence[Sleeper]) -> Wait:
    """Wait for ``blockers``, saying what each is doing."""
    reasons: dict[str, list[str]] = {}
    for blocker in sorted(blockers, key=lambda b: (_ORDER[b.state], b.stops, b.worker_id)):
        reasons.setdefault(_waiting_on(blocker), []).append(blocker.worker_id)
    return Wait(tuple(sorted(b.worker_id for b in blockers)),
                "; ".join(f"{why}: {', '.join(ids)}" for why, ids in reasons.items()))


def overcommitted(workers: Sequence[Sleeper]) -> tuple[str, ...]:
    """Idle workers to put to sleep where the awake ones exceed a GPU's wake slot (as many as
    idle ones allow; a worker whose state is unknown is not counted, nor one going to sleep:
    its memory is on its way back)."""
    slots = wake_slots(workers)
    used = awake_use(workers, frozenset({AWAKE, WAKING}))
    over = {key: amount - slots.get(key, 0) for key, amount in used.items()
            if amount > slots.get(key, 0)}
    return _relieve(over, _lru(workers))[0] if over else ()


def expired(workers: Iterable[Sleeper], now: float) -> tuple[str, ...]:
    """Idle workers unused for longer than their idle timeout."""
    return tuple(sorted(w.worker_id for w in workers
                        if w.idle and now - w.last_used >= w.idle_timeout))


def next_expiry(workers: Iterable[Sleeper]) -> float | None:
    """When the next idle worker's timeout runs out (the clock of last_used), if any."""
    times = [w.last_used + w.idle_timeout for w in workers
             if w.idle and math.isfinite(w.idle_timeout)]
    return min(times, default=None)


__all__ = ["ASLEEP", "AWAKE", "HOLDING", "SLEEPING", "UNKNOWN", "WAKING", "Decision",
           "Evict", "Fits", "GpuKey", "Policy", "Sleeper", "Wait", "awake_use", "expired",
           "make_room", "next_expiry", "overcommitted", "wake_slots"]
