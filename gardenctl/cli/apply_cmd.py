"""`gardenctl apply`: converge the running workers to the garden file (or a saved plan)."""

from __future__ import annotations

import sys

import click

from gardenctl.cli import EXIT_ERROR, EXIT_INTERRUPTED
from gardenctl.cli.options import echo_json, garden_file, inventory_file, output_format, state_dir

APPLY_FORMAT_VERSION = 1


@click.command()
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False))
@garden_file
@inventory_file
@state_dir
@output_format("text", "json")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def apply(plan_file: str | None, garden_path: str, inventory_path: str | None,
          state_path: str | None, output: str, yes: bool) -> None:
    """Start, replace and stop workers until they match the garden file.

    With PLAN_FILE (from `plan --out`), execute exactly that plan, refusing it if the garden
    file, the inventory or the running workers changed since it was made.
    """
    from gardenctl.cli.session import apply_plan, open_session

    with open_session(state_path, "gardenctl apply") as session:
        result = session.plan(garden_path, inventory_path, plan_file)
        plan = result.plan
        if output == "text":
            from gardenctl.plan.render import render_plan

            click.echo(render_plan(plan))
        if not plan.has_work:
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
        _exit_for(plan, report)


def _document(plan, report) -> dict:
    from gardenctl.plan.document import plan_to_json

    return {
        "format_version": APPLY_FORMAT_VERSION,
        "plan": plan_to_json(plan),
        "ok": report.ok if report else True,
        "interrupted": report.interrupted if report else False,
        "results": [r.to_json() for r in report.results] if report else [],
    }


def _print_report(report) -> None:
    for result in report.results:
        mark = "ok  " if result.ok else "FAIL"
        click.echo(f"  {mark} {result.action:<8} {result.worker_id}: {result.message}")
        if not result.ok:
            if result.hint:
                click.echo(f"         hint: {result.hint}")
            if result.log_tail:
                click.echo("         last log lines:")
                for line in result.log_tail.splitlines()[-8:]:
                    click.echo(f"           | {line}")
    failed = len(report.failed())
    if report.interrupted:
        click.echo("Interrupted: workers already spawned keep loading; run apply again to "
                   "converge.", err=True)
    elif failed:
        click.echo(f"Apply finished with {failed} failure(s).", err=True)
    else:
        click.echo("Apply complete.")


def _exit_for(plan, report) -> None:
    if report is not None and report.interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if report is not None and not report.ok:
        raise click.exceptions.Exit(EXIT_ERROR)
    if plan.unplaced:
        raise click.exceptions.Exit(EXIT_ERROR)
