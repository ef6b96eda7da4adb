"""Glue between the CLI and a Session: progress display for an apply."""

from __future__ import annotations

from gardenctl.session import Session, open_session
from gardenctl.workflow import PlanResult

__all__ = ["apply_plan", "open_session"]


def apply_plan(session: Session, result: PlanResult, quiet: bool = False):
    from gardenctl.cli.progress import make_progress

    timeouts = {a.worker_id: a.worker.start_timeout for a in result.plan.actions if a.worker}
    progress = make_progress(timeouts, quiet=quiet)
    try:
        return session.apply(result, progress)
    finally:
        if progress is not None:
            progress.close()
