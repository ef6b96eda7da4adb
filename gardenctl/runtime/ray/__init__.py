"""The Ray runtime (`runtime: {kind: ray}`): workers as supervisor actors on a Ray cluster's
nodes. Ray is an optional extra (``pip install 'gardenctl[ray]'``), imported only here, and
only when a garden runs on Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gardenctl.errors import GardenError

if TYPE_CHECKING:
    from gardenctl.runtime.ray.cluster import RayCluster

_connected: dict[str, RayCluster] = {}


def connect(address: str | None) -> RayCluster:
    """The cluster at ``address`` (auto, host:port or ray://...; None: RAY_ADDRESS, else
    auto), connected once per process."""
    try:
        from gardenctl.runtime.ray.cluster import RayCluster
    except ImportError as exc:
        raise GardenError(
            f"the garden runs on Ray, but Ray cannot be imported here ({exc}): install it with "
            "`pip install 'gardenctl[ray]'` (the same Ray version as the cluster)") from None
    key = address or ""
    if key not in _connected:
        if _connected:  # ray.init binds a process to one cluster
            raise GardenError("this gardenctl is already connected to another Ray cluster "
                              f"({next(iter(_connected.values())).address})")
        _connected[key] = RayCluster.connect(address)
    return _connected[key]


__all__ = ["connect"]
