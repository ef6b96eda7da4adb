"""A test stand-in for `vllm serve`: vLLM's processes seen from outside, with no model and no GPU.

Run it where gardenctl would run vLLM (``vllm_command: [standin-vllm]`` in a garden file):

    standin-vllm serve MODEL [flags...]
    python -m gardenctl.testing.standin_vllm serve MODEL [flags...]
    standin-vllm --version            (prints the release it stands for, like `vllm --version`)

It behaves like vLLM 0.32 where an orchestrator can see it (docs/vllm.md), and logs the
start-up lines of the release named by STANDIN_VLLM_VERSION (0.8 to 0.33):

- Command line: accepts exactly the flags of the real `vllm serve` (gardenctl/data/
  vllm-serve-flags-0.32.txt) and rejects others with exit 2 and ``vllm serve: error:
  unrecognized arguments: ...``; see ``standin_args`` for which flags take values.
- Start-up: binds --host/--port at once (a taken port: exit 1, "address already in use"),
  "loads" for STANDIN_VLLM_READY_DELAY seconds, logs vLLM's memory lines (``Model loading
  took X GiB``, ``Available KV cache memory``, ``GPU KV cache size``, ``Maximum concurrency``)
  computed from the flags and a simulated GPU (see ``standin_engine``), then
  ``Application startup complete.``. Until then every route answers 503 (vLLM refuses
  connections instead; see ``standin_http``). Start-up fails like vLLM's when the simulated
  memory does not fit, e.g. a --max-model-len too long for the KV cache.
- HTTP: /health, /version, /v1/models, /v1/completions, /v1/chat/completions (both stream
  with "stream": true: Server-Sent Events framed byte for byte like vLLM 0.32's, one chunk
  per token; see ``standin_http``), and with VLLM_SERVER_DEV_MODE=1 the sleep routes
  (``/sleep?level=0|1|2&mode=abort|wait|keep``, ``/wake_up?tags=``, ``/is_sleeping``; see
  ``standin_sleep``); --api-key or $VLLM_API_KEY protects /v1 routes. Secrets are never
  printed. /v1/embeddings is not served (404), as for a generate model in vLLM.
- Shutdown: SIGTERM or SIGINT stops accepting, lets in-flight requests finish for at most
  --shutdown-timeout seconds (default 0), stops the EngineCore child if any, exits 0.

Environment (set them through a model's ``env:`` in a garden file):

  STANDIN_VLLM_READY_DELAY=0.5      seconds of simulated loading before ready (or failure)
  STANDIN_VLLM_FAIL=MODE            inject a failure, after the loading delay:
      oom                 CUDA out of memory while loading (torch.OutOfMemoryError), exit
      kv_cache            "To serve at least one request with the model's max seq len (L)...", exit
      no_cache_blocks     "No available memory for the cache blocks", exit
      model_not_found     Hugging Face "Repository Not Found" / "is not a local folder and is
                          not a valid model identifier", exit
      free_memory         "Free memory on device cuda:0 (...) on startup is less than desired
                          GPU memory utilization (...)", exit
      crash_after_ready   ready, then after STANDIN_VLLM_CRASH_AFTER seconds the engine dies:
                          /health 503, "EngineDeadError" logged, exit (with
                          VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 it stays up answering 503)
      hang                never ready; keeps the port bound until signalled
  STANDIN_VLLM_REPLAY=PATH          replay a real failure log: after binding the port and the
                                    loading delay, print PATH's lines to stdout as they are
                                    (no prefixes added) and exit with STANDIN_VLLM_EXIT_CODE;
                                    e.g. the logs of tests/data/vllm-failures/
  STANDIN_VLLM_CRASH_AFTER=1.0      seconds between ready and the crash_after_ready crash
  STANDIN_VLLM_EXIT_CODE=1          exit status of every simulated failure (1-255)
  STANDIN_VLLM_IGNORE_SIGTERM=1     log and ignore SIGTERM, so the caller must SIGKILL
                                    (SIGINT still stops it)
  STANDIN_VLLM_SPAWN_CHILD=1        spawn a "VLLM::EngineCore" child (a sleeping python) in
                                    the same process group, like vLLM's EngineCore: it
                                    survives a SIGKILL of the parent alone, dies with a
                                    SIGTERM or SIGKILL to the group, is stopped on a clean
                                    shutdown, and exits by itself after an hour at most
  STANDIN_VLLM_GPU_MEMORY=80GiB     simulated GPU total (bytes, or KiB/MiB/GiB/TiB/KB/MB/GB/TB)
  STANDIN_VLLM_WEIGHTS=1GiB         simulated weights, all ranks together (split over -tp)
  STANDIN_VLLM_KV_BYTES_PER_TOKEN=131072
                                    KV cache bytes per token at TP=1 (Llama-3.1-8B's); split
                                    over -tp, halved by --kv-cache-dtype fp8*
  STANDIN_VLLM_ACTIVATION=0.77GiB   activation peak of the profile run, per rank (or 0)
  STANDIN_VLLM_CUDA_GRAPH=0.84GiB   CUDA-graph pool, per rank (or 0; none with --enforce-eager);
                                    inside the budget from 0.18 when vLLM estimates it
                                    (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS, default on from
                                    0.20), else captured outside it
  STANDIN_VLLM_VERSION=0.32.0       the vLLM release whose start-up lines are printed (banner,
                                    `non-default args`, weights line, V0 profile and blocks with
                                    VLLM_USE_V1=0 up to 0.10.2, KV lines, graph lines, `init
                                    engine ... took`; docs/vllm.md section 9); also what
                                    --version and /version say
  STANDIN_VLLM_ALLOCATE=1           really allocate, with PyTorch on cuda:0, the weights + KV
                                    cache + graph bytes reported, before ready, held until exit:
                                    in the EngineCore child with STANDIN_VLLM_SPAWN_CHILD=1 (a
                                    Python child that imports torch), else in this process.
                                    Without PyTorch or CUDA: error at start, exit 2. A
                                    sleep (--enable-sleep-mode) frees the weights and KV
                                    cache blocks; a wake-up allocates them again
  STANDIN_VLLM_OVERRUN=SIZE         with ALLOCATE: once ready, allocate SIZE more (a worker that
                                    takes more than it claimed); if torch runs out of memory the
                                    engine dies like vLLM's (OutOfMemoryError logged, /health
                                    503, exit STANDIN_VLLM_EXIT_CODE)
  STANDIN_VLLM_REQUEST_DELAY=0      seconds before a completion's first token (to test draining)
  STANDIN_VLLM_TOKEN_DELAY=0.005    seconds between two tokens; max_tokens (default 16) tokens
                                    are made, the prompt's words cycled, streamed or not
  STANDIN_VLLM_SLEEP_DELAY=0.1      seconds POST /sleep?level=1|2 takes (level 0: none)
  STANDIN_VLLM_WAKE_DELAY=0.3       seconds POST /wake_up takes to bring level-1 weights back
                                    (vLLM's blog: 0.26 s for Qwen3-0.6B, 3-6 s large models)
  STANDIN_VLLM_WAKE_DELAY_LEVEL2=0.9  the same after a level-2 sleep (blog: 0.85 s)
  STANDIN_VLLM_DRY_RUN=1            parse the arguments, print them as JSON, exit 0
  vLLM's own: VLLM_API_KEY, VLLM_SERVER_DEV_MODE (the sleep routes exist only with it, as in
  vLLM 0.32; without --enable-sleep-mode a sleep pauses but frees nothing),
  VLLM_KEEP_ALIVE_ON_ENGINE_DEATH, VLLM_LOGGING_LEVEL=DEBUG (adds the
  DEBUG profile and free-memory lines), VLLM_USE_V1=0 (the V0 engine, releases <= 0.10.2),
  VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS.

Booleans accept 1/0, true/false, yes/no. Exit codes: 0 after a signal, 2 for a usage error
(unknown flag, bad STANDIN_VLLM_* value), 1 for a taken port, STANDIN_VLLM_EXIT_CODE for
every simulated failure.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from gardenctl.testing import standin_args, standin_gpu
from gardenctl.testing.standin_engine import (
    CUDA_CONTEXT_BYTES,
    DEFAULT_MAX_MODEL_LEN,
    NON_TORCH_BYTES,
    EngineFailure,
    EngineSettings,
    LogLine,
    StartupResult,
    engine_crashed,
    engine_out_of_memory,
    profile_memory,
    simulate_startup,
)
from gardenctl.testing.standin_env import EnvError, StandinEnv
from gardenctl.testing.standin_http import (
    ApiSettings,
    EngineState,
    StandinHTTPServer,
    create_http_server,
)
from gardenctl.testing.standin_log import VllmLog
from gardenctl.testing.standin_sleep import Scheduler, SleepMemory

ENGINE_CORE_TITLE = "VLLM::EngineCore"
ENGINE_CORE_MAX_LIFETIME_S = 3600
SERVE_POLL_INTERVAL_S = 0.1  # how quickly serve_forever notices a shutdown request
USAGE = "usage: standin-vllm serve [MODEL] [flags...]   (try: standin-vllm serve --help)"


# vLLM's start-up logo (0.19+): art, then the text beside it.
LOGO = (
    ("       █     █     █▄   ▄█", ""),
    (" ▄▄ ▄█ █     █     █ ▀▄▀ █", "version {version}"),
    ("  █▄█▀ █     █     █     █", "model   {model}"),
    ("   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀", ""),
)


def engine_settings(args: argparse.Namespace, env: StandinEnv) -> EngineSettings:
    return EngineSettings(
        model=args.model,
        revision=args.revision,
        gpu_total_bytes=env.gpu_memory_bytes,
        weights_bytes=env.weights_bytes,
        kv_bytes_per_token=env.kv_bytes_per_token,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        # vLLM reads an absent or negative (-1: "auto") max_model_len as the model's maximum.
        max_model_len=(args.max_model_len if (args.max_model_len or 0) > 0
                       else DEFAULT_MAX_MODEL_LEN),
        enforce_eager=args.enforce_eager,
        load_seconds=env.ready_delay,
        vllm_version=env.vllm_version,
        use_v1=env.use_v1,
        debug=env.debug_logging,
        activation_bytes=env.activation_bytes,
        cuda_graph_bytes=env.cuda_graph_bytes,
        estimate_cudagraphs=env.estimate_cudagraphs,
    )


def version_text(env: StandinEnv) -> str:
    return ".".join(str(part) for part in env.vllm_version)


def api_settings(
    args: argparse.Namespace, env: StandinEnv, settings: EngineSettings
) -> ApiSettings:
    return ApiSettings(
        model=args.model,
        served_model_names=standin_args.served_model_names(args),
        max_model_len=settings.max_model_len,
        api_keys=standin_args.api_keys(args, env.api_key),
        # vLLM 0.32 registers the dev routes (sleep ones included) with VLLM_SERVER_DEV_MODE=1
        # alone; --enable-sleep-mode decides only whether a sleep frees memory.
        sleep_routes=env.server_dev_mode,
        request_delay=env.request_delay,
        access_log=not args.disable_uvicorn_access_log,
        log_requests=args.enable_log_requests,
        version=version_text(env),
        token_delay=env.token_delay,
        force_include_usage=args.enable_force_include_usage,
        sse_keep_alive_interval=_seconds(args.sse_keep_alive_interval),
    )


def _seconds(value: object) -> float:
    try:
        return max(0.0, float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def sleep_scheduler(args: argparse.Namespace, env: StandinEnv, settings: EngineSettings,
                    log: VllmLog) -> Scheduler:
    """The scheduler, with the memory a sleep frees: one rank's, from the start-up profile."""
    profile = profile_memory(settings)
    tp_key = 1 if settings.tensor_parallel_size == 1 else 2
    memory = SleepMemory(
        weights=profile.weights, kv_cache=max(0, profile.kv_cache),
        cuda_graphs=profile.cuda_graphs,
        fixed=CUDA_CONTEXT_BYTES[tp_key] + NON_TORCH_BYTES[tp_key],
        sleep_mode=bool(args.enable_sleep_mode),
        offload_cudagraph=bool(args.sleep_mode_offload_cudagraph),
        version=env.vllm_version,
    )
    return Scheduler(log, memory, sleep_delay=env.sleep_delay, wake_delay=env.wake_delay,
                     wake_delay_level2=env.wake_delay_level2)


class ShutdownRequest:
    """SIGTERM/SIGINT handling: the first signal asks the main thread to shut down."""

    def __init__(self, log: VllmLog, ignore_sigterm: bool) -> None:
        self._log = log
        self._ignore_sigterm = ignore_sigterm
        self._requested = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and self._ignore_sigterm:
            self._log.api("WARNING", "standin_vllm.py",
                          "Received SIGTERM; ignoring it (STANDIN_VLLM_IGNORE_SIGTERM=1)")
            return
        if not self._requested.is_set():
            self.signal_name = name
            self._requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once a shutdown was asked for; False if ``timeout`` passed first."""
        return self._requested.wait(timeout)

    def requested(self) -> bool:
        return self._requested.is_set()


def spawn_engine_core() -> subprocess.Popen:
    """A child that stands for vLLM's EngineCore: same process group, default signals."""
    code = f"import time; time.sleep({ENGINE_CORE_MAX_LIFETIME_S})"
    return subprocess.Popen([sys.executable, "-c", code, ENGINE_CORE_TITLE],
                            stdin=subprocess.DEVNULL)


def allocation_sizes(result: StartupResult) -> tuple[tuple[str, int], ...]:
    """What a successful start reported, to really allocate: (sleep-mode tag, bytes) pairs."""
    profile = result.profile
    if result.failure is not None or profile is None:
        return ()
    sizes = (("weights", profile.weights), ("kv_cache", profile.kv_cache),
             ("cudagraph", profile.cuda_graphs))
    return tuple((tag, n) for tag, n in sizes if n > 0)


def real_out_of_memory(error: str) -> EngineFailure:
    """A start that failed because torch really ran out of memory (STANDIN_VLLM_ALLOCATE=1)."""
    return EngineFailure(
        reason="oom",
        engine_traceback=(
            "EngineCore failed to start.",
            "Traceback (most recent call last):",
            f"torch.OutOfMemoryError: {error}",
        ),
        server_traceback=(
            "RuntimeError: Engine core initialization failed. See root cause above. "
            "Failed core proc(s): {'EngineCore_DP0': 1}",
        ),
    )


def stop_child(child: subprocess.Popen | None) -> None:
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=2)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


class StandinServer:
    """One run of the stand-in: start-up, serving, failure or shutdown, and the exit code."""

    def __init__(self, args: argparse.Namespace, env: StandinEnv, log: VllmLog) -> None:
        self.args = args
        self.env = env
        self.log = log
        self.settings = engine_settings(args, env)
        self.engine = EngineState()
        self.stop_request = ShutdownRequest(log, env.ignore_sigterm)

    def run(self) -> int:
        self.stop_request.install()
        self._log_banner()
        self.startup = simulate_startup(self.settings, self.env.fail)
        self.local_gpu: standin_gpu.LocalGpu | None = None
        if self.env.allocate and not self.env.spawn_child:
            try:
                self.local_gpu = standin_gpu.LocalGpu()  # imports torch: only on request
            except standin_gpu.GpuUnavailable as error:
                return self._gpu_unavailable(str(error))
        api = api_settings(self.args, self.env, self.settings)
        self.scheduler = sleep_scheduler(self.args, self.env, self.settings, self.log)
        try:
            server = create_http_server(self.args.host, self.args.port, api, self.engine, self.log,
                                        self.scheduler)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            self._log_port_in_use(error)
            return 1
        thread = threading.Thread(target=server.serve_forever, args=(SERVE_POLL_INTERVAL_S,),
                                  name="http", daemon=True)
        thread.start()
        self.child_gpu: standin_gpu.ChildGpu | None = None
        child: subprocess.Popen | None = None
        if self.env.spawn_child and self.env.allocate:
            self.child_gpu = standin_gpu.ChildGpu(allocation_sizes(self.startup),
                                                  self.env.overrun_bytes)
            child = self.child_gpu.process
        elif self.env.spawn_child:
            child = spawn_engine_core()
        if child is not None:
            self.log.engine_pid = child.pid
        try:
            exit_code = self._run_engine()
            if exit_code == 0:
                self._shut_down_gracefully(server)
            return exit_code
        finally:
            server.shutdown()
            server.server_close()
            stop_child(child)

    def _run_engine(self) -> int:
        """Start the simulated engine, serve until asked to stop; return the exit code."""
        if self.child_gpu is not None:
            kind, detail = self.child_gpu.wait_for("torch-ok", self.stop_request.requested)
            if kind == "stopped":
                return 0
            if kind != "torch-ok":
                return self._gpu_unavailable(detail)
        if self.stop_request.wait(self.env.ready_delay):
            return 0
        if self.env.replay is not None:
            return self._replay(self.env.replay)
        result = self.startup
        self._log_lines(result.lines)
        if result.failure is not None:
            return self._fail(result.failure)
        if self.env.fail == "hang":
            self.stop_request.wait()
            return 0
        if self.env.allocate:
            failed = self._allocate(allocation_sizes(result))
            if failed is not None:
                return failed
        self.engine.mark_ready()
        self._log_ready()
        if self.env.allocate and self.env.overrun_bytes:
            error = self._overrun()
            if error == "stopped":
                return 0
            if error is not None:
                return self._engine_died(engine_out_of_memory(error))
        crashes = self.env.fail == "crash_after_ready"
        if crashes and not self.stop_request.wait(self.env.crash_after):
            return self._engine_died(engine_crashed())
        self.stop_request.wait()
        return 0

    def _engine_died(self, failure: EngineFailure) -> int:
        """EngineCore died after ready: /health 503, the error logged, exit (unless kept alive)."""
        self.engine.mark_dead()
        self.log.api("ERROR", "core_client.py",
                     "Engine core proc EngineCore_DP0 died unexpectedly, shutting down client.")
        exit_code = self._fail(failure)
        if not self.env.keep_alive_on_engine_death:
            return exit_code
        self.stop_request.wait()
        return 0

    def _allocate(self, sizes: Sequence[tuple[str, int]]) -> int | None:
        """Really allocate what the log reported; an exit code if that failed, else None."""
        error: str | None = None
        if self.local_gpu is not None:
            try:
                for tag, n_bytes in sizes:
                    self.local_gpu.allocate(n_bytes, tag)
            except standin_gpu.GpuOutOfMemory as oom:
                error = str(oom)
        elif self.child_gpu is not None:
            kind, detail = self.child_gpu.wait_for("allocated", self.stop_request.requested)
            if kind == "stopped":
                return 0
            if kind == "error":
                return self._gpu_unavailable(detail)
            if kind != "allocated":
                error = detail
        if error is None:
            self.scheduler.gpu = self.local_gpu or self.child_gpu  # sleep mode frees it
            return None
        return self._fail(real_out_of_memory(error))

    def _overrun(self) -> str | None:
        """Allocate STANDIN_VLLM_OVERRUN more: None if it fit, torch's error, or "stopped"."""
        if self.local_gpu is not None:
            try:
                self.local_gpu.allocate(self.env.overrun_bytes)
            except standin_gpu.GpuOutOfMemory as oom:
                return str(oom)
            return None
        assert self.child_gpu is not None
        self.child_gpu.request_overrun()
        kind, detail = self.child_gpu.wait_for("overrun-ok", self.stop_request.requested)
        if kind in ("overrun-ok", "stopped"):
            return None if kind == "overrun-ok" else "stopped"
        return detail

    def _gpu_unavailable(self, why: str) -> int:
        print(f"standin-vllm: error: STANDIN_VLLM_ALLOCATE=1 needs PyTorch with a CUDA device: "
              f"{why}", file=sys.stderr, flush=True)
        return 2

    def _replay(self, path: str) -> int:
        """Print a recorded failure log as it is, then fail like that start did."""
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()
        return self.env.exit_code

    def _fail(self, failure: EngineFailure) -> int:
        for line in failure.engine_traceback:
            self.log.engine("ERROR", "core.py", line)
        self.log.stderr(failure.server_traceback)
        return self.env.exit_code

    def _shut_down_gracefully(self, server: StandinHTTPServer) -> None:
        """Stop accepting; let in-flight requests finish within --shutdown-timeout."""
        if self.stop_request.signal_name:
            self.log.uvicorn("INFO", f"Received {self.stop_request.signal_name}, shutting down")
        self.log.api("INFO", "launcher.py", "Shutting down FastAPI HTTP server.")
        server.shutdown()
        server.server_close()
        pending = server.in_flight.count
        timeout = self.args.shutdown_timeout
        if pending and timeout > 0:
            self.log.uvicorn("INFO", f"Waiting up to {timeout} s for {pending} in-flight "
                                     f"request(s) to finish")
            if not server.in_flight.wait_idle(timeout):
                self.log.uvicorn("WARNING", "Shutdown timeout reached; aborting in-flight requests")
        elif pending:
            self.log.uvicorn("INFO", f"Aborting {pending} in-flight request(s) "
                                     f"(--shutdown-timeout 0)")
        self.log.uvicorn("INFO", "Application shutdown complete.")
        self.log.uvicorn("INFO", f"Finished server process [{self.log.api_server_pid}]")

    def _log_banner(self) -> None:
        """The release's banner: the logo (0.19+, docs/vllm.md section 9) or one line before."""
        version = version_text(self.env)
        if self.env.vllm_version >= (0, 19):
            for art, beside in LOGO:
                text = beside.format(version=version, model=self.args.model)
                self.log.api("INFO", "api_utils.py", f"{art}  {text}".rstrip())
        else:
            self.log.api("INFO", "api_server.py", f"vLLM API server version {version}")
        self.log.api("WARNING", "standin_vllm.py",
                     "This is gardenctl's test stand-in for `vllm serve`: it loads no model and "
                     + ("allocates real GPU memory with PyTorch." if self.env.allocate
                        else "uses no GPU."))
        if self.env.vllm_version >= (0, 9, 1):  # 0.8.x printed the whole Namespace instead
            shown = standin_args.non_default_args(self.args)  # secrets masked
            self.log.api("INFO", "utils.py", f"non-default args: {shown}")

    def _log_lines(self, lines: Sequence[LogLine]) -> None:
        for line in lines:
            write = self.log.engine if line.process == "engine" else self.log.api
            write(line.level, line.source, line.message)

    def _log_ready(self) -> None:
        host = self.args.host
        self.log.api("INFO", "api_server.py",
                     f"Starting vLLM API server 0 on http://{host}:{self.args.port}")
        self.log.uvicorn("INFO", f"Started server process [{self.log.api_server_pid}]")
        self.log.uvicorn("INFO", "Waiting for application startup.")
        self.log.uvicorn("INFO", "Application startup complete.")

    def _log_port_in_use(self, error: OSError) -> None:
        address = (self.args.host, self.args.port)
        self.log.stderr((
            "Traceback (most recent call last):",
            '  File "/usr/local/lib/python3.12/dist-packages/vllm/entrypoints/openai/'
            'api_server.py", in create_server_socket',
            f"OSError: [Errno {error.errno}] Address already in use",
        ))
        self.log.uvicorn("ERROR", f"[Errno {error.errno}] error while attempting to bind on "
                                  f"address {address!r}: address already in use")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-v", "--version"):  # like `vllm --version`: the version alone
        try:
            env = StandinEnv.from_environ(os.environ)
        except EnvError as error:
            print(f"standin-vllm: error: {error}", file=sys.stderr)
            return 2
        print(version_text(env))
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        stream = sys.stdout if argv else sys.stderr
        print(USAGE, __doc__ or "", sep="\n", file=stream)
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"{USAGE}\nstandin-vllm: error: unknown command {argv[0]!r}: only 'serve' is "
              "stood in for", file=sys.stderr)
        return 2
    args = standin_args.parse_serve_args(argv[1:], epilog=__doc__ or "")
    try:
        env = StandinEnv.from_environ(os.environ)
    except EnvError as error:
        print(f"standin-vllm: error: {error}", file=sys.stderr)
        return 2
    if env.dry_run:
        print(json.dumps({"model": args.model,
                          "served_model_names": list(standin_args.served_model_names(args)),
                          "non_default_args": standin_args.non_default_args(args)}, sort_keys=True))
        return 0
    log = VllmLog(version=env.vllm_version, v0=engine_settings(args, env).v0)
    return StandinServer(args, env, log).run()


if __name__ == "__main__":
    sys.exit(main())
