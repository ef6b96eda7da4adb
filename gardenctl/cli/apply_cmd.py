"""`gardenctl apply`: converge the running workers to the garden file (or a saved plan)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from gardenctl.cli import EXIT_ERROR, EXIT_INTERRUPTED
from gardenctl.cli.options import (
    echo_json,
    garden_file,
    inventory_file,
    output_format,
    runtime_choice,
    state_dir,
)

APPLY_FORMAT_VERSION = 2
_MARKS = {"held": "HELD", "skipped": "SKIP"}


@click.command()
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False))
@garden_file
@inventory_file
@state_dir
@runtime_choice
@output_format("text", "json")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def apply(plan_file: str | None, garden_path: str, inventory_path: str | None,
          state_path: str | None, output: str, yes: bool) -> None:
    """Start, replace and stop workers until they match the garden file, and wait until the
    workers it started are ready (or say why not).

    With PLAN_FILE (from `plan --out`), run it only if the garden file, the GPUs and the
    running workers still give exactly that plan; otherwise nothing is changed.
    """
    from gardenctl.cli.session import apply_plan, open_session
    from gardenctl.text import shown

    with open_session(state_path, "gardenctl apply") as session:
        path = _garden_of(plan_file) if plan_file else garden_path
        # A saved plan is checked against the plan made now from what `plan` knew: the
        # releases remembered, not asked again.
        result = session.plan(path, inventory_path, detect=plan_file is None)
        if plan_file:  # a saved plan runs as it was made, waits included
            session.check_saved(plan_file, result)
        else:
            result = session.plan_when_gpus_free(
                result, inventory_path, lambda why: click.echo(f"waiting: {shown(why)}", err=True))
        plan = result.plan
        if output == "text":
            from gardenctl.plan.render import render_plan

            click.echo(render_plan(plan))
        if not plan.has_work and not plan.blocked:
            if output == "json":
                echo_json(_document(plan, None))
            _exit_for(plan, None)
            return
        if plan.has_changes and not yes:
            if not sys.stdin.isatty():
                raise click.UsageError("apply changes workers: pass --yes when not at a terminal")
            if not click.confirm("Apply these changes?", default=False, err=True):
                raise click.exceptions.Exit(EXIT_ERROR)
        report = apply_plan(session, result, quiet=output == "json")
        if output == "json":
            echo_json(_document(plan, report))
        else:
            _print_report(report)
        if session.learn_problem:
            click.echo(f"warning: {shown(session.learn_problem)}", err=True)
        _exit_for(plan, report)


def _garden_of(plan_file: str) -> str:
    """The garden file a saved plan was made from."""
    from gardenctl.errors import GardenError

    try:
        with open(plan_file, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise GardenError(f"{plan_file}: no such plan file") from None
    except (OSError, ValueError) as exc:
        raise GardenError(f"{plan_file}: not a JSON plan ({exc})") from None
    path = document.get("garden_file") if isinstance(document, dict) else None
    if not isinstance(path, str):
        raise GardenError(f"{plan_file} is not a gardenctl plan (made by `gardenctl plan --out`)")
    return path


def _document(plan: Any, report: Any) -> dict[str, Any]:
    from gardenctl.plan.document import plan_to_json

    return {
        "format_version": APPLY_FORMAT_VERSION,
        "plan": plan_to_json(plan),
        "ok": report.ok if report else True,
        "interrupted": report.interrupted if report else False,
        "results": [r.to_json() for r in report.results] if report else [],
    }


def _print_report(report: Any) -> None:
    from gardenctl.text import shown

    for result in report.results:
        mark = "ok  " if result.ok else _MARKS.get(result.outcome.value, "FAIL")
        click.echo(f"  {mark} {result.action:<14} {shown(result.worker_id)}: "
                   f"{shown(result.message)}")
        if not result.ok:
            if result.hint:
                click.echo(f"         hint: {shown(result.hint)}")
            if result.log_tail:
                click.echo("         last log lines:")
                for line in result.log_tail.splitlines()[-8:]:
                    click.echo(f"           | {shown(line)}")
    failed = len(report.failed())
    if report.interrupted:
        click.echo("Interrupted: workers already spawned keep loading; run apply again to "
                   "converge.", err=True)
    elif failed:
        click.echo(f"Apply finished with {failed} step(s) not done.", err=True)
    else:
        click.echo("Apply complete.")


def _exit_for(plan: Any, report: Any) -> None:
    if report is not None and report.interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if report is not None and not report.ok:
        raise click.exceptions.Exit(EXIT_ERROR)
    if plan.unplaced:
        raise click.exceptions.Exit(EXIT_ERROR)
