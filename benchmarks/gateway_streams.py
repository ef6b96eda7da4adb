"""Gateway streams: how many streamed chat completions `gardenctl gateway` holds at once on this
machine, what they cost it, and the same load sent straight to the workers.

    python benchmarks/gateway_streams.py [--levels 250,500,1000,2000] [--workers 2]
        [--tokens 30] [--token-delay 0.5] [--ramp 2] [--no-direct] [--gateway-nofile N]
    python benchmarks/gateway_streams.py --quick      # a tiny run, to see that it works

Starts --workers stand-in vLLM workers (replicas of one model) with the real `gardenctl apply`
(a garden in a temporary folder, tests/e2e_helpers.py) at a slow token pace
(STANDIN_VLLM_TOKEN_DELAY=--token-delay, --tokens tokens: a stream lasts about
(tokens - 1) x token-delay, 14.5 s by default). For each level N of --levels, a fresh
`gardenctl gateway` (so its memory starts from the same idle state every time) receives N
streamed /v1/chat/completions from this process (asyncio + aiohttp, one connection each,
started evenly over --ramp seconds: all N are open at once, since a stream outlives the ramp).
Then, unless --no-direct, the same N streams go straight to the workers (round robin), which
shows what the gateway adds and what the stand-in or the client cost on their own.

Per level and path it reports: streams whose answer began (HTTP 200 and headers: "opened"),
streams completed with every token chunk and `data: [DONE]`, errors (by kind, under the
table), the most streams open at the same moment, time from sending the request to the first
token chunk (p50 / p99), stream duration (p50 / p99), and from a psutil sampler thread (every
--sample seconds): the gateway's RSS (idle before the level -> peak), its CPU (mean over the
level and the peak over one sample, in % of one core), its most open file descriptors, and
the mean CPU of the workers (all together), of this client process and of the whole machine.

File descriptors: each stream through the gateway holds two sockets there (client and worker),
and one in a worker. This process raises its RLIMIT_NOFILE soft limit to the hard limit before
anything starts, so apply's workers and the gateway inherit it (the gateway does not raise its
own); the gateway's limit as the kernel reports it is printed. --gateway-nofile N starts the
gateway with a soft limit of N instead (1024 is a common default) to see what a low limit does.

Everything runs on this machine: on few cores the client, the gateway and the workers share
them, and the "machine CPU" column says when they were saturated. Prints a markdown table for
benchmarks/RESULTS.md; no timing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from e2e_helpers import Garden, garden_at, model  # noqa: E402
from gateway_helpers import Gateway  # noqa: E402

MODEL = "bench"
PROMPT = "one two three four five six seven eight"
MIB = 1024**2


# -- one stream --------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One stream as the client saw it."""

    opened: bool = False  # HTTP 200, headers read
    completed: bool = False  # every token chunk, then data: [DONE]
    error: str | None = None  # a short kind, counted under the table
    first_token_s: float | None = None  # request sent -> first chunk with content
    duration_s: float | None = None  # request sent -> end of the answer


@dataclass
class Live:
    """Streams open now (headers read, answer not finished) and the most at once."""

    open: int = 0
    peak: int = 0

    def enter(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)

    def leave(self) -> None:
        self.open -= 1


def _has_content(payload: bytes) -> bool:
    """Does this chunk (its JSON) carry generated text? (The first chat chunk has only the
    role, with empty content.)"""
    try:
        choices = json.loads(payload).get("choices") or []
    except ValueError:
        return False
    return any((c.get("delta") or {}).get("content") for c in choices)


async def one_stream(session: aiohttp.ClientSession, url: str, tokens: int, delay: float,
                     timeout: aiohttp.ClientTimeout, live: Live) -> Outcome:
    await asyncio.sleep(delay)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens, "stream": True}
    outcome = Outcome()
    started = time.perf_counter()
    events = 0
    try:
        async with session.post(url, json=body, timeout=timeout) as response:
            if response.status != 200:
                await response.read()
                outcome.error = f"HTTP {response.status}"
                return outcome
            outcome.opened = True
            live.enter()
            try:
                done = False
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    if done:  # anything after [DONE] is wrong
                        outcome.error = "data after [DONE]"
                        return outcome
                    events += 1
                    if outcome.first_token_s is None and _has_content(payload):
                        outcome.first_token_s = time.perf_counter() - started
                outcome.duration_s = time.perf_counter() - started
            finally:
                live.leave()
    except asyncio.TimeoutError:
        outcome.error = "timeout"
    except aiohttp.ClientConnectorError as exc:
        outcome.error = f"connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    except aiohttp.ClientPayloadError:
        outcome.error = "cut mid-stream"
    except aiohttp.ServerDisconnectedError:
        outcome.error = "server disconnected"
    except aiohttp.ClientError as exc:
        outcome.error = type(exc).__name__
    except OSError as exc:
        outcome.error = exc.strerror or type(exc).__name__
    else:
        if not done:
            outcome.error = "no [DONE]"
        elif events != tokens + 1:  # the role chunk, then one chunk per token
            outcome.error = "missing chunks"
        else:
            outcome.completed = True
    return outcome


async def run_streams(urls: list[str], count: int, tokens: int, ramp: float,
                      timeout_s: float) -> tuple[list[Outcome], int]:
    """``count`` streams, the i-th to urls[i % len(urls)], started evenly over ``ramp``
    seconds; their outcomes and the most open at once."""
    live = Live()
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        outcomes = await asyncio.gather(*(
            one_stream(session, urls[i % len(urls)], tokens, ramp * i / count, timeout, live)
            for i in range(count)))
    return list(outcomes), live.peak


# -- what the processes cost ---------------------------------------------------------------------

@dataclass
class Usage:
    """What the sampler saw over one run."""

    wall_s: float = 0.0
    gateway_rss_idle: int | None = None
    gateway_rss_peak: int = 0
    gateway_fds_peak: int = 0
    gateway_cpu_s: float = 0.0
    gateway_cpu_peak: float = 0.0  # % of one core over one sample
    workers_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    machine_cpu: float = 0.0  # mean % of all cores
    errors: list[str] = field(default_factory=list)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class Sampler(threading.Thread):
    """Samples the gateway's RSS, file descriptors and CPU every ``interval`` seconds, from
    start() to stop(); CPU of the workers, this process and the machine over the whole run."""

    def __init__(self, gateway_pid: int | None, worker_pids: list[int], interval: float) -> None:
        super().__init__(daemon=True)
        self.gateway = psutil.Process(gateway_pid) if gateway_pid else None
        self.workers = [psutil.Process(pid) for pid in worker_pids]
        self.client = psutil.Process()
        self.interval = interval
        self.usage = Usage()
        self._halt = threading.Event()

    def _sample_gateway(self) -> float:
        assert self.gateway is not None
        with self.gateway.oneshot():
            self.usage.gateway_rss_peak = max(self.usage.gateway_rss_peak,
                                              self.gateway.memory_info().rss)
            self.usage.gateway_fds_peak = max(self.usage.gateway_fds_peak,
                                              self.gateway.num_fds())
            return _cpu_s(self.gateway)

    def start(self) -> None:
        if self.gateway is not None:
            self.usage.gateway_rss_idle = self.gateway.memory_info().rss
            self._gateway_cpu0 = self._sample_gateway()
        self._workers_cpu0 = sum(_cpu_s(w) for w in self.workers)
        self._client_cpu0 = _cpu_s(self.client)
        psutil.cpu_percent()  # starts the machine-wide interval
        self._wall0 = time.perf_counter()
        super().start()

    def run(self) -> None:
        last_cpu, last_wall = getattr(self, "_gateway_cpu0", 0.0), self._wall0
        while not self._halt.wait(self.interval):
            if self.gateway is None:
                continue
            try:
                cpu, wall = self._sample_gateway(), time.perf_counter()
            except psutil.Error as exc:
                self.usage.errors.append(f"sampling the gateway failed: {exc}")
                return
            self.usage.gateway_cpu_peak = max(self.usage.gateway_cpu_peak,
                                              100 * (cpu - last_cpu) / (wall - last_wall))
            last_cpu, last_wall = cpu, wall

    def stop(self) -> Usage:
        self._halt.set()
        self.join()
        usage = self.usage
        usage.machine_cpu = psutil.cpu_percent()
        usage.wall_s = time.perf_counter() - self._wall0
        if self.gateway is not None:
            usage.gateway_cpu_s = self._sample_gateway() - self._gateway_cpu0
        usage.workers_cpu_s = sum(_cpu_s(w) for w in self.workers) - self._workers_cpu0
        usage.client_cpu_s = _cpu_s(self.client) - self._client_cpu0
        return usage


# -- the run -------------------------------------------------------------------------------------

def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the (soft, hard) now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep what we have; the limit is printed
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def start_gateway(garden: Garden, nofile: int | None) -> Gateway:
    """A `gardenctl gateway` child, with a soft RLIMIT_NOFILE of ``nofile`` if given (set on
    this process while the child is spawned: a child inherits its parent's limits)."""
    if nofile is None:
        return Gateway(garden)
    kept = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, kept[1]), kept[1]))
    try:
        return Gateway(garden)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, kept)


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=20)
    except Exception:  # noqa: BLE001 - whatever went wrong, it must not keep running
        gateway.process.kill()
        gateway.process.wait(timeout=10)


def wait_workers_idle(pids: list[int], timeout: float = 60.0) -> None:
    """Wait until the workers hold no established TCP connection other than their listening
    socket (the last level's streams are over), so levels do not overlap."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = 0
        for pid in pids:
            try:
                busy += sum(1 for c in psutil.Process(pid).net_connections("tcp")
                            if c.status == psutil.CONN_ESTABLISHED)
            except psutil.Error:
                pass
        if busy == 0:
            return
        time.sleep(0.2)


@dataclass
class Result:
    level: int
    path: str  # "gateway" or "direct"
    outcomes: list[Outcome]
    peak_open: int
    usage: Usage


def measure(urls: list[str], level: int, path: str, args: argparse.Namespace,
            gateway_pid: int | None, worker_pids: list[int]) -> Result:
    expected = max(0, args.tokens - 1) * args.token_delay
    timeout_s = args.ramp + 3 * expected + 60
    sampler = Sampler(gateway_pid, worker_pids, args.sample)
    sampler.start()
    try:
        outcomes, peak = asyncio.run(run_streams(urls, level, args.tokens, args.ramp,
                                                 timeout_s))
    finally:
        usage = sampler.stop()
    return Result(level, path, outcomes, peak, usage)


# -- the report ----------------------------------------------------------------------------------

def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def p50_p99(samples: list[float], scale: float, digits: int) -> str:
    if not samples:
        return "-"
    return (f"{scale * percentile(samples, 50):.{digits}f} / "
            f"{scale * percentile(samples, 99):.{digits}f}")


def row(result: Result) -> str:
    outcomes, usage = result.outcomes, result.usage
    opened = sum(o.opened for o in outcomes)
    completed = sum(o.completed for o in outcomes)
    errors = sum(o.error is not None for o in outcomes)
    first = [o.first_token_s for o in outcomes if o.first_token_s is not None]
    durations = [o.duration_s for o in outcomes if o.completed and o.duration_s is not None]
    wall = usage.wall_s or 1.0
    if result.path == "gateway" and usage.gateway_rss_idle is not None:
        rss = (f"{usage.gateway_rss_idle / MIB:.0f} -> {usage.gateway_rss_peak / MIB:.0f} "
               f"(+{(usage.gateway_rss_peak - usage.gateway_rss_idle) / 1024 / result.level:.0f}"
               " KiB/stream)")
        cpu = f"{100 * usage.gateway_cpu_s / wall:.0f} / {usage.gateway_cpu_peak:.0f}"
        fds = str(usage.gateway_fds_peak)
    else:
        rss = cpu = fds = "-"
    return (f"| {result.level} | {result.path} | {opened} | {completed} | {errors} "
            f"| {result.peak_open} | {p50_p99(first, 1000, 1)} | {p50_p99(durations, 1, 2)} "
            f"| {rss} | {cpu} | {fds} | {100 * usage.workers_cpu_s / wall:.0f} "
            f"| {100 * usage.client_cpu_s / wall:.0f} | {usage.machine_cpu:.0f} |")


def print_report(results: list[Result], args: argparse.Namespace, limits: dict[str, str],
                 workers: int) -> None:
    print(f"Machine: `{' '.join(platform.uname())}`; {os.cpu_count()} cores; Python "
          f"{platform.python_version()}; aiohttp {aiohttp.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    expected = max(0, args.tokens - 1) * args.token_delay
    print(f"Load: {workers} stand-in worker(s) of one model; each stream {args.tokens} tokens "
          f"at STANDIN_VLLM_TOKEN_DELAY={args.token_delay} s (~{expected:.1f} s a stream), "
          f"started over {args.ramp} s; sampled every {args.sample} s.")
    print("RLIMIT_NOFILE (soft / hard): " + "; ".join(f"{k} {v}" for k, v in limits.items())
          + "\n")
    print("| streams | path | opened | completed | errors | most open at once "
          "| first token p50 / p99 (ms) | stream p50 / p99 (s) "
          "| gateway RSS idle -> peak (MiB) | gateway CPU mean / peak (% of a core) "
          "| gateway most fds | workers CPU (%) | client CPU (%) | machine CPU (% of all) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print(row(result))
    notes = []
    for result in results:
        kinds = Counter(o.error for o in result.outcomes if o.error is not None)
        if kinds:
            notes.append(f"- {result.level} {result.path}: " + ", ".join(
                f"{count} x {kind}" for kind, count in kinds.most_common()))
        notes += [f"- {result.level} {result.path}: {e}" for e in result.usage.errors]
    if notes:
        print("\nErrors:\n" + "\n".join(notes))


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 250,500") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive numbers")
    return levels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=parse_levels, default=[250, 500, 1000, 2000],
                        help="streams held at once, one run each (default 250,500,1000,2000)")
    parser.add_argument("--workers", type=int, default=2, choices=range(1, 7),
                        help="stand-in workers (replicas of one model; default 2)")
    parser.add_argument("--tokens", type=int, default=30, help="tokens a stream (default 30)")
    parser.add_argument("--token-delay", type=float, default=0.5,
                        help="seconds between two tokens (default 0.5)")
    parser.add_argument("--ramp", type=float, default=2.0,
                        help="seconds over which a level's streams are started (default 2)")
    parser.add_argument("--sample", type=float, default=0.5,
                        help="seconds between two samples of the gateway (default 0.5)")
    parser.add_argument("--no-direct", dest="direct", action="store_false",
                        help="skip the same load sent straight to the workers")
    parser.add_argument("--gateway-nofile", type=int, default=None,
                        help="start the gateway with this soft RLIMIT_NOFILE (default: this "
                             "process's, raised to the hard limit)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run: levels 20,50, 6 tokens at 0.2 s, ramp 0.5 s")
    args = parser.parse_args()
    if args.quick:
        args.levels, args.tokens, args.token_delay, args.ramp = [20, 50], 6, 0.2, 0.5
    soft, hard = raise_nofile()
    limits = {"this process": f"{soft} / {hard}"}
    results: list[Result] = []
    # apply refuses a *_TOKEN_* variable written in the file (it looks like a secret): the file
    # names it, apply's environment gives it
    delay = {"STANDIN_VLLM_TOKEN_DELAY": str(args.token_delay)}
    with tempfile.TemporaryDirectory() as folder, \
            garden_at(Path(folder) / "g", extra_env=delay) as garden:
        garden.applied([model(MODEL, replicas=args.workers)], defaults={"env": {
            "STANDIN_VLLM_TOKEN_DELAY": "${STANDIN_VLLM_TOKEN_DELAY}"}})
        workers = [garden.workers()[garden.worker_id(MODEL, r)] for r in range(args.workers)]
        worker_urls = [f"http://127.0.0.1:{w['port']}/v1/chat/completions" for w in workers]
        worker_pids = [garden.pids()[garden.worker_id(MODEL, r)] for r in range(args.workers)]
        limits["worker"] = "{} / {}".format(*psutil.Process(worker_pids[0]).rlimit(
            psutil.RLIMIT_NOFILE))
        for level in args.levels:
            gateway = start_gateway(garden, args.gateway_nofile)
            try:
                limits["gateway"] = "{} / {}".format(*psutil.Process(gateway.process.pid).rlimit(
                    psutil.RLIMIT_NOFILE))
                url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
                asyncio.run(run_streams([url], 1, 2, 0.0, 30.0))  # warm the path up
                results.append(measure([url], level, "gateway", args, gateway.process.pid,
                                       worker_pids))
            finally:
                stop_gateway(gateway)
            print(f"... {level} through the gateway done", file=sys.stderr, flush=True)
            wait_workers_idle(worker_pids)
            if args.direct:
                results.append(measure(worker_urls, level, "direct", args, None, worker_pids))
                print(f"... {level} direct done", file=sys.stderr, flush=True)
                wait_workers_idle(worker_pids)
    print_report(results, args, limits, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
