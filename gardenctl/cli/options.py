"""Options shared by several commands, and the JSON writer every `-o json` uses."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

DEFAULT_GARDEN = "garden.yaml"


def garden_file(func: Callable) -> Callable:
    return click.option(
        "-f",
        "--file",
        "garden_path",
        default=DEFAULT_GARDEN,
        show_default=True,
        type=click.Path(dir_okay=False),
        help="The garden file.",
    )(func)


def inventory_file(func: Callable) -> Callable:
    return click.option(
        "--inventory",
        "inventory_path",
        default=None,
        type=click.Path(dir_okay=False),
        help="YAML/JSON file of nodes and GPUs; overrides the garden's inventory and discovery.",
    )(func)


def output_format(*choices: str) -> Callable:
    def decorate(func: Callable) -> Callable:
        return click.option(
            "-o",
            "--output",
            "output",
            type=click.Choice(choices),
            default=choices[0],
            show_default=True,
            help="Output format.",
        )(func)

    return decorate


def echo_json(document: Any) -> None:
    """Print a JSON document deterministically (insertion order, two-space indent, newline)."""
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


def state_dir(func: Callable) -> Callable:
    return click.option(
        "--state-dir",
        "state_path",
        default=None,
        type=click.Path(file_okay=False),
        help="Where worker records, logs and the lock live (default: $GARDENCTL_STATE_DIR, "
        "else $XDG_STATE_HOME/gardenctl, else ~/.local/state/gardenctl).",
    )(func)


def _set_runtime(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        import os

        os.environ["GARDENCTL_RUNTIME"] = value  # read by gardenctl.runtime.runtime_spec


def runtime_choice(func: Callable) -> Callable:
    return click.option(
        "--runtime",
        type=click.Choice(["local", "ray"]),
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_set_runtime,
        help="Run on this runtime instead of the garden's `runtime.kind` (ray: the cluster at "
        "runtime.address, else $RAY_ADDRESS, else auto).",
    )(func)
