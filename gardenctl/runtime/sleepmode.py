"""vLLM's sleep mode over HTTP: put a standby worker to sleep, wake it, ask whether it sleeps.

vLLM 0.32 (docs/vllm.md section 11): the routes exist with VLLM_SERVER_DEV_MODE=1 and need
`--enable-sleep-mode` to free memory. `POST /sleep?level=L&mode=wait` pauses scheduling, lets the
requests in flight finish (`abort`, vLLM's default, would cut them off), then frees the KV cache
and offloads (level 1) or drops (level 2) the weights; it answers once asleep. `POST /wake_up`
restores them. After a level-2 sleep the weights come back empty: they are reloaded from disk
(`POST /collective_rpc` with `{"method": "reload_weights"}`) and the prefix cache is reset
(`POST /reset_prefix_cache`). `GET /is_sleeping` answers `{"is_sleeping": bool}`. The dev
routes are not behind `--api-key`; the key is sent anyway, so a proxy in front that checks it
still passes them.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping

from gardenctl.errors import GardenError
from gardenctl.runtime.health import connect_host

SLEEP_TIMEOUT = 300.0  # seconds: a sleep waits for the requests in flight to finish
WAKE_TIMEOUT = 600.0  # seconds: a level-2 wake-up reloads the weights from disk


class SleepModeError(GardenError):
    """A worker did not do what its sleep-mode route was asked (it is gone, it has no sleep
    mode, it answered an error)."""


def sleep(host: str, port: int, level: int, api_key: str | None = None,
          timeout: float = SLEEP_TIMEOUT) -> None:
    _call(host, port, "POST", f"/sleep?level={level}&mode=wait", api_key, timeout)


def wake(host: str, port: int, level: int, api_key: str | None = None,
         timeout: float = WAKE_TIMEOUT) -> None:
    """Wake a worker that sleeps at ``level``; after level 2, reload its weights too."""
    _call(host, port, "POST", "/wake_up", api_key, timeout)
    if level >= 2:
        _call(host, port, "POST", "/collective_rpc", api_key, timeout,
              {"method": "reload_weights"})
        _call(host, port, "POST", "/reset_prefix_cache", api_key, timeout)


def act(action: str, host: str, port: int, level: int,
        api_key: str | None = None) -> bool | None:
    """One sleep-mode action: "sleep", "wake" (None) or "is_sleeping" (its answer)."""
    if action == "sleep":
        sleep(host, port, level, api_key)
    elif action == "wake":
        wake(host, port, level, api_key)
    elif action == "is_sleeping":
        return is_sleeping(host, port, api_key)
    else:
        raise ValueError(f"unknown sleep-mode action {action!r}")
    return None


def is_sleeping(host: str, port: int, api_key: str | None = None,
                timeout: float = 2.0) -> bool | None:
    """True or False; None when the worker does not answer (or has no sleep routes)."""
    try:
        body = _call(host, port, "GET", "/is_sleeping", api_key, timeout)
    except SleepModeError:
        return None
    value = body.get("is_sleeping") if isinstance(body, Mapping) else None
    return value if isinstance(value, bool) else None


def _call(host: str, port: int, method: str, path: str, api_key: str | None, timeout: float,
          payload: object = None) -> object:
    connection = http.client.HTTPConnection(connect_host(host), port, timeout=timeout)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    route = path.split("?", 1)[0]
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        body = response.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise SleepModeError(f"{route} on port {port}: {exc}") from None
    finally:
        connection.close()
    if response.status == 404:
        raise SleepModeError(f"{route} on port {port} answered 404: the worker does not serve "
                             "it (vLLM's sleep-mode routes need VLLM_SERVER_DEV_MODE=1; an older "
                             "vLLM may lack it)")
    if response.status >= 400:
        raise SleepModeError(f"{route} on port {port} answered {response.status}: "
                             f"{body[:200].decode('utf-8', 'replace')}")
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


__all__ = ["SleepModeError", "act", "is_sleeping", "sleep", "wake"]
