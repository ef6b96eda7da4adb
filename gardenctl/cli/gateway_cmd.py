"""`gardenctl gateway`: one OpenAI-compatible endpoint for every model of the garden.

aiohttp is imported here, when the command runs, never by `import gardenctl.cli`."""

from __future__ import annotations

from typing import Any

import click

from gardenctl.cli.options import garden_file, inventory_file, runtime_choice, state_dir


@click.command()
@garden_file
@inventory_file
@state_dir
@runtime_choice
@click.option("--host", default=None, help="Listen here instead of the garden's gateway.host.")
@click.option("--port", default=None, type=click.IntRange(1, 65535),
              help="Listen here instead of the garden's gateway.port.")
@click.option("--refresh", "refresh_s", default=1.0, show_default=True,
              type=click.FloatRange(min=0.05),
              help="Seconds between two observations of the garden's workers.")
def gateway(garden_path: str, inventory_path: str | None, state_path: str | None,
            host: str | None, port: int | None, refresh_s: float) -> None:
    """Serve the garden's models on one OpenAI-compatible endpoint (foreground). Each request
    goes to a ready worker of the model it names, the least busy first; workers that start,
    stop or move, and edits of the file, are followed without a restart. GET /health and
    /metrics (Prometheus). Ctrl-C or SIGTERM stops it; the workers keep running."""
    from gardenctl.gateway.app import serve

    serve(*prepare_gateway(garden_path, inventory_path, state_path, host, port, refresh_s))


def prepare_gateway(garden_path: str, inventory_path: str | None, state_path: str | None,
                    host: str | None, port: int | None, refresh_s: float) -> tuple[Any, Any]:
    """The gateway's state and where it listens (also for `watch --gateway`); GardenError for
    a key that is not set, or a non-loopback address without a key."""
    import logging

    from gardenctl.errors import GardenError
    from gardenctl.gateway.app import Gateway, GatewayOptions
    from gardenctl.gateway.discovery import Discovery
    from gardenctl.spec.models import LOOPBACK_HOSTS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    _raise_open_files()
    discovery = Discovery(garden_path, inventory_path, state_path)
    view = discovery.refresh()  # a file that cannot be used yet: /health answers 503 until
    if view.missing_key is not None:  # a valid version appears (as `watch` waits for one)
        raise GardenError(f"the gateway's api_key refers to ${{{view.missing_key}}}, which is "
                          "not set; set it in the gateway's environment")
    settings = view.settings
    options = GatewayOptions(host=host or settings.host, port=port or settings.port,
                             refresh_s=refresh_s)
    if options.host not in LOOPBACK_HOSTS and view.client_key is None:
        raise GardenError(f"--host {options.host} would expose every model beyond this machine "
                          "without an API key; set gateway.api_key: \"${GATEWAY_API_KEY}\" in "
                          "the garden, or listen on 127.0.0.1")
    return Gateway(discovery, view, refresh_s), options


def _raise_open_files() -> None:
    """Each stream holds two descriptors (client and worker): take the hard limit of open
    files, not the common soft default of 1024 (about 500 streams)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # then the soft limit stays: a 503 per stream beyond it, never a hang
