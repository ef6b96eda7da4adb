"""Glue between the CLI and a Session: progress display for an apply."""

from __future__ import annotations

from gardenctl.execute import ApplyReport
from gardenctl.session import Session, open_session
from gardenctl.workflow import PlanResult

__all__ = ["apply_plan", "open_session"]


def apply_plan(session: Session, result: PlanResult, quiet: bool = False) -> ApplyReport:
    from gardenctl.cli.progress import make_progress

    timeouts = {s.worker_id: s.worker.start_timeout for s in result.plan.steps if s.worker}
    progress = make_progress(timeouts, quiet=quiet)
    try:
        return session.apply(result, progress)
    finally:
        if progress is not None:
            progress.close()
