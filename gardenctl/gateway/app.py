"""The gateway's process: an aiohttp server, its shared state and the task that follows the
garden.

Built on aiohttp: a mature asyncio HTTP server and client in one package (one event loop, no
thread per connection, thousands of idle streams are cheap), whose `StreamResponse` writes each
chunk to the client as it is read from the worker (`iter_any`), so server-sent events pass
through without buffering; and whose handler cancellation (on here) cancels the upstream
request when the client goes away. Metrics are written by hand (`metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gardenctl.gateway.discovery import Discovery, GardenView
from gardenctl.gateway.metrics import Metrics
from gardenctl.gateway.sleepers import Sleepers
from gardenctl.gateway.upstream import Outstanding

log = logging.getLogger("gardenctl.gateway")

EJECT_S = 5.0  # a replica that refused a connection is tried last for this long
MAX_BODY_BYTES = 64 * 1024**2  # request bodies (long prompts, embedding batches)
SHUTDOWN_S = 10.0  # on SIGTERM / Ctrl-C, requests in flight get this long to finish
BACKLOG = 2048  # the listen queue, as uvicorn's (vLLM's) default: a burst of clients is queued,
# not dropped (a dropped handshake waits for the client's retransmission, seconds later)


@dataclass(frozen=True)
class GatewayOptions:
    host: str
    port: int
    refresh_s: float = 1.0  # how often the garden is observed


class Gateway:
    """The state every request handler shares (all of it used from the event loop's thread)."""

    def __init__(self, discovery: Discovery, view: GardenView, refresh_s: float) -> None:
        self.discovery = discovery
        self.view = view
        self.refresh_s = refresh_s
        self.outstanding = Outstanding()
        self.metrics = Metrics()
        self.standby = Sleepers(discovery, self.metrics, self.outstanding)
        self._ejected: dict[str, float] = {}  # worker id -> monotonic time it may lead again
        self._session: aiohttp.ClientSession | None = None
        self._adopted = False
        self.adopt(view)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the gateway's client session is open while it serves"
        return self._session

    def adopt(self, view: GardenView) -> None:
        """Serve ``view`` from now on (keeping the last usable one when this one is not)."""
        if view.usable or not self.view.usable:
            if view.reread and self._adopted:
                log.info("read the new version of %s", self.discovery.garden_path)
            self.view = view
            self._adopted = True
            names = sorted(view.table.declared | set(view.table.served_names()))
            self.metrics.know(names)
            self.metrics.ready_replicas = {n: sum(r.ready for r in view.table.replicas(n))
                                           for n in names}
        for problem in view.problems:
            log.warning("%s", problem)

    def eject(self, worker_id: str) -> None:
        self._ejected[worker_id] = time.monotonic() + EJECT_S

    def ejected(self) -> set[str]:
        now = time.monotonic()
        for worker_id in [w for w, until in self._ejected.items() if until <= now]:
            del self._ejected[worker_id]
        return set(self._ejected)

    async def refresh(self) -> None:
        view = await asyncio.get_running_loop().run_in_executor(None, self.discovery.refresh)
        self.metrics.refreshes += 1
        before = self.view.table.served_names()
        self.adopt(view)
        await self.standby.sync(self.view)
        after = self.view.table.served_names()
        if after != before:
            log.info("serving %s", ", ".join(after) if after else "no model (none is ready)")

    async def follow(self) -> None:
        """Observe the garden every refresh_s seconds, for as long as the gateway runs."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the last good view keeps serving
                self.metrics.refresh_errors += 1
                log.warning("observing the garden failed (%s: %s); the last view stays",
                            type(exc).__name__, exc)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp's cleanup context: the client session, the follow task and the standby
        workers' keeper (their states first, so that no request goes to a sleeping one)."""
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              trust_env=False)
        await self.standby.sync(self.view)
        tasks = [asyncio.create_task(self.follow()), asyncio.create_task(self.standby.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.standby.close()
            await self._session.close()


GATEWAY = web.AppKey("gateway", Gateway)


def build_app(gateway: Gateway) -> web.Application:
    from gardenctl.gateway.routes import add_routes

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[GATEWAY] = gateway
    add_routes(app)
    app.cleanup_ctx.append(gateway.lifecycle)
    return app


def serve(gateway: Gateway, options: GatewayOptions) -> None:
    """Run the gateway in the foreground until SIGINT or SIGTERM."""
    log.info("gateway listening on http://%s:%d (OpenAI API under /v1; /health, /metrics)",
             options.host, options.port)
    served = gateway.view.table.served_names()
    log.info("serving %s", ", ".join(served) if served else "no model yet (none is ready)")
    web.run_app(build_app(gateway), host=options.host, port=options.port, print=None,
                access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_S,
                backlog=BACKLOG)


__all__ = ["GATEWAY", "Gateway", "GatewayOptions", "build_app", "serve"]
