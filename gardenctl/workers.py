"""Desired workers: each model replica with its place, port, `vllm serve` argv and environment.

A worker's identity is `garden/model/replica`. Two hashes describe it:
- the *sizing hash* covers what decides its memory (model, lengths, dtypes, parallelism, the
  placement policy's knobs, extra args). While it is unchanged, a running worker keeps its GPUs
  and its --gpu-memory-utilization, so a cosmetic edit or a new neighbour never moves it;
- the *spec hash* covers exactly what forces a restart: argv, environment (secret references,
  never their values) and GPUs. Equal spec hash -> keep; different -> replace.
Priority, replica count, start timeout and pinning (while still satisfied) are in neither.

vLLM facts checked against vLLM 0.32 (docs/vllm.md): workers get CUDA_VISIBLE_DEVICES in NVML
order with CUDA_DEVICE_ORDER=PCI_BUS_ID, VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS set explicitly
(so the CUDA-graph pool is inside the --gpu-memory-utilization budget), never VLLM_PORT, and
secrets only through the environment (argv is readable by every local user).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from gardenctl.estimate.types import MemoryEstimate
from gardenctl.placement.model import Placement, WorkerRequest
from gardenctl.spec.models import Garden, ModelSpec, PlacementPolicy, env_reference

WORKER_ID_ENV = "GARDENCTL_WORKER_ID"
SPEC_HASH_ENV = "GARDENCTL_SPEC_HASH"
STATE_ENV = "GARDENCTL_STATE"  # the state directory that owns the worker
MARKER_ENVS = (WORKER_ID_ENV, SPEC_HASH_ENV, STATE_ENV)

# `memory_cap: true` (docs/memory-cap.md): the hook directory goes first on the worker's
# PYTHONPATH and its sitecustomize caps PyTorch's allocator at MEMORY_CAP_ENV bytes per GPU in
# every Python process of the worker. The directory is found by path, not imported: the planning
# core does not import the runtime package, and the hook itself imports nothing from gardenctl.
MEMORY_CAP_ENV = "GARDENCTL_MEMORY_CAP_BYTES"
MEMORY_CAP_PATH_ENV = "GARDENCTL_MEMORY_CAP_PYTHONPATH"  # the garden's own ${NAME} PYTHONPATH
MEMORY_CAP_HOOK_DIR = str(Path(__file__).resolve().parent / "runtime" / "memcap")

# Fields that decide a worker's memory footprint (and so its place and F).
SIZING_FIELDS = (
    "model", "revision", "max_model_len", "min_concurrency", "tensor_parallel_size", "dtype",
    "quantization", "kv_cache_dtype", "gpu_memory_utilization", "max_num_seqs",
    "max_num_batched_tokens", "enforce_eager", "args", "standby",
)
# A standby worker's vLLM needs sleep mode, and its /sleep and /wake_up routes exist only in
# vLLM's development mode (docs/vllm.md section 11).
SLEEP_MODE_FLAG = "--enable-sleep-mode"
SLEEP_ROUTES_ENV = "VLLM_SERVER_DEV_MODE"
SLEEP_LEVEL_ENV = "GARDENCTL_SLEEP_LEVEL"


def make_worker_id(garden: str, model: str, replica: int) -> str:
    return f"{garden}/{model}/{replica}"


@dataclass(frozen=True)
class Liveness:
    """How a ready worker is probed (`/health`) and when it counts as dead (kubelet-style)."""

    period: float = 5.0  # seconds between probes under `watch`
    failure_threshold: int = 3  # failed probes in a row before it is restarted
    timeout: float = 2.0  # seconds one probe may take

    @classmethod
    def of(cls, model: ModelSpec) -> Liveness:
        probe = model.liveness
        return cls(probe.period, probe.failure_threshold, probe.timeout)


@dataclass(frozen=True)
class Standby:
    """How a standby worker sleeps (see gardenctl.placement.standby): the gateway wakes it for
    a request and puts it to sleep when idle or when another needs its GPU memory."""

    level: int  # vLLM's sleep level: 1 (weights to host RAM) or 2 (weights dropped)
    asleep_bytes: int  # per GPU, what stays on the GPU while it sleeps (planned; 0: stop)
    mode: str = "sleep"  # "sleep" | "stop" (stopped while idle, started on demand)

    @property
    def sleeps(self) -> bool:
        """It uses vLLM's sleep mode (a stop-mode worker is stopped instead)."""
        return self.mode == "sleep"

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "asleep_bytes": self.asleep_bytes, "mode": self.mode}


@dataclass(frozen=True)
class DesiredWorker:
    worker_id: str
    garden: str
    model: str  # the model's name in the garden
    model_ref: str  # Hugging Face id or path given to vLLM
    replica: int
    node: str
    gpus: tuple[int, ...]
    host: str
    port: int
    served_model_name: str
    utilization: float
    claim_bytes: int  # per GPU
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # values are literals or ${NAME} references, never secrets
    sizing_hash: str
    spec_hash: str
    start_timeout: float
    shutdown_timeout: float
    liveness: Liveness = field(default_factory=Liveness)
    standby: Standby | None = None  # None: always awake

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = list(self.gpus)
        data["argv"] = list(self.argv)
        data["env"] = dict(self.env)
        if self.standby is None:
            del data["standby"]  # records and plans of always-awake workers stay as they were
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DesiredWorker:
        """The one way back from JSON (records, saved plans); KeyError/TypeError/ValueError
        when ``data`` is not a worker."""
        values = {key: data[key] for key in _FIELDS if key in data}
        values["gpus"] = tuple(int(g) for g in values["gpus"])
        values["argv"] = tuple(str(a) for a in values["argv"])
        values["env"] = tuple(sorted((str(k), str(v)) for k, v in dict(values["env"]).items()))
        values["liveness"] = Liveness(**data["liveness"]) if data.get("liveness") else Liveness()
        standby = data.get("standby")
        values["standby"] = (Standby(int(standby["level"]), int(standby["asleep_bytes"]),
                                     str(standby.get("mode", "sleep")))
                             if standby else None)
        return cls(**values)


_FIELDS = tuple(name for name in DesiredWorker.__dataclass_fields__
                if name not in ("liveness", "standby"))


def _digest(document: object) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sizing_hash(model: ModelSpec, policy: PlacementPolicy) -> str:
    policy_knobs = ((policy.utilization_policy, policy.safety_margin, policy.estimator)
                    if model.gpu_memory_utilization == "auto" else None)
    values = tuple(tuple(v) if isinstance(v, list) else v
                   for v in (getattr(model, name) for name in SIZING_FIELDS))
    # standby changes what the worker books (asleep + wake slot); its level and idle timeout
    # do not move it
    values = tuple(model.standby.mode if name == "standby" and model.standby else v
                   for name, v in zip(SIZING_FIELDS, values, strict=True))
    return _sizing_digest(values, policy_knobs)


@lru_cache(maxsize=4096)  # a garden of many alike models hashes each kind once
def _sizing_digest(values: tuple[object, ...], policy: tuple[object, ...] | None) -> str:
    document: dict[str, object] = {name: list(v) if isinstance(v, tuple) else v
                                   for name, v in zip(SIZING_FIELDS, values, strict=True)}
    if policy is not None:
        document["policy"] = list(policy)
    return _digest(document)


def spec_hash(argv: Sequence[str], env: Sequence[tuple[str, str]], node: str,
              gpus: Sequence[int]) -> str:
    return _digest({"argv": list(argv), "env": sorted(env), "node": node, "gpus": list(gpus)})


def build_requests(garden: Garden, models: Sequence[ModelSpec],
                   estimates: Mapping[str, MemoryEstimate],
                   declared_sizing: Mapping[str, str] | None = None) -> list[WorkerRequest]:
    """One placement request per replica of every model."""
    requests = []
    for model in models:
        estimate = estimates[model.name]
        fixed = None if model.gpu_memory_utilization == "auto" else model.gpu_memory_utilization
        pin = model.placement
        model_sizing = ((declared_sizing or {}).get(model.name)
                        or sizing_hash(model, garden.placement))
        for replica in range(model.replicas):
            requests.append(WorkerRequest(
                worker_id=make_worker_id(garden.name, model.name, replica),
                model=model.name,
                replica=replica,
                tensor_parallel_size=model.tensor_parallel_size,
                priority=model.priority,
                estimate=estimate,
                utilization=fixed,
                pin_node=pin.node if pin else None,
                pin_gpus=tuple(pin.gpus) if pin and pin.gpus is not None else None,
                sizing_hash=model_sizing,
                spread=model.spread_replicas,
                standby_level=(model.standby.level if model.standby is not None
                               and model.standby.mode == "sleep" else 0),
                standby_stop=model.standby is not None and model.standby.mode == "stop",
            ))
    return requests


def assign_ports(garden: Garden, models: Sequence[ModelSpec], placed_ids: set[str],
                 current_ports: Mapping[str, int],
                 busy_ports: Collection[int] = ()) -> dict[str, int]:
    """Ports for placed workers: explicit ones (port + replica), else the port the worker
    already has (unless another program took it while the worker was down), else the lowest
    port from placement.base_port up that no other worker and no other program
    (``busy_ports``: never the garden's own running workers) uses."""
    ports: dict[str, int] = {}
    auto: list[str] = []
    for model in models:
        for replica in range(model.replicas):
            worker_id = make_worker_id(garden.name, model.name, replica)
            if worker_id not in placed_ids:
                continue
            if model.port is not None:
                ports[worker_id] = model.port + replica
            else:
                auto.append(worker_id)
    taken = set(ports.values()) | set(busy_ports)
    for worker_id in sorted(auto):
        port = current_ports.get(worker_id)
        if port is not None and port not in taken:  # a worker keeps its port while it can
            ports[worker_id] = port
            taken.add(port)
    candidate = garden.placement.base_port
    for worker_id in sorted(auto):
        if worker_id in ports:
            continue
        while candidate in taken:
            candidate += 1
        ports[worker_id] = candidate
        taken.add(candidate)
    return ports


def vllm_argv(model: ModelSpec, *, port: int, utilization: float, max_model_len: int) -> list[str]:
    """`vllm serve` command line for one worker (vLLM 0.32 flags; never a secret)."""
    argv = [*model.vllm_command, "serve", model.model,
            "--host", model.host,
            "--port", str(port),
            "--served-model-name", model.served_model_name or model.name,
            "--max-model-len", str(max_model_len),
            "--tensor-parallel-size", str(model.tensor_parallel_size),
            "--gpu-memory-utilization", f"{utilization:.3f}",
            "--shutdown-timeout", str(int(model.shutdown_timeout))]
    if model.tensor_parallel_size > 1:  # never vLLM's Ray executor (docs/vllm.md section 15)
        argv += ["--distributed-executor-backend", "mp"]
    if model.revision:
        argv += ["--revision", model.revision]
    if model.dtype != "auto":
        argv += ["--dtype", model.dtype]
    if model.quantization:
        argv += ["--quantization", model.quantization]
    if model.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", model.kv_cache_dtype]
    if model.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(model.max_num_seqs)]
    if model.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(model.max_num_batched_tokens)]
    if model.enforce_eager:
        argv.append("--enforce-eager")
    if model.trust_remote_code:
        argv.append("--trust-remote-code")
    if model.standby is not None and model.standby.mode == "sleep":
        argv.append(SLEEP_MODE_FLAG)
    return argv + list(model.args)


def memory_cap_bytes(claim_bytes: int, estimate: MemoryEstimate) -> int:
    """The hard limit of a capped worker's PyTorch allocator on each GPU: its claim less the
    CUDA context (driver memory, never PyTorch's).

    The claim is ceil(total x F) + what the estimate puts outside F (the CUDA context; the
    graph pool too for releases that allocate it after the KV cache, and that pool *is* PyTorch
    memory). Inside ceil(total x F), vLLM sizes the KV cache from the memory it *measured*
    (weights, activation peak, graph pool, non-torch), so PyTorch can hold up to the whole budget
    less the non-torch memory actually used. The estimate's non_torch is not subtracted: when
    the real non-torch memory is smaller than estimated, vLLM gives the difference to the KV
    cache, and a cap below the budget would fail a healthy worker. So a healthy vLLM stays under
    this cap by its own construction, and one that grows past its claim through PyTorch fails.
    What it cannot stop: non-torch memory past the estimate (docs/memory-cap.md).
    """
    return max(1, claim_bytes - estimate.cuda_context.bytes)


def memory_cap_of(worker: DesiredWorker | None) -> int | None:
    """The hard limit a planned worker runs under (bytes per GPU), None when it has none."""
    value = dict(worker.env).get(MEMORY_CAP_ENV) if worker is not None else None
    return int(value) if value is not None and value.isdigit() else None


def worker_env(model: ModelSpec, gpus: Sequence[int],
               cap_bytes: int | None = None) -> list[tuple[str, str]]:
    """The worker's own variables: gardenctl's GPU settings, the model's `env`, and with
    ``cap_bytes`` (memory_cap: true) the cap hook's PYTHONPATH and limit."""
    env = {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS": "1",
    }
    env.update(model.env)
    if model.standby is not None and model.standby.mode == "sleep":
        env[SLEEP_ROUTES_ENV] = "1"
        # not read by vLLM: the level is how the gateway puts it to sleep, and what host RAM
        # the plan books; in the environment, a new level replaces the worker (spec hash)
        env[SLEEP_LEVEL_ENV] = str(model.standby.level)
    if cap_bytes is not None:
        env[MEMORY_CAP_ENV] = str(cap_bytes)
        theirs = model.env.get("PYTHONPATH", "")
        if theirs and env_reference(theirs) is not None:
            # resolved only when the worker starts: the hook appends it to sys.path after itself
            env[MEMORY_CAP_PATH_ENV] = theirs
            env["PYTHONPATH"] = MEMORY_CAP_HOOK_DIR
        else:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (MEMORY_CAP_HOOK_DIR, theirs) if p)
    return sorted(env.items())


def desired_workers(garden: Garden, models: Sequence[ModelSpec], placement: Placement,
                    estimates: Mapping[str, MemoryEstimate], current_ports: Mapping[str, int],
                    busy_ports: Collection[int] = (),
                    declared_sizing: Mapping[str, str] | None = None) -> list[DesiredWorker]:
    """Every placed worker, fully specified: what `apply` will run. ``declared_sizing``: the
    sizing hash of each model as the file declares it, where a lesson resized it (its running
    workers keep their place and claim: gardenctl.lessons)."""
    by_name = {m.name: m for m in models}
    sizing = {m.name: (declared_sizing or {}).get(m.name) or sizing_hash(m, garden.placement)
              for m in models}
    placed = {a.worker_id: a for a in placement.assignments}
    ports = assign_ports(garden, models, set(placed), current_ports, busy_ports)
    workers = []
    for worker_id in sorted(placed):
        assignment = placed[worker_id]
        model = by_name[assignment.model]
        estimate = estimates[model.name]
        replica = int(worker_id.rsplit("/", 1)[1])
        argv = vllm_argv(model, port=ports[worker_id], utilization=assignment.utilization,
                         max_model_len=estimate.max_model_len)
        cap = (memory_cap_bytes(assignment.claim_bytes, estimate) if model.memory_cap
               else None)
        env = worker_env(model, assignment.gpus, cap)
        workers.append(DesiredWorker(
            worker_id=worker_id,
            garden=garden.name,
            model=model.name,
            model_ref=model.model,
            replica=replica,
            node=assignment.node,
            gpus=assignment.gpus,
            host=model.host,
            port=ports[worker_id],
            served_model_name=model.served_model_name or model.name,
            utilization=assignment.utilization,
            claim_bytes=assignment.claim_bytes,
            argv=tuple(argv),
            env=tuple(env),
            sizing_hash=sizing[model.name],
            spec_hash=spec_hash(argv, env, assignment.node, assignment.gpus),
            start_timeout=model.start_timeout,
            shutdown_timeout=model.shutdown_timeout,
            liveness=Liveness.of(model),
            standby=(Standby(model.standby.level, assignment.asleep_bytes, model.standby.mode)
                     if model.standby is not None and assignment.asleep_bytes is not None
                     else None),
        ))
    return workers
