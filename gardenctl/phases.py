"""The legal moves of a worker's phase, written once and checked wherever a record changes.

    (new) ──spawn──> STARTING ──healthy──> READY ──probes fail──> UNHEALTHY
    (new) ──spawn fails──> FAILED            │                      │
    STARTING ──exits / times out──> FAILED   └──exits──> CRASHED <──┘ (exits, or stopped to restart)
    any running phase ──stop──> STOPPING ──> (record removed), or FAILED / CRASHED when it was
                                             stopped to be started again
    FAILED, CRASHED ──restart──> STARTING (a new run; the record carries its history)

A run that ends before it was ever ready is FAILED; one that had been ready is CRASHED: the
difference decides whether a replacement is rolled back (gardenctl.reconcile).
"""

from __future__ import annotations

from gardenctl.vocab import Phase

_S, _R, _U, _X, _C, _F = (Phase.STARTING, Phase.READY, Phase.UNHEALTHY, Phase.STOPPING,
                          Phase.CRASHED, Phase.FAILED)

# phase -> the phases it may move to (None: a new record)
TRANSITIONS: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({_S, _F}),
    _S: frozenset({_R, _F, _X}),
    _R: frozenset({_U, _C, _X}),
    _U: frozenset({_C, _X}),
    _X: frozenset({_F, _C}),
    _C: frozenset({_S, _F, _X}),
    _F: frozenset({_S, _F, _X}),
    Phase.UNKNOWN: frozenset({_R, _S, _X}),  # an orphan adopted, or stopped
}


class IllegalTransition(RuntimeError):
    """A bug: code tried to move a worker between phases that do not follow each other."""


def check_transition(before: Phase | None, after: Phase) -> Phase:
    """``after`` if a worker in ``before`` may move to it; IllegalTransition otherwise."""
    allowed = TRANSITIONS.get(before, frozenset())
    if after not in allowed:
        raise IllegalTransition(f"a worker cannot go from {before or 'nothing'} to {after}")
    return after


def ended_phase(was_ready: bool) -> Phase:
    """The phase of a run that is over: CRASHED after it had been ready, FAILED before."""
    return Phase.CRASHED if was_ready else Phase.FAILED


__all__ = ["TRANSITIONS", "IllegalTransition", "check_transition", "ended_phase"]
