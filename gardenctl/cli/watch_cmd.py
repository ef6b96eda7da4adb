"""`gardenctl watch`: converge on every save of the garden file, and heal drift and crashes."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import click

from gardenctl.cli.options import (
    garden_file,
    inventory_file,
    output_format,
    runtime_choice,
    state_dir,
)

if TYPE_CHECKING:
    from gardenctl.session import Session


@click.command()
@garden_file
@inventory_file
@state_dir
@runtime_choice
@output_format("text", "json")
@click.option("--resync", default=30.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds between full re-convergence passes (jittered by 10%).")
@click.option("--debounce", "debounce_ms", default=300, show_default=True,
              type=click.IntRange(min=0), help="Milliseconds a burst of saves is gathered for.")
@click.option("--poll", is_flag=True,
              help="Poll the file instead of file events (network mounts, WSL).")
@click.option("--allow-empty", is_flag=True,
              help="Accept a file version that would stop every worker.")
@click.option("--gateway", "with_gateway", is_flag=True,
              help="Also serve the garden's models on one OpenAI endpoint (the garden's "
              "gateway: section), in this process.")
def watch(garden_path: str, inventory_path: str | None, state_path: str | None, output: str,
          resync: float, debounce_ms: int, poll: bool, allow_empty: bool,
          with_gateway: bool) -> None:
    """Keep the workers as the garden file says: re-converge on each save, on a worker's death
    (with crash-loop backoff) and every --resync seconds. A broken or unplaceable edit changes
    nothing. One event line per action (-o json: JSON lines). With --gateway the same process
    serves the models on one endpoint (as `gardenctl gateway`). SIGTERM or Ctrl-C stops watching
    (and serving) and leaves the workers running; `gardenctl down` stops them."""
    from gardenctl.events import EventLog
    from gardenctl.session import open_session
    from gardenctl.watch import Watcher, WatchOptions

    options = WatchOptions(garden_path=garden_path, inventory_path=inventory_path,
                           resync=resync, debounce_ms=debounce_ms, poll=poll,
                           allow_empty=allow_empty)
    log = EventLog(json_lines=output == "json")
    with open_session(state_path, "gardenctl watch") as session:
        _lock_now(session, garden_path)
        watcher = Watcher(session, options, log)

        def stop(signum: int, frame: Any) -> None:
            watcher.request_stop(signal.Signals(signum).name)  # flags only: signal-safe

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        served = _start_gateway(garden_path, inventory_path, state_path) if with_gateway \
            else None
        try:
            watcher.run()
        finally:
            if served is not None:
                served.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if watcher.fatal is not None:
            raise watcher.fatal


def _start_gateway(garden_path: str, inventory_path: str | None,
                   state_path: str | None) -> Any:
    """The gateway, listening in a thread of this process (aiohttp is imported only now)."""
    from gardenctl.cli.gateway_cmd import prepare_gateway
    from gardenctl.gateway.background import BackgroundGateway

    served = BackgroundGateway(*prepare_gateway(garden_path, inventory_path, state_path,
                                                None, None, 1.0))
    served.start()
    return served


def _lock_now(session: Session, garden_path: str) -> None:
    """Take the garden's lock at once when the file can be read (a second watch or an apply
    of the same garden fails now); a broken file is locked when a valid version appears."""
    from gardenctl.errors import SpecError
    from gardenctl.spec.loader import load_garden

    try:
        garden = load_garden(garden_path).garden
    except SpecError:
        return
    session.lock(garden.name, garden)
