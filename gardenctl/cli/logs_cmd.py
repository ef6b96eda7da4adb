"""`gardenctl logs WORKER [-f]`: a worker's log (stdout and stderr of its vLLM)."""

from __future__ import annotations

import os
import time

import click

from gardenctl.cli.options import DEFAULT_GARDEN, runtime_choice, state_dir


@click.command()
@click.argument("worker")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@click.option("-n", "--lines", "count", default=100, show_default=True,
              type=click.IntRange(min=0), help="How many of the last lines to show first.")
@click.option("--file", "garden_path", default=DEFAULT_GARDEN, show_default=True,
              type=click.Path(dir_okay=False), help="Garden file, to complete short names.")
@click.option("--previous", is_flag=True, help="The log of the run before (after a restart).")
@state_dir
@runtime_choice
def logs(worker: str, follow: bool, count: int, garden_path: str, state_path: str | None,
         previous: bool) -> None:
    """Print the last lines of WORKER's log: garden/model/replica, or model/replica or model
    (replica 0) of the garden in --file."""
    from gardenctl.errors import GardenError
    from gardenctl.state import StateDir

    state = StateDir(state_path)
    worker_id = _full_id(worker, garden_path, state)
    runtime = _cluster_runtime(garden_path, worker_id, state)
    if runtime is not None:
        _print_from_runtime(runtime, worker_id, count, follow, previous)
        return
    path = state.log_path(worker_id)
    if previous:
        path = path.with_name(path.name + ".1")
    if not path.exists():
        raise GardenError(f"no log for {worker_id} in {state.root} (has it ever been started?)")
    with open(path, "rb") as handle:
        tail = handle.read().decode("utf-8", "replace").splitlines()[-count:] if count else []
        for line in tail:
            click.echo(line)
        if not follow:
            return
        try:
            _follow(handle, path)
        except KeyboardInterrupt:
            return


FOLLOW_BYTES = 64 * 1024  # the window of the log's tail that `logs -f` reads on a Ray node


def _cluster_runtime(garden_path: str, worker_id: str, state):
    """The Ray runtime when the worker's garden runs on a cluster (its logs are on its node),
    else None (the log is a file in the state directory)."""
    from gardenctl.errors import GardenError
    from gardenctl.runtime import runtime_spec

    garden = None
    if os.path.exists(garden_path):
        from gardenctl.spec.loader import load_garden

        try:
            garden = load_garden(garden_path).garden
        except GardenError:
            garden = None
    if garden is not None and garden.name != worker_id.split("/")[0]:
        garden = None
    if runtime_spec(garden).kind != "ray":
        return None
    from gardenctl.runtime import open_runtime

    return open_runtime(garden, None, state, writable=False)


def _print_from_runtime(runtime, worker_id: str, count: int, follow: bool,
                        previous: bool) -> None:
    """Print the worker's log as its runtime reads it on the worker's node."""
    from gardenctl.errors import GardenError

    text = runtime.read_log(worker_id, previous=previous)
    if text is None:
        raise GardenError(f"no log for {worker_id} in the Ray cluster (is its actor running?)")
    lines = text.splitlines()
    for line in lines[-count:] if count else []:
        click.echo(line)
    if not follow:
        return
    try:
        while True:
            time.sleep(0.5)
            now = runtime.read_log(worker_id, previous=previous, limit=FOLLOW_BYTES)
            if now is None:
                click.echo("--- gardenctl: the worker's actor is gone ---")
                return
            fresh = now.splitlines()
            for line in _new_lines(lines, fresh):
                click.echo(line)
            lines = fresh
    except KeyboardInterrupt:
        return


def _new_lines(before: list[str], after: list[str]) -> list[str]:
    """The lines of ``after`` that follow what ``before`` ended with (a window of the log's
    tail that moved on); all of ``after`` when they share nothing (a new run)."""
    if not before:
        return after
    for end in range(len(after) - 1, -1, -1):  # where before's last line is in after
        if after[end] == before[-1]:
            start = max(0, end + 1 - len(before))
            if after[start:end + 1] == before[len(before) - (end + 1 - start):]:
                return after[end + 1:]
    return after


def _follow(handle, path) -> None:
    inode = os.fstat(handle.fileno()).st_ino
    while True:
        chunk = handle.read()
        if chunk:
            click.echo(chunk.decode("utf-8", "replace"), nl=False)
            continue
        time.sleep(0.25)
        try:
            if os.stat(path).st_ino != inode:  # rotated: a new run of the worker began
                handle.close()
                handle = open(path, "rb")  # noqa: SIM115 - followed until Ctrl-C
                inode = os.fstat(handle.fileno()).st_ino
                click.echo("--- gardenctl: the worker was restarted; new log ---")
        except FileNotFoundError:
            pass


def _full_id(worker: str, garden_path: str, state) -> str:
    from gardenctl.errors import GardenError

    parts = worker.split("/")
    if len(parts) == 3:
        return worker
    garden = None
    if os.path.exists(garden_path):
        from gardenctl.spec.loader import load_garden

        try:
            garden = load_garden(garden_path).garden.name
        except GardenError:
            garden = None
    if garden is None:
        base = state.root / "gardens"
        gardens = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        if len(gardens) != 1:
            raise GardenError(f"which garden is {worker!r} in? Give garden/model/replica")
        garden = gardens[0]
    if len(parts) == 1:
        return f"{garden}/{parts[0]}/0"
    return f"{garden}/{parts[0]}/{parts[1]}"
