"""The stand-in's HTTP API: the routes of vLLM's OpenAI-compatible server, with canned answers.

Not ready yet: every route answers 503. (Real vLLM refuses connections until the engine is
ready; the stand-in listens at once instead, so that a second server on the same port fails
at once with "address already in use" while a restarted one can still reuse the port. A
client must treat "refused" and 503 alike: not ready.)

Ready: ``GET /health`` 200, ``GET /version``, ``GET /v1/models``, ``POST /v1/completions``
and ``POST /v1/chat/completions`` (the reply repeats the prompt's words up to max_tokens:
deterministic, no model involved; ids follow vLLM: ``X-Request-Id``, else the body's
``request_id``, else 16 hex digits, after ``cmpl-``/``chatcmpl-``). With VLLM_SERVER_DEV_MODE=1
also ``POST /sleep``, ``POST /wake_up`` and ``GET /is_sleeping`` (``standin_sleep``): while
asleep, generation requests wait until the wake-up (vLLM 0.32 queues them); and ``POST
/collective_rpc`` (``{"method": "reload_weights"}`` only: ``{"results": [null]}``, one result
per rank) and ``POST /reset_prefix_cache`` (200, no body). After a level-2 wake-up and before
reload_weights, generations answer ``<weights not loaded>`` (vLLM's output is garbage then).
Engine dead: every route answers 503.

Streaming (``"stream": true``), as vLLM 0.32's ``serving.py`` of chat_completion/ and
completion/: status 200, ``Content-Type: text/event-stream; charset=utf-8``, chunked transfer
encoding, one HTTP chunk per event ``data: <compact JSON>\n\n``, flushed one by one. Chat: a
first chunk with ``delta: {"role": "assistant", "content": ""}``, then one chunk per token,
the last one with ``finish_reason`` ("length"; "abort" when a sleep aborts it). Completions:
one chunk per token with ``text``. ``stream_options.include_usage`` (or
--enable-force-include-usage) adds a chunk with ``choices: []`` and ``usage``;
``continuous_usage_stats`` adds usage to every chunk. Then ``data: [DONE]\n\n``. A client
that disconnects aborts the request (with --enable-log-requests: ``Aborted request(s) ID.``
and ``Request ID aborted.``). --sse-keep-alive-interval sends ``: keep-alive`` comments while
no token comes (a sleeping engine).

API keys, as in vLLM: when set, routes under /v1 need ``Authorization: Bearer KEY`` (else
401 ``{"error": "Unauthorized"}``); /health, /version and the sleep routes stay open.
"""

from __future__ import annotations

import hmac
import itertools
import json
import select
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from gardenctl.testing.standin_gpu import GpuOutOfMemory
from gardenctl.testing.standin_log import VllmLog
from gardenctl.testing.standin_sleep import PAUSE_MODES, Request, Scheduler

DEFAULT_MAX_TOKENS = 16
GARBAGE = "<weights not loaded>"  # what a model answers with uninitialised weights
SSE_KEEP_ALIVE_COMMENT = ": keep-alive\n\n"  # vLLM's sse_keep_alive.py


class EngineState:
    """The simulated engine's phase, shared by the request threads and the main thread."""

    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = self.STARTING

    @property
    def phase(self) -> str:
        with self._lock:
            return self._phase

    def mark_ready(self) -> None:
        with self._lock:
            self._phase = self.READY

    def mark_dead(self) -> None:
        with self._lock:
            self._phase = self.DEAD


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
    token_delay: float = 0.0  # seconds between two tokens
    force_include_usage: bool = False  # --enable-force-include-usage
    sse_keep_alive_interval: float = 0.0  # --sse-keep-alive-interval


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event as vLLM writes it: pydantic's compact JSON, UTF-8 as is."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


@dataclass
class Generation:
    """One request's answer, with the chunk objects of vLLM 0.32's stream generators.

    Keys and their order follow vLLM's pydantic models dumped with ``exclude_unset``
    (``ChatCompletionStreamResponse``, ``CompletionStreamResponse``) and, for the usage chunk,
    ``exclude_none`` (serving.py of chat_completion/ and completion/).
    """

    request_id: str
    model: str
    chat: bool
    created: int
    prompts: list[str]
    words: list[list[str]]
    include_usage: bool = False
    continuous_usage: bool = False
    emitted: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.emitted = [[] for _ in self.prompts]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.split()) for prompt in self.prompts)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}

    def _streamed_usage(self, completion_tokens: int, prompt_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens,
                                 "completion_tokens": completion_tokens}
        if self.chat:
            usage["completion_tokens_details"] = None
        return usage

    def role_chunk(self) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        chunk = self._chunk([choice])
        if self.continuous_usage:
            chunk["usage"] = self._streamed_usage(0, self.prompt_tokens)
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
        return chunk

    def token_chunk(self, index: int, delta: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": index, "delta": {"content": delta},
                                      "logprobs": None, "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = None
        else:
            choice = {"index": index, "text": delta, "logprobs": None,
                      "finish_reason": finish_reason, "stop_reason": None,
                      "prompt_token_ids": None, "token_ids": None}
        chunk = self._chunk([choice])
        if self.continuous_usage:
            prompt_tokens = (self.prompt_tokens if self.chat
                             else len(self.prompts[index].split()))
            chunk["usage"] = self._streamed_usage(len(self.emitted[index]), prompt_tokens)
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        completion = sum(len(deltas) for deltas in self.emitted)
        return {**self._chunk([]), "usage": {"prompt_tokens": self.prompt_tokens,
                                             "total_tokens": self.prompt_tokens + completion,
                                             "completion_tokens": completion}}


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
    # vLLM serves through uvicorn, whose listen backlog is 2048 (socketserver's default is 5:
    # 200 clients connecting at once would have their handshakes dropped and retried for
    # seconds, which a real vLLM never does)
    request_queue_size = 2048

    def __init__(
        self, address: tuple[str, int], api: ApiSettings, engine: EngineState, log: VllmLog,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.api = api
        self.engine = engine
        self.log = log
        self.scheduler = scheduler or Scheduler(log)
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
    host: str, port: int, api: ApiSettings, engine: EngineState, log: VllmLog,
    scheduler: Scheduler | None = None,
) -> StandinHTTPServer:
    """Bind and listen on host:port now; raises OSError (EADDRINUSE) if the port is taken."""
    server_class = StandinHTTPServer6 if ":" in host else StandinHTTPServer
    return server_class((host, port), api, engine, log, scheduler)


def _error(status: int, message: str, error_type: str) -> tuple[int, dict[str, Any]]:
    error = {"message": message, "type": error_type, "param": None, "code": status}
    return status, {"error": error}


def _level_error(text: str) -> tuple[str, str] | None:
    """FastAPI's check of ``level: Query(ge=0, le=2)``: (error type, message) or None."""
    try:
        level = int(text)
    except ValueError:
        return ("int_parsing",
                "Input should be a valid integer, unable to parse string as an integer")
    if level < 0:
        return "greater_than_equal", "Input should be greater than or equal to 0"
    if level > 2:
        return "less_than_equal", "Input should be less than or equal to 2"
    return None


def _validation_error(name: str, value: str, error_type: str,
                      message: str) -> tuple[int, dict[str, Any]]:
    """vLLM's answer to a FastAPI RequestValidationError: 400 with pydantic's error text."""
    detail = {"type": error_type, "loc": f"query.{name}", "msg": message, "input": value}
    error = {"message": f"1 validation error:\n  {detail}", "type": "Bad Request",
             "param": f"query.{name}", "code": 400}
    return 400, {"error": error}


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
        "/collective_rpc": {"POST": "post_collective_rpc"},
        "/reset_prefix_cache": {"POST": "post_reset_prefix_cache"},
    }
    # vLLM's development routes: registered only with VLLM_SERVER_DEV_MODE=1
    SLEEP_ROUTES = frozenset({"/is_sleeping", "/sleep", "/wake_up", "/collective_rpc",
                              "/reset_prefix_cache"})

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
        status, payload = handler(body)
        if status:  # 0: the handler answered itself (a stream) or the client went away
            self._send_json(status, payload)

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
        return self._generate(body, "cmpl", prompts, chat=False)

    def post_chat_completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list", "BadRequestError")
        last = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
        prompt = last if isinstance(last, str) else ""
        return self._generate(body, "chatcmpl", [prompt], chat=True)

    def _generate(
        self, body: dict[str, Any], id_prefix: str, prompts: list[str], chat: bool,
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
        stream = body.get("stream") or False
        options = body.get("stream_options")
        if not isinstance(stream, bool) or not isinstance(options, (dict, type(None))):
            return _error(400, "stream must be a boolean and stream_options an object",
                          "BadRequestError")
        if options is not None and not stream:  # vLLM's validator, same words
            return _error(400, "Stream options can only be defined when `stream=True`.",
                          "BadRequestError")
        # vLLM: the X-Request-Id header, else the body's request_id, else 16 random hex digits.
        base_id = (self.headers.get("X-Request-Id") or body.get("request_id")
                   or f"{uuid.uuid4().int & (2**64 - 1):016x}")
        generation = Generation(
            request_id=f"{id_prefix}-{base_id}", model=model, chat=chat, created=int(time.time()),
            prompts=prompts, words=[echo_words(p, max_tokens) for p in prompts],
            include_usage=api.force_include_usage or bool((options or {}).get("include_usage")),
        )
        generation.continuous_usage = api.force_include_usage or (
            generation.include_usage and bool((options or {}).get("continuous_usage_stats")))
        if stream:
            self._stream(generation)
            return 0, None  # answered already
        finish_reasons, texts = self._run(generation, emit=lambda *_: None)
        if finish_reasons is None:
            return 0, None  # the client went away: nothing to answer
        choices = []
        for index, text in enumerate(texts):
            content = ({"message": {"role": "assistant", "content": text.strip()}} if chat
                       else {"text": text})
            choices.append({"index": index, **content, "logprobs": None,
                            "finish_reason": finish_reasons[index], "stop_reason": None})
        return 200, {
            "id": generation.request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": generation.created, "model": model, "choices": choices,
            "usage": generation.usage(sum(len(t) for t in generation.emitted)),
        }

    def _run(self, generation: Generation, emit: Callable[[int, str, str | None], None],
             idle: Callable[[], None] = lambda: None,
             ) -> tuple[list[str] | None, list[str]]:
        """Generate token by token, calling ``emit(index, delta, finish_reason)`` per token.

        Returns each prompt's finish reason (None if the client disconnected: the request is
        aborted and logged as vLLM does) and text.
        """
        api, scheduler, log = self.server.api, self.server.scheduler, self.server.log
        n_prompts = len(generation.prompts)
        # vLLM: one engine request per prompt ("<id>-<i>" for completions), internal id + 8 chars.
        external = ([generation.request_id] if generation.chat
                    else [f"{generation.request_id}-{i}" for i in range(n_prompts)])
        internal = [f"{rid}-{uuid.uuid4().hex[:8]}" for rid in external]
        if api.log_requests:
            for rid in external:
                log.api("INFO", "logger.py", f"Received request {rid}")
        requests: list[Request] = []
        reasons: list[str | None] = [None] * n_prompts

        def aborted_by_client() -> tuple[None, list[str]]:
            if api.log_requests:
                log.api("INFO", "async_llm.py", f"Aborted request(s) {','.join(internal)}.")
                for rid in external:
                    log.api("INFO", "async_llm.py", f"Request {rid} aborted.")
            return None, []

        try:
            for rid in internal:
                request = scheduler.add(rid, self._client_gone, idle)
                if request is None:
                    return aborted_by_client()
                requests.append(request)
            if not scheduler.weights_valid:  # woken from level 2, weights not reloaded
                generation.words = [echo_words(GARBAGE, len(words)) for words in generation.words]
            if api.request_delay:
                time.sleep(api.request_delay)  # the prefill
            longest = max((len(words) for words in generation.words), default=0)
            for step in range(longest):
                if all(reason is not None for reason in reasons):
                    break  # every prompt finished (aborted by a sleep, say)
                if step and api.token_delay:
                    time.sleep(api.token_delay)
                if self._client_gone():
                    return aborted_by_client()
                for index, words in enumerate(generation.words):
                    if reasons[index] is not None or step >= len(words):
                        continue
                    if not scheduler.step(requests[index], self._client_gone, idle):
                        reasons[index] = "abort"
                        emit(index, "", "abort")
                        continue
                    last = step == len(words) - 1
                    reasons[index] = "length" if last else None
                    word = words[step]
                    delta = word if generation.chat and step == 0 else " " + word
                    generation.emitted[index].append(delta)
                    emit(index, delta, reasons[index])
            for index, words in enumerate(generation.words):
                if not words:  # max_tokens 0: finished at once, nothing to stream
                    reasons[index] = "length"
        except OSError:  # the client closed the connection under a write
            return aborted_by_client()
        finally:
            for request in requests:
                scheduler.finish(request)
        return [r or "length" for r in reasons], ["".join(d) for d in generation.emitted]

    def _stream(self, generation: Generation) -> None:
        """Answer with Server-Sent Events, one HTTP chunk per event, as vLLM 0.32 does."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        keep_alive = self.server.api.sse_keep_alive_interval
        last_write = [time.monotonic()]

        def send(data: str) -> None:
            payload = data.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            self.wfile.flush()
            last_write[0] = time.monotonic()

        def idle() -> None:  # vLLM's --sse-keep-alive-interval: a comment while nothing comes
            if keep_alive > 0 and time.monotonic() - last_write[0] >= keep_alive:
                send(SSE_KEEP_ALIVE_COMMENT)

        first = [True]

        def emit(index: int, delta: str, finish_reason: str | None) -> None:
            if first[0] and generation.chat:  # vLLM's first chat chunk: the role, no content
                first[0] = False
                send(sse(generation.role_chunk()))
            if not delta and not generation.emitted[index]:
                return  # vLLM sends no empty chunk before the first token
            send(sse(generation.token_chunk(index, delta, finish_reason)))

        try:
            reasons, _ = self._run(generation, emit, idle)
            if reasons is None:
                return
            if first[0] and generation.chat:  # no token at all (max_tokens 0)
                send(sse(generation.role_chunk()))
            if generation.include_usage:
                send(sse(generation.usage_chunk()))
            send("data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # the client went away after the last token

    def _client_gone(self) -> bool:
        """True once the client has closed its side of the connection (EOF readable)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def get_is_sleeping(self, body: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"is_sleeping": self.server.scheduler.is_sleeping()}

    def post_sleep(self, body: dict[str, Any]) -> tuple[int, Any]:
        level_text = self.query.get("level", ["1"])[-1]
        mode = self.query.get("mode", ["abort"])[-1]
        level_error = _level_error(level_text)
        if level_error is not None:
            return _validation_error("level", level_text, *level_error)
        if mode not in PAUSE_MODES:
            return _validation_error("mode", mode, "literal_error",
                                     "Input should be 'abort', 'wait' or 'keep'")
        return 200, self.server.scheduler.sleep(int(level_text), mode)

    def post_wake_up(self, body: dict[str, Any]) -> tuple[int, Any]:
        tags = self.query.get("tags") or None
        try:
            return 200, self.server.scheduler.wake_up(tags)
        except GpuOutOfMemory as error:  # real memory did not fit: vLLM's utility call fails
            self.server.log.engine("ERROR", "core.py", f"Invocation of wake_up method failed: "
                                                       f"{type(error).__name__}: {error}")
            return 500, {"error": {"message": str(error), "type": "Internal Server Error",
                                   "param": None, "code": 500}}

    def post_collective_rpc(self, body: dict[str, Any]) -> tuple[int, Any]:
        """vLLM's dev route (serve/rpc): call ``method`` on every worker; here only
        reload_weights exists. FastAPI's HTTPException answers ``{"detail": ...}``."""
        method = body.get("method")
        if method is None:
            return 400, {"detail": "Missing 'method' in request body"}
        if method != "reload_weights":  # the worker has no such method: the RPC fails
            self.server.log.engine("ERROR", "core.py", f"Invocation of collective_rpc method "
                                   f"failed: AttributeError: 'Worker' object has no attribute "
                                   f"'{method}'")
            return _error(500, f"'Worker' object has no attribute '{method}'",
                          "Internal Server Error")
        self.server.scheduler.reload_weights()
        return 200, {"results": [None]}  # one result per rank (reload_weights returns None)

    def post_reset_prefix_cache(self, body: dict[str, Any]) -> tuple[int, Any]:
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
