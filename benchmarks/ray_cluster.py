"""How long gardenctl's commands take on a Ray cluster, and how a lost node is repaired.

A real multi-node Ray cluster on this machine (Ray's own test cluster, tests/ray_helpers.py: a
head with no GPU and three nodes with two logical GPUs each, labelled gardenctl/node, every
address on 127.0.0.1), the stand-in vLLM started by worker actors, gardenctl driven through its
real command line, exactly as tests/test_ray.py does.

    python benchmarks/ray_cluster.py             # about three minutes; prints a table
    python benchmarks/ray_cluster.py --runs 5

Measures (each a whole `python -m gardenctl ...` process, connecting to the cluster included):
  - the cluster's own start;
  - `plan` of a garden of three models (one pinned to a node and GPU, one tensor-parallel over
    two GPUs, one placed freely) over three nodes, nothing running: median of --runs;
  - `apply` of it from nothing (three actors created, three stand-ins ready);
  - a no-op `apply` and `status` once it runs: median of --runs;
  - a lost node: the node of the freely placed model is removed from the cluster; the next
    `apply` (observed ended, re-placed on another node, started, ready) is timed;
  - `down` (every worker stopped, actors and GPU leases given back).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from e2e_helpers import model
from ray_helpers import RayGarden, RayTestCluster

NODES = {"n1": 2, "n2": 2, "n3": 2}
MODELS = [model("pinned", placement={"node": "n2", "gpus": [1]}),
          model("wide", tensor_parallel_size=2, placement={"node": "n1"}),
          model("roam")]


def timed(garden: RayGarden, *args: str) -> float:
    run = garden.run(*args, timeout=300)
    if run.code != 0:
        raise SystemExit(f"gardenctl {' '.join(args)} failed:\n{run}")
    return run.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    started = time.monotonic()
    cluster = RayTestCluster(NODES)
    rows.append(("Ray test cluster start (head + 3 nodes)", f"{time.monotonic() - started:.1f} s"))
    with tempfile.TemporaryDirectory() as folder:
        garden = RayGarden(Path(folder) / "g", cluster, nodes=NODES)
        try:
            garden.write(MODELS)
            plans = [timed(garden, "plan") for _ in range(args.runs)]
            rows.append((f"plan, nothing running (median of {args.runs})",
                         f"{statistics.median(plans):.1f} s"))
            rows.append(("apply from nothing (3 workers, one TP=2)",
                         f"{timed(garden, 'apply', '--yes'):.1f} s"))
            noops = [timed(garden, "apply", "--yes") for _ in range(args.runs)]
            rows.append((f"apply, nothing to change (median of {args.runs})",
                         f"{statistics.median(noops):.1f} s"))
            statuses = [timed(garden, "status") for _ in range(args.runs)]
            rows.append((f"status (median of {args.runs})", f"{statistics.median(statuses):.1f} s"))
            roam = garden.worker_id("roam")
            lost = garden.workers()[roam]["node"]
            cluster.remove_node(lost)
            repair = garden.run("apply", "--yes", timeout=300)  # exit 1 when a pin is unplaced
            moved = garden.workers()[roam]
            plan = garden.run("plan", "-o", "json", timeout=300).json()
            unplaced = [u["worker"].split("/", 1)[1] for u in plan["unplaced"]]
            rows.append((f"apply after node {lost} was lost (roam/0 -> {moved['node']}, "
                         f"{moved['phase']}; exit {repair.code}, unplaced while {lost} is gone: "
                         f"{', '.join(unplaced) or 'none'})", f"{repair.elapsed:.1f} s"))
            rows.append(("down (3 workers, actors and GPU leases released)",
                         f"{timed(garden, 'down', '--yes'):.1f} s"))
        finally:
            garden.tear_down()
            cluster.shutdown()
    print(f"Machine: `{' '.join(platform.uname())}`, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}, Ray {_ray_version()}\n")
    print("| step | wall time |\n|---|---|")
    for step, value in rows:
        print(f"| {step} | {value} |")


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
