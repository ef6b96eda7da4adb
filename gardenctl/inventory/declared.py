"""Inventories written down: in the garden file (`inventory:`) or in a file (`--inventory`)."""

from __future__ import annotations

from pathlib import Path

from gardenctl.inventory.model import Gpu, Inventory, Node
from gardenctl.spec.models import InventorySpec


def inventory_from_spec(spec: InventorySpec, source: str) -> Inventory:
    """Expand `count` GPUs of each group into indexed GPUs, in the order they are written."""
    nodes = []
    for node in spec.nodes:
        gpus: list[Gpu] = []
        for group in node.gpus:
            for _ in range(group.count):
                gpus.append(
                    Gpu(
                        node=node.name,
                        index=len(gpus),
                        name=group.name,
                        total_bytes=group.memory,
                        used_bytes=group.used,
                    )
                )
        nodes.append(Node(name=node.name, gpus=tuple(gpus), host_memory_bytes=node.host_memory))
    return Inventory(nodes=tuple(nodes), source=source)


def load_inventory_file(path: str | Path) -> Inventory:
    """Read an inventory file: the garden's `inventory:` section as a YAML or JSON document.

    The document is either `{nodes: [...]}` or `{inventory: {nodes: [...]}}`.
    """
    from gardenctl.errors import SpecError
    from gardenctl.spec.loader import read_file, read_mapping, validate_document

    name = str(path)
    raw = read_file(path, missing_hint="check the path given to --inventory")
    try:
        data, source = read_mapping(raw, name, what="inventory file",
                                    hint="write `nodes:` with each node's `name:` and `gpus:`")
        if set(data) == {"inventory"} and isinstance(data["inventory"], dict):
            data = data["inventory"]
            source.values = {k[1:]: v for k, v in source.values.items() if k[:1] == ("inventory",)}
            source.keys = {k[1:]: v for k, v in source.keys.items() if k[:1] == ("inventory",)}
        spec = validate_document(data, source, InventorySpec)
    except SpecError as exc:
        raise SpecError(exc.issues, what="inventory file") from None
    return inventory_from_spec(spec, source=f"file {name}")

