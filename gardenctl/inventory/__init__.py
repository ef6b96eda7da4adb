"""Hardware: discovered through NVML, declared in the garden, or read from a file."""

from __future__ import annotations

from gardenctl.inventory.model import Gpu, GpuProcess, Inventory, Node

__all__ = ["Gpu", "GpuProcess", "Inventory", "Node", "resolve_inventory"]


def resolve_inventory(garden, garden_path: str, inventory_path: str | None, nvml=None, *,
                      declared_only: bool = False) -> Inventory:
    """The inventory a command plans against: --inventory FILE, else the garden's declared
    inventory, else this machine's GPUs through NVML. On a Ray cluster: the cluster's nodes,
    their GPUs read on each node, the file or declared inventory filling in nodes without
    NVML. ``declared_only`` (validate, which reaches no cluster): the file or declared one.
    """
    from gardenctl.runtime import runtime_spec

    spec = runtime_spec(garden)
    if spec.kind == "ray" and not declared_only:
        from gardenctl.inventory.ray import cluster_inventory
        from gardenctl.runtime.ray import connect

        declared = _file(inventory_path) if inventory_path else _declared(garden, garden_path)
        return cluster_inventory(connect(spec.address), declared)
    if inventory_path:
        return _file(inventory_path)
    declared = _declared(garden, garden_path)
    if declared is not None:
        return declared
    from gardenctl.inventory.nvml import discover_local_gpus

    return discover_local_gpus(nvml)


def _declared(garden, garden_path: str) -> Inventory | None:
    if garden is None or garden.inventory is None:
        return None
    from gardenctl.inventory.declared import inventory_from_spec

    return inventory_from_spec(garden.inventory, source=f"declared in {garden_path}")


def _file(inventory_path: str) -> Inventory:
    from gardenctl.inventory.declared import load_inventory_file

    return load_inventory_file(inventory_path)
