"""`gardenctl status`: what runs where, claimed vs used memory, phases, in sync or not."""

from __future__ import annotations

import time
from typing import Any

import click

from gardenctl.cli.options import (
    echo_json,
    garden_file,
    inventory_file,
    output_format,
    runtime_choice,
    state_dir,
)

STATUS_FORMAT_VERSION = 2
BAR = 40


@click.command()
@garden_file
@inventory_file
@state_dir
@runtime_choice
@output_format("text", "json")
def status(garden_path: str, inventory_path: str | None, state_path: str | None,
           output: str) -> None:
    """Show each GPU's ledger (claimed by our workers, used by them now, used by others), each
    worker's phase, restarts, uptime and last error, and whether the garden is in sync."""
    from gardenctl.status import gather_status

    report = gather_status(garden_path, inventory_path, state_path, now=time.time())
    if output == "json":
        echo_json({"format_version": STATUS_FORMAT_VERSION, **report.to_json()})
    else:
        click.echo(render_status(report))


def render_status(report: Any) -> str:
    from gardenctl.text import shown
    from gardenctl.units import format_size

    lines = [f"Garden {shown(report.garden or '?')} ({shown(report.garden_file)}): "
             f"{report.sync_line()}"]
    for reason in report.out_of_sync:
        lines.append(f"  - {shown(reason)}")
    for note in report.notes:
        first, *rest = note.splitlines()
        lines.append(f"  note: {shown(first)}")
        lines += [f"        {shown(line.strip())}" for line in rest]
    if report.watch is not None:
        lines.append(_watch_line(report.watch))
    if report.gpus:
        lines += ["", "GPUs ('#' others, '=' claimed by our workers, '.' free; "
                  "'used' is what our workers' processes hold now):"]
        for gpu in report.gpus:
            total = max(gpu.total_bytes, 1)
            others = round(BAR * min(gpu.used_by_others_bytes, total) / total)
            ours = min(BAR - others, round(BAR * min(gpu.claimed_bytes, total) / total))
            bar = "[" + "#" * others + "=" * ours + "." * (BAR - others - ours) + "]"
            used = ("n/a (no NVML)" if gpu.used_by_ours_bytes is None
                    else format_size(gpu.used_by_ours_bytes))
            lines.append(f"  {shown(gpu.node)} GPU {gpu.index}  {shown(gpu.name)}  "
                         f"{format_size(gpu.total_bytes)}  {bar}")
            lines.append(f"      claimed {format_size(gpu.claimed_bytes)}, used {used}, others "
                         f"{format_size(gpu.used_by_others_bytes)}")
    lines.append("")
    if not report.workers:
        lines.append("No workers.")
        return "\n".join(lines)
    header = ("WORKER", "NODE", "GPUS", "PORT", "PHASE", "RESTARTS", "UPTIME",
              "LAST ERROR / NEXT")
    rows = [(shown(w.worker_id), shown(w.node), ",".join(map(str, w.gpus)), str(w.port), _phase(w),
             str(w.restarts), _duration(w.uptime_s), shown(_last(w))[:90])
            for w in report.workers]
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    lines += _memory_lines(report.workers)
    lines += _standby_lines(report.workers)
    for worker_id, tail in sorted(report.log_tails.items()):
        if tail:
            lines.append(f"  last log lines of {shown(worker_id)} (gardenctl logs "
                         f"{shown(worker_id)}):")
            lines += [f"    | {shown(line)[:150]}" for line in tail]
    return "\n".join(lines)


def _memory_lines(workers: list[Any]) -> list[str]:
    """Claimed / measured / estimated per GPU of each worker, and what stands out."""
    from gardenctl.text import shown
    from gardenctl.units import format_size

    rows = [w for w in workers  # the workers that hold memory now
            if w.memory is not None and w.phase in ("starting", "ready", "unhealthy", "stopping")]
    if not rows:
        return []
    lines = ["", "Memory per GPU (claimed: what the plan reserved for the worker; measured: what "
             "its own vLLM log says, 'used' from NVML; estimated: what the plan sizes the model "
             "at now):"]
    header = ("WORKER", "CLAIMED", "MEASURED", "ESTIMATED")
    table = []
    for w in rows:
        memory = w.memory
        estimated = "-"
        if memory.estimated_bytes is not None:
            how = "from its profile" if memory.source == "measured" else "static estimate"
            estimated = f"{format_size(memory.estimated_bytes)} ({how})"
        table.append((shown(w.worker_id), format_size(w.claim_bytes),
                      _measured_text(memory.measured), estimated))
    widths = [max(len(r[i]) for r in [*table, header]) for i in range(len(header))]
    for row in [header, *table]:
        lines.append("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    for w in rows:
        if w.memory.source == "measured":
            lines.append(f"    {shown(w.worker_id)}: the plan sizes it from its profile, "
                         f"{shown(w.memory.source_note)}")
        elif w.memory.source_note:
            lines.append(f"    {shown(w.worker_id)}: estimated; {shown(w.memory.source_note)}")
        for note in w.memory.notes:
            lines.append(f"    ! {shown(w.worker_id)} {shown(note)}")
    return lines


def _standby_lines(workers: list[Any]) -> list[str]:
    """Standby workers: awake or asleep now, and the gateway's wake-ups."""
    from gardenctl.text import shown
    from gardenctl.units import format_size

    rows = [w for w in workers if w.standby is not None]
    if not rows:
        return []
    lines = ["", "Standby (asleep until a request reaches the gateway; what a wake-up takes back "
             "as planned, and as its first sleep freed; wake-ups as the gateway counts them):"]
    header = ("WORKER", "STATE", "LEVEL", "ASLEEP HOLDS", "WAKE-UP TAKES (MEASURED)", "WAKES",
              "LAST WAKE")
    table = []
    for w in rows:
        standby = w.standby
        last = "-"
        if standby.last_wake is not None:
            last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(standby.last_wake))
            if standby.last_wake_s is not None:
                last += f" (took {standby.last_wake_s:.2f}s)"
        measured = ("not yet" if standby.measured_wake_bytes is None
                    else format_size(standby.measured_wake_bytes))
        table.append((shown(w.worker_id), standby.state,
                      str(standby.level) if standby.mode == "sleep" else "stop",
                      format_size(standby.asleep_bytes),
                      f"{format_size(standby.wake_bytes)} ({measured})", str(standby.wakes),
                      last))
    widths = [max(len(r[i]) for r in [*table, header]) for i in range(len(header))]
    for row in [header, *table]:
        lines.append("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return lines


def _measured_text(measured: Any) -> str:
    from gardenctl.units import format_size

    if measured is None:
        return "not yet (no start-up lines in its log)"
    parts = []
    if measured.gpu_used_bytes is not None:
        parts.append(f"used {format_size(measured.gpu_used_bytes)}")
    if measured.weights_bytes is not None:
        parts.append(f"weights {format_size(measured.weights_bytes)}")
    if measured.kv_cache_bytes is not None:
        kv = f"KV {format_size(measured.kv_cache_bytes)}"
        if measured.kv_cache_tokens is not None:
            kv += f" ({measured.kv_cache_tokens:,} tokens"
            if measured.max_concurrency is not None:
                kv += f", {measured.max_concurrency:.2f}x"
            kv += ")"
        parts.append(kv)
    if measured.non_kv_bytes is not None:
        parts.append(f"non-KV {format_size(measured.non_kv_bytes)}")
    if measured.vllm_version:
        parts.append(f"vLLM {measured.vllm_version}")
    return ", ".join(parts) or "nothing in its log yet"


def _phase(worker: Any) -> str:
    if worker.standby is not None and worker.phase == "ready":
        return f"ready ({worker.standby.state})"
    if worker.next_step == "hold" and worker.next_start_after:
        wait = max(0, worker.next_start_after - time.time())
        return f"{worker.phase}, restart in {wait:.0f}s ({worker.failures} in a row)"
    return str(worker.phase)


def _last(worker: Any) -> str:
    """The last error, then (when the plan would act on the worker) what it would do next."""
    parts = []
    if worker.last_error:
        parts.append(worker.last_error)
    if worker.next_step and worker.next_step != "hold":
        parts.append(f"next: {worker.next_step}: {worker.next_cause}")
    return "; ".join(parts)


def _watch_line(watch: Any) -> str:
    from gardenctl.text import shown

    state = f"running (pid {watch.pid})" if watch.running else "not running"
    text = f"  watch: {state}"
    if watch.last_applied:
        text += f"; last applied version {watch.last_applied['version']}"
    attempted = watch.last_attempted
    if attempted and (not watch.last_applied
                      or attempted["version"] != watch.last_applied["version"]):
        verdict = "accepted" if attempted.get("accepted") else "rejected"
        text += f"; last attempted {attempted['version']} ({verdict})"
        if attempted.get("error"):
            text += f": {shown(attempted['error'].splitlines()[0][:120])}"
    return text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
