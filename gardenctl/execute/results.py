"""What an apply reports: one result per action, with outcomes told apart."""

from __future__ import annotations

from dataclasses import dataclass, field

RELEASE_TIMEOUT = 120.0  # seconds to wait for a stopped worker's GPU memory to come back

# ActionResult.outcome
OK = "ok"
READY_OUTCOME = "ready"
EXITED_BEFORE_READY = "exited_before_ready"
KILLED_BY_SIGNAL = "killed_by_signal"
HEALTH_TIMEOUT = "health_check_timed_out"
SPAWN_FAILED = "spawn_failed"
MISSING_SECRET = "missing_secret"
INSUFFICIENT_FREE = "insufficient_free_memory"
MEMORY_NOT_RELEASED = "memory_not_released"
STOP_FAILED = "stop_failed"
SKIPPED = "skipped"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class ActionResult:
    worker_id: str
    action: str
    ok: bool
    outcome: str
    message: str
    elapsed: float = 0.0
    hint: str = ""
    log_tail: str = ""
    cause: str | None = None  # recognised failure cause (diagnose)
    suggested_max_model_len: int | None = None

    def to_json(self) -> dict:
        return {
            "worker": self.worker_id, "action": self.action, "ok": self.ok,
            "outcome": self.outcome, "message": self.message, "elapsed_s": round(self.elapsed, 3),
            "hint": self.hint, "cause": self.cause,
            "suggested_max_model_len": self.suggested_max_model_len, "log_tail": self.log_tail,
        }


@dataclass
class ApplyReport:
    results: list[ActionResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.ok for r in self.results)

    def failed(self) -> list[ActionResult]:
        return [r for r in self.results if not r.ok]


