"""`gardenctl inventory`: the GPUs gardenctl would plan against, and who uses them."""

from __future__ import annotations

import os

import click

from gardenctl.cli.options import (
    DEFAULT_GARDEN,
    echo_json,
    inventory_file,
    output_format,
    runtime_choice,
)

INVENTORY_FORMAT_VERSION = 1


@click.command()
@click.option("-f", "--file", "garden_path", default=None, type=click.Path(dir_okay=False),
              help=f"Use this garden's declared inventory (default: ./{DEFAULT_GARDEN} if it "
              "exists and declares one).")
@inventory_file
@runtime_choice
@output_format("text", "json")
def inventory(garden_path: str | None, inventory_path: str | None, output: str) -> None:
    """List GPUs: from --inventory FILE, else the garden's declared `inventory:`, else this
    machine's GPUs through NVML (with the processes using each)."""
    from gardenctl.inventory import resolve_inventory

    garden = None
    path = garden_path or (DEFAULT_GARDEN if os.path.exists(DEFAULT_GARDEN) else None)
    if inventory_path is None and path is not None:
        from gardenctl.spec.loader import load_garden

        garden = load_garden(path).garden
    found = resolve_inventory(garden, path or "", inventory_path)
    if output == "json":
        echo_json(_to_json(found))
    else:
        click.echo(_to_text(found))


def _to_json(found) -> dict:
    return {
        "format_version": INVENTORY_FORMAT_VERSION,
        "source": found.source,
        "nodes": [
            {
                "name": node.name,
                "gpus": [
                    {
                        "index": gpu.index,
                        "uuid": gpu.uuid,
                        "name": gpu.name,
                        "total_bytes": gpu.total_bytes,
                        "used_bytes": gpu.used_bytes,
                        "free_bytes": gpu.total_bytes - gpu.used_bytes,
                        "processes": [
                            {"pid": p.pid, "used_bytes": p.used_bytes} for p in gpu.processes
                        ],
                    }
                    for gpu in node.gpus
                ],
            }
            for node in found.nodes
        ],
    }


def _to_text(found) -> str:
    from gardenctl.text import shown
    from gardenctl.units import format_size

    lines = [f"GPUs ({shown(found.source)}):"]
    for node in found.nodes:
        lines.append(f"  node {shown(node.name)}")
        for gpu in node.gpus:
            used = "used" if found.used_includes_ours else "used by others"
            lines.append(f"    GPU {gpu.index}  {shown(gpu.name)}  "
                         f"{format_size(gpu.total_bytes)} total, "
                         f"{format_size(gpu.used_bytes)} {used}, "
                         f"{format_size(gpu.total_bytes - gpu.used_bytes)} free"
                         + (f"  {gpu.uuid}" if gpu.uuid else ""))
            for process in gpu.processes:
                memory = format_size(process.used_bytes) if process.used_bytes is not None else "?"
                lines.append(f"      pid {process.pid}: {memory}")
    return "\n".join(lines)
