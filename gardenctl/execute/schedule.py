"""Which of a plan's steps may begin now, from what they wait for (`Step.after`).

Pure bookkeeping, no decisions: the planner wrote every rule (GPU order, rollouts, rollbacks)
as a dependency. A step may begin once each step it needs has finished the way it needs
(DONE: succeeded, FAILED: failed, FINISHED: either). A step whose need can no longer be met
is dropped: `skipped` when what it needed failed (it would have been wrong to run it), `not
needed` for a rollback whose replacement succeeded. Steps that only report (hold, wait,
keep) never run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gardenctl.plan.model import Needs, Step, When
from gardenctl.vocab import StepKind

RUNS = (StepKind.START, StepKind.REPLACE, StepKind.RESTART, StepKind.ROLLBACK, StepKind.STOP,
        StepKind.STOP_LEFTOVERS, StepKind.AWAIT, StepKind.ADOPT)


@dataclass(frozen=True)
class Dropped:
    step: Step
    needed: Needs  # the need that can no longer be met
    skipped: bool  # True: what it needed failed; False: a rollback that is not needed


@dataclass
class Schedule:
    pending: list[Step]
    running: set[str] = field(default_factory=set)
    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)  # never ran: neither done nor failed

    @classmethod
    def of(cls, steps: Iterable[Step]) -> Schedule:
        return cls([s for s in steps if s.kind in RUNS])

    def _met(self, need: Needs) -> bool | None:
        """True: met; False: can never be met; None: not yet known."""
        if need.step_id in self.succeeded:
            return need.when != When.FAILED
        if need.step_id in self.failed:
            return need.when != When.DONE
        if need.step_id in self.dropped:
            return need.when == When.FINISHED
        if need.step_id in self.running or any(s.id == need.step_id for s in self.pending):
            return None
        return need.when != When.FAILED  # not in this plan: treated as done before it

    def runnable(self) -> list[Step]:
        """Steps that may begin now (taken out of pending; report each with `finished`)."""
        ready = [s for s in self.pending if all(self._met(n) is True for n in s.after)]
        for step in ready:
            self.pending.remove(step)
            self.running.add(step.id)
        return ready

    def finished(self, step: Step, ok: bool) -> None:
        self.running.discard(step.id)
        (self.succeeded if ok else self.failed).add(step.id)

    def deferred(self, step: Step) -> None:
        """It did not happen, and nothing went wrong (its GPU was busy with another garden):
        what needs it done does not run, and neither does a rollback that needs it failed."""
        self.running.discard(step.id)
        self.dropped.add(step.id)

    def drop_unreachable(self) -> list[Dropped]:
        """Steps whose needs can never be met, removed: what needs them done (or failed) is
        dropped too; what only needs them finished may go on."""
        dropped: list[Dropped] = []
        changed = True
        while changed:
            changed = False
            for step in list(self.pending):
                need = next((n for n in step.after if self._met(n) is False), None)
                if need is None:
                    continue
                self.pending.remove(step)
                self.dropped.add(step.id)
                dropped.append(Dropped(step, need, skipped=need.when != When.FAILED))
                changed = True
        return dropped

    @property
    def done(self) -> bool:
        return not self.pending and not self.running


__all__ = ["RUNS", "Dropped", "Schedule"]
