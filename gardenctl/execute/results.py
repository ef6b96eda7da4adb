"""What an apply reports: one result per step, with outcomes told apart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gardenctl.vocab import Cause, Outcome, StepKind

RELEASE_TIMEOUT = 120.0  # seconds to wait for a stopped worker's GPU memory to come back


@dataclass(frozen=True)
class StepResult:
    worker_id: str
    kind: StepKind
    outcome: Outcome
    message: str
    elapsed: float = 0.0
    hint: str = ""
    log_tail: str = ""
    cause: Cause | None = None  # recognised failure cause
    suggested_max_model_len: int | None = None
    step_id: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome.ok

    @property
    def action(self) -> str:
        return self.kind.value

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step_id, "worker": self.worker_id, "action": self.kind.value,
            "ok": self.ok, "outcome": self.outcome.value, "message": self.message,
            "elapsed_s": round(self.elapsed, 3), "hint": self.hint,
            "cause": self.cause.value if self.cause else None,
            "suggested_max_model_len": self.suggested_max_model_len, "log_tail": self.log_tail,
        }


@dataclass
class ApplyReport:
    results: list[StepResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.ok for r in self.results)

    def failed(self) -> list[StepResult]:
        return [r for r in self.results if not r.ok]


__all__ = ["RELEASE_TIMEOUT", "ApplyReport", "StepResult"]
