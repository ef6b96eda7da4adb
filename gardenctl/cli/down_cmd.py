"""`gardenctl down`: stop every worker of this garden."""

from __future__ import annotations

import sys

import click

from gardenctl.cli import EXIT_ERROR
from gardenctl.cli.options import echo_json, garden_file, output_format, runtime_choice, state_dir

DOWN_FORMAT_VERSION = 1


@click.command()
@garden_file
@state_dir
@runtime_choice
@click.option("--garden", "garden_name", default=None,
              help="The garden's name, when its file is gone or broken.")
@output_format("text", "json")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def down(garden_path: str, state_path: str | None, garden_name: str | None, output: str,
         yes: bool) -> None:
    """Stop every worker of the garden (SIGTERM, grace period, SIGKILL of the process group)
    and remove their records. Takes the state lock."""
    from gardenctl.down import open_for_down, stop_garden, workers_of
    from gardenctl.session import open_session
    from gardenctl.text import shown

    spec = _garden_spec(garden_path, required=not garden_name)
    name = _checked_name(garden_name) if garden_name else spec.name if spec else ""
    if spec is not None and spec.name != name:
        spec = None  # --garden names another garden than the file: its runtime is unknown
    with open_session(state_path, "gardenctl down") as session:
        session.lock(name, spec)
        runtime = open_for_down(spec, session.state, name)
        targets = workers_of(runtime, name)
        if not targets:
            if output == "json":
                echo_json({"format_version": DOWN_FORMAT_VERSION, "garden": name, "results": []})
            else:
                click.echo(f"Garden {shown(name)}: no workers to stop.")
            return
        if output == "text":
            click.echo(f"Garden {shown(name)}: will stop {len(targets)} worker(s):")
            for worker in targets:
                click.echo(f"  - {shown(worker.worker_id)} ({worker.phase}, pid {worker.pid})")
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError("down stops workers: pass --yes when not at a terminal")
            if not click.confirm("Stop them?", default=False, err=True):
                raise click.exceptions.Exit(EXIT_ERROR)
        results = stop_garden(session.state, runtime, name, targets)
    if output == "json":
        echo_json({"format_version": DOWN_FORMAT_VERSION, "garden": name,
                   "results": [r.to_json() for r in results]})
    else:
        for result in results:
            click.echo(f"  {'ok  ' if result.ok else 'FAIL'} {shown(result.worker_id)}: "
                       f"{shown(result.message)}")
    if not all(r.ok for r in results):
        raise click.exceptions.Exit(EXIT_ERROR)


def _checked_name(name: str) -> str:
    import re

    from gardenctl.spec.models import NAME_PATTERN
    from gardenctl.text import quoted

    if not re.match(NAME_PATTERN, name):
        raise click.BadParameter(f"{quoted(name)} is not a garden name (valid: letters, digits, "
                                 "'.', '_' and '-', starting with a letter or digit, at most 63 "
                                 "characters)", param_hint="--garden")
    return name


def _garden_spec(garden_path: str, *, required: bool):
    """The garden the file declares; None when it is unreadable and --garden names it."""
    from gardenctl.errors import GardenError
    from gardenctl.spec.loader import load_garden

    try:
        return load_garden(garden_path).garden
    except GardenError as exc:
        if not required:
            return None
        raise GardenError(f"cannot tell which garden to stop: {str(exc).splitlines()[0]}; "
                          "pass --garden NAME") from None
