"""The gateway's HTTP routes: the OpenAI API under /v1, routed by the body's `model`, and
/health and /metrics.

A request goes to the ready replica of its model with the fewest outstanding requests
(`upstream.choose_replica`); for a standby model, to an awake one, after waking one if all
sleep, or starting one if all are stopped (`standby: stop`; `sleepers`: the request waits up to
the garden's wake_timeout). If that replica refuses or resets the connection before its answer
has begun, the next one is tried (never after: a started stream cannot be replayed). A
non-streamed answer is read whole and passed on with its status; a streamed one (server-sent
events, or any answer without a length) is written to the client chunk by chunk as it arrives.
When the client goes away, aiohttp cancels the handler and the upstream connection is closed,
which a vLLM server takes as the request's abort. The client's Authorization header never
reaches a worker: each worker gets its own VLLM_API_KEY.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gardenctl.gateway import errors
from gardenctl.gateway.app import GATEWAY, Gateway
from gardenctl.gateway.errors import GatewayError
from gardenctl.gateway.metrics import CONTENT_TYPE, UNKNOWN_MODEL
from gardenctl.gateway.sleepers import Lease
from gardenctl.gateway.upstream import Replica, choose_replica

log = logging.getLogger("gardenctl.gateway")

WORKER_HEADER = "X-Gardenctl-Worker"  # which worker answered (for debugging and tests)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization", "content-length"}
NOT_RETURNED = HOP_BY_HOP | {"content-length", "server", "date"}
# Failures of a connection before the worker's answer began: another replica may be tried.
CONNECT_FAILURES = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                    aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
CLIENT_CLOSED = 499  # the status counted for a request whose client went away (as nginx does)
LOST_MID_STREAM = "worker_lost_mid_stream"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name:.+}", get_model)
    app.router.add_post("/v1/{tail:.+}", proxy)
    app.router.add_route("*", "/{tail:.*}", unknown_route)


def reply(failure: GatewayError) -> web.Response:
    return web.json_response(failure.body(), status=failure.status, headers=dict(failure.headers))


# -- routes the gateway answers itself -------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    view = gateway.view
    if not view.usable:
        return web.json_response({"status": "error", "message": "the garden file cannot be "
                                  "read: " + "; ".join(view.problems)}, status=503)
    return web.json_response({"status": "ok", "garden": view.table.garden,
                              "models": view.table.served_names()})


async def metrics(request: web.Request) -> web.Response:
    text = request.app[GATEWAY].metrics.render()
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    denied = authorize(request, gateway)
    if denied is not None:
        return reply(denied)
    return web.json_response({"object": "list",
                              "data": [_model_entry(gateway, name)
                                       for name in gateway.view.table.served_names()]})


async def get_model(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    denied = authorize(request, gateway)
    if denied is not None:
        return reply(denied)
    name = request.match_info["name"]
    if not gateway.view.table.replicas(name):
        return reply(errors.model_not_found(name, gateway.view.table.served_names()))
    return web.json_response(_model_entry(gateway, name))


def _model_entry(gateway: Gateway, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0,
            "owned_by": f"gardenctl/{gateway.view.table.garden}"}


async def unknown_route(request: web.Request) -> web.Response:
    return reply(errors.unknown_route(request.method, request.path))


def authorize(request: web.Request, gateway: Gateway) -> GatewayError | None:
    """None when the request may pass: no key is set, or it carries the gateway's key."""
    view = gateway.view
    if view.missing_key is not None:
        return errors.key_not_set(view.missing_key)
    if view.client_key is None:
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                          view.client_key.encode()):
        return None
    return errors.unauthorized()


# -- the proxy -------------------------------------------------------------------------------

async def proxy(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    denied = authorize(request, gateway)
    if denied is not None:
        gateway.metrics.reject(UNKNOWN_MODEL, denied.status, denied.code or denied.type)
        return reply(denied)
    body = await request.read()
    model = _model_of(body)
    if isinstance(model, GatewayError):
        gateway.metrics.reject(UNKNOWN_MODEL, model.status, "invalid_request")
        return reply(model)
    table = gateway.view.table
    if not table.known(model):
        failure = errors.model_not_found(model, table.served_names())
        gateway.metrics.reject(UNKNOWN_MODEL, failure.status, "model_not_found")
        return reply(failure)
    replicas = table.replicas(model)
    if not replicas:
        failure = errors.no_ready_replica(model)
        gateway.metrics.reject(model, failure.status, "model_not_ready")
        return reply(failure)
    return await forward(request, gateway, model, replicas, body)


def _model_of(body: bytes) -> str | GatewayError:
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        return errors.bad_request("The request body is not valid JSON.")
    if not isinstance(payload, dict):
        return errors.bad_request("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return errors.bad_request("You must provide a model parameter.", "model")
    return model


async def forward(request: web.Request, gateway: Gateway, model: str,
                  replicas: tuple[Replica, ...], body: bytes) -> web.StreamResponse:
    """Send the request to a replica (the next one if a connection fails before its answer
    begins) and relay the answer; count it in the metrics whatever happens."""
    started = time.monotonic()
    settings = gateway.view.settings
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                    sock_read=settings.read_timeout)
    gateway.metrics.begin(model)
    status: int = CLIENT_CLOSED
    error: str | None = "client_closed"
    tried: list[str] = []
    lease: Lease | None = None
    try:
        if any(r.standby for r in replicas):  # asleep ones are woken first (sleepers)
            woken = await gateway.standby.acquire(model, replicas, settings.wake_timeout)
            if isinstance(woken, GatewayError):
                status, error = woken.status, woken.code
                return reply(woken)
            lease = woken
            # a `standby: stop` worker started meanwhile is reached where it runs now
            replicas = gateway.view.table.replicas(model) or replicas
        while True:
            # only an awake worker takes a request (chosen and counted without a pause, so
            # that it is never put to sleep in between)
            replica = choose_replica(gateway.standby.routable(replicas),
                                     gateway.outstanding.counts(), tried, gateway.ejected())
            if replica is None:
                failure = errors.unreachable(model, len(tried))
                status, error = failure.status, failure.code
                return reply(failure)
            if tried:
                gateway.metrics.of(model).failovers += 1
            tried.append(replica.worker_id)
            gateway.outstanding.begin(replica.worker_id)
            if lease is not None:
                lease.release()
            try:
                response = await _attempt(request, replica, body, timeout)
            except CONNECT_FAILURES as exc:
                gateway.eject(replica.worker_id)
                gateway.standby.failed(replica.worker_id)
                log.warning("%s: %s failed before answering (%s); trying another replica",
                            model, replica.worker_id, _why(exc))
                gateway.outstanding.end(replica.worker_id)
                continue
            except aiohttp.SocketTimeoutError:
                gateway.outstanding.end(replica.worker_id)
                failure = errors.upstream_timeout(model, settings.read_timeout)
                status, error = failure.status, failure.code
                return reply(failure)
            except BaseException:
                gateway.outstanding.end(replica.worker_id)
                raise
            try:
                answer, status, error = await _relay(request, response, replica, model)
            finally:
                gateway.outstanding.end(replica.worker_id)
            if error == LOST_MID_STREAM:
                gateway.standby.failed(replica.worker_id)
            return answer
    finally:
        if lease is not None:
            lease.release()
        gateway.metrics.finish(model, status, time.monotonic() - started, error)


class _Answer:
    """A worker's answer as far as it was read before anything went to the client."""

    def __init__(self, upstream: aiohttp.ClientResponse, body: bytes | None) -> None:
        self.upstream = upstream
        self.body = body  # the whole body of a non-streamed answer; None: stream it


async def _attempt(request: web.Request, replica: Replica, body: bytes,
                   timeout: aiohttp.ClientTimeout) -> _Answer:
    """Send the request; read a non-streamed answer whole. Raises CONNECT_FAILURES when the
    worker failed before its answer was complete, so another replica may take it."""
    headers = CIMultiDict((k, v) for k, v in request.headers.items()
                          if k.lower() not in NOT_FORWARDED)
    if replica.api_key:
        headers["Authorization"] = f"Bearer {replica.api_key}"
    gateway = request.app[GATEWAY]
    upstream = await gateway.session.request(
        request.method, replica.base_url + request.path_qs, data=body, headers=headers,
        timeout=timeout, allow_redirects=False)
    try:
        if _is_stream(upstream):
            return _Answer(upstream, None)
        try:
            data = await upstream.read()
        except aiohttp.ClientPayloadError as exc:
            raise aiohttp.ServerDisconnectedError(f"the answer was cut: {exc}") from exc
        return _Answer(upstream, data)
    except BaseException:
        upstream.close()
        raise


def _is_stream(upstream: aiohttp.ClientResponse) -> bool:
    content_type = upstream.headers.get("Content-Type", "")
    return content_type.startswith("text/event-stream") or upstream.content_length is None


async def _relay(request: web.Request, answer: _Answer, replica: Replica,
                 model: str) -> tuple[web.StreamResponse, int, str | None]:
    """Pass the worker's answer to the client: (the response, its status, error kind)."""
    upstream = answer.upstream
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items()
                          if k.lower() not in NOT_RETURNED)
    headers[WORKER_HEADER] = replica.worker_id
    error = None if upstream.status < 400 else f"http_{upstream.status}"
    try:
        if answer.body is not None:
            whole = web.Response(status=upstream.status, body=answer.body, headers=headers)
            return whole, upstream.status, error
        stream = web.StreamResponse(status=upstream.status, headers=headers)
        await stream.prepare(request)
        chunks = upstream.content.iter_any().__aiter__()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                # the worker failed mid-stream: nothing can be replayed; cut the client's
                # connection so that it sees an unfinished answer, not a complete one
                log.warning("%s: %s failed mid-stream (%s)", model, replica.worker_id,
                            _why(exc))
                if request.transport is not None:
                    request.transport.close()
                return stream, upstream.status, LOST_MID_STREAM
            try:
                await stream.write(chunk)
            except ConnectionResetError:  # the client went away between two chunks
                upstream.close()
                return stream, CLIENT_CLOSED, "client_closed"
        await stream.write_eof()
        return stream, upstream.status, error
    except asyncio.CancelledError:
        upstream.close()  # the client went away: abort the worker's request too
        raise
    finally:
        upstream.release()


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


__all__ = ["WORKER_HEADER", "add_routes", "authorize", "forward", "proxy"]
