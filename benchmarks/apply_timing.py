"""How long `gardenctl apply` takes when little or nothing changes, and how quickly it notices a
worker that became ready. Real processes: the stand-in vLLM server on simulated GPUs, driven
through the real CLI (`python -m gardenctl ...`), exactly as tests/test_e2e_*.py do.

    python benchmarks/apply_timing.py            # about a minute; prints a table
    python benchmarks/apply_timing.py --runs 20

Measures:
  (a) no-op apply: `gardenctl apply --yes` on a garden of 5 ready workers, the whole process
      (Python start-up, file, observation of the 5 workers with HTTP probes, plan), median of
      --runs runs; `gardenctl --version` is timed the same way, for scale;
  (b) ready -> reported: with STANDIN_VLLM_READY_DELAY=1, a thread of this script polls the new
      worker's /health every 5 ms from before the apply starts; the time from the first 200 to
      the moment apply's progress line "<worker>  ready" arrives on its stderr (read as it is
      written) is how long gardenctl takes to notice. Also shown: apply's own "ready after X s"
      minus the 1 s delay (that also counts spawning the process and importing the stand-in);
  (c) restart-free edits on the 5-worker garden: a cosmetic edit (a comment and a priority) and
      adding a model; the apply's wall time, and whether any of the 5 workers was restarted
      (same pid and process start time before and after).

Nothing is left running: every garden is brought down (and any leftover process group killed)
at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fleets  # benchmarks/, the script's own folder
from e2e_helpers import READY_DELAY as DEFAULT_DELAY
from e2e_helpers import Garden, http_get, model

FIVE = [model(name) for name in ("m1", "m2", "m3", "m4", "m5")]
READY_DELAY = 1.0


def identities(garden: Garden) -> dict[str, tuple[int, float]]:
    return {w: (pid, psutil.Process(pid).create_time()) for w, pid in garden.pids().items()}


def timed_apply(garden: Garden) -> float:
    run = garden.apply()
    if run.code != 0:
        raise SystemExit(f"apply failed:\n{run}")
    return run.elapsed


def measure_startup(garden: Garden, runs: int) -> list[float]:
    """`gardenctl --version`: the interpreter and the CLI skeleton alone, for scale."""
    return [garden.run("--version").elapsed for _ in range(runs)]


def measure_noop(garden: Garden, runs: int) -> list[float]:
    garden.applied(FIVE)
    before = identities(garden)
    times = []
    for _ in range(runs):
        run = garden.apply()
        if run.code != 0 or "No changes" not in run.out:
            raise SystemExit(f"expected a no-op apply:\n{run}")
        times.append(run.elapsed)
    if identities(garden) != before:
        raise SystemExit("a no-op apply restarted a worker")
    return times


class HealthWatcher(threading.Thread):
    """Polls http://127.0.0.1:PORT/health until it answers 200; keeps the time of that answer."""

    def __init__(self, port: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.first_ok: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            status, _ = http_get(self.port, "/health", timeout=0.5)
            if status == 200:
                self.first_ok = time.monotonic()
                return
            time.sleep(self.interval)


def measure_ready_latency(root: Path, runs: int) -> list[tuple[float, float]]:
    """(detection latency, apply's reported elapsed - delay) for `runs` fresh starts."""
    samples = []
    garden = Garden(root / "latency", gpus=2)
    try:
        for _ in range(runs):
            garden.write([model("probe", env={"STANDIN_VLLM_READY_DELAY": str(READY_DELAY)})])
            port = garden.base_port  # the only worker gets the first port
            watcher = HealthWatcher(port)
            watcher.start()
            process = subprocess.Popen(
                [sys.executable, "-m", "gardenctl", "apply", "--yes"], cwd=garden.root,
                env=garden.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, bufsize=1)
            reported = None
            assert process.stderr is not None
            for line in process.stderr:
                if line.rstrip().endswith(f"{garden.worker_id('probe')}  ready"):
                    reported = time.monotonic()
            out = process.stdout.read() if process.stdout else ""
            process.wait()
            watcher.stop.set()
            watcher.join()
            if process.returncode != 0 or reported is None or watcher.first_ok is None:
                raise SystemExit(f"apply failed or no ready line (exit {process.returncode})")
            elapsed = float(out.split("ready after ")[1].split("s")[0])
            samples.append((reported - watcher.first_ok, elapsed - READY_DELAY))
            garden.run("down", "--yes")
    finally:
        garden.tear_down()
    return samples


def measure_edits(garden: Garden, runs: int) -> dict[str, list[tuple[float, int]]]:
    """{edit: [(apply wall time, workers of the five restarted)]}"""
    garden.applied(FIVE)
    results: dict[str, list[tuple[float, int]]] = {"cosmetic": [], "add": [], "remove": []}
    for i in range(runs):
        before = identities(garden)
        garden.write([{**m, "priority": i + 1} if m["name"] == "m1" else m for m in FIVE],
                     comment=f"cosmetic edit {i}")
        elapsed = timed_apply(garden)
        after = identities(garden)
        results["cosmetic"].append((elapsed, sum(after[w] != before[w] for w in before)))
        garden.write(FIVE + [model("extra")])
        elapsed = timed_apply(garden)
        after = identities(garden)
        results["add"].append((elapsed, sum(after.get(w) != before[w] for w in before)))
        garden.write(FIVE)
        elapsed = timed_apply(garden)
        after = identities(garden)
        results["remove"].append((elapsed, sum(after.get(w) != before[w] for w in before)))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="repetitions per measure")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gardenctl-apply-timing-"))
    garden = Garden(root / "five", gpus=8)
    try:
        startup = measure_startup(garden, args.runs)
        noop = measure_noop(garden, args.runs)
        edits = measure_edits(garden, max(3, args.runs // 2))
    finally:
        garden.tear_down()
    latency = measure_ready_latency(root, args.runs)

    detect = [s[0] for s in latency]
    overhead = [s[1] for s in latency]
    print(f"# apply timing. {fleets.machine().markdown()}")
    print(f"# stand-in READY_DELAY {READY_DELAY:.1f}s for (b); "
          f"{DEFAULT_DELAY}s elsewhere; one worker per simulated GPU; "
          f"{args.runs} runs\n")
    rows = [
        ("    for scale: `gardenctl --version` (whole process)", startup, None),
        ("(a) no-op apply, 5 ready workers (whole process)", noop, None),
        ("(b) /health 200 -> apply prints 'ready'", detect, None),
        ("(b) apply's 'ready after' minus the 1 s delay", overhead, None),
    ]
    for name, values in edits.items():
        label = {"cosmetic": "(c) cosmetic edit (comment, priority)",
                 "add": "(c) add a 6th model (includes its start)",
                 "remove": "(c) remove that model again"}[name]
        rows.append((label, [v[0] for v in values], sum(v[1] for v in values)))
    print(f"{'measure':<52} {'median':>8} {'min':>8} {'max':>8}  restarts of the 5")
    for label, values, restarts in rows:
        tail = "" if restarts is None else f"  {restarts}"
        print(f"{label:<52} {statistics.median(values):>7.3f}s {min(values):>7.3f}s "
              f"{max(values):>7.3f}s{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
