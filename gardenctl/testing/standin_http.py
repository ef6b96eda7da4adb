"""The stand-in's HTTP API: the routes of vLLM's OpenAI-compatible server, with canned answers.

Not ready yet: every route answers 503. (Real vLLM refuses connections until the engine is
ready; the stand-in listens at once instead, so that a second server on the same port fails
at once with "address already in use" while a restarted one can still reuse the port. A
client must treat "refused" and 503 alike: not ready.)

Ready: ``GET /health`` 200, ``GET /version``, ``GET /v1/models``, ``POST /v1/completions``
and ``POST /v1/chat/completions`` (the reply repeats the prompt's words up to max_tokens:
deterministic, no model involved). With --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 also
``POST /sleep?level=N``, ``POST /wake_up`` and ``GET /is_sleeping``; while asleep, generation
answers 503. Engine dead: every route answers 503.

API keys, as in vLLM: when set, routes under /v1 need ``Authorization: Bearer KEY`` (else
401 ``{"error": "Unauthorized"}``); /health, /version and the sleep routes stay open.
"""

from __future__ import annotations

import hmac
import itertools
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from gardenctl.testing.standin_log import VllmLog

DEFAULT_MAX_TOKENS = 16


class EngineState:
    """The simulated engine's phase, shared by the request threads and the main thread."""

    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = self.STARTING
        self._sleep_level = 0

    @property
    def phase(self) -> str:
        with self._lock:
            return self._phase

    @property
    def sleep_level(self) -> int:
        with self._lock:
            return self._sleep_level

    def mark_ready(self) -> None:
        with self._lock:
            self._phase = self.READY

    def mark_dead(self) -> None:
        with self._lock:
            self._phase = self.DEAD

    def set_sleep_level(self, level: int) -> None:
        with self._lock:
            self._sleep_level = level


@dataclass(frozen=True)
class ApiSettings:
    model: str
    served_model_names: tuple[str, ...]
    max_model_len: int
    api_keys: tuple[str, ...]
    sleep_routes: bool
    request_delay: float
    access_log: bool
    log_requests: bool
    version: str
    sleep_freed_bytes: int  # what sleeping gives back (weights and KV cache)
    sleep_kept_bytes: int  # what stays on the GPU while asleep


class InFlight:
    """Counts the connections being served, so that shutdown can wait for them to finish."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def begin(self) -> None:
        with self._idle:
            self._count += 1

    def end(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    @property
    def count(self) -> int:
        with self._idle:
            return self._count

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=timeout)


class StandinHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # an unfinished request never holds the process open

    def __init__(
        self, address: tuple[str, int], api: ApiSettings, engine: EngineState, log: VllmLog
    ) -> None:
        self.api = api
        self.engine = engine
        self.log = log
        self.in_flight = InFlight()
        self.request_ids = itertools.count()
        super().__init__(address, StandinRequestHandler)  # binds and listens at once

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host up in DNS (getfqdn), which can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        self.in_flight.begin()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.in_flight.end()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.in_flight.end()


class StandinHTTPServer6(StandinHTTPServer):
    address_family = socket.AF_INET6


def create_http_server(
    host: str, port: int, api: ApiSettings, engine: EngineState, log: VllmLog
) -> StandinHTTPServer:
    """Bind and listen on host:port now; raises OSError (EADDRINUSE) if the port is taken."""
    server_class = StandinHTTPServer6 if ":" in host else StandinHTTPServer
    return server_class((host, port), api, engine, log)


def _error(status: int, message: str, error_type: str) -> tuple[int, dict[str, Any]]:
    error = {"message": message, "type": error_type, "param": None, "code": status}
    return status, {"error": error}


def echo_words(prompt: str, max_tokens: int) -> list[str]:
    """The stand-in's "generation": the prompt's words, cycled, max_tokens of them."""
    words = prompt.split() or ["stand-in"]
    return [words[i % len(words)] for i in range(max_tokens)]


class StandinRequestHandler(BaseHTTPRequestHandler):
    server: StandinHTTPServer
    query: dict[str, list[str]]  # the request's query string, set by _dispatch
    server_version = "uvicorn"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # path -> {method: handler name}
    ROUTES: ClassVar[Mapping[str, Mapping[str, str]]] = {
        "/health": {"GET": "get_health"},
        "/version": {"GET": "get_version"},
        "/v1/models": {"GET": "get_models"},
        "/v1/completions": {"POST": "post_completions"},
        "/v1/chat/completions": {"POST": "post_chat_completions"},
        "/is_sleeping": {"GET": "get_is_sleeping"},
        "/sleep": {"POST": "post_sleep"},
        "/wake_up": {"POST": "post_wake_up"},
    }
    SLEEP_ROUTES = frozenset({"/is_sleeping", "/sleep", "/wake_up"})

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self.close_connection = True  # one request per connection keeps shutdown simple
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        api, phase = self.server.api, self.server.engine.phase
        if phase == EngineState.STARTING:
            return self._send_json(503, {"error": "Service Unavailable: the engine is starting"})
        if url.path.startswith("/v1") and api.api_keys and not self._has_valid_api_key():
            return self._send_json(401, {"error": "Unauthorized"})
        if phase == EngineState.DEAD:
            return self._send_json(503, {"error": "Service Unavailable: the engine is dead"})
        methods = self.ROUTES.get(url.path)
        if methods is None or (url.path in self.SLEEP_ROUTES and not api.sleep_routes):
            return self._send_json(404, {"detail": "Not Found"})
        if method not in methods:
            return self._send_json(405, {"detail": "Method Not Allowed"})
        try:
            body = self._read_json_body() if method == "POST" else {}
        except ValueError as error:
            return self._send_json(*_error(400, f"Invalid JSON body: {error}", "BadRequestError"))
        handler: Callable[[dict[str, Any]], tuple[int, Any]] = getattr(self, methods[method])
        self._send_json(*handler(body))

    def _has_valid_api_key(self) -> bool:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and any(
            hmac.compare_digest(token.encode(), key.encode()) for key in self.server.api.api_keys
        )

    def _read_json_body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        return body

    def _send_json(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    # --- routes -----------------------------------------------------------------------------

    def get_health(self, body: dict[str, Any]) -> tuple[int, Any]:
        return 200, None

    def get_version(self, body: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"version": self.server.api.version}

    def get_models(self, body: dict[str, Any]) -> tuple[int, Any]:
        api = self.server.api
        models = [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
             "root": api.model, "parent": None, "max_model_len": api.max_model_len}
            for name in api.served_model_names
        ]
        return 200, {"object": "list", "data": models}

    def post_completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        prompt = body.get("prompt", "")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            return _error(400, "The stand-in takes a prompt string or a list of strings",
                          "BadRequestError")
        return self._generate(body, "cmpl", "text_completion", prompts, lambda text: {"text": text})

    def post_chat_completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list", "BadRequestError")
        last = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
        prompt = last if isinstance(last, str) else ""
        return self._generate(
            body, "chatcmpl", "chat.completion", [prompt],
            lambda text: {"message": {"role": "assistant", "content": text.strip()}},
        )

    def _generate(
        self, body: dict[str, Any], id_prefix: str, object_name: str, prompts: list[str],
        choice_content: Callable[[str], dict[str, Any]],
    ) -> tuple[int, Any]:
        api = self.server.api
        model = body.get("model") or api.served_model_names[0]
        if model not in api.served_model_names:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            return _error(400, "max_tokens must be a non-negative integer", "BadRequestError")
        if body.get("stream"):
            return _error(400, "The stand-in does not stream; send stream=false", "BadRequestError")
        if self.server.engine.sleep_level:
            return _error(503, "The engine is asleep; POST /wake_up first",
                          "ServiceUnavailableError")
        request_id = f"{id_prefix}-standin-{next(self.server.request_ids)}"
        if api.log_requests:
            self.server.log.api("INFO", "logger.py", f"Received request {request_id}")
        if api.request_delay:
            time.sleep(api.request_delay)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(prompts):
            words = echo_words(prompt, max_tokens)
            text = "".join(" " + word for word in words)
            choices.append({"index": index, **choice_content(text), "logprobs": None,
                            "finish_reason": "length", "stop_reason": None})
            prompt_tokens += len(prompt.split())
            completion_tokens += len(words)
        return 200, {
            "id": request_id, "object": object_name, "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def get_is_sleeping(self, body: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"is_sleeping": self.server.engine.sleep_level > 0}

    def post_sleep(self, body: dict[str, Any]) -> tuple[int, Any]:
        level_text = self.query.get("level", ["1"])[0]
        if level_text not in ("1", "2"):
            return _error(400, f"level must be 1 or 2, got {level_text!r}", "BadRequestError")
        api = self.server.api
        self.server.engine.set_sleep_level(int(level_text))
        freed_gib, kept_gib = api.sleep_freed_bytes / 1024**3, api.sleep_kept_bytes / 1024**3
        self.server.log.engine("INFO", "gpu_worker.py",
                               f"Sleep mode freed {freed_gib:.2f} GiB memory, "
                               f"{kept_gib:.2f} GiB memory is still in use.")
        self.server.log.engine("INFO", "core.py", "It took 0.000001 seconds to fall asleep.")
        return 200, None

    def post_wake_up(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.server.engine.set_sleep_level(0)
        self.server.log.engine("INFO", "core.py", "It took 0.000001 seconds to wake up.")
        return 200, None

    # --- logging ----------------------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.server.api.access_log:
            return
        phrase = HTTPStatus(code).phrase if isinstance(code, int) else ""
        host, port = self.client_address[:2]
        self.server.log.uvicorn("INFO", f'{host}:{port} - "{self.requestline}" {code} {phrase}')

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.uvicorn("WARNING", format % args)
