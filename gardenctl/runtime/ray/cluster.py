"""Every call gardenctl makes to Ray, in one wrapper (the rest of the Ray runtime is plain code).

Where things live in the cluster (nothing lives outside it):

- workers: one detached, named actor each (`supervisor.WorkerSupervisor`), in the garden's
  namespace ``gardenctl.<garden>``, named by the worker id, pinned to its node by a hard
  node-affinity; it asks Ray for no CPU and no GPU (the GPU leases below account for them) and
  runs with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``, so Ray never sets the GPUs its
  process sees: gardenctl gives `vllm serve` the plan's GPUs in CUDA_VISIBLE_DEVICES;
- records: Ray's key-value store (GCS), namespace ``gardenctl``, key ``record/<worker id>``;
- GPU leases: a detached actor per GPU that any worker uses, holding that whole GPU in Ray's
  accounting (``num_gpus=1``), aligned with the plan's physical GPU (see `lease_gpus`), so that
  other Ray work on the cluster is never given a GPU that gardenctl's workers use; its key
  ``lease/<node>/<gpu>`` names it;
- the writer lock of a garden: a named, non-detached actor ``lock`` in the garden's namespace,
  owned by the gardenctl that holds it, so it disappears with that gardenctl (Ctrl-C, crash,
  lost machine) and no stale lock outlives it; the brief GPU check-then-start mutex: the key
  ``gpus.lock``, naming the garden whose writer takes it (free again when that writer's lock
  is gone, or after an expiry).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gardenctl.errors import GardenError, InventoryError, LockHeldError
from gardenctl.runtime.ray.supervisor import WorkerSupervisor
from gardenctl.state import lock_holder_message

NAMESPACE = "gardenctl"
NODE_LABEL = "gardenctl/node"
NOSET = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
CALL_TIMEOUT = 15.0  # seconds for one call to a worker actor (a stop passes its own)
LEASE_TIMEOUT = 5.0  # seconds Ray may take to grant one GPU before it is taken as held
GPU_MUTEX_TTL = 300.0  # a GPU mutex older than this was left by a gardenctl that died


class ActorGone(GardenError):
    """The actor is dead or unreachable: its process, or its node, is gone."""


@dataclass(frozen=True)
class RayNode:
    node_id: str
    name: str  # the node label gardenctl/node, else the node's hostname
    address: str
    gpus: int  # GPUs in Ray's accounting


def garden_namespace(garden: str) -> str:
    return f"{NAMESPACE}.{garden}"


def _garden_of(worker_id: str) -> str:
    return worker_id.split("/", 1)[0]


class _GpuLeaseBody:
    """Holds GPUs in Ray's accounting; says which ones Ray gave it."""

    def gpu_ids(self) -> list[int]:
        return [int(i) for i in ray.get_gpu_ids()]


class _WriterLockBody:
    def __init__(self, holder: dict[str, Any]) -> None:
        self.holder = holder

    def who(self) -> dict[str, Any]:
        return self.holder


_Supervisor: Any = ray.remote(WorkerSupervisor)
_GpuLease: Any = ray.remote(num_cpus=0)(_GpuLeaseBody)
_WriterLock: Any = ray.remote(num_cpus=0)(_WriterLockBody)


@ray.remote(num_cpus=0)
def _probe_gpus(node_name: str) -> dict[str, Any]:
    """On one node: its GPUs through NVML, or why they cannot be read."""
    from gardenctl.errors import InventoryError
    from gardenctl.inventory.nvml import discover_local_gpus

    try:
        found = discover_local_gpus(node_name=node_name)
    except InventoryError as exc:
        return {"error": str(exc)}
    return {"gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes,
                      "used_bytes": g.used_bytes, "uuid": g.uuid,
                      "processes": [[p.pid, p.used_bytes, p.name] for p in g.processes]}
                     for g in found.gpus]}


class RayCluster:
    """A connection to one Ray cluster (``ray.init`` once per process)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._lease_lock = threading.Lock()

    @classmethod
    def connect(cls, address: str | None) -> RayCluster:
        address = address or os.environ.get("RAY_ADDRESS") or "auto"
        if not ray.is_initialized():
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level=logging.ERROR, configure_logging=False)
            except (ConnectionError, RayError, RuntimeError, ValueError) as exc:
                raise GardenError(
                    f"cannot reach the Ray cluster at {address!r}: {exc}. Start one (`ray start "
                    "--head`), or set runtime.address (or RAY_ADDRESS) to its address") from None
        return cls(address)

    # -- nodes -----------------------------------------------------------------------------

    def nodes(self) -> dict[str, RayNode]:
        """The cluster's alive nodes by name (label gardenctl/node, else hostname), now."""
        found: dict[str, RayNode] = {}
        for entry in ray.nodes():
            if not entry.get("Alive"):
                continue
            labels = entry.get("Labels") or {}
            name = labels.get(NODE_LABEL) or entry.get("NodeManagerHostname") or ""
            node = RayNode(node_id=entry["NodeID"], name=name,
                           address=entry.get("NodeManagerAddress", ""),
                           gpus=int(entry.get("Resources", {}).get("GPU", 0)))
            if name in found:
                raise InventoryError(
                    f"two nodes of the Ray cluster are both called {name!r} ({found[name].address}"
                    f" and {node.address}); give each a unique name with `ray start --labels "
                    f"{NODE_LABEL}=<name>`")
            found[name] = node
        return dict(sorted(found.items()))

    def probe_all_gpus(self, nodes: list[RayNode],
                       timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Each node's GPUs read through NVML on the node itself ({"gpus": [...]}), or why
        they cannot be ({"error": ...}), by node name; all nodes at once."""
        refs = {node.name: _probe_gpus.options(scheduling_strategy=_pinned(node))
                .remote(node.name) for node in nodes}
        found: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        for name, ref in refs.items():
            try:
                found[name] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except (GetTimeoutError, RayError) as exc:
                found[name] = {"error": f"the GPU probe failed ({type(exc).__name__})"}
        return found

    # -- key-value store -------------------------------------------------------------------

    def kv_get(self, key: str) -> bytes | None:
        value = internal_kv._internal_kv_get(key.encode(), namespace=NAMESPACE)
        return bytes(value) if value is not None else None

    def kv_put(self, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        """Store ``value``; False when ``overwrite`` is off and the key already existed."""
        existed = internal_kv._internal_kv_put(key.encode(), value, overwrite=overwrite,
                                               namespace=NAMESPACE)
        return overwrite or not existed

    def kv_delete(self, key: str) -> None:
        internal_kv._internal_kv_del(key.encode(), namespace=NAMESPACE)

    def kv_keys(self, prefix: str) -> list[str]:
        keys = internal_kv._internal_kv_list(prefix.encode(), namespace=NAMESPACE)
        return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in keys)

    # -- worker actors ---------------------------------------------------------------------

    def worker(self, worker_id: str) -> Any | None:
        """The handle of the worker's actor, or None when there is none (or it died)."""
        try:
            return ray.get_actor(worker_id, namespace=garden_namespace(_garden_of(worker_id)))
        except ValueError:
            return None

    def worker_names(self) -> list[str]:
        """Every worker actor of every garden in the cluster (by worker id)."""
        return sorted(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                      if entry["namespace"].startswith(NAMESPACE + ".")
                      and entry["name"].count("/") == 2)

    def start_worker_actor(self, worker_id: str, spec_hash: str, node: RayNode) -> Any:
        """A new supervisor actor for the worker on ``node`` (any earlier one is killed
        first: its process has ended, or the caller stopped it)."""
        old = self.worker(worker_id)
        if old is not None:
            self.kill(old)
        try:
            return _Supervisor.options(
                name=worker_id, namespace=garden_namespace(_garden_of(worker_id)),
                lifetime="detached", num_cpus=0, num_gpus=0, max_restarts=0,
                max_concurrency=8, scheduling_strategy=_pinned(node),
                runtime_env={"env_vars": dict(NOSET)},
            ).remote(worker_id, spec_hash, node.name)
        except ValueError as exc:  # the name is taken: another gardenctl raced us
            raise GardenError(f"{worker_id}: its actor could not be created ({exc})") from None

    def call(self, actor: Any, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """Call one method of an actor and wait for its answer; ActorGone when it is dead or
        does not answer in ``timeout`` seconds."""
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=timeout)
        except RayActorError as exc:
            raise ActorGone(f"its actor is gone ({type(exc).__name__})") from None
        except GetTimeoutError:
            raise ActorGone(f"its actor did not answer in {timeout:g} s") from None

    def kill(self, actor: Any) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except (RayError, ValueError):
            pass

    # -- locks -----------------------------------------------------------------------------

    @contextmanager
    def garden_lock(self, garden: str, command: str) -> Iterator[None]:
        """The garden's writer lock, across every machine that reaches the cluster."""
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                  "since": time.time()}
        try:
            lock = _WriterLock.options(name="lock", namespace=garden_namespace(garden),
                                       lifetime=None).remote(holder)
            ray.get(lock.who.remote(), timeout=60)
        except ValueError:
            raise LockHeldError(self._holder_message(garden)) from None
        try:
            yield
        finally:
            self.kill(lock)

    def _holder_message(self, garden: str) -> str:
        try:
            info = ray.get(ray.get_actor("lock", namespace=garden_namespace(garden))
                           .who.remote(), timeout=10)
        except (ValueError, RayError):
            info = {}
        return lock_holder_message(garden, f"the Ray cluster at {self.address}", info)

    @contextmanager
    def gpu_mutex(self, holder: str | None = None) -> Iterator[None]:
        """The brief cluster-wide lock around "no worker loads on these GPUs, then start".
        ``holder``: the garden whose writer lock the caller holds; the mutex is free again
        as soon as that lock is gone (its gardenctl died), else after GPU_MUTEX_TTL."""
        token = uuid.uuid4().hex
        while True:
            stamp = json.dumps({"token": token, "at": time.time(), "holder": holder}).encode()
            if self.kv_put("gpus.lock", stamp, overwrite=False):
                break
            if self._stale(self.kv_get("gpus.lock")):
                self.kv_delete("gpus.lock")
                continue
            time.sleep(0.02)
        try:
            yield
        finally:
            held = self.kv_get("gpus.lock")
            if held and token.encode() in held:
                self.kv_delete("gpus.lock")

    def _stale(self, held: bytes | None) -> bool:
        try:
            info = json.loads(held or b"{}")
            at, holder = float(info.get("at", 0)), info.get("holder")
        except (ValueError, AttributeError, TypeError):
            return True
        if time.time() - at > GPU_MUTEX_TTL:
            return True
        if holder and time.time() - at > 1.0:  # its holder's writer lock died with it
            try:
                ray.get_actor("lock", namespace=garden_namespace(holder))
            except ValueError:
                return True
        return False

    # -- GPU leases ------------------------------------------------------------------------

    def leased(self, node: str) -> dict[int, Any]:
        """The live leases of ``node``'s GPUs, by GPU index (stale keys are removed)."""
        found: dict[int, Any] = {}
        for key in self.kv_keys(f"lease/{node}/"):
            index = int(key.rsplit("/", 1)[1])
            name = (self.kv_get(key) or b"").decode()
            try:
                found[index] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                self.kv_delete(key)
        return found

    def lease_gpus(self, node: RayNode, gpus: Iterable[int]) -> None:
        """Hold GPUs ``gpus`` of ``node`` in Ray's accounting, each by a lease whose Ray GPU id
        is that very GPU. Ray cannot be asked for one GPU id, so leases are taken one GPU at a
        time (Ray gives the lowest free id first) until every wanted id is held, and the extra
        ones are given back. GardenError when Ray has given a wanted GPU to other work."""
        wanted = set(gpus)
        with self._lease_lock:
            missing = wanted - set(self.leased(node.name))
            spare: list[Any] = []
            try:
                while missing:
                    if len(spare) >= node.gpus:
                        break
                    name = f"gpu/{node.name}/{uuid.uuid4().hex[:12]}"
                    lease = _GpuLease.options(
                        name=name, namespace=NAMESPACE, lifetime="detached", num_gpus=1,
                        scheduling_strategy=_pinned(node), runtime_env={"env_vars": dict(NOSET)},
                    ).remote()
                    try:
                        (gpu,) = ray.get(lease.gpu_ids.remote(), timeout=LEASE_TIMEOUT)
                    except (GetTimeoutError, RayError, ValueError):
                        self.kill(lease)  # no GPU of the node is free in Ray's accounting
                        break
                    if gpu in missing:
                        self.kv_put(f"lease/{node.name}/{gpu}", name.encode())
                        missing.discard(gpu)
                    else:
                        spare.append(lease)
            finally:
                for lease in spare:
                    self.kill(lease)
        if missing:
            shown = ",".join(str(g) for g in sorted(missing))
            raise GardenError(
                f"Ray does not give GPU {shown} of node {node.name} to gardenctl: other Ray "
                f"work holds it (the node has {node.gpus} GPU(s) in Ray's accounting). Stop that "
                "work, or keep this garden's models off that GPU")

    def release_gpus(self, node: str, keep: Iterable[int]) -> None:
        """Give back the leases of ``node``'s GPUs that no worker uses any more."""
        keep = set(keep)
        with self._lease_lock:
            for index, lease in self.leased(node).items():
                if index not in keep:
                    self.kill(lease)
                    self.kv_delete(f"lease/{node}/{index}")


def _pinned(node: RayNode) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)


__all__ = ["NAMESPACE", "NODE_LABEL", "ActorGone", "RayCluster", "RayNode", "garden_namespace"]
