"""A plan as a JSON document (`plan -o json`, `plan --out plan.json`) and back.

Fields are only ever added (format_version says which generation wrote them). Secrets never
appear: worker environments hold `${NAME}` references, resolved only when a worker starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gardenctl.errors import GardenError
from gardenctl.observe import ObservedWorker
from gardenctl.placement.model import LedgerRow, Reason, Unplaced
from gardenctl.plan.model import PLAN_FORMAT_VERSION, Action, ModelSummary, Plan
from gardenctl.workers import DesiredWorker


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return {
        "format_version": PLAN_FORMAT_VERSION,
        "kind": "gardenctl-plan",
        "garden": plan.garden,
        "garden_file": plan.garden_file,
        "inventory_source": plan.inventory_source,
        "fingerprints": dict(plan.fingerprints),
        "summary": plan.summary(),
        "has_changes": plan.has_changes,
        "actions": [_action_json(a) for a in plan.actions],
        "gpus": [_ledger_json(row) for row in plan.ledgers],
        "unplaced": [_unplaced_json(u) for u in plan.unplaced],
        "models": [dataclasses.asdict(m) for m in plan.models],
        "warnings": list(plan.warnings),
    }


def _action_json(action: Action) -> dict[str, Any]:
    previous = action.previous
    return {
        "action": action.action,
        "worker": action.worker_id,
        "model": action.model,
        "node": action.node,
        "gpus": list(action.gpus),
        "claim_bytes": action.claim_bytes,  # on each of its GPUs
        "gpu_memory_utilization": action.utilization,
        "port": action.port,
        "cause": action.cause,
        "previous": previous.to_json() if previous else None,
        "spec": action.worker.to_json() if action.worker else None,
    }


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
    }


def _unplaced_json(unplaced: Unplaced) -> dict[str, Any]:
    return {
        "worker": unplaced.worker_id,
        "model": unplaced.model,
        "kept_previous": unplaced.kept_previous,
        "reasons": [r.to_json() for r in unplaced.reasons],
    }


def plan_from_json(document: Mapping[str, Any]) -> Plan:
    """Rebuild a Plan from its JSON document; GardenError if it is not one."""
    if not isinstance(document, Mapping) or document.get("kind") != "gardenctl-plan":
        raise GardenError("this file is not a gardenctl plan (made by `gardenctl plan --out`)")
    version = document.get("format_version")
    if not isinstance(version, int) or version > PLAN_FORMAT_VERSION:
        raise GardenError(f"this plan has format_version {version!r}; this gardenctl reads up to "
                          f"{PLAN_FORMAT_VERSION}. Make the plan again with this version.")
    try:
        return Plan(
            garden=document["garden"],
            garden_file=document["garden_file"],
            inventory_source=document["inventory_source"],
            fingerprints=dict(document["fingerprints"]),
            actions=tuple(_action_from(a) for a in document["actions"]),
            ledgers=tuple(_ledger_from(g) for g in document["gpus"]),
            unplaced=tuple(_unplaced_from(u) for u in document["unplaced"]),
            warnings=tuple(document.get("warnings", ())),
            models=tuple(ModelSummary(**m) for m in document.get("models", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise GardenError(f"the plan file is damaged ({type(exc).__name__}: {exc}); make it "
                          "again with `gardenctl plan --out`") from None


def _action_from(data: Mapping[str, Any]) -> Action:
    previous = data.get("previous")
    spec = data.get("spec")
    return Action(
        action=data["action"],
        worker_id=data["worker"],
        model=data["model"],
        cause=data["cause"],
        worker=DesiredWorker.from_json(spec) if spec else None,
        previous=observed_from_json(previous) if previous else None,
    )


def observed_from_json(data: Mapping[str, Any]) -> ObservedWorker:
    values = dict(data)
    values["gpus"] = tuple(values["gpus"])
    values["argv"] = tuple(values["argv"])
    values["pids"] = tuple(values.get("pids", ()))
    values["env"] = tuple(sorted(dict(values.get("env", {})).items()))
    return ObservedWorker(**values)


def _ledger_from(data: Mapping[str, Any]) -> LedgerRow:
    return LedgerRow(
        node=data["node"], index=data["index"], name=data["name"],
        total_bytes=data["total_bytes"], used_by_others_bytes=data["used_by_others_bytes"],
        reserve_bytes=data["reserve_bytes"], claimed_before_bytes=data["claimed_before_bytes"],
        claimed_after_bytes=data["claimed_after_bytes"],
        workers_before=tuple((w["worker"], w["claim_bytes"]) for w in data["workers_before"]),
        workers_after=tuple((w["worker"], w["claim_bytes"]) for w in data["workers_after"]),
    )


def _unplaced_from(data: Mapping[str, Any]) -> Unplaced:
    return Unplaced(
        worker_id=data["worker"], model=data["model"], kept_previous=data["kept_previous"],
        reasons=tuple(Reason(**r) for r in data["reasons"]),
    )
