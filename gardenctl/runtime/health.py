"""Is a vLLM server ready? `/health` answers 200 and `/v1/models` lists its served name.

vLLM binds its port before the engine is built and refuses connections until it is ready;
`/health` answers 503 once the engine has died. `/v1/models` needs the API key when one is set.
"""

from __future__ import annotations

import http.client
import json
import re

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}

# Start-up milestones in vLLM's log (0.32), newest last: shown while a worker loads.
_MILESTONES = [
    (re.compile(r"Loading safetensors checkpoint shards:\s+(\d+)%"),
     lambda m: f"loading weights {m.group(1)}%"),
    (re.compile(r"Starting to load model|Loading weights"), lambda m: "loading weights"),
    (re.compile(r"Model loading took ([\d.]+) GiB"),
     lambda m: f"weights loaded ({m.group(1)} GiB)"),
    (re.compile(r"Available KV cache memory: ([\d.]+) GiB"),
     lambda m: f"KV cache {m.group(1)} GiB"),
    (re.compile(r"Capturing CUDA graph|Graph capturing"), lambda m: "capturing CUDA graphs"),
    (re.compile(r"Starting vLLM API server|Application startup complete"),
     lambda m: "starting API server"),
]


def connect_host(host: str) -> str:
    return WILDCARDS.get(host, host)


def probe_ready(host: str, port: int, served_name: str, api_key: str | None,
                timeout: float = 1.0) -> bool:
    """True when /health is 200 and /v1/models lists ``served_name``."""
    status, _ = _get(host, port, "/health", None, timeout)
    if status != 200:
        return False
    status, body = _get(host, port, "/v1/models", api_key, timeout)
    if status != 200:
        return False
    try:
        names = {entry.get("id") for entry in json.loads(body).get("data", [])}
    except (ValueError, AttributeError):
        return False
    return served_name in names


def probe_liveness(host: str, port: int, timeout: float = 2.0) -> str | None:
    """One liveness probe: None when /health answers 200; otherwise why not, in words (vLLM
    answers 503 once its engine has died while the API server lives on)."""
    status, _ = _get(host, port, "/health", None, timeout)
    if status == 200:
        return None
    if status is None:
        return f"/health did not answer within {timeout:g}s"
    return f"/health answered {status}"


def _get(host: str, port: int, path: str, api_key: str | None,
         timeout: float) -> tuple[int | None, bytes]:
    connection = http.client.HTTPConnection(connect_host(host), port, timeout=timeout)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(1 << 20)
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        connection.close()


def latest_milestone(log_text: str) -> str:
    """What the worker is doing, from the last start-up milestone in its log."""
    best: tuple[int, str] | None = None
    for pattern, describe in _MILESTONES:
        for match in pattern.finditer(log_text):
            if best is None or match.start() >= best[0]:
                best = (match.start(), describe(match))
    return best[1] if best else ""
