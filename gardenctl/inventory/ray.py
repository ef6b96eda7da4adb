"""The inventory of a Ray cluster: its alive nodes, each with the GPUs a probe on it reads
through NVML, or, where a node has no NVML (a CPU-only test cluster), the GPUs a declared
inventory node of the same name gives it.

A node is named by its Ray label ``gardenctl/node`` (``ray start --labels``), else by its
hostname. A node that left the cluster is not in the inventory, so the plan puts nothing there;
a node that joined is, so the plan may use it.
"""

from __future__ import annotations

from gardenctl.inventory.model import Gpu, GpuProcess, Inventory, Node
from gardenctl.runtime.ray.cluster import RayCluster


def cluster_inventory(cluster: RayCluster, declared: Inventory | None) -> Inventory:
    nodes = cluster.nodes()
    probes = cluster.probe_all_gpus(list(nodes.values()))
    found: list[Node] = []
    notes: list[str] = []
    measured_all = True
    for name, node in nodes.items():
        probe = probes.get(name, {"error": "no answer"})
        fallback = declared.node(name) if declared is not None else None
        if "gpus" in probe:
            found.append(Node(name, tuple(_gpu(name, g) for g in probe["gpus"]),
                              fallback.host_memory_bytes if fallback is not None else None))
        elif fallback is not None:
            found.append(fallback)
            measured_all = False
        else:
            if node.gpus:
                notes.append(f"node {name}: Ray counts {node.gpus} GPU(s), but they cannot be "
                             f"read ({probe['error'].splitlines()[0]}) and no inventory node "
                             f"{name} declares them: nothing is placed there")
            found.append(Node(name, ()))
    if declared is not None:
        for missing in sorted({n.name for n in declared.nodes} - set(nodes)):
            notes.append(f"declared node {missing} is not in the Ray cluster: nothing is placed "
                         "there")
    gpus = [g for n in found for g in n.gpus]
    return Inventory(nodes=tuple(found), source=f"Ray cluster at {cluster.address}",
                     notes=tuple(notes), used_includes_ours=bool(gpus) and measured_all)


def _gpu(node: str, data: dict) -> Gpu:
    return Gpu(node=node, index=int(data["index"]), name=str(data["name"]),
               total_bytes=int(data["total_bytes"]), used_bytes=int(data["used_bytes"]),
               uuid=data.get("uuid"),
               processes=tuple(GpuProcess(int(p[0]), p[1], str(p[2]))
                               for p in data.get("processes", ())))


__all__ = ["cluster_inventory"]
