"""The gateway in a thread of another command (`gardenctl watch --gateway`): one process keeps
the garden converged and served.

aiohttp's `run_app` owns the main thread's signals; here the app runs on an event loop of its
own thread through `AppRunner` and `TCPSite` (the same app, handler cancellation and backlog),
installs no signal handler (the watch loop keeps SIGTERM and Ctrl-C), and is stopped by `stop()`,
which lets requests in flight finish for up to SHUTDOWN_S seconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from aiohttp import web

from gardenctl.errors import GardenError
from gardenctl.gateway.app import BACKLOG, SHUTDOWN_S, Gateway, GatewayOptions, build_app

log = logging.getLogger("gardenctl.gateway")


class BackgroundGateway:
    def __init__(self, gateway: Gateway, options: GatewayOptions) -> None:
        self.gateway = gateway
        self.options = options
        self._thread = threading.Thread(target=self._run, name="gardenctl-gateway", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._listening = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Listen, or raise GardenError (the port is taken, the address is wrong)."""
        self._thread.start()
        self._listening.wait()
        if self._error is not None:
            self._thread.join()
            raise GardenError(f"the gateway could not listen on {self.options.host}:"
                              f"{self.options.port}: {self._error}")
        log.info("gateway listening on http://%s:%d (OpenAI API under /v1; /health, /metrics)",
                 self.options.host, self.options.port)

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=SHUTDOWN_S + 5)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._listening.is_set():
                self._error = exc
                self._listening.set()
            else:
                log.error("the gateway stopped: %s: %s", type(exc).__name__, exc)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(build_app(self.gateway), handler_cancellation=True,
                               access_log=None, shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.options.host, self.options.port, backlog=BACKLOG)
            await site.start()
            self._listening.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()


__all__ = ["BackgroundGateway"]
