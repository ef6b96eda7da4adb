"""Runtimes run workers: `local` (process groups on this machine), `fake` (in memory, tests)."""

from __future__ import annotations

from collections.abc import Container

from gardenctl.errors import GardenError
from gardenctl.inventory.model import Inventory
from gardenctl.runtime.base import GpuProbe, Runtime
from gardenctl.spec.models import Garden
from gardenctl.state import StateDir


def open_runtime(garden: Garden | None, inventory: Inventory, state: StateDir, *,
                 writable: bool = True, gardens: Container[str] | None = None) -> Runtime:
    """The runtime a garden asks for, bound to the node it runs on. ``writable``: the caller
    holds the lock of ``gardens`` (None: every garden's), whose records alone it updates
    (read-only commands pass False and change no record)."""
    kind = garden.runtime.kind if garden is not None else "local"
    if kind == "ray":
        raise GardenError(
            "runtime kind `ray` is not available in this version of gardenctl; use "
            "`runtime: {kind: local}` on each machine for now"
        )
    from gardenctl.runtime.local import LocalRuntime

    if len(inventory.nodes) != 1:
        names = ", ".join(n.name for n in inventory.nodes)
        raise GardenError(
            f"the local runtime runs workers on this machine only, but the inventory "
            f"({inventory.source}) has {len(inventory.nodes)} nodes ({names}); declare this "
            "machine alone, or plan the fleet without applying it here"
        )
    return LocalRuntime(state, node=inventory.nodes[0].name, writable=writable, gardens=gardens)


def open_probe(inventory: Inventory) -> GpuProbe | None:
    """Live GPU memory through NVML when the inventory came from NVML; None for declared
    (simulated) GPUs, whose memory nobody can measure."""
    if not inventory.used_includes_ours:
        return None
    from gardenctl.inventory.nvml import NvmlProbe

    return NvmlProbe(node=inventory.nodes[0].name)
