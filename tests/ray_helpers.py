"""A real Ray cluster of several nodes on this machine, for the Ray runtime's tests.

`RayTestCluster` starts Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`): a head
with no GPU and worker nodes with logical GPUs, each named by the node label gardenctl/node,
every address on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). No node has NVML here, so a
garden's `inventory:` gives the GPUs of the nodes it declares, and the plan uses only those: each
test's garden sees only its own nodes of the shared cluster.

`RayGarden` is the e2e `Garden` on that cluster: its file says `runtime: {kind: ray}` and the
worker processes it finds are marked by the cluster, not by a state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
from e2e_helpers import GPU_MEMORY, READY_DELAY, STANDIN, WORKER_ID_ENV, Garden, wait_until

STATE_ENV = "GARDENCTL_STATE"
NODE_LABEL = "gardenctl/node"


class RayTestCluster:
    def __init__(self, nodes: dict[str, int]) -> None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "labels": {NODE_LABEL: "head"}})
        self.nodes: dict[str, Any] = {}
        for name, gpus in nodes.items():
            self.add_node(name, gpus)
        self.address = self.cluster.address
        from gardenctl.runtime.ray import connect

        self.handle = connect(self.address)  # this test process's driver (ray.init once)

    def add_node(self, name: str, gpus: int = 2) -> None:
        self.nodes[name] = self.cluster.add_node(num_cpus=1, num_gpus=gpus,
                                                 labels={NODE_LABEL: name})
        self.cluster.wait_for_nodes()

    def remove_node(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name))

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()

    # -- what Ray says ---------------------------------------------------------------------

    def worker_actors(self, garden: str) -> list[str]:
        import ray

        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == f"gardenctl.{garden}")

    def free_gpus(self, node: str) -> float:
        """GPUs of ``node`` that Ray would give other work now."""

        from ray._private.state import available_resources_per_node

        node_id = self.handle.nodes()[node].node_id
        return available_resources_per_node().get(node_id, {}).get("GPU", 0.0)

    def gpu_ids_given_to_other_work(self, node: str) -> list[int]:
        """The GPU ids Ray gives a task that asks for one GPU of ``node`` (other Ray work)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_gpus=1, num_cpus=0)
        def which() -> list[int]:
            return [int(i) for i in ray.get_gpu_ids()]

        node_id = self.handle.nodes()[node].node_id
        return ray.get(which.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id, soft=False)).remote(), timeout=60)


class RayGarden(Garden):
    """A Garden whose file runs it on the test cluster, over the nodes it declares."""

    def __init__(self, root: Path, cluster: RayTestCluster, *, nodes: dict[str, int],
                 gpu_memory: str = GPU_MEMORY, **options: Any) -> None:
        super().__init__(root, **options)
        self.cluster = cluster
        self.node_gpus = nodes
        self.gpu_memory = gpu_memory
        self.env["RAY_ADDRESS"] = cluster.address

    def write(self, models: list[dict], *, comment: str = "",
              defaults: dict | None = None) -> None:
        env = {"STANDIN_VLLM_READY_DELAY": READY_DELAY,
               "STANDIN_VLLM_GPU_MEMORY": self.gpu_memory}
        settings = {"vllm_command": list(STANDIN), "max_model_len": 2048,
                    "shutdown_timeout": "5s", "start_timeout": "60s", **(defaults or {})}
        settings["env"] = {**env, **settings.get("env", {})}
        lines = [f"# {comment}" if comment else "# Ray e2e test garden",
                 f"name: {self.name}",
                 f"runtime: {{kind: ray, address: {json.dumps(self.cluster.address)}}}",
                 f"defaults: {json.dumps(settings)}",
                 f"placement: {json.dumps({'base_port': self.base_port})}",
                 "inventory:  # the nodes have no NVML: their GPUs, as Ray's logical GPUs",
                 "  nodes:"]
        for node, count in self.node_gpus.items():
            lines.append(f"    - {{name: {node}, gpus: [{{name: simulated, memory: "
                         f"{self.gpu_memory}, count: {count}}}]}}")
        lines.append("models:")
        lines += [f"  - {json.dumps(m)}" for m in models]
        self.file.write_text("\n".join(lines) + "\n")

    def owns(self, env: dict[str, str]) -> bool:
        """Workers on the cluster are marked by it, not by a state directory."""
        return env.get(STATE_ENV, "").startswith("ray:")

    def leader(self, worker_id: str) -> psutil.Process | None:
        """The worker's `vllm serve` process (its process group's leader)."""
        for process in self.processes():
            with contextlib.suppress(psutil.Error, OSError):
                if (process.environ()[WORKER_ID_ENV] == worker_id
                        and os.getpgid(process.pid) == process.pid):
                    return process
        return None

    def pids(self) -> dict[str, int]:
        found = {}
        for process in self.processes():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(process.pid) == process.pid:
                    found[process.environ()[WORKER_ID_ENV]] = process.pid
        return found

    def tear_down(self) -> list[str]:
        left = super().tear_down()
        gone = wait_until(lambda: not self.cluster.worker_actors(self.name), timeout=30)
        if not gone:
            left.append(f"actors left in the cluster: {self.cluster.worker_actors(self.name)}")
        return left


def wait_for_exit(process: psutil.Process, timeout: float = 30.0) -> bool:
    try:
        process.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        return False


__all__ = ["RayGarden", "RayTestCluster", "time", "wait_for_exit"]
