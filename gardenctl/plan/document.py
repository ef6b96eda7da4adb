"""A plan as a JSON document (`plan -o json`, `plan --out plan.json`).

Fields are only ever added (format_version says which generation wrote them); version 2 added
`steps` (each with its id, kind, cause, notes and what it waits for). `actions` keeps one entry
per worker for readers of version 1. Secrets never appear: worker environments hold `${NAME}`
references, resolved only when a worker starts.

A saved plan is never executed from the file: `apply plan.json` makes the plan again and runs it
only if the document it makes is identical to the saved one (`saved_plan_difference`), so a
hand-edited argv, an edited garden or a changed fleet is refused rather than run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from gardenctl.errors import GardenError
from gardenctl.placement.model import LedgerRow, Unplaced
from gardenctl.plan.model import PLAN_FORMAT_VERSION, Launch, Plan, Step
from gardenctl.workers import memory_cap_of

KIND = "gardenctl-plan"


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return {
        "format_version": PLAN_FORMAT_VERSION,
        "kind": KIND,
        "garden": plan.garden,
        "garden_file": plan.garden_file,
        "inventory_source": plan.inventory_source,
        "fingerprints": dict(plan.fingerprints),
        "summary": plan.summary(),
        "has_changes": plan.has_changes,
        "converged": plan.converged,
        "steps": [step_json(s) for s in plan.steps],
        "actions": [_action_json(s) for s in plan.steps if not s.conditional],
        "gpus": [_ledger_json(row) for row in plan.ledgers],
        "unplaced": [_unplaced_json(u) for u in plan.unplaced],
        "models": [dataclasses.asdict(m) for m in plan.models],
        "warnings": list(plan.warnings),
    }


def step_json(step: Step) -> dict[str, Any]:
    return {
        "id": step.id,
        "kind": step.kind.value,
        "worker": step.worker_id,
        "model": step.model,
        "node": step.node,
        "gpus": list(step.gpus),
        "claim_bytes": step.claim_bytes,
        "memory_cap_bytes": memory_cap_of(step.worker),  # memory_cap: true; else null
        "gpu_memory_utilization": step.utilization,
        "port": step.port,
        "cause": step.cause,
        "notes": list(step.notes),
        "after": [n.to_json() for n in step.after],
        "conditional": step.conditional,
        "until": _iso(step.until),
        "blocked_by": step.blocked_by.value if step.blocked_by else None,
        "then": step.then.value if step.then else None,
        "ends_because": step.ends_because,
        "launch": _launch_json(step.launch),
        "spec": step.worker.to_json() if step.worker else None,
        "previous": step.previous.to_json() if step.previous else None,
    }


def _action_json(step: Step) -> dict[str, Any]:
    return {
        "action": step.kind.value,
        "worker": step.worker_id,
        "model": step.model,
        "node": step.node,
        "gpus": list(step.gpus),
        "claim_bytes": step.claim_bytes,  # on each of its GPUs
        "memory_cap_bytes": memory_cap_of(step.worker),  # PyTorch's hard limit, on each GPU
        "gpu_memory_utilization": step.utilization,
        "port": step.port,
        "cause": step.cause,
        "previous": step.previous.to_json() if step.previous else None,
        "spec": step.worker.to_json() if step.worker else None,
    }


def _launch_json(launch: Launch | None) -> dict[str, Any] | None:
    if launch is None:
        return None
    return {"restarts": launch.restarts, "streak": launch.streak,
            "replaces": launch.replaces.to_json() if launch.replaces else None,
            "rejected": launch.rejected.to_json() if launch.rejected else None}


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _ledger_json(row: LedgerRow) -> dict[str, Any]:
    return {
        "node": row.node,
        "index": row.index,
        "name": row.name,
        "total_bytes": row.total_bytes,
        "used_by_others_bytes": row.used_by_others_bytes,
        "reserve_bytes": row.reserve_bytes,
        "claimed_before_bytes": row.claimed_before_bytes,
        "claimed_after_bytes": row.claimed_after_bytes,
        "free_after_bytes": row.free_after_bytes,
        "workers_before": [{"worker": w, "claim_bytes": b} for w, b in row.workers_before],
        "workers_after": [{"worker": w, "claim_bytes": b} for w, b in row.workers_after],
        # standby workers: booked asleep, plus one wake slot (the largest awake - asleep)
        "standby_after": [{"worker": w, "awake_bytes": awake, "asleep_bytes": asleep}
                          for w, awake, asleep in row.standby_after],
        "wake_slot_bytes": row.wake_slot_bytes,
    }


def _unplaced_json(unplaced: Unplaced) -> dict[str, Any]:
    return {
        "worker": unplaced.worker_id,
        "model": unplaced.model,
        "kept_previous": unplaced.kept_previous,
        "reasons": [r.to_json() for r in unplaced.reasons],
    }


def check_saved_plan(document: object) -> Mapping[str, Any]:
    """The saved document, if it is a plan this gardenctl can compare; GardenError if not."""
    if not isinstance(document, Mapping) or document.get("kind") != KIND:
        raise GardenError("this file is not a gardenctl plan (made by `gardenctl plan --out`)")
    version = document.get("format_version")
    if version != PLAN_FORMAT_VERSION:
        raise GardenError(f"this plan has format_version {version!r}; this gardenctl makes "
                          f"version {PLAN_FORMAT_VERSION}. Make the plan again with "
                          "`gardenctl plan --out`.")
    return document


def saved_plan_difference(saved: Mapping[str, Any], fresh: Mapping[str, Any]) -> str | None:
    """None when the saved plan is exactly the plan made now; else the first difference, in
    words (which step or section, which field)."""
    for name in ("garden", "inventory", "observed"):
        if saved.get("fingerprints", {}).get(name) != fresh["fingerprints"].get(name):
            return {"garden": "the garden file changed", "inventory": "the GPUs changed",
                    "observed": "the running workers changed"}[name]
    saved_steps, fresh_steps = saved.get("steps"), fresh["steps"]
    if not isinstance(saved_steps, list) or len(saved_steps) != len(fresh_steps):
        return "its steps are not the steps the garden gives now"
    for old, new in zip(saved_steps, fresh_steps, strict=True):
        if old != new:
            fields = sorted(k for k in new if not isinstance(old, Mapping) or old.get(k) != new[k])
            what = new["id"]
            return f"step {what} differs ({', '.join(fields) or 'its fields'})"
    for key in sorted(fresh):
        if saved.get(key) != fresh[key]:
            return f"its {key!r} section differs"
    return None


__all__ = ["check_saved_plan", "plan_to_json", "saved_plan_difference", "step_json"]
