"""The gateway's standby workers: what state each is in, waking them for requests, and putting
them to sleep when idle (the rule of who may be awake is `standby`, pure). Both modes go through
the same machinery (locks, rule, idle task, metrics, standby.json): `standby: sleep` workers
are woken and put to sleep with vLLM's sleep mode; `standby: stop` workers are started and
stopped by `gardenctl watch`, on the garden's demand file, which the gateway writes.

State (sleep mode). A sleep-mode worker is routable while it sleeps (its record says READY), but
a request is sent only to one that is awake. The gateway learns a worker's state when it first
sees it (a new worker id, or a new pid: a restart) from vLLM's ``GET /is_sleeping``, and from
then on from what it does to it: ``asleep -> waking -> awake -> sleeping -> asleep``. Its owner
records it READY only once it has put it to sleep, so a new worker that says it is awake is
awake (woken by an earlier gateway). A worker whose state it cannot tell (no answer; or `apply`
is starting a standby worker on its GPUs, which puts awake neighbours to sleep behind the
gateway's back) is *unknown*: counted as awake, sent nothing, and asked again.

State (stop mode). A stop-mode worker has no process, and no record, while stopped: the gateway
follows every planned one (`discovery`: from the plan) and derives its state from the demand
file and the observation: *asleep* (shown "stopped") while it does not run, *waking* while its
start is demanded and it is not ready yet, *awake* while it is ready and demanded, *sleeping*
(shown "stopping") while it runs and is not demanded (`watch` is stopping it). Nothing asleep
stays on its GPUs (asleep bytes 0): waking it takes its whole claim from the wake slot.

Wake-ups. A request for a model whose replicas all sleep wakes one (one already waking, else
the lowest worker id asleep; it is shared by every request that waits for it), and waits for it
at most the garden's ``gateway.wake_timeout`` (then 503 with Retry-After; the wake-up goes on as
long as a request still waits for it). One wake-up at a time per GPU: a lock per (node, GPU),
taken in order. Under the locks: if waking it would exceed a GPU's wake slot, idle workers are
put to sleep first (least recently used first); a worker with requests in flight is never put
to sleep, the wake-up waits for its requests to end (woken by their end, not by a clock); and
no standby worker may be loading on those GPUs (a fresh observation of the runtime). Every
request waiting for a worker, or about to be sent to one, holds it: it is not idle then.

Starting a stop-mode worker is its wake-up: room is made the same way (an idle stop-mode victim
is "put to sleep" by removing it from the demand file; the wake-up waits until it is observed
stopped), then its worker id is written to the demand file (worker id -> time.time()), `watch`
starts it (a cold start: raise ``wake_timeout`` for such models), and the request is sent once
an observation says it is ready. The demand stays while anyone waits, and while it runs; when
nobody waits any more and it does not run, it is removed again, so nothing starts for nobody.
When no `gardenctl watch` of the garden runs, nothing would start it: a request for a stopped
one is answered 503 at once, and no demand is written (one that still runs, its demand removed
as idle, is served again: nothing stops it without a watch).

Sleeps. A background task puts to sleep an awake worker idle for longer than its model's
``standby.idle_timeout`` (read live from the file), and idle ones where the awake workers
exceed a GPU's slot (the garden changed under them). A stop-mode worker's sleep is counted when
an observation finds it stopped.

Every change of state is written to the garden's ``standby.json`` (`gardenctl status` shows
it), counted in the metrics (wake-ups, sleeps by reason: a start on demand counts as a wake-up,
a stop as a sleep) and logged. Runtime calls block (HTTP to the worker): they run in a small
thread pool of their own, as does the check for a watch. Everything else (the demand file and
standby.json are small atomic writes) runs in the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gardenctl.gateway import errors
from gardenctl.gateway import standby as rule
from gardenctl.gateway.discovery import sleeps, stops
from gardenctl.gateway.errors import GatewayError
from gardenctl.gateway.metrics import Metrics
from gardenctl.gateway.upstream import Outstanding, Replica
from gardenctl.state import StandbyView
from gardenctl.vocab import Phase

if TYPE_CHECKING:
    from gardenctl.gateway.discovery import Discovery, GardenView
    from gardenctl.observe import ObservedWorker
    from gardenctl.runtime.base import Runtime
    from gardenctl.workers import DesiredWorker

log = logging.getLogger("gardenctl.gateway")

T = TypeVar("T")
THREADS = 8  # sleep-mode calls at once (a wake-up waits for the weights; a sleep for requests)
CHECK_S = 1.0  # the idle check runs at least this often (idle_timeout edits apply within it)
IDLE = "idle"
EVICTED = "evicted"
# what standby.json says of a stop-mode worker (`gardenctl status` shows it as it is)
STOP_STATES = {rule.ASLEEP: "stopped", rule.SLEEPING: "stopping"}


class WakeFailed(Exception):
    """A wake-up that cannot happen: the worker is gone, or its wake-up route failed."""


class Signal:
    """"Something changed": a request ended, a worker changed state, the garden was observed.
    Every coroutine waiting is woken; each then looks again."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self, timeout: float | None = None) -> None:
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._future), timeout)

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None


@dataclass(eq=False)
class Tracked:
    """One standby worker as the gateway follows it: a sleep-mode worker's run (worker id and
    pid), or a stop-mode worker (worker id: its runs come and go)."""

    worker_id: str
    pid: int | None
    model: str  # the served name
    node: str
    gpus: tuple[int, ...]
    awake_bytes: int
    asleep_bytes: int
    stops: bool = False  # `standby: stop`: started and stopped by `watch` on the demand file
    state: str = rule.UNKNOWN
    last_used: float = 0.0  # time.monotonic() of the last request's begin or end, or wake-up
    holds: int = 0  # requests waiting for it, or about to be sent to it
    wakes: int = 0
    last_wake: float | None = None  # wall time
    last_wake_s: float | None = None
    waiting: str = ""  # why its wake-up waits, when it does
    wake: asyncio.Task[None] | None = None
    phase: Phase | None = None  # stop mode: its run's phase, as last observed (None: no run)
    error: str | None = None  # stop mode: why its last run ended, when it failed
    stopping: tuple[str, str, float] | None = None  # stop mode: (reason, why, since) of a stop

    @property
    def keys(self) -> tuple[rule.GpuKey, ...]:
        return tuple((self.node, gpu) for gpu in self.gpus)

    @property
    def running(self) -> bool:
        """Stop mode: a process of it runs (it holds its GPU memory, or is taking it)."""
        return self.phase is not None and self.phase.running

    @classmethod
    def of(cls, worker: ObservedWorker, before: StandbyView | None, now: float) -> Tracked:
        """A sleep-mode worker's run."""
        spec = worker.spec
        asleep = spec.standby.asleep_bytes if spec.standby is not None else 0
        tracked = cls(worker.worker_id, worker.pid, spec.served_model_name, spec.node,
                      spec.gpus, spec.claim_bytes, asleep, last_used=now)
        if before is not None and before.pid == worker.pid:  # a gateway restarted: keep counts
            tracked.wakes = before.wakes
            tracked.last_wake, tracked.last_wake_s = before.last_wake, before.last_wake_s
        return tracked

    @classmethod
    def stopped(cls, spec: DesiredWorker, before: StandbyView | None, now: float) -> Tracked:
        """A stop-mode worker (its counts survive its runs, and a restart of the gateway)."""
        tracked = cls(spec.worker_id, None, spec.served_model_name, spec.node, spec.gpus,
                      spec.claim_bytes, 0, stops=True, state=rule.ASLEEP, last_used=now)
        if before is not None:
            tracked.wakes = before.wakes
            tracked.last_wake, tracked.last_wake_s = before.last_wake, before.last_wake_s
        return tracked

    def place(self, spec: DesiredWorker) -> None:
        """Stop mode: where it runs, or would run (the plan may move a stopped one)."""
        self.model, self.node, self.gpus = spec.served_model_name, spec.node, spec.gpus
        self.awake_bytes = spec.claim_bytes


class Lease:
    """The awake replicas a request may go to, held (not idle, so not put to sleep) until the
    request is sent (or given up)."""

    def __init__(self, replicas: Sequence[Replica], held: Iterable[Tracked],
                 changed: Signal) -> None:
        self.replicas = tuple(replicas)
        self._held = list(held)
        self._changed = changed
        for tracked in self._held:
            tracked.holds += 1

    def release(self) -> None:
        held, self._held = self._held, []
        for tracked in held:
            tracked.holds -= 1
        if held:
            self._changed.fire()


class Sleepers:
    """The standby workers of the garden the gateway serves (event loop's thread only)."""

    def __init__(self, discovery: Discovery, metrics: Metrics, outstanding: Outstanding,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.discovery = discovery
        self.metrics = metrics
        self.outstanding = outstanding
        outstanding.listener = self._used
        self.clock = clock
        self.workers: dict[str, Tracked] = {}
        self.policies: Mapping[str, rule.Policy] = {}
        self.garden: str | None = None
        self.demanded: dict[str, float] = {}  # the demand file as last written (stop mode)
        self._before: dict[str, StandbyView] | None = None  # standby.json as found
        self._written: dict[str, StandbyView] | None = None
        self._locks: dict[rule.GpuKey, asyncio.Lock] = {}
        self._changed = Signal()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executor: ThreadPoolExecutor | None = None

    # -- what requests see -----------------------------------------------------------------

    def routable(self, replicas: Iterable[Replica]) -> list[Replica]:
        """The replicas a request may be sent to now: always-awake ones, awake standby ones."""
        return [r for r in replicas if not r.standby or self._state(r.worker_id) == rule.AWAKE]

    async def acquire(self, model: str, replicas: Sequence[Replica],
                      timeout: float) -> Lease | GatewayError:
        """The awake replicas of ``model``, after waking (or starting) one if none is; an error
        answer when that failed, took longer than ``timeout`` seconds, or cannot happen (a
        stopped one, and no watch to start it)."""
        deadline = self.clock() + timeout
        target: Tracked | None = None
        try:
            while True:
                awake = self.routable(replicas)
                if awake:
                    return Lease(awake, (self.workers[r.worker_id] for r in awake
                                         if r.standby), self._changed)
                if target is None or not self._current(target):
                    if target is not None:  # it was restarted or stopped meanwhile
                        target.holds -= 1
                    target = self._pick(replicas)
                    if target is None:
                        return errors.no_ready_replica(model)
                    target.holds += 1
                    if target.stops:
                        refused = await self._without_watch(model, target)
                        if refused is not None:
                            return refused
                        continue  # look again: that took a moment
                task = self._wake_task(target)
                left = deadline - self.clock()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(asyncio.shield(task), left)
                except asyncio.TimeoutError:
                    why = target.waiting or "its wake-up is still running"
                    log.warning("%s: no worker awake after %gs (wake_timeout) waiting for %s: "
                                "%s", model, timeout, target.worker_id, why)
                    return errors.wake_timeout(model, timeout, why, stopped=target.stops)
                except WakeFailed as exc:
                    return errors.wake_failed(model, str(exc), stopped=target.stops)
        finally:
            if target is not None:
                target.holds -= 1
                self._changed.fire()

    def failed(self, worker_id: str) -> None:
        """A connection to the worker failed: ask its state again before sending it more
        (it may have been restarted, asleep, on the same port; a stop-mode one: stopped)."""
        tracked = self.workers.get(worker_id)
        if tracked is not None and tracked.state == rule.AWAKE:
            tracked.state = rule.UNKNOWN
            self._changed_state()

    def _state(self, worker_id: str) -> str | None:
        tracked = self.workers.get(worker_id)
        return tracked.state if tracked is not None else None

    def _pick(self, replicas: Iterable[Replica]) -> Tracked | None:
        """The worker to wake: one already waking, else the lowest worker id asleep."""
        tracked = [self.workers[r.worker_id] for r in replicas
                   if r.standby and r.worker_id in self.workers]
        waking = [t for t in tracked if t.state == rule.WAKING
                  or (t.wake is not None and not t.wake.done())]
        asleep = [t for t in tracked if t.state == rule.ASLEEP]
        chosen = waking or asleep or tracked
        return min(chosen, key=lambda t: t.worker_id) if chosen else None

    async def _without_watch(self, model: str, target: Tracked) -> GatewayError | None:
        """A stop-mode worker to start: the answer when no `gardenctl watch` runs to start it
        (None when one does, or it runs on demand already)."""
        if target.running and target.state != rule.SLEEPING:
            return None
        try:
            watched = await self._call(self.discovery.watch_running)
        except Exception as exc:  # noqa: BLE001 - cannot tell: the wake-up is tried
            log.warning("cannot tell whether a watch of the garden runs (%s: %s)",
                        type(exc).__name__, exc)
            return None
        if watched or not self._current(target):
            return None
        if target.phase == Phase.READY:  # demand removed while idle, and nothing stopped it
            self._set_demand(target.worker_id, True)
            target.state, target.stopping, target.last_used = rule.AWAKE, None, self.clock()
            log.info("%s: %s still runs (no watch stopped it): serving it again", model,
                     target.worker_id)
            self._changed_state()
            return None
        log.warning("%s: %s is stopped (standby: stop) and no `gardenctl watch` of the garden "
                    "runs to start it: answered 503", model, target.worker_id)
        return errors.stopped_no_watch(model)

    def _used(self, worker_id: str, left: int) -> None:
        """Outstanding's listener: a request began or ended on ``worker_id``."""
        tracked = self.workers.get(worker_id)
        if tracked is not None:
            tracked.last_used = self.clock()
        if left == 0:
            self._changed.fire()

    # -- following the garden ----------------------------------------------------------------

    async def sync(self, view: GardenView) -> None:
        """Follow an observation: new and restarted sleep-mode workers are asked their state;
        gone ones are forgotten; awake ones beside a standby worker that is loading (or new)
        become unknown. Stop-mode workers' states are derived (`_follow_stops`)."""
        if not view.usable or view.table.garden is None:
            return
        if view.table.garden != self.garden:
            self.workers.clear()
            self.garden, self._before, self._written = view.table.garden, None, None
            self.demanded = self.discovery.state.read_demand(self.garden)
        if self._before is None:
            self._before = self.discovery.state.read_standby(self.garden)
        self.policies = view.standby
        ready = {w.worker_id: w for w in view.workers if w.phase == Phase.READY and sleeps(w)}
        loading = {(w.node, gpu) for w in view.workers if _busy(w) for gpu in w.gpus}
        changed = False
        for worker_id, tracked in list(self.workers.items()):
            seen = ready.get(worker_id)
            if not tracked.stops and (seen is None or seen.pid != tracked.pid):
                del self.workers[worker_id]
                changed = True
        fresh: set[rule.GpuKey] = set()  # GPUs of runs new to the gateway
        for worker_id, seen in ready.items():
            known = self.workers.get(worker_id)
            if known is None or known.stops:  # new, or its mode changed (a new run too)
                self.workers[worker_id] = Tracked.of(seen, self._before.get(worker_id),
                                                     self.clock())
                fresh |= set(self.workers[worker_id].keys)
                changed = True
        stop_changed, started = self._follow_stops(view)
        changed |= stop_changed
        fresh |= started
        asking: list[Tracked] = []
        for tracked in self.workers.values():
            if tracked.stops:
                continue
            keys = set(tracked.keys)
            if tracked.state == rule.AWAKE and keys & (loading | fresh):
                # `apply` puts awake standby workers to sleep before it starts one beside them
                # (maybe between two observations): ask again, once no start is under way
                tracked.state = rule.UNKNOWN
                changed = True
            if tracked.state == rule.UNKNOWN and not keys & loading:
                asking.append(tracked)
        if changed:
            self._changed_state()
        self._changed.fire()
        await asyncio.gather(*(self._ask(t) for t in asking))
        for tracked in list(self.workers.values()):
            if (not tracked.stops and tracked.state == rule.ASLEEP
                    and self.outstanding.counts().get(tracked.worker_id, 0) > 0):
                self._wake_task(tracked)  # requests sent before it fell asleep wait inside it

    def _follow_stops(self, view: GardenView) -> tuple[bool, set[rule.GpuKey]]:
        """Stop-mode workers: every planned or observed one is followed, its state derived
        from the observation and the demand; a demand nobody needs is withdrawn. Whether
        anything changed, and the GPUs of runs that began since the last observation (their
        start put awake sleep-mode neighbours to sleep)."""
        observed = {w.worker_id: w for w in view.workers if stops(w.spec)}
        planned = {w.worker_id: w for w in view.stop_planned or ()}
        for worker in view.workers:  # a sleep-mode run (its mode is changing): followed as such
            if sleeps(worker) and worker.phase.running and worker.worker_id not in observed:
                planned.pop(worker.worker_id, None)
        changed = False
        for worker_id, tracked in list(self.workers.items()):
            if tracked.stops and worker_id not in observed and worker_id not in planned:
                del self.workers[worker_id]  # no longer in the garden
                changed = True
        assert self._before is not None
        started: set[rule.GpuKey] = set()
        now = self.clock()
        for worker_id in sorted(observed.keys() | planned.keys()):
            seen = observed.get(worker_id)
            run = seen if seen is not None and seen.phase.running else None
            spec = run.spec if run is not None else planned.get(worker_id)
            if spec is None:
                spec = observed[worker_id].spec
            known = self.workers.get(worker_id)
            if known is None or not known.stops:  # new, or its mode changed
                known = Tracked.stopped(spec, self._before.get(worker_id), now)
                self.workers[worker_id] = known
                changed = True
            tracked = known
            tracked.place(spec)
            pid = run.pid if run is not None else None
            if pid != tracked.pid:
                if pid is not None:
                    started |= set(tracked.keys)
                tracked.pid = pid
                changed = True
            tracked.phase = seen.phase if seen is not None else None
            tracked.error = seen.last_error if seen is not None and seen.phase.dead else None
            changed |= self._derive(tracked)
        for tracked in list(self.workers.values()):
            if self._unneeded(tracked) and (tracked.wake is None or tracked.wake.done()):
                self._set_demand(tracked.worker_id, False)
                changed |= self._derive(tracked)
        if view.stop_planned is not None:  # demand for workers the garden no longer has
            for worker_id in [w for w in self.demanded if w not in self.workers
                              or not self.workers[w].stops]:
                self._set_demand(worker_id, False)
        return changed, started

    def _derive(self, tracked: Tracked) -> bool:
        """A stop-mode worker's state from its run and its demand; whether it changed."""
        demanded = tracked.worker_id in self.demanded
        if not tracked.running:
            state = rule.WAKING if demanded else rule.ASLEEP
        elif not demanded:
            state = rule.SLEEPING  # `watch` stops it
        elif tracked.phase == Phase.READY:
            state = rule.AWAKE
        elif tracked.phase == Phase.STARTING:
            state = rule.WAKING
        else:
            state = rule.UNKNOWN  # unhealthy, being replaced: not routable, its memory held
        if state == tracked.state:
            return False
        if tracked.state == rule.SLEEPING and tracked.stopping is not None:
            reason, why, since = tracked.stopping
            if state == rule.ASLEEP:
                self.metrics.slept(tracked.model, reason)
                log.info("%s: stopped %s %s (%.2fs)", tracked.model, tracked.worker_id, why,
                         self.clock() - since)
        if state != rule.SLEEPING:
            tracked.stopping = None
        if state == rule.AWAKE:
            tracked.last_used = self.clock()
        tracked.state = state
        return True

    def _unneeded(self, tracked: Tracked) -> bool:
        """A stop-mode worker demanded for nobody: it does not run and no request waits."""
        return (tracked.stops and tracked.worker_id in self.demanded and not tracked.running
                and not self._demand(tracked))

    def _set_demand(self, worker_id: str, wanted: bool) -> None:
        """Add a stop-mode worker to the demand file (`watch` starts it), or remove it
        (`watch` stops it)."""
        if wanted == (worker_id in self.demanded) or self.garden is None:
            return
        if wanted:
            self.demanded[worker_id] = time.time()
        else:
            del self.demanded[worker_id]
        try:
            self.discovery.state.write_demand(self.garden, dict(self.demanded))
        except OSError as exc:
            log.warning("cannot write the demand file (standby: stop): %s", exc)

    async def _ask(self, tracked: Tracked) -> None:
        """Ask an unknown sleep-mode worker whether it sleeps (its owner recorded it READY only
        once asleep: "awake" means someone woke it)."""
        try:
            answer = await self._call(self._runtime().is_sleeping, tracked.worker_id)
        except WakeFailed:
            answer = None
        if not self._current(tracked) or tracked.state != rule.UNKNOWN or answer is None:
            return
        tracked.state = rule.ASLEEP if answer else rule.AWAKE
        tracked.last_used = self.clock()
        self._changed_state()

    # -- waking ------------------------------------------------------------------------------

    def _wake_task(self, tracked: Tracked) -> asyncio.Task[None]:
        if tracked.wake is None or tracked.wake.done():
            tracked.wake = asyncio.create_task(self._wake(tracked))
            self._keep(tracked.wake)
            tracked.wake.add_done_callback(lambda _: self._changed_state())  # no longer waking
            self._changed_state()  # shown "waking" from now on
        return tracked.wake

    async def _wake(self, tracked: Tracked) -> None:
        began = self.clock()
        slept: list[Tracked] = []
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(tracked.keys):
                await stack.enter_async_context(self._lock(key))
            if not await self._room_for(tracked, slept) or (
                    tracked.stops and not await self._start(tracked)):
                if self._unneeded(tracked):  # nobody waits any more: nothing starts for nobody
                    self._set_demand(tracked.worker_id, False)
                    self._derive(tracked)
                    self._changed_state()
                return
            if not tracked.stops:
                await self._wake_up(tracked)
        seconds = self.clock() - began
        if not self._current(tracked):
            raise WakeFailed(f"{tracked.worker_id} stopped or was restarted")
        tracked.state, tracked.last_used = rule.AWAKE, self.clock()
        tracked.wakes += 1
        tracked.last_wake, tracked.last_wake_s = time.time(), round(seconds, 3)
        self.metrics.woke(tracked.model, seconds)
        first = "".join(
            f"; {doing} first: {', '.join(ids)}"
            for doing, ids in (("put to sleep", [t.worker_id for t in slept if not t.stops]),
                               ("stopped", [t.worker_id for t in slept if t.stops])) if ids)
        if tracked.stops:
            log.info("%s: started %s in %.2fs (standby: stop)%s", tracked.model,
                     tracked.worker_id, seconds, first)
        else:
            log.info("%s: woke %s in %.2fs%s", tracked.model, tracked.worker_id, seconds, first)
        self._changed_state()

    async def _room_for(self, tracked: Tracked, slept: list[Tracked]) -> bool:
        """Under its GPUs' locks: make room for waking ``tracked`` (the victims put to sleep
        join ``slept``); True when it may be woken now (a stop-mode one: started), False when
        there is nothing to do (awake already, or nobody waits for it any more)."""
        while True:
            if not self._current(tracked):
                raise WakeFailed(f"{tracked.worker_id} stopped or was restarted")
            if tracked.state == rule.AWAKE or not self._demand(tracked):
                return False  # awake already, or nobody waits any more
            if tracked.stops and tracked.state == rule.WAKING:
                return True  # its start is demanded already
            decision = (None if tracked.state == rule.UNKNOWN
                        else rule.make_room(tracked.worker_id, self._sleepers()))
            if isinstance(decision, rule.Evict):
                slept += await self._evict(decision.victims, tracked)
                continue
            if isinstance(decision, rule.Wait):
                await self._wait(tracked, decision.why)
                continue
            # it fits (or its state must be asked): nothing may be loading beside it
            loading = await self._loading_beside(tracked)
            if loading:
                await self._wait(tracked, f"{', '.join(loading)} is loading, unhealthy or "
                                 "stopping on its GPUs")
                continue
            if tracked.state == rule.UNKNOWN:
                if tracked.stops:
                    await self._wait(tracked, f"it is {tracked.phase or 'not running'}")
                    continue
                await self._ask(tracked)
                if tracked.state == rule.UNKNOWN:
                    await self._wait(tracked, "it does not say whether it sleeps")
                continue
            if (self._current(tracked) and tracked.state == rule.ASLEEP
                    and isinstance(rule.make_room(tracked.worker_id, self._sleepers()),
                                   rule.Fits)):
                return True

    async def _wake_up(self, tracked: Tracked) -> None:
        """A sleep-mode worker: vLLM's wake-up (the room is made)."""
        tracked.state, tracked.waiting = rule.WAKING, ""
        self._changed_state()
        try:
            await self._call(self._runtime().wake_up, tracked.worker_id)
        except Exception as exc:  # noqa: BLE001 - any failure (a damaged record, Ray) is one
            # failed wake-up: the worker must not stay "waking"
            log.warning("%s: waking %s failed: %s", tracked.model, tracked.worker_id, exc)
            if self._current(tracked):
                tracked.state = rule.UNKNOWN
                self._changed_state()
            raise WakeFailed(str(exc)) from None

    async def _start(self, tracked: Tracked) -> bool:
        """A stop-mode worker (the room is made): demand it, and wait until an observation says
        it is ready (True), or nobody waits for it any more (False)."""
        if tracked.worker_id not in self.demanded:
            self._set_demand(tracked.worker_id, True)
            log.info("%s: %s demanded: `gardenctl watch` starts it (standby: stop)",
                     tracked.model, tracked.worker_id)
        self._derive(tracked)
        tracked.waiting = ""
        self._changed_state()
        while True:
            if not self._current(tracked):
                raise WakeFailed(f"{tracked.worker_id} is no longer in the garden")
            if tracked.state == rule.AWAKE:
                return True
            if not self._demand(tracked):
                return False
            await self._wait(tracked, self._starting(tracked))

    @staticmethod
    def _starting(tracked: Tracked) -> str:
        """Why a demanded stop-mode worker is not ready yet."""
        if tracked.phase == Phase.STARTING:
            return "it is starting (a cold start: standby: stop)"
        if tracked.phase is not None and tracked.phase.dead:
            return (f"its start failed ({tracked.error or tracked.phase}); `gardenctl watch` "
                    "starts it again")
        if tracked.phase is not None:
            return f"it is {tracked.phase}"
        return "waiting for `gardenctl watch` to start it (standby: stop)"

    async def _evict(self, victims: Sequence[str], wanted: Tracked) -> list[Tracked]:
        """Put ``victims`` to sleep at once to make room for ``wanted``; those that slept
        (stop-mode ones: whose stop began; the room is theirs once observed stopped)."""
        why = f"to make room for {wanted.worker_id}"
        begun = [t for t in (self.workers.get(v) for v in victims)
                 if t is not None and self._begin_sleep(t, EVICTED, why)]
        sleeping = [t for t in begun if not t.stops]
        done = await asyncio.gather(*(self._finish_sleep(t, EVICTED, why) for t in sleeping))
        return [t for t, ok in zip(sleeping, done, strict=True) if ok] + [
            t for t in begun if t.stops]

    async def _wait(self, tracked: Tracked, why: str) -> None:
        if why != tracked.waiting:
            log.info("%s: %s %s waits: %s", tracked.model,
                     "starting" if tracked.stops else "waking", tracked.worker_id, why)
            tracked.waiting = why
        await self._changed.wait(CHECK_S)

    async def _loading_beside(self, tracked: Tracked) -> list[str]:
        """Standby workers loading on its GPUs now (a fresh observation): `apply` starts them
        awake, in the wake slot."""
        try:
            workers = await self._call(self.discovery.observe)
        except Exception as exc:  # noqa: BLE001 - an observation that fails blocks no wake-up
            log.warning("observing the garden before a wake-up failed (%s: %s)",
                        type(exc).__name__, exc)
            return []
        mine = set(tracked.keys)
        return sorted(w.worker_id for w in workers
                      if w.worker_id != tracked.worker_id and _busy(w)
                      and mine & {(w.node, g) for g in w.gpus})

    # -- sleeping ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Put to sleep idle workers past their idle timeout, and idle ones beyond a GPU's wake
        slot; for as long as the gateway runs."""
        while True:
            for worker_id in rule.expired(self._sleepers(), self.clock()):
                tracked = self.workers[worker_id]
                timeout = self._policy(tracked).idle_timeout
                self._sleep(tracked, IDLE, f"idle for {timeout:g}s")
            for worker_id in rule.overcommitted(self._sleepers()):
                self._sleep(self.workers[worker_id], EVICTED,
                            "the awake standby workers exceed its GPU's wake slot")
            due = rule.next_expiry(self._sleepers())
            wait = CHECK_S if due is None else min(CHECK_S, max(0.0, due - self.clock()))
            await self._changed.wait(wait)

    def _sleep(self, tracked: Tracked, reason: str, why: str) -> None:
        """Put an idle awake worker to sleep (a stop-mode one: have it stopped), in the
        background."""
        if self._begin_sleep(tracked, reason, why) and not tracked.stops:
            self._keep(self._finish_sleep(tracked, reason, why))

    def _begin_sleep(self, tracked: Tracked, reason: str, why: str) -> bool:
        """Mark an idle awake worker "sleeping" (no request is sent to it from now on); a
        stop-mode one leaves the demand file (`watch` stops it; its sleep is counted when an
        observation finds it stopped)."""
        if tracked.state != rule.AWAKE or self._demand(tracked) or not self._current(tracked):
            return False
        if tracked.stops:
            self._set_demand(tracked.worker_id, False)
            self._derive(tracked)
            tracked.stopping = (reason, why, self.clock())
        else:
            tracked.state = rule.SLEEPING
        self._changed_state()
        return True

    async def _finish_sleep(self, tracked: Tracked, reason: str, why: str) -> bool:
        """A sleep-mode worker: vLLM's sleep (``mode=wait``)."""
        began = self.clock()
        try:
            await self._call(self._runtime().put_to_sleep, tracked.worker_id)
        except Exception as exc:  # noqa: BLE001 - any failure: never left "sleeping" for good
            log.warning("%s: putting %s to sleep failed: %s", tracked.model,
                        tracked.worker_id, exc)
            if self._current(tracked):
                tracked.state = rule.UNKNOWN  # asked again at the next observation
                self._changed_state()
            return False
        if not self._current(tracked):
            return False
        tracked.state = rule.ASLEEP
        self.metrics.slept(tracked.model, reason)
        log.info("%s: put %s to sleep %s (%.2fs)", tracked.model, tracked.worker_id, why,
                 self.clock() - began)
        self._changed_state()
        return True

    # -- shared ------------------------------------------------------------------------------

    def _current(self, tracked: Tracked) -> bool:
        """Still the run the gateway follows (not gone, not restarted)."""
        return self.workers.get(tracked.worker_id) is tracked

    def _demand(self, tracked: Tracked) -> int:
        """Requests in flight on it or waiting for it."""
        return tracked.holds + self.outstanding.counts().get(tracked.worker_id, 0)

    def _policy(self, tracked: Tracked) -> rule.Policy:
        return self.policies.get(tracked.model) or rule.Policy()

    def _sleepers(self) -> list[rule.Sleeper]:
        out = []
        for tracked in self.workers.values():
            policy = self._policy(tracked)
            out.append(rule.Sleeper(
                tracked.worker_id, tracked.keys, tracked.awake_bytes, tracked.asleep_bytes,
                tracked.state, self._demand(tracked), tracked.last_used, policy.priority,
                policy.idle_timeout, tracked.stops))
        return out

    def _lock(self, key: rule.GpuKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _runtime(self) -> Runtime:
        runtime = self.discovery.runtime
        if runtime is None:
            raise WakeFailed("the garden's runtime cannot be reached")
        return runtime

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="gateway-standby")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    def _keep(self, work: asyncio.Task[Any] | Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` (a task or a coroutine) in the background; report what it raised."""
        task = work if isinstance(work, asyncio.Task) else asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, WakeFailed):
            log.error("standby task failed: %s: %s", type(exc).__name__, exc,
                      exc_info=(type(exc), exc, exc.__traceback__))

    def _changed_state(self) -> None:
        """After any change of state: standby.json, the awake gauge, and whoever waits."""
        awake = dict.fromkeys(self.policies, 0)
        for tracked in self.workers.values():
            awake[tracked.model] = awake.get(tracked.model, 0) + (tracked.state == rule.AWAKE)
        self.metrics.standby_awake = awake
        self._write()
        self._changed.fire()

    def _write(self) -> None:
        if self.garden is None:
            return
        views = {}
        for tracked in self.workers.values():
            state = tracked.state
            if state == rule.UNKNOWN:
                continue  # not known: `status` shows nothing rather than a guess
            if state == rule.ASLEEP and tracked.wake is not None and not tracked.wake.done():
                state = rule.WAKING  # a request waits for it
            if tracked.stops:
                state = STOP_STATES.get(state, state)
            views[tracked.worker_id] = StandbyView(state, tracked.wakes, tracked.last_wake,
                                                   tracked.last_wake_s, tracked.pid)
        if views == self._written:
            return
        try:
            self.discovery.state.write_standby(self.garden, views)
        except OSError as exc:
            log.warning("cannot write the standby states: %s", exc)
            return
        self._written = views

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _busy(worker: ObservedWorker) -> bool:
    """A standby worker whose memory use the gateway cannot tell: loading (apply starts it
    awake, in the wake slot), unhealthy or being stopped (it may hold all it had awake)."""
    return (worker.spec.standby is not None and worker.phase.running
            and worker.phase != Phase.READY)


__all__ = ["STOP_STATES", "Lease", "Signal", "Sleepers", "Tracked", "WakeFailed"]
