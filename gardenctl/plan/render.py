"""A plan as text for people: actions with causes, then each GPU's ledger before -> after.

Deterministic (no clock, no terminal width): golden tests compare it byte for byte.
Bars: '#' used by other processes, '=' claimed by our workers, '.' free; 40 characters = total.
"""

from __future__ import annotations

from gardenctl.placement.model import LedgerRow
from gardenctl.plan.model import KEEP, REPLACE, START, STOP, Action, Plan
from gardenctl.units import format_size

BAR_WIDTH = 40
SYMBOLS = {START: "+", REPLACE: "~", STOP: "-", KEEP: "="}


def render_plan(plan: Plan, *, show_idle_gpus: bool = False) -> str:
    lines = [f"Plan for garden {plan.garden} ({plan.garden_file}; GPUs {plan.inventory_source})",
             ""]
    if plan.actions:
        lines.append("Workers:")
        width = max(len(a.worker_id) for a in plan.actions)
        for action in plan.actions:
            lines += _action_lines(action, width)
        lines.append("")
    lines += _model_lines(plan)
    lines += _ledger_lines(plan.ledgers, show_idle_gpus)
    if plan.unplaced:
        lines.append(f"Unplaced ({len(plan.unplaced)}):")
        for unplaced in plan.unplaced:
            head = "kept at its running version" if unplaced.kept_previous else "not placed"
            lines.append(f"  ! {unplaced.worker_id}: {head}")
            for reason in unplaced.reasons:
                lines.append(f"      {reason.message}")
        lines.append("")
    if plan.warnings:
        lines.append("Warnings:")
        lines += [f"  - {w}" for w in plan.warnings]
        lines.append("")
    lines.append(summary_line(plan))
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    s = plan.summary()
    if not plan.has_changes:
        text = f"No changes: {s['keep']} worker(s) already as the garden wants."
    else:
        text = (f"Plan: {s['start']} to start, {s['replace']} to replace, {s['stop']} to stop, "
                f"{s['keep']} unchanged.")
        adopted = sum(1 for a in plan.actions if a.adopts)
        if adopted:
            text += f" {adopted} to adopt."
    loading = sum(1 for a in plan.actions if a.loading)
    if loading:
        text += f" {loading} still loading (apply waits for them)."
    if s["unplaced"]:
        text += f" {s['unplaced']} unplaced."
    return text


def _action_lines(action: Action, width: int) -> list[str]:
    head = f"  {SYMBOLS[action.action]} {action.action:<8} {action.worker_id:<{width}}  "
    where = f"{action.node} GPU {','.join(map(str, action.gpus))}"
    if action.action == STOP:
        head += where
    else:
        head += (f"{where}  util {action.utilization:.3f}  claims {format_size(action.claim_bytes)}"
                 f"  port {action.port}")
    return [head.rstrip(), f"      {action.cause}"]


def _model_lines(plan: Plan) -> list[str]:
    if not plan.models:
        return []
    lines = ["Models (estimated memory per GPU; `gardenctl estimate MODEL` itemises it):"]
    width = max(len(m.name) for m in plan.models)
    for m in plan.models:
        basis = m.weights_source.split(":", 1)[0][:40]
        sequences = f"{m.max_model_len:,} tokens" + (f" x {m.min_concurrency}"
                                                     if m.min_concurrency > 1 else "")
        tp = f", TP {m.tensor_parallel_size}" if m.tensor_parallel_size > 1 else ""
        lines.append(f"  {m.name:<{width}}  {format_size(m.total_bytes):>9} = weights "
                     f"{format_size(m.weights_bytes)} ({basis}) + KV {format_size(m.kv_cache_bytes)}"
                     f" ({sequences}{tp}) + other {format_size(m.other_bytes)}")
    lines.append("")
    return lines


def _ledger_lines(rows: tuple[LedgerRow, ...], show_idle: bool) -> list[str]:
    shown = [r for r in rows if show_idle or r.workers_before or r.workers_after]
    if not rows:
        return []
    lines = ["GPUs ('#' others, '=' our claims, '.' free):"]
    for row in shown:
        lines.append(f"  {row.node} GPU {row.index}  {row.name}  {format_size(row.total_bytes)}")
        lines.append(f"    before {_bar(row, row.claimed_before_bytes)}  "
                     f"{_figures(row, row.claimed_before_bytes)}")
        lines.append(f"    after  {_bar(row, row.claimed_after_bytes)}  "
                     f"{_figures(row, row.claimed_after_bytes)}")
        if row.workers_after:
            names = ", ".join(f"{_short(w)} {format_size(b)}" for w, b in row.workers_after)
            lines.append(f"           {names}")
        if row.overcommitted:
            lines.append("    ! over-committed: running workers claim more than is free")
    idle = len(rows) - len(shown)
    if idle:
        lines.append(f"  ({idle} GPU(s) with no workers of this garden not shown)")
    lines.append("")
    return lines


def _bar(row: LedgerRow, claimed: int) -> str:
    total = max(row.total_bytes, 1)
    others = round(BAR_WIDTH * min(row.used_by_others_bytes, total) / total)
    ours = round(BAR_WIDTH * min(claimed, total) / total)
    ours = min(ours, BAR_WIDTH - others)
    return "[" + "#" * others + "=" * ours + "." * (BAR_WIDTH - others - ours) + "]"


def _figures(row: LedgerRow, claimed: int) -> str:
    free = row.total_bytes - row.used_by_others_bytes - claimed
    return (f"claimed {format_size(claimed)}, others {format_size(row.used_by_others_bytes)}, "
            f"free {format_size(free)}")


def _short(worker_id: str) -> str:
    return worker_id.split("/", 1)[1] if "/" in worker_id else worker_id
