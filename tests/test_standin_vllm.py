"""The stand-in `vllm serve`: real processes, real ports, real signals, asserted from outside.

Every server is started in its own process group (as gardenctl starts workers) and the whole
group is SIGKILLed when the test ends, whatever happened.
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gardenctl.measure.vllm_log import read_startup
from gardenctl.testing import standin_args
from gardenctl.testing.standin_engine import (
    CUDA_CONTEXT_BYTES,
    NON_TORCH_BYTES,
    EngineSettings,
    GiB,
    simulate_startup,
)

pytestmark = pytest.mark.e2e

STANDIN = [sys.executable, "-m", "gardenctl.testing.standin_vllm"]
MODEL = "facebook/opt-125m"
FAST_READY = "0.2"
SECRET = "sk-standin-secret-4f9c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Standin:
    process: subprocess.Popen
    port: int
    log_path: Path
    started_at: float

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, payload: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, JSON body or None); raises OSError when nothing answers."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        return status, json.loads(body) if body else None

    def health(self) -> int | None:
        """/health's status, or None while nothing answers."""
        try:
            return self.request("GET", "/health")[0]
        except OSError:
            return None

    def wait_ready(self, timeout: float = 5.0) -> float:
        """Poll /health until 200; return the seconds since the process started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == 200:
                return time.monotonic() - self.started_at
            if self.process.poll() is not None:
                pytest.fail(f"exited with {self.process.returncode} before ready:\n{self.log()}")
            time.sleep(0.02)
        pytest.fail(f"not ready after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 5.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{self.log()}")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not logged after {timeout} s:\n{self.log()}")
            time.sleep(0.02)


@pytest.fixture
def start_standin(tmp_path: Path) -> Iterator[Callable[..., Standin]]:
    """Start `standin_vllm serve MODEL --host 127.0.0.1 --port P *flags`, logging to a file."""
    started: list[Standin] = []

    def start(*flags: str, env: dict[str, str] | None = None, port: int | None = None,
              model: str = MODEL) -> Standin:
        port = port or free_port()
        log_path = tmp_path / f"standin-{len(started)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [*STANDIN, "serve", model, "--host", "127.0.0.1", "--port", str(port), *flags],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "STANDIN_VLLM_READY_DELAY": FAST_READY, **(env or {})},
                start_new_session=True,
            )
        standin = Standin(process, port, log_path, time.monotonic())
        started.append(standin)
        return standin

    yield start
    for standin in started:
        try:
            os.killpg(standin.process.pid, signal.SIGKILL)  # the group: a spawned child too
        except ProcessLookupError:
            pass
        standin.process.wait()


def run_standin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STANDIN, *args], capture_output=True, text=True, timeout=10,
                          check=False, env={**os.environ, **(env or {})})


def authorization(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- readiness and the HTTP API ---------------------------------------------------------------


def test_health_is_503_while_loading_and_200_once_ready(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_READY_DELAY": "0.6"})
    while (first_status := standin.health()) is None:
        time.sleep(0.01)
    assert first_status == 503
    assert standin.request("GET", "/v1/models")[0] == 503

    assert standin.wait_ready() >= 0.6
    assert "Application startup complete." in standin.log()


def test_models_lists_every_served_name(start_standin):
    standin = start_standin("--served-model-name", "chat", "chat-alias", "--max-model-len", "4096")
    standin.wait_ready()

    status, body = standin.request("GET", "/v1/models")

    assert status == 200
    assert [model["id"] for model in body["data"]] == ["chat", "chat-alias"]
    assert {model["root"] for model in body["data"]} == {MODEL}
    assert {model["max_model_len"] for model in body["data"]} == {4096}


def test_completion_repeats_prompt_words_deterministically(start_standin):
    standin = start_standin("--served-model-name", "chat")
    standin.wait_ready()
    request = {"model": "chat", "prompt": "red green blue", "max_tokens": 5}

    first = standin.request("POST", "/v1/completions", request)
    second = standin.request("POST", "/v1/completions", request)
    unknown = standin.request("POST", "/v1/completions", {**request, "model": "other"})
    chat = standin.request("POST", "/v1/chat/completions",
                           {"model": "chat", "messages": [{"role": "user", "content": "hi there"}],
                            "max_tokens": 3})

    assert first[0] == 200
    assert first[1]["choices"][0]["text"] == " red green blue red green"
    assert second[1]["choices"] == first[1]["choices"]
    assert first[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert unknown[0] == 404 and "does not exist" in unknown[1]["error"]["message"]
    assert chat[0] == 200
    assert chat[1]["choices"][0]["message"] == {"role": "assistant", "content": "hi there hi"}


def test_unknown_route_is_404_and_wrong_method_405(start_standin):
    standin = start_standin()
    standin.wait_ready()

    assert standin.request("GET", "/v2/nothing") == (404, {"detail": "Not Found"})
    assert standin.request("GET", "/v1/completions")[0] == 405
    assert standin.request("GET", "/version") == (200, {"version": "0.32.0"})


@pytest.mark.parametrize("key_source", ["flag", "environment"])
def test_api_key_protects_v1_routes_and_is_never_logged(start_standin, key_source):
    if key_source == "flag":
        standin = start_standin("--api-key", SECRET)
    else:
        standin = start_standin(env={"VLLM_API_KEY": SECRET})
    standin.wait_ready()  # /health needs no key

    assert standin.request("GET", "/v1/models")[0] == 401
    assert standin.request("GET", "/v1/models", headers=authorization("wrong"))[0] == 401
    assert standin.request("GET", "/v1/models", headers=authorization(SECRET))[0] == 200
    assert standin.request("POST", "/v1/completions", {"prompt": "x"},
                           headers=authorization(SECRET))[0] == 200
    assert SECRET not in standin.log()
    if key_source == "flag":
        assert "'api_key': '***'" in standin.log()


# --- streaming (SSE) and sleep mode, through http.client -----------------------------------

DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1", "STANDIN_VLLM_SLEEP_DELAY": "0.05",
            "STANDIN_VLLM_WAKE_DELAY": "0.05", "STANDIN_VLLM_WAKE_DELAY_LEVEL2": "0.1"}
SLOW_TOKENS = {"STANDIN_VLLM_TOKEN_DELAY": "0.01"}  # 1000 tokens: a 10 s stream


def open_stream(standin: Standin, path: str, body: dict[str, Any],
                headers: dict[str, str] | None = None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=10)
    connection.request("POST", path, json.dumps(body),
                       {"Content-Type": "application/json", **(headers or {})})
    return connection, connection.getresponse()


def next_event(response: http.client.HTTPResponse) -> str:
    """The next SSE event's data ("" at the end of the body); asserts vLLM's framing."""
    line = response.readline().decode()
    if not line:
        return ""
    assert line.startswith("data: ") and line.endswith("\n"), line
    assert response.readline() == b"\n"
    return line[len("data: "):-1]


def read_events(response: http.client.HTTPResponse) -> list[str]:
    events = []
    while event := next_event(response):
        events.append(event)
    return events


def sleep_request(standin: Standin, method: str, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return response.status, json.loads(body) if body else None


def test_chat_stream_sends_one_vllm_chunk_per_token_then_usage_and_done(start_standin):
    standin = start_standin("--served-model-name", "chat")
    standin.wait_ready()
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}

    connection, response = open_stream(standin, "/v1/chat/completions", body)
    raw_first = response.readline()
    events = [raw_first.decode()[len("data: "):-1]] if response.readline() == b"\n" else []
    events += read_events(response)
    connection.close()
    plain = standin.request("POST", "/v1/chat/completions", {**body, "stream": False,
                                                            "stream_options": None})

    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert raw_first.startswith(b'data: {"id":"chatcmpl-')  # compact JSON, as pydantic dumps
    assert [list(chunk) for chunk in chunks[:1]] == [
        ["id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text"]]
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {"chat"}
    tokens = chunks[1:-1]
    assert [c["choices"][0]["delta"] for c in tokens] == [
        {"content": "hi"}, {"content": " there"}, {"content": " hi"}]
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, "length"]
    content = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
    assert content == plain[1]["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}


def test_completion_stream_has_text_chunks_and_no_usage_unless_asked(start_standin):
    standin = start_standin()
    standin.wait_ready()

    connection, response = open_stream(standin, "/v1/completions",
                                       {"prompt": "red green", "max_tokens": 4, "stream": True})
    events = read_events(response)
    connection.close()

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 4  # one per token, no usage chunk
    assert [c["choices"][0]["text"] for c in chunks] == [" red", " green", " red", " green"]
    assert chunks[0]["object"] == "text_completion" and chunks[0]["id"].startswith("cmpl-")
    assert chunks[-1]["choices"][0] == {"index": 0, "text": " green", "logprobs": None,
                                        "finish_reason": "length", "stop_reason": None,
                                        "prompt_token_ids": None, "token_ids": None}


def test_client_disconnect_mid_stream_aborts_the_request(start_standin):
    standin = start_standin("--enable-log-requests", env=SLOW_TOKENS)
    standin.wait_ready()

    connection, response = open_stream(
        standin, "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1000, "stream": True},
        headers={"X-Request-Id": "gone-early"})
    first = json.loads(next_event(response))  # arrives while 999 tokens are still to come
    response.close()  # the socket closes with the last reference to it
    connection.close()

    assert first["id"] == "chatcmpl-gone-early"
    standin.wait_for_log("Request chatcmpl-gone-early aborted.")
    assert "Aborted request(s) chatcmpl-gone-early-" in standin.log()


def test_sleep_routes_exist_only_in_dev_mode(start_standin):
    standin = start_standin("--enable-sleep-mode")
    standin.wait_ready()

    assert sleep_request(standin, "POST", "/sleep?level=1")[0] == 404
    assert sleep_request(standin, "POST", "/wake_up")[0] == 404
    assert sleep_request(standin, "GET", "/is_sleeping") == (404, {"detail": "Not Found"})


def freed_line(freed: int, still_used: int) -> str:
    """vLLM 0.32's line: format_gib is round(bytes / GiB, 2) printed with %s."""
    return (f"Sleep mode freed {round(freed / GiB, 2)} GiB memory, "
            f"{round(still_used / GiB, 2)} GiB memory is still in use.")


def test_sleep_frees_weights_and_kv_cache_and_queues_requests_until_woken(start_standin):
    standin = start_standin("--enable-sleep-mode", "--enable-log-requests",
                            "--gpu-memory-utilization", "0.5", "--max-model-len", "4096",
                            env={**DEV_MODE, "STANDIN_VLLM_GPU_MEMORY": "24GiB",
                                 "STANDIN_VLLM_WEIGHTS": "2GiB"})
    standin.wait_ready()
    report = read_startup(standin.log())
    pooled = report.weights_bytes + report.kv_cache_bytes
    kept = CUDA_CONTEXT_BYTES[1] + NON_TORCH_BYTES[1] + report.cuda_graph_bytes

    assert sleep_request(standin, "GET", "/is_sleeping") == (200, {"is_sleeping": False})
    assert sleep_request(standin, "POST", "/sleep") == (200, {"status": "sleeping", "level": 1})
    assert sleep_request(standin, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert freed_line(pooled, kept) in standin.log()
    assert (f"is backed up in CPU and the rest {report.kv_cache_bytes / GiB:.2f} GiB is "
            "discarded directly.") in standin.log()
    assert standin.health() == 200

    answers: list[tuple[int, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(standin.request(
        "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
        headers={"X-Request-Id": "queued"})))
    waiting.start()
    standin.wait_for_log("Received request cmpl-queued-0")
    assert not answers  # queued, not refused: vLLM 0.32 pauses the scheduler
    assert sleep_request(standin, "POST", "/wake_up") == (200, {"status": "awake", "tags": None})
    waiting.join(10)

    assert answers and answers[0][0] == 200
    assert answers[0][1]["choices"][0]["text"] == " x x"
    assert sleep_request(standin, "GET", "/is_sleeping") == (200, {"is_sleeping": False})
    log = standin.log()
    assert "wake up the engine with tags: None" in log
    assert "seconds to wake up tags {'weights', 'kv_cache'}." in log
    assert log.index("seconds to fall asleep.") < log.index("setting pause state to UNPAUSED")


def test_level_2_discards_weights_and_wakes_by_tags(start_standin):
    standin = start_standin("--enable-sleep-mode", "--enforce-eager", env=DEV_MODE)
    standin.wait_ready()
    report = read_startup(standin.log())

    assert sleep_request(standin, "POST", "/sleep?level=2") == (
        200, {"status": "sleeping", "level": 2})
    weights = sleep_request(standin, "POST", "/wake_up?tags=weights")
    still_asleep = sleep_request(standin, "GET", "/is_sleeping")
    kv_cache = sleep_request(standin, "POST", "/wake_up?tags=kv_cache")

    assert weights == (200, {"status": "sleeping", "tags": ["weights"]})
    assert still_asleep == (200, {"is_sleeping": True})
    assert kv_cache == (200, {"status": "awake", "tags": ["kv_cache"]})
    assert sleep_request(standin, "GET", "/is_sleeping") == (200, {"is_sleeping": False})
    log = standin.log()
    pooled = report.weights_bytes + report.kv_cache_bytes
    assert f"sleep freed {pooled / GiB:.2f} GiB memory in total, of which 0.00 GiB" in log
    assert freed_line(pooled, CUDA_CONTEXT_BYTES[1] + NON_TORCH_BYTES[1]) in log
    assert "seconds to wake up tags ['weights']." in log
    assert "seconds to wake up tags ['kv_cache']." in log


def post_json(standin: Standin, path: str, body: Any) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=10)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return response.status, json.loads(data) if data else None


def completion_text(standin: Standin) -> str:
    status, body = standin.request("POST", "/v1/completions", {"prompt": "yes", "max_tokens": 3})
    assert status == 200, body
    return body["choices"][0]["text"]


def test_level_2_wake_answers_garbage_until_reload_weights(start_standin):
    standin = start_standin("--enable-sleep-mode", env=DEV_MODE)
    standin.wait_ready()
    sleep_request(standin, "POST", "/sleep?level=2")
    sleep_request(standin, "POST", "/wake_up")

    garbage = completion_text(standin)
    reloaded = post_json(standin, "/collective_rpc", {"method": "reload_weights"})
    reset = sleep_request(standin, "POST", "/reset_prefix_cache")
    fixed = completion_text(standin)

    assert garbage == " <weights not loaded>"
    assert reloaded == (200, {"results": [None]})
    assert reset == (200, None)
    assert fixed == " yes yes yes"
    log = standin.log()
    assert "[gpu_model_runner.py] Reloading weights inplace..." in log
    assert "Reloading and processing weights took" in log


def test_level_1_wake_keeps_the_weights(start_standin):
    standin = start_standin("--enable-sleep-mode", env=DEV_MODE)
    standin.wait_ready()
    sleep_request(standin, "POST", "/sleep?level=1")
    sleep_request(standin, "POST", "/wake_up")

    assert completion_text(standin) == " yes yes yes"


def test_rpc_routes_exist_only_in_dev_mode_and_know_reload_weights_only(start_standin):
    plain = start_standin("--enable-sleep-mode")
    dev = start_standin("--enable-sleep-mode", env=DEV_MODE)
    plain.wait_ready()
    dev.wait_ready()

    assert post_json(plain, "/collective_rpc", {"method": "reload_weights"})[0] == 404
    assert sleep_request(plain, "POST", "/reset_prefix_cache")[0] == 404
    assert post_json(dev, "/collective_rpc", {}) == (
        400, {"detail": "Missing 'method' in request body"})
    assert post_json(dev, "/collective_rpc", {"method": "no_such_method"})[0] == 500


def test_dev_mode_without_sleep_mode_pauses_but_frees_nothing(start_standin):
    standin = start_standin(env=DEV_MODE)
    standin.wait_ready()

    assert sleep_request(standin, "POST", "/sleep?level=1")[0] == 200
    assert sleep_request(standin, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert "Sleep mode freed 0.0 GiB memory" in standin.log()
    assert sleep_request(standin, "POST", "/wake_up")[0] == 200


def test_bad_sleep_level_or_mode_is_400(start_standin):
    standin = start_standin("--enable-sleep-mode", env=DEV_MODE)
    standin.wait_ready()

    level = sleep_request(standin, "POST", "/sleep?level=3")
    mode = sleep_request(standin, "POST", "/sleep?mode=later")

    assert level[0] == 400 and level[1]["error"]["param"] == "query.level"
    assert "less than or equal to 2" in level[1]["error"]["message"]
    assert mode[0] == 400 and mode[1]["error"]["param"] == "query.mode"
    assert sleep_request(standin, "GET", "/is_sleeping") == (200, {"is_sleeping": False})


def test_sleep_aborts_a_running_stream_with_finish_reason_abort(start_standin):
    standin = start_standin("--enable-sleep-mode", env={**DEV_MODE, **SLOW_TOKENS})
    standin.wait_ready()
    connection, response = open_stream(
        standin, "/v1/completions", {"prompt": "go", "max_tokens": 1000, "stream": True})
    first = json.loads(next_event(response))

    assert sleep_request(standin, "POST", "/sleep?level=1&mode=abort")[0] == 200
    rest = read_events(response)
    connection.close()

    assert first["choices"][0]["finish_reason"] is None
    assert rest[-1] == "[DONE]"
    last = json.loads(rest[-2])["choices"][0]
    assert (last["text"], last["finish_reason"]) == ("", "abort")
    assert len(rest) < 1000


def test_startup_log_reports_memory_computed_from_flags(start_standin):
    standin = start_standin(
        "--gpu-memory-utilization", "0.5", "--max-model-len", "4096", "--enforce-eager",
        env={"STANDIN_VLLM_GPU_MEMORY": "24GiB", "STANDIN_VLLM_WEIGHTS": "2GiB"},
    )
    standin.wait_ready()
    log = standin.log()

    # 0.5 x 24 GiB - 2 GiB weights - 0.77 activation - 0.25 non-torch (no graphs: eager)
    assert "Model loading took 2.0 GiB memory" in log
    assert "Available KV cache memory: 8.98 GiB" in log
    assert "GPU KV cache size: 73,552 tokens" in log
    assert "Maximum concurrency for 4,096 tokens per request: 17.96x" in log
    assert "test stand-in for `vllm serve`" in log


# --- the command line -------------------------------------------------------------------------


def test_unknown_flag_exits_2_with_argparse_message():
    result = run_standin("serve", MODEL, "--foo")

    assert result.returncode == 2
    assert "vllm serve: error: unrecognized arguments: --foo" in result.stderr


def every_flag_argv(equals_form: bool) -> list[str]:
    """Every listed flag once: booleans bare, the others with the value 1 (valid for all)."""
    booleans = standin_args.boolean_flags(standin_args.build_serve_parser())
    argv = [MODEL]
    for flag in standin_args.load_serve_flags():
        if flag in ("-h", "--help"):
            continue
        if flag in booleans:
            argv.append(flag)
        elif equals_form:
            argv.append(f"{flag}=1")
        else:
            argv += [flag, "1"]
    return argv


@pytest.mark.parametrize("equals_form", [False, True], ids=["flag-value", "flag=value"])
def test_parser_accepts_every_listed_flag(equals_form):
    args = standin_args.parse_serve_args(every_flag_argv(equals_form))

    assert args.model == MODEL
    assert args.tensor_parallel_size == 1 and args.port == 1


def test_process_accepts_every_listed_flag_in_dry_run():
    result = run_standin("serve", *every_flag_argv(equals_form=False),
                         env={"STANDIN_VLLM_DRY_RUN": "1"})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == MODEL


def test_parser_accepts_no_flag_that_vllm_lacks():
    listed = set(standin_args.load_serve_flags())

    declared = standin_args.declared_flags(standin_args.build_serve_parser())

    assert declared - listed == set()
    assert listed - declared == set()


def test_boolean_flags_take_no_value():
    args = standin_args.parse_serve_args([
        MODEL, "--enforce-eager", "--trust-remote-code", "--enable-sleep-mode",
        "--no-enable-prefix-caching", "--headless", "--port", "9000",
    ])

    assert args.enforce_eager and args.trust_remote_code and args.enable_sleep_mode
    assert args.enable_prefix_caching is False
    assert args.port == 9000


def test_parsed_flags_have_vllm_types_defaults_and_spellings():
    defaults = standin_args.parse_serve_args([MODEL])
    args = standin_args.parse_serve_args([
        MODEL, "-tp", "2", "-q", "awq", "--max_model_len=32k", "--kv-cache-memory-bytes", "8G",
        "--served-model-name", "a", "b", "--gpu-memory-utilization", "0.5",
    ])

    assert (defaults.host, defaults.port) == ("0.0.0.0", 8000)
    assert defaults.gpu_memory_utilization == 0.92  # vLLM 0.32's default
    assert standin_args.served_model_names(defaults) == (MODEL,)
    assert (args.tensor_parallel_size, args.quantization) == (2, "awq")
    assert (args.max_model_len, args.kv_cache_memory_bytes) == (32_000, 8 * GiB)
    assert standin_args.served_model_names(args) == ("a", "b")


def test_help_says_it_is_a_stand_in():
    result = run_standin("serve", "--help")

    assert result.returncode == 0
    assert "stand-in for `vllm serve`" in result.stdout
    assert "no GPU" in result.stdout
    assert "STANDIN_VLLM_FAIL" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("standin-vllm")
    if not script.exists():
        pytest.skip("standin-vllm not installed; run pip install -e .")

    result = subprocess.run([str(script), "serve", MODEL, "--bogus"], capture_output=True,
                            text=True, timeout=10, check=False)

    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_bad_environment_value_is_a_usage_error():
    result = run_standin("serve", MODEL, env={"STANDIN_VLLM_FAIL": "meltdown"})

    assert result.returncode == 2
    assert "STANDIN_VLLM_FAIL='meltdown' is not valid: expected one of oom," in result.stderr


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "message"), [
    ("oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"),
    ("kv_cache", "To serve at least one request with the model's max seq len (2048)"),
    ("no_cache_blocks", "No available memory for the cache blocks"),
    ("model_not_found", "is not a local folder and is not a valid model identifier"),
    ("free_memory", "on startup is less than desired GPU memory utilization (0.92,"),
])
def test_injected_startup_failure_logs_vllm_message_and_exits_1(start_standin, mode, message):
    standin = start_standin("--max-model-len", "2048", env={"STANDIN_VLLM_FAIL": mode})

    assert standin.wait_exit() == 1
    assert message in standin.log()
    assert "Application startup complete." not in standin.log()


def test_exit_code_variable_chooses_the_failure_status(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_FAIL": "oom", "STANDIN_VLLM_EXIT_CODE": "7"})

    assert standin.wait_exit() == 7


def test_max_model_len_beyond_the_kv_cache_fails_without_injection(start_standin):
    standin = start_standin("--max-model-len", "131072", env={"STANDIN_VLLM_GPU_MEMORY": "8GiB"})

    assert standin.wait_exit() == 1
    assert "the estimated maximum model length is" in standin.log()


def test_crash_after_ready_serves_then_exits_1(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_FAIL": "crash_after_ready",
                                 "STANDIN_VLLM_CRASH_AFTER": "0.3"})
    standin.wait_ready()

    assert standin.wait_exit() == 1
    assert "EngineDeadError" in standin.log()


def test_dead_engine_answers_503_when_kept_alive(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_FAIL": "crash_after_ready",
                                 "STANDIN_VLLM_CRASH_AFTER": "0",
                                 "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    standin.wait_for_log("EngineDeadError")

    assert standin.health() == 503
    assert standin.process.poll() is None


def test_hang_keeps_port_bound_but_never_ready_until_sigterm(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_FAIL": "hang", "STANDIN_VLLM_READY_DELAY": "0"})
    standin.wait_for_log("Available KV cache memory")
    time.sleep(0.3)

    assert standin.health() == 503
    standin.process.send_signal(signal.SIGTERM)
    assert standin.wait_exit() == 0


def test_second_server_on_the_same_port_fails_at_once(start_standin):
    first = start_standin(env={"STANDIN_VLLM_READY_DELAY": "5"})
    while first.health() is None:  # bound, still "loading"
        time.sleep(0.01)

    second = start_standin(port=first.port)

    assert second.wait_exit(timeout=2) == 1
    assert "address already in use" in second.log()
    assert first.process.poll() is None


# --- signals and process groups ---------------------------------------------------------------


def test_sigterm_lets_in_flight_request_finish_then_exits_0(start_standin):
    standin = start_standin("--shutdown-timeout", "5", "--enable-log-requests",
                            env={"STANDIN_VLLM_REQUEST_DELAY": "0.5"})
    standin.wait_ready()
    replies: list[tuple[int, Any]] = []
    client = threading.Thread(target=lambda: replies.append(
        standin.request("POST", "/v1/completions", {"prompt": "slow"})))
    client.start()
    standin.wait_for_log("Received request cmpl-")

    standin.process.send_signal(signal.SIGTERM)
    standin.wait_for_log("Waiting up to 5 s for 1 in-flight request(s) to finish")
    refused = standin.health() is None
    client.join(timeout=5)

    assert standin.wait_exit() == 0
    assert refused
    assert replies and replies[0][0] == 200
    assert "Application shutdown complete." in standin.log()


def test_ignore_sigterm_survives_sigterm_and_dies_by_sigkill(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_IGNORE_SIGTERM": "1"})
    standin.wait_ready()

    standin.process.send_signal(signal.SIGTERM)
    standin.wait_for_log("ignoring it")
    time.sleep(0.2)
    assert standin.health() == 200

    standin.process.kill()
    assert standin.wait_exit() == -signal.SIGKILL


def engine_core_child(standin: Standin):
    psutil = pytest.importorskip("psutil")
    children = psutil.Process(standin.process.pid).children()
    assert len(children) == 1
    return children[0]


def is_dead(process) -> bool:
    """Gone, or a zombie waiting for its (new) parent to reap it: some inits are slow at it."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_dead(process, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not is_dead(process) and time.monotonic() < deadline:
        time.sleep(0.02)
    return is_dead(process)


def test_engine_core_child_shares_the_group_and_outlives_its_parent(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_SPAWN_CHILD": "1"})
    standin.wait_ready()
    child = engine_core_child(standin)

    assert "VLLM::EngineCore" in " ".join(child.cmdline())
    assert os.getpgid(child.pid) == os.getpgid(standin.process.pid)
    standin.process.kill()  # the parent alone
    standin.wait_exit()
    time.sleep(0.1)
    assert not is_dead(child)

    os.killpg(standin.process.pid, signal.SIGKILL)  # the group outlives its leader
    assert wait_dead(child)


def test_engine_core_child_dies_with_a_group_sigterm(start_standin):
    standin = start_standin(env={"STANDIN_VLLM_SPAWN_CHILD": "1"})
    standin.wait_ready()
    child = engine_core_child(standin)

    os.killpg(standin.process.pid, signal.SIGTERM)

    assert standin.wait_exit() == 0
    assert wait_dead(child)


# --- the simulated engine, without a process --------------------------------------------------


def settings(**changes: Any) -> EngineSettings:
    base = EngineSettings(
        model=MODEL, revision=None, gpu_total_bytes=80 * GiB, weights_bytes=16 * GiB,
        kv_bytes_per_token=131_072, tensor_parallel_size=1, gpu_memory_utilization=0.9,
        kv_cache_memory_bytes=None, kv_cache_dtype="auto", max_model_len=8192,
        enforce_eager=False, load_seconds=0.0,
    )
    return dataclasses.replace(base, **changes)


def test_kv_cache_memory_bytes_sets_the_cache_and_fp8_halves_token_cost():
    result = simulate_startup(settings(kv_cache_memory_bytes=1 * GiB, kv_cache_dtype="fp8"), None)

    messages = "\n".join(line.message for line in result.lines)
    assert result.failure is None
    assert "Available KV cache memory: 1.0 GiB\n" in messages  # 0.32's format_gib
    assert "GPU KV cache size: 16,384 tokens," in messages


def test_tensor_parallel_splits_weights_over_ranks():
    result = simulate_startup(settings(tensor_parallel_size=2), None)

    assert any(line.message.startswith("Model loading took 8.0 GiB") for line in result.lines)


def test_utilization_above_free_memory_fails_the_startup_check():
    result = simulate_startup(settings(gpu_memory_utilization=1.0), None)

    assert result.failure is not None and result.failure.reason == "free_memory"
    assert "Free memory on device cuda:0 (79.49/80.00 GiB)" in result.failure.engine_traceback[-1]


# --- the releases it speaks, read back with gardenctl's own log reader ------------------------

RELEASE_GPU = 24 * GiB
RELEASE_FLAGS = ("--gpu-memory-utilization", "0.5", "--max-model-len", "4096")
RELEASE_ENV = {"STANDIN_VLLM_GPU_MEMORY": "24GiB", "STANDIN_VLLM_WEIGHTS": "2GiB",
               "STANDIN_VLLM_ACTIVATION": "0.5GiB", "STANDIN_VLLM_CUDA_GRAPH": "0.25GiB",
               "STANDIN_VLLM_READY_DELAY": "0"}
NON_TORCH = NON_TORCH_BYTES[1]  # 0.25 GiB at TP=1
# budget ceil(24 GiB x 0.5) = 12 GiB; KV = 12 - 2 weights - 0.5 activation - 0.25 non-torch,
# minus the 0.25 GiB graph pool where vLLM subtracts its estimate
KV_GRAPHS_OUTSIDE = 12 * GiB - 2 * GiB - GiB // 2 - NON_TORCH
KV_GRAPHS_INSIDE = KV_GRAPHS_OUTSIDE - GiB // 4


_TWO_KV_LINES = ("GPU KV cache size: ", " tokens\n", "Maximum concurrency for 4,096 tokens")
RELEASE_TEXTS = {  # docs/vllm.md section 9
    "0.8.2": ("vLLM API server version 0.8.2", "Model loading took 2.0000 GB and",
              *_TWO_KV_LINES, "warmup model) took 0.00 seconds"),
    "0.8.5": ("Model loading took 2.0000 GiB and", *_TWO_KV_LINES),
    "0.9.1": ("non-default args: {", "Available KV cache memory: 9.25 GiB", *_TWO_KV_LINES),
    "0.10.2": ("(EngineCore_0 pid=", "Model loading took 2.0000 GiB and",
               "INFO", "Free memory on device (", *_TWO_KV_LINES),
    "V0": ("Initializing a V0 LLM engine (v0.10.2)", "the current vLLM instance can use "
           "total_gpu_memory (24.00GiB) x gpu_memory_utilization (0.50) = 12.00GiB",
           "# cuda blocks: 4736, # CPU blocks: 0",
           "Maximum concurrency for 4096 tokens per request: 18.50x"),
    "0.11.0": ("(EngineCore_DP0 pid=", "Model loading took 2.0000 GiB and", *_TWO_KV_LINES),
    "0.13.0": ("Model loading took 2.0000 GiB memory and", *_TWO_KV_LINES),
    "0.19.0": ("█  version 0.19.0", "Model loading took 2.0 GiB memory and",
               "Estimated CUDA graph memory: 0.25 GiB total", *_TWO_KV_LINES,
               "warmup model) took 0.00 seconds"),
    "0.28.0": ("tokens, Maximum concurrency for 4,096 tokens per request:",
               "warmup model) took 0.00 s\n"),
    "0.32.0": ("█  version 0.32.0", "Model loading took 2.0 GiB memory and",
               "tokens, Maximum concurrency for 4,096 tokens per request:",
               "CUDA graph pool memory: 0.25 GiB (actual)"),
}


@pytest.mark.parametrize(("version", "extra_env", "engine", "kv_cache", "kv_line"), [
    ("0.8.2", {}, "V1", KV_GRAPHS_OUTSIDE, False),  # "GB"; no KV memory line at INFO
    ("0.8.5", {}, "V1", KV_GRAPHS_OUTSIDE, False),
    ("0.9.1", {}, "V1", KV_GRAPHS_OUTSIDE, True),
    ("0.10.2", {}, "V1", KV_GRAPHS_OUTSIDE, True),
    ("0.10.2", {"VLLM_USE_V1": "0"}, "V0", KV_GRAPHS_OUTSIDE, True),
    ("0.11.0", {}, "V1", KV_GRAPHS_OUTSIDE, True),
    ("0.13.0", {"VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS": "1"}, "V1", KV_GRAPHS_OUTSIDE, True),
    ("0.19.0", {}, "V1", KV_GRAPHS_OUTSIDE, True),  # estimate exists, off by default
    ("0.19.0", {"VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS": "1"}, "V1", KV_GRAPHS_INSIDE, True),
    ("0.28.0", {}, "V1", KV_GRAPHS_INSIDE, True),  # one-line KV size and concurrency
    ("0.32.0", {}, "V1", KV_GRAPHS_INSIDE, True),
    ("0.32.0", {"VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS": "0"}, "V1", KV_GRAPHS_OUTSIDE, True),
])
def test_each_release_logs_what_the_log_reader_reads_back(start_standin, version, extra_env,
                                                          engine, kv_cache, kv_line):
    standin = start_standin(*RELEASE_FLAGS, env={**RELEASE_ENV, **extra_env,
                                                 "STANDIN_VLLM_VERSION": version})
    standin.wait_for_log("Application startup complete.")
    report = read_startup(standin.log())

    tokens = kv_cache // 131_072 // 16 * 16
    assert (report.vllm_version, report.engine, report.ready) == (version, engine, True)
    assert report.weights_bytes == 2 * GiB
    assert report.kv_cache_bytes == (kv_cache if kv_line else None)
    assert (report.kv_cache_tokens, report.max_model_len) == (tokens, 4096)
    assert report.max_concurrency == round(tokens / 4096, 2)
    assert report.cuda_graph_bytes == GiB // 4
    release = tuple(int(part) for part in version.split("."))
    assert report.gpu_memory_utilization == (0.5 if release >= (0, 9, 1) else None)
    for text in RELEASE_TEXTS[version if engine == "V1" else "V0"]:  # the release's own wording
        assert text in standin.log()
    if kv_line:  # what the budget held besides the KV cache: includes the graph estimate
        assert report.derived_non_kv_bytes(0.5, RELEASE_GPU) == 12 * GiB - kv_cache
    assert report.non_kv_bytes == (2 * GiB + GiB // 2 + NON_TORCH if engine == "V0" else None)


@pytest.mark.parametrize("version", ["0.10.2", "0.19.0", "0.32.0"])
def test_debug_logging_adds_the_profile_and_free_memory_lines(start_standin, version):
    standin = start_standin(*RELEASE_FLAGS, env={**RELEASE_ENV, "STANDIN_VLLM_VERSION": version,
                                                 "VLLM_LOGGING_LEVEL": "DEBUG"})
    standin.wait_for_log("Application startup complete.")
    report = read_startup(standin.log())

    assert report.non_kv_bytes == 2 * GiB + GiB // 2 + NON_TORCH
    assert (report.activation_bytes, report.non_torch_bytes) == (GiB // 2, NON_TORCH)
    assert (report.gpu_memory_utilization, report.gpu_total_bytes) == (0.5, RELEASE_GPU)


def test_info_logging_has_no_debug_lines(start_standin):
    standin = start_standin(*RELEASE_FLAGS, env={**RELEASE_ENV, "STANDIN_VLLM_VERSION": "0.19.0"})
    standin.wait_for_log("Application startup complete.")

    assert " DEBUG " not in standin.log()
    assert read_startup(standin.log()).non_kv_bytes is None


@pytest.mark.parametrize(("env", "printed"), [({}, "0.32.0"),
                                              ({"STANDIN_VLLM_VERSION": "0.10.2"}, "0.10.2")])
def test_version_flag_prints_the_version_alone(env, printed):
    for flag in ("--version", "-v"):
        result = run_standin(flag, env=env)

        assert (result.returncode, result.stdout, result.stderr) == (0, printed + "\n", "")


def test_version_before_0_8_is_a_usage_error():
    result = run_standin("serve", MODEL, env={"STANDIN_VLLM_VERSION": "0.7.3"})

    assert result.returncode == 2
    assert "STANDIN_VLLM_VERSION='0.7.3' is not valid" in result.stderr


# --- real allocation (STANDIN_VLLM_ALLOCATE=1), with a fake torch on PYTHONPATH -------------

FAKE_TORCH = '''
import os

class OutOfMemoryError(RuntimeError):
    pass

class cuda:
    OutOfMemoryError = OutOfMemoryError

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def empty_cache():
        pass

uint8 = "uint8"
_used = 0

class _Block:
    def __init__(self, n):
        self.n = n

    def __del__(self):
        global _used
        _used -= self.n
        with open(os.environ["FAKE_TORCH_LOG"] + ".freed", "a") as log:
            log.write(f"{self.n}\\n")

    def numel(self):
        return self.n

def empty(n, dtype=None, device=None):
    global _used
    cap = int(os.environ["FAKE_TORCH_CAP"])
    if _used + n > cap:
        raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} bytes.\\n"
                               f"GPU 0 has a total capacity of {cap} bytes")
    _used += n
    with open(os.environ["FAKE_TORCH_LOG"], "a") as log:
        log.write(f"{os.getpid()} {device} {dtype} {n}\\n")
    return _Block(n)
'''


@pytest.fixture
def fake_torch(tmp_path: Path) -> Callable[[int], dict[str, str]]:
    """The environment of a stand-in whose `import torch` is a fake GPU of ``cap`` bytes."""
    folder = tmp_path / "fake-torch"
    folder.mkdir()
    (folder / "torch.py").write_text(FAKE_TORCH)

    def environment(cap: int) -> dict[str, str]:
        return {**RELEASE_ENV, "PYTHONPATH": str(folder), "FAKE_TORCH_CAP": str(cap),
                "FAKE_TORCH_LOG": str(tmp_path / "allocations.log"),
                "STANDIN_VLLM_ALLOCATE": "1"}
    return environment


def allocations(env: dict[str, str]) -> list[tuple[int, str, str, int]]:
    path = Path(env["FAKE_TORCH_LOG"])
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(int(pid), device, dtype, int(n)) for pid, device, dtype, n in rows]


def test_engine_core_child_allocates_what_the_log_reports_before_ready(start_standin,
                                                                       fake_torch):
    env = {**fake_torch(100 * GiB), "STANDIN_VLLM_SPAWN_CHILD": "1"}
    standin = start_standin(*RELEASE_FLAGS, env=env)
    standin.wait_ready()
    report = read_startup(standin.log())
    child = engine_core_child(standin)

    assert [(pid, device, dtype) for pid, device, dtype, _ in allocations(env)] == [
        (child.pid, "cuda:0", "uint8")] * 3
    assert sum(n for *_, n in allocations(env)) == (
        report.weights_bytes + report.kv_cache_bytes + report.cuda_graph_bytes)
    assert "VLLM::EngineCore" in " ".join(child.cmdline())


def test_main_process_allocates_without_a_child(start_standin, fake_torch):
    env = fake_torch(100 * GiB)
    standin = start_standin(*RELEASE_FLAGS, env=env)
    standin.wait_ready()

    assert {pid for pid, *_ in allocations(env)} == {standin.process.pid}
    assert sum(n for *_, n in allocations(env)) == 2 * GiB + KV_GRAPHS_INSIDE + GiB // 4


@pytest.mark.parametrize("in_child", ["0", "1"], ids=["main-process", "engine-core-child"])
def test_sleep_frees_and_wake_up_restores_real_memory(start_standin, fake_torch, in_child):
    env = {**fake_torch(100 * GiB), **DEV_MODE, "STANDIN_VLLM_SPAWN_CHILD": in_child}
    standin = start_standin(*RELEASE_FLAGS, "--enable-sleep-mode", env=env)
    standin.wait_ready()
    report = read_startup(standin.log())
    freed_path = Path(env["FAKE_TORCH_LOG"] + ".freed")

    assert sleep_request(standin, "POST", "/sleep?level=1")[0] == 200
    freed = [int(n) for n in freed_path.read_text().split()]
    assert sorted(freed) == sorted([report.weights_bytes, report.kv_cache_bytes])
    assert sleep_request(standin, "POST", "/wake_up")[0] == 200

    allocated = [n for *_, n in allocations(env)]
    assert allocated[-2:] == [report.weights_bytes, report.kv_cache_bytes]
    assert sum(allocated) - sum(freed) == (
        report.weights_bytes + report.kv_cache_bytes + report.cuda_graph_bytes)


@pytest.mark.parametrize("spawn_child", ["0", "1"])
def test_overrun_past_the_gpu_kills_the_engine_like_vllm(start_standin, fake_torch,
                                                         spawn_child):
    env = {**fake_torch(12 * GiB), "STANDIN_VLLM_SPAWN_CHILD": spawn_child,
           "STANDIN_VLLM_OVERRUN": "2GiB", "STANDIN_VLLM_EXIT_CODE": "3"}
    standin = start_standin(*RELEASE_FLAGS, env=env)

    assert standin.wait_exit() == 3
    log = standin.log()
    assert "Application startup complete." in log  # it was ready first
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2147483648" in log
    assert "died unexpectedly" in log and "EngineDeadError" in log


def test_overrun_that_fits_keeps_serving(start_standin, fake_torch):
    env = {**fake_torch(100 * GiB), "STANDIN_VLLM_SPAWN_CHILD": "1",
           "STANDIN_VLLM_OVERRUN": "2GiB"}
    standin = start_standin(*RELEASE_FLAGS, env=env)
    standin.wait_ready()
    deadline = time.monotonic() + 5
    while len(allocations(env)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)

    assert allocations(env)[-1][-1] == 2 * GiB
    assert standin.health() == 200


def test_dead_engine_after_overrun_answers_503_when_kept_alive(start_standin, fake_torch):
    env = {**fake_torch(12 * GiB), "STANDIN_VLLM_OVERRUN": "2GiB",
           "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}
    standin = start_standin(*RELEASE_FLAGS, env=env)
    standin.wait_for_log("EngineDeadError")

    assert standin.health() == 503
    assert standin.process.poll() is None


def test_allocation_that_does_not_fit_fails_the_start(start_standin, fake_torch):
    standin = start_standin(*RELEASE_FLAGS, env={**fake_torch(4 * GiB),
                                                 "STANDIN_VLLM_SPAWN_CHILD": "1"})

    assert standin.wait_exit() == 1
    assert "torch.OutOfMemoryError: CUDA out of memory" in standin.log()
    assert "Engine core initialization failed" in standin.log()
    assert "Application startup complete." not in standin.log()


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
@pytest.mark.parametrize("spawn_child", ["0", "1"])
def test_allocate_without_torch_fails_at_start_with_exit_2(start_standin, spawn_child):
    standin = start_standin(env={"STANDIN_VLLM_ALLOCATE": "1",
                                 "STANDIN_VLLM_SPAWN_CHILD": spawn_child})

    assert standin.wait_exit() == 2
    assert ("STANDIN_VLLM_ALLOCATE=1 needs PyTorch with a CUDA device: PyTorch is not "
            "installed") in standin.log()
