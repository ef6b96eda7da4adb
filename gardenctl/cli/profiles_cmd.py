"""`gardenctl profiles`: what gardenctl learned from real vLLM start-ups, and importing more.

    gardenctl profiles [-o json]                       list the learned profiles
    gardenctl profiles import LOG... --gpu NAME        learn from start-up logs you already have
    gardenctl profiles forget [--model REF]            delete profiles
"""

from __future__ import annotations

import os
import time
from typing import Any

import click

from gardenctl.cli.options import echo_json, output_format, state_dir

PROFILES_FORMAT_VERSION = 1


@click.group(invoke_without_command=True)
@state_dir
@output_format("text", "json")
@click.pass_context
def profiles(ctx: click.Context, state_path: str | None, output: str) -> None:
    """List the memory profiles learned from real starts (the next plan sizes a model from a
    profile of the same model, settings, vLLM release and GPU model)."""
    ctx.obj = {"state_path": state_path}
    if ctx.invoked_subcommand is not None:
        return
    store = _store(state_path)
    found = store.all()
    if output == "json":
        echo_json({"format_version": PROFILES_FORMAT_VERSION, "database": str(store.path),
                   "profiles": [p.to_json() for p in found]})
    else:
        click.echo(render(found, str(store.path)))


@profiles.command("import")
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--gpu", "gpu_name", required=True,
              help="The GPU model the logs were produced on, as NVML names it "
              "(e.g. 'NVIDIA H100 80GB HBM3'; see `gardenctl inventory`).")
@click.option("--gpu-memory", "gpu_memory", default=None,
              help="Total memory of that GPU (e.g. 80GiB), for logs that do not state it.")
@click.option("--model", "model", default=None,
              help="The model's reference as a garden's `model:` gives it (Hugging Face id or "
              "path), for logs that do not name it.")
@click.option("--vllm-version", "vllm_version", default=None,
              help="The vLLM release, for logs without a version banner.")
@state_dir
@output_format("text", "json")
@click.pass_context
def import_logs(ctx: click.Context, logs: tuple[str, ...], gpu_name: str,
                gpu_memory: str | None, model: str | None, vllm_version: str | None,
                state_path: str | None, output: str) -> None:
    """Learn from vLLM start-up logs (each file: the output of one `vllm serve`; the last
    start in it counts). The model, its settings and the release come from the log's own
    `non-default args` and banner; what it lacks comes from the options."""
    from gardenctl.errors import GardenError
    from gardenctl.profiles.learn import import_log
    from gardenctl.units import parse_size

    state_path = state_path or (ctx.obj or {}).get("state_path")
    total = None
    if gpu_memory is not None:
        try:
            total = parse_size(gpu_memory)
        except ValueError as exc:
            raise GardenError(f"--gpu-memory: {exc}") from None
    store = _store(state_path)
    learned = []
    for path in logs:
        profile = import_log(path, store, gpu_name=gpu_name, gpu_total_bytes=total,
                             model=model, vllm_version=vllm_version,
                             measured_at=os.path.getmtime(path))
        learned.append(profile)
    if output == "json":
        echo_json({"format_version": PROFILES_FORMAT_VERSION, "database": str(store.path),
                   "imported": [p.to_json() for p in learned]})
    else:
        for path, profile in zip(logs, learned, strict=True):
            click.echo(f"learned from {path}: {profile.key.describe()}: "
                       f"{_line(profile)}")


@profiles.command("forget")
@click.option("--model", "model", default=None,
              help="Only this model's profiles (its Hugging Face id or path, as in `model:`).")
@state_dir
@click.pass_context
def forget(ctx: click.Context, model: str | None, state_path: str | None) -> None:
    """Delete learned profiles (all, or one model's): the next plans use the estimate."""
    state_path = state_path or (ctx.obj or {}).get("state_path")
    count = _store(state_path).forget(model)
    click.echo(f"deleted {count} profile{'s' if count != 1 else ''}")


def _store(state_path: str | None) -> Any:
    from gardenctl.profiles.store import ProfileStore
    from gardenctl.state import StateDir

    return ProfileStore.in_state(StateDir(state_path).root)


def render(found: list[Any], database: str) -> str:
    from gardenctl.text import shown

    if not found:
        return (f"No profiles yet ({shown(database)}). Every worker that becomes ready adds "
                "one; `gardenctl profiles import LOG --gpu NAME` learns from logs you have.")
    lines = [f"{len(found)} profile{'s' if len(found) != 1 else ''} in {shown(database)} "
             "(per GPU of a worker):"]
    for profile in found:
        lines.append(f"  {shown(profile.key.describe())}")
        lines.append(f"      {_line(profile)}")
    return "\n".join(lines)


def _line(profile: Any) -> str:
    from gardenctl.text import shown
    from gardenctl.units import format_size

    day = time.strftime("%Y-%m-%d", time.gmtime(profile.measured_at))
    graphs = ("" if profile.cuda_graph_bytes is None
              else f", graphs {format_size(profile.cuda_graph_bytes)}")
    return (f"non-KV {format_size(profile.sizing_non_kv_bytes)} (weights "
            f"{format_size(profile.weights_bytes)}{graphs}), KV "
            f"{profile.kv_bytes_per_token:,} B/token; {profile.samples} "
            f"start{'s' if profile.samples != 1 else ''}, last {day} "
            f"({shown(profile.source)})")
