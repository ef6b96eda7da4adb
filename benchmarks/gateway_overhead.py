"""Gateway overhead: the latency `gardenctl gateway` adds to a request, against calling the
worker directly, in one run.

    python benchmarks/gateway_overhead.py [--requests 500] [--threads 16]

Starts one stand-in vLLM worker with the real `gardenctl apply` (a garden in a temporary
folder, tests/e2e_helpers.py) and `gardenctl gateway` in front of it, then times small
non-streamed /v1/completions (max_tokens 4, no request delay in the stand-in, so what is timed
is HTTP and routing, not generation):

- sequential: --requests requests each way, alternating direct / gateway (drift hits both);
- concurrent: --threads client threads, --requests requests in all each way.

Each request is a fresh HTTP/1.1 connection (the stand-in closes every connection, as its
`Connection: close` says), timed from connect to the last byte of the answer. Prints a markdown
table (p50, p99, mean; added = gateway - direct) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from e2e_helpers import garden_at, model  # noqa: E402
from gateway_helpers import Gateway  # noqa: E402

BODY = json.dumps({"model": "bench", "prompt": "one two three", "max_tokens": 4}).encode()


def timed_request(port: int) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/completions", body=BODY,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"port {port} answered {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started


def concurrent(port: int, total: int, threads: int) -> tuple[list[float], float]:
    samples: list[float] = []
    lock = threading.Lock()
    per_thread = total // threads

    def work() -> None:
        mine = [timed_request(port) for _ in range(per_thread)]
        with lock:
            samples.extend(mine)

    started = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return samples, time.perf_counter() - started


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, direct: list[float], via: list[float], extra: str = "") -> str:
    ms = [1000 * f(s) for s in (direct, via) for f in
          (lambda x: percentile(x, 50), lambda x: percentile(x, 99), statistics.fmean)]
    return (f"| {name} | {ms[0]:.2f} / {ms[1]:.2f} / {ms[2]:.2f} | {ms[3]:.2f} / {ms[4]:.2f} / "
            f"{ms[5]:.2f} | {ms[3] - ms[0]:+.2f} / {ms[4] - ms[1]:+.2f} |{extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, garden_at(Path(folder) / "g") as garden:
        garden.applied([model("bench")])
        worker_port = garden.workers()[garden.worker_id("bench")]["port"]
        gateway = Gateway(garden)
        for port in (worker_port, gateway.port):  # warm up both paths
            for _ in range(20):
                timed_request(port)
        direct, via = [], []
        for _ in range(args.requests):
            direct.append(timed_request(worker_port))
            via.append(timed_request(gateway.port))
        c_direct, t_direct = concurrent(worker_port, args.requests, args.threads)
        c_via, t_via = concurrent(gateway.port, args.requests, args.threads)
    print(f"Machine: `{' '.join(platform.uname())}`; {os.cpu_count()} cores; Python "
          f"{platform.python_version()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print("| requests | direct p50 / p99 / mean (ms) | gateway p50 / p99 / mean (ms) "
          "| added p50 / p99 (ms) | throughput direct / gateway (req/s) |")
    print("|---|---|---|---|---|")
    print(row(f"{args.requests} sequential", direct, via, " |"))
    print(row(f"{args.requests} over {args.threads} threads", c_direct, c_via,
              f" {len(c_direct) / t_direct:.0f} / {len(c_via) / t_via:.0f} |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
