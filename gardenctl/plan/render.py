"""A plan as text for people: its steps with causes and what each waits for, the models'
assumed memory, then each GPU's ledger before -> after.

Deterministic (no clock, no terminal width): golden tests compare it byte for byte. Everything
that came from the garden file is shown escaped (`gardenctl.text.shown`): a newline in a model
id cannot forge a line. Bars: '#' used by others, '=' claimed by our workers, '.' free.
"""

from __future__ import annotations

from gardenctl.placement.model import LedgerRow
from gardenctl.plan.model import Plan, Step, When
from gardenctl.text import shown
from gardenctl.units import format_size
from gardenctl.vocab import StepKind
from gardenctl.workers import memory_cap_of

BAR_WIDTH = 40
SYMBOLS = {
    StepKind.START: "+", StepKind.REPLACE: "~", StepKind.RESTART: "^", StepKind.ROLLBACK: "<",
    StepKind.STOP: "-", StepKind.STOP_LEFTOVERS: "-", StepKind.AWAIT: "*", StepKind.ADOPT: "@",
    StepKind.HOLD: "!", StepKind.WAIT: "!", StepKind.KEEP: "=",
}
_SPAWNED_HERE = (StepKind.START, StepKind.REPLACE, StepKind.RESTART, StepKind.ROLLBACK,
                 StepKind.AWAIT, StepKind.ADOPT, StepKind.KEEP)


def render_plan(plan: Plan, *, show_idle_gpus: bool = False) -> str:
    lines = [f"Plan for garden {shown(plan.garden)} ({shown(plan.garden_file)}; GPUs "
             f"{shown(plan.inventory_source)})", ""]
    if plan.steps:
        lines.append("Steps (in order; 'after' is what a step waits for):")
        width = max(len(shown(s.worker_id)) for s in plan.steps)
        numbers = {s.id: i for i, s in enumerate(plan.steps, 1)}
        for step in plan.steps:
            lines += step_lines(step, width, numbers)
        lines.append("")
    lines += _model_lines(plan)
    lines += _ledger_lines(plan.ledgers, show_idle_gpus)
    if plan.unplaced:
        lines.append(f"Unplaced ({len(plan.unplaced)}):")
        for unplaced in plan.unplaced:
            head = "kept at its running version" if unplaced.kept_previous else "not placed"
            lines.append(f"  ! {shown(unplaced.worker_id)}: {head}")
            for reason in unplaced.reasons:
                lines.append(f"      {shown(reason.message)}")
        lines.append("")
    if plan.warnings:
        lines.append("Warnings:")
        lines += [f"  - {shown(w)}" for w in plan.warnings]
        lines.append("")
    lines.append(summary_line(plan))
    return "\n".join(lines)


_ALSO_DONE = (("rollback", "to roll back"), ("adopt", "to adopt"))
_NOT_DONE = (("await", "still loading (apply waits for them)"),
             ("hold", "held by crash-loop backoff"), ("wait", "waiting (see Warnings)"),
             ("unplaced", "unplaced"))


def summary_line(plan: Plan) -> str:
    s = plan.summary()
    if not plan.has_changes:
        text = f"No changes: {s['keep']} worker(s) already as the garden wants."
    else:
        text = (f"Plan: {s['start']} to start, {s['replace']} to replace, {s['restart']} to "
                f"restart, {s['stop'] + s['stop_leftovers']} to stop, {s['keep']} unchanged.")
        text += "".join(f" {s[key]} {words}." for key, words in _ALSO_DONE if s[key])
    return text + "".join(f" {s[key]} {words}." for key, words in _NOT_DONE if s[key])


def step_lines(step: Step, width: int, numbers: dict[str, int] | None = None) -> list[str]:
    """A step as lines: what, where, why, what else, and what it waits for."""
    numbers = numbers or {}
    number = f"{numbers[step.id]:>2}. " if step.id in numbers else ""
    label = step.kind.value.replace("_", " ")
    head = f"  {number}{SYMBOLS[step.kind]} {label:<14} {shown(step.worker_id):<{width}}  "
    where = f"{shown(step.node)} GPU {','.join(map(str, step.gpus))}"
    if step.kind in _SPAWNED_HERE and step.worker is not None:
        cap = memory_cap_of(step.worker)
        head += (f"{where}  util {step.utilization:.3f}  claims {format_size(step.claim_bytes)}"
                 + (f"  cap {format_size(cap)}" if cap is not None else "")
                 + f"  port {step.port}")
    else:
        head += where
    lines = [head.rstrip(), f"      {shown(step.cause)}"]
    lines += [f"      ({shown(note)})" for note in step.notes]
    if step.after:
        lines.append("      after: " + ", ".join(_need(n.step_id, n.when, numbers)
                                                  for n in step.after))
    return lines


def _need(step_id: str, when: When, numbers: dict[str, int]) -> str:
    name = f"{numbers[step_id]}" if step_id in numbers else shown(step_id)
    return {When.DONE: f"{name} done", When.FAILED: f"{name} failed",
            When.FINISHED: f"{name} finished"}[when]


def _model_lines(plan: Plan) -> list[str]:
    if not plan.models:
        return []
    lines = ["Models (memory per GPU, estimated or measured; `gardenctl estimate MODEL` "
             "itemises the estimate):"]
    width = max(len(m.name) for m in plan.models)
    for m in plan.models:
        basis = shown(m.weights_source.split(":", 1)[0][:40])
        sequences = f"{m.max_model_len:,} tokens" + (f" x {m.min_concurrency}"
                                                     if m.min_concurrency > 1 else "")
        tp = f", TP {m.tensor_parallel_size}" if m.tensor_parallel_size > 1 else ""
        lines.append(f"  {m.name:<{width}}  {format_size(m.total_bytes):>9} = weights "
                     f"{format_size(m.weights_bytes)} ({basis}) + KV "
                     f"{format_size(m.kv_cache_bytes)} ({sequences}{tp}) + other "
                     f"{format_size(m.other_bytes)}")
        if m.memory_source == "measured":
            lines.append(f"  {'':<{width}}  sized from its profile: {shown(m.memory_note)}")
        elif m.memory_note:
            lines.append(f"  {'':<{width}}  estimated; {shown(m.memory_note)}")
    lines.append("")
    return lines


def _ledger_lines(rows: tuple[LedgerRow, ...], show_idle: bool) -> list[str]:
    shown_rows = [r for r in rows if show_idle or r.workers_before or r.workers_after]
    if not rows:
        return []
    lines = ["GPUs ('#' others, '=' our claims, '.' free):"]
    for row in shown_rows:
        lines.append(f"  {shown(row.node)} GPU {row.index}  {shown(row.name)}  "
                     f"{format_size(row.total_bytes)}")
        lines.append(f"    before {_bar(row, row.claimed_before_bytes)}  "
                     f"{_figures(row, row.claimed_before_bytes)}")
        lines.append(f"    after  {_bar(row, row.claimed_after_bytes)}  "
                     f"{_figures(row, row.claimed_after_bytes)}")
        sleepers = {w: asleep for w, _, asleep in row.standby_after}
        awake = [(w, b) for w, b in row.workers_after if w not in sleepers]
        if awake:
            names = ", ".join(f"{shown(_short(w))} {format_size(b)}" for w, b in awake)
            lines.append(f"           {names}")
        if row.standby_after:
            names = ", ".join(f"{shown(_short(w))} {format_size(a)} awake / "
                              f"{format_size(s)} asleep" for w, a, s in row.standby_after)
            lines.append(f"           standby: {names}")
            lines.append(f"           standby booked asleep ({format_size(row.asleep_after_bytes)})"
                         f" + wake slot {format_size(row.wake_slot_bytes)}: any of them woken "
                         "alone fits, several at once while their wake-ups fit in the slot")
        if row.overcommitted:
            lines.append("    ! over-committed: running workers claim more than is free")
    idle = len(rows) - len(shown_rows)
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
