"""Hardware: discovered through NVML, declared in the garden, or read from a file."""

from __future__ import annotations

from gardenctl.inventory.model import Gpu, GpuProcess, Inventory, Node

__all__ = ["Gpu", "GpuProcess", "Inventory", "Node", "resolve_inventory"]


def resolve_inventory(garden, garden_path: str, inventory_path: str | None, nvml=None) -> Inventory:
    """The inventory a command plans against: --inventory FILE, else the garden's declared
    inventory, else this machine's GPUs through NVML."""
    if inventory_path:
        from gardenctl.inventory.declared import load_inventory_file

        return load_inventory_file(inventory_path)
    if garden is not None and garden.inventory is not None:
        from gardenctl.inventory.declared import inventory_from_spec

        return inventory_from_spec(garden.inventory, source=f"declared in {garden_path}")
    from gardenctl.inventory.nvml import discover_local_gpus

    return discover_local_gpus(nvml)
