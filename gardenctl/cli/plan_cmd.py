"""`gardenctl plan`: what apply would change, GPU by GPU, and why (a dry run)."""

from __future__ import annotations

import click

from gardenctl.cli import EXIT_CHANGES, EXIT_ERROR
from gardenctl.cli.options import (
    echo_json,
    garden_file,
    inventory_file,
    output_format,
    runtime_choice,
    state_dir,
)


@click.command()
@garden_file
@inventory_file
@state_dir
@runtime_choice
@output_format("text", "json")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Also save the plan as JSON; `gardenctl apply PLAN` executes exactly it.")
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 2 when there are changes to apply (0: none, 1: error).")
@click.option("--show-idle-gpus", is_flag=True, help="List GPUs that hold no worker, too.")
def plan(garden_path: str, inventory_path: str | None, state_path: str | None, output: str,
         out_path: str | None, detailed_exitcode: bool, show_idle_gpus: bool) -> None:
    """Show the plan: workers to start, replace, stop or keep, with causes, and each GPU's
    memory before -> after. Changes nothing."""
    from gardenctl.inventory import resolve_inventory
    from gardenctl.plan.document import plan_to_json
    from gardenctl.plan.render import render_plan
    from gardenctl.spec.loader import load_garden
    from gardenctl.state import StateDir
    from gardenctl.workflow import plan_read_only

    loaded = load_garden(garden_path)
    inventory = resolve_inventory(loaded.garden, garden_path, inventory_path)
    result = plan_read_only(loaded, inventory, StateDir(state_path))
    document = plan_to_json(result.plan)
    if out_path:
        from gardenctl.errors import GardenError
        from gardenctl.files import write_json_atomic

        try:
            write_json_atomic(out_path, document)
        except OSError as exc:
            raise GardenError(f"cannot write the plan to {out_path}: {exc.strerror}") from None
    if output == "json":
        echo_json(document)
    else:
        click.echo(render_plan(result.plan, show_idle_gpus=show_idle_gpus))
        if out_path:
            click.echo(f"Saved to {out_path}; run `gardenctl apply {out_path}` to execute it.")
    if result.plan.unplaced:
        raise click.exceptions.Exit(EXIT_ERROR)
    if detailed_exitcode and result.plan.has_changes:
        raise click.exceptions.Exit(EXIT_CHANGES)
