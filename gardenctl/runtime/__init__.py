"""Runtimes run workers: `local` (process groups on this machine), `ray` (supervisor actors on
the nodes of a Ray cluster), `fake` (in memory, tests)."""

from __future__ import annotations

import os
from collections.abc import Container, Iterator
from contextlib import ExitStack, contextmanager

from gardenctl.errors import GardenError
from gardenctl.inventory.model import Inventory
from gardenctl.runtime.base import GpuProbe, Runtime
from gardenctl.spec.models import Garden, RuntimeSpec
from gardenctl.state import StateDir

RUNTIME_ENV = "GARDENCTL_RUNTIME"  # set by `--runtime`: overrides the garden's runtime.kind
KINDS = ("local", "ray")


def runtime_spec(garden: Garden | None) -> RuntimeSpec:
    """The runtime a garden runs on: its `runtime:` section, with the kind that `--runtime`
    (GARDENCTL_RUNTIME) names instead, when given."""
    spec = garden.runtime if garden is not None else RuntimeSpec()
    override = os.environ.get(RUNTIME_ENV)
    if override:
        if override not in KINDS:
            raise GardenError(f"{RUNTIME_ENV}={override!r} is not a runtime kind (valid: "
                              f"{', '.join(KINDS)})")
        spec = spec.model_copy(update={"kind": override})
    return spec


def open_runtime(garden: Garden | None, inventory: Inventory | None, state: StateDir, *,
                 writable: bool = True, gardens: Container[str] | None = None) -> Runtime:
    """The runtime a garden asks for (a Ray cluster needs no ``inventory``: it is the cluster's
    own; the local runtime runs on the one node of ``inventory``). ``writable``: the caller
    holds the lock of ``gardens`` (None: every garden's), whose records alone it updates
    (read-only commands pass False and change no record)."""
    spec = runtime_spec(garden)
    if spec.kind == "ray":
        from gardenctl.runtime.ray import connect
        from gardenctl.runtime.ray.runtime import RayRuntime

        return RayRuntime(connect(spec.address), writable=writable, gardens=gardens)
    from gardenctl.runtime.local import LocalRuntime

    if inventory is None:
        raise GardenError("the local runtime needs the inventory of the machine it runs on")
    if len(inventory.nodes) != 1:
        names = ", ".join(n.name for n in inventory.nodes)
        raise GardenError(
            f"the local runtime runs workers on this machine only, but the inventory "
            f"({inventory.source}) has {len(inventory.nodes)} nodes ({names}); declare this "
            "machine alone, run the garden on a Ray cluster (`runtime: {kind: ray}`), or plan "
            "the fleet without applying it here"
        )
    return LocalRuntime(state, node=inventory.nodes[0].name, writable=writable, gardens=gardens)


@contextmanager
def garden_lock(garden: Garden | None, name: str, state: StateDir,
                command: str) -> Iterator[None]:
    """The lock that keeps two writers (apply, down, watch) of one garden apart: the state
    directory's file lock, and on a Ray cluster the cluster's own lock as well (it holds
    across every machine that reaches the cluster)."""
    with ExitStack() as stack:
        stack.enter_context(state.lock(name, command))
        spec = runtime_spec(garden)
        if spec.kind == "ray":
            from gardenctl.runtime.ray import connect

            stack.enter_context(connect(spec.address).garden_lock(name, command))
        yield


def open_probe(inventory: Inventory, garden: Garden | None = None) -> GpuProbe | None:
    """Live GPU memory through NVML when the inventory came from this machine's NVML; None
    for declared (simulated) GPUs, whose memory nobody can measure, and on a Ray cluster
    (whose GPUs are on other machines)."""
    if not inventory.used_includes_ours or runtime_spec(garden).kind == "ray":
        return None
    from gardenctl.inventory.nvml import NvmlProbe

    return NvmlProbe(node=inventory.nodes[0].name)


__all__ = ["KINDS", "RUNTIME_ENV", "garden_lock", "open_probe", "open_runtime", "runtime_spec"]
