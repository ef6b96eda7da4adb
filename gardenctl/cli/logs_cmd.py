"""`gardenctl logs WORKER [-f]`: a worker's log (stdout and stderr of its vLLM)."""

from __future__ import annotations

import os
import time

import click

from gardenctl.cli.options import DEFAULT_GARDEN, state_dir


@click.command()
@click.argument("worker")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@click.option("-n", "--lines", "count", default=100, show_default=True,
              type=click.IntRange(min=0), help="How many of the last lines to show first.")
@click.option("--file", "garden_path", default=DEFAULT_GARDEN, show_default=True,
              type=click.Path(dir_okay=False), help="Garden file, to complete short names.")
@click.option("--previous", is_flag=True, help="The log of the run before (after a restart).")
@state_dir
def logs(worker: str, follow: bool, count: int, garden_path: str, state_path: str | None,
         previous: bool) -> None:
    """Print the last lines of WORKER's log: garden/model/replica, or model/replica or model
    (replica 0) of the garden in --file."""
    from gardenctl.errors import GardenError
    from gardenctl.state import StateDir

    state = StateDir(state_path)
    worker_id = _full_id(worker, garden_path, state)
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
