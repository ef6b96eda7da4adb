"""The garden file's data model (format v1): what a team declares it wants served.

These pydantic models are the single source of the file's rules: the loader validates with them,
`schemas/garden.schema.json` is generated from them, and the docs quote their descriptions.
All models are strict (YAML's `no` is not a boolean here, `"8"` is not an integer), frozen, and
refuse unknown keys.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue

from gardenctl.units import VALID_SIZE_HINT, parse_size

FORMAT_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
SECRET_KEY_HINTS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
DEFAULT_VLLM_COMMAND = ("vllm",)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _to_bytes(value: Any) -> int:
    return parse_size(value)


ByteSize = Annotated[
    int,
    BeforeValidator(_to_bytes),
    PlainSerializer(lambda v: v, return_type=int),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KMGTkmgt][Ii]?[Bb]|[Bb])?\s*$"},
            ],
            "description": VALID_SIZE_HINT,
        }
    ),
]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


MAX_SECONDS = 7 * 24 * 3600  # a week: anything longer is a typo


def _to_seconds(value: Any) -> float:
    seconds = _parse_seconds(value)
    if not 0 <= seconds <= MAX_SECONDS:  # also refuses .nan and .inf
        raise ValueError(f"a duration must be between 0 and {MAX_SECONDS} seconds (a week), "
                         f"got {value!r}")
    return seconds


def _parse_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m or a number of seconds")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            number, unit = match.groups()
            factor = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[unit]
            return float(number) * factor
    raise ValueError(f"expected a duration such as 90s, 15m or a number of seconds, got {value!r}")


Seconds = Annotated[
    float,
    BeforeValidator(_to_seconds),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
            ],
            "description": "a duration such as 90s, 15m, 1h or a number of seconds",
        }
    ),
]


def _check_env_value(value: str) -> str:
    if "${" in value and not ENV_REFERENCE.match(value):
        raise ValueError(  # the value is not repeated: it may be a secret
            "an environment reference must be the whole value, like ${HF_TOKEN}; this value "
            "has ${ in it but is not one reference"
        )
    return value


EnvValue = Annotated[str, AfterValidator(_check_env_value)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
VLLM_VERSION_PATTERN = r"^\d+\.\d+(\.\d+)?([.+-]?[A-Za-z0-9.+-]*)?$"
VllmVersion = Annotated[str, Field(pattern=VLLM_VERSION_PATTERN, max_length=64)]

Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
KvCacheDtype = Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla", "fp8_inc"]
UtilizationPolicy = Literal["fit", "fill", "tiered"]
EstimatorName = Literal["gardenctl", "model-garden", "ndif"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ModelPlacement(_Strict):
    """Pin a model's workers to a node and/or a set of GPUs."""

    node: Name | None = Field(None, description="Only this node may run the model's workers.")
    gpus: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description=(
            "GPU indexes (NVML order) the model's workers may use; each worker takes "
            "tensor_parallel_size of them."
        ),
        min_length=1,
    )


class LivenessProbe(_Strict):
    """How a ready worker is probed, like a kubelet liveness probe: `/health` every `period`;
    `failure_threshold` failures in a row restart it (with the crash-loop backoff)."""

    period: Seconds = Field(5.0, gt=0, description="Seconds between probes (under watch).")
    failure_threshold: int = Field(
        3, ge=1, le=100, description="Failed probes in a row before the worker is restarted."
    )
    timeout: Seconds = Field(2.0, gt=0, description="How long one probe may take.")


class RolloutPolicy(_Strict):
    """How a model's replicas are replaced when its settings change."""

    max_unavailable: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Replicas that may be down at once while being replaced; the next replica is "
            "replaced only when the previous one is ready, and a replacement that does not "
            "become ready is rolled back to the running version."
        ),
    )


def _standby_shorthand(value: Any) -> Any:
    """`standby: sleep` is `standby: {mode: sleep}`."""
    return {"mode": value} if isinstance(value, str) else value


class StandbySpec(_Strict):
    """More models than fit at once: the worker sleeps (vLLM's sleep mode) until a request for
    it reaches the gateway, and sleeps again when idle. While asleep it keeps only what sleep
    mode leaves on the GPU (the CUDA context, non-torch memory, the CUDA-graph pool), so several
    standby models share the memory one of them needs awake."""

    mode: Literal["sleep", "stop"] = Field(
        "sleep",
        description=(
            "sleep: vLLM's sleep mode (--enable-sleep-mode); the worker process stays up and "
            "wakes in seconds. stop: the worker is stopped when idle and started (a cold "
            "start) when a request comes; it holds no GPU memory meanwhile. A stopped worker "
            "is started by `gardenctl watch` (or `watch --gateway`), on the gateway's demand."
        ),
    )
    level: Literal[1, 2] = Field(
        1,
        description=(
            "mode sleep: 1 keeps the weights in host RAM while asleep (the plan checks host "
            "memory), the fastest wake-up; 2 drops them and reloads them from disk on wake-up."
        ),
    )
    idle_timeout: Seconds = Field(
        300.0, gt=0,
        description="A woken worker with no request for this long is put to sleep (or "
        "stopped) again.",
    )


class _ModeShorthand:
    """In the JSON schema, `standby:` is also a bare mode (`standby: sleep`, `standby: stop`)."""

    def __get_pydantic_json_schema__(self, core_schema: Any,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"anyOf": [{"enum": ["sleep", "stop"], "description": "= {mode: sleep|stop}"},
                          handler(core_schema)]}


Standby = Annotated[StandbySpec, BeforeValidator(_standby_shorthand), _ModeShorthand()]


class ModelSettings(_Strict):
    """Every setting of a model that `defaults:` may also give (a model's own value wins)."""

    revision: str | None = Field(
        None, description="Model revision (branch, tag or commit). A commit hash pins it."
    )
    replicas: int = Field(1, ge=0, le=64, description="How many workers serve this model.")
    max_model_len: int | None = Field(
        None,
        ge=16,
        description=(
            "Longest sequence (prompt + output) in tokens. Unset: the model's own limit "
            "from config.json."
        ),
    )
    min_concurrency: int = Field(
        1,
        ge=1,
        description="Sequences of max_model_len tokens that the KV cache must hold at once.",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per worker, on one node.")
    dtype: Dtype = "auto"
    quantization: str | None = Field(
        None, description="vLLM quantization method (awq, gptq, fp8, ...); unset: from the model."
    )
    kv_cache_dtype: KvCacheDtype = "auto"
    gpu_memory_utilization: Literal["auto"] | Annotated[float, Field(gt=0, le=1)] = Field(
        "auto",
        description=(
            "Fraction of each GPU's total memory the worker's vLLM may use; 'auto' computes "
            "it from the memory estimate and the placement policy."
        ),
    )
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (less memory, slower).")
    placement: ModelPlacement | None = None
    priority: int = Field(
        0, description="Higher is placed first when the garden does not fit on its GPUs."
    )
    spread_replicas: bool = Field(
        False,
        description=(
            "true: no two replicas of this model share a GPU (opening another GPU if needed). "
            "false: replicas go to different GPUs among those the garden already uses, and "
            "share one rather than open another."
        ),
    )
    port: int | None = Field(
        None,
        ge=1024,
        le=65535,
        description="HTTP port; replica i listens on port + i. Unset: assigned from 8001 up.",
    )
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Interface to listen on; anything but loopback needs VLLM_API_KEY in env.",
    )
    args: list[str] = Field(
        default_factory=list, description="Extra `vllm serve` flags, passed as they are."
    )
    env: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], EnvValue] = Field(
        default_factory=dict,
        description=(
            "Environment of the worker. Secrets only as ${NAME} references, resolved when the "
            "worker starts; merged with the defaults' env."
        ),
        json_schema_extra={"propertyNames": {"pattern": ENV_NAME_PATTERN}},
    )
    trust_remote_code: bool = Field(False, description="Needs a pinned revision (commit hash).")
    vllm_command: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: list(DEFAULT_VLLM_COMMAND),
        min_length=1,
        description="argv prefix that runs vLLM, e.g. [/opt/vllm/bin/vllm].",
    )
    vllm_version: VllmVersion | None = Field(
        None,
        description=(
            "The vLLM release vllm_command runs, e.g. 0.19.1. Unset: asked of vllm_command "
            "(`--version`, cached by executable path and mtime); the estimate's overheads "
            "depend on it."
        ),
    )
    on_memory_error: Literal["resize", "fail"] = Field(
        "resize",
        description=(
            "When a start fails for memory (KV cache too small, no room for cache blocks, the "
            "start-up free-memory check, out of memory in the sampler warm-up): 'resize' starts "
            "it next with what the log taught (a larger or smaller gpu_memory_utilization, a "
            "smaller max_num_seqs), never below min_concurrency and only where it still fits; "
            "'fail' leaves it as declared."
        ),
    )
    memory_cap: bool = Field(
        False,
        description=(
            "Make the worker's claim a hard limit: PyTorch's per-process memory fraction is set "
            "in every process of the worker that allocates GPU memory, so an overrun fails this "
            "worker alone. Allocations outside PyTorch's allocator are not capped."
        ),
    )
    start_timeout: Seconds = Field(
        900.0, gt=0, description="How long a worker may take to become ready."
    )
    shutdown_timeout: Seconds = Field(
        30.0,
        ge=0,
        description=(
            "How long vLLM drains in-flight requests when stopped (--shutdown-timeout); its "
            "process group is SIGKILLed if it has not exited 10 s after that."
        ),
    )
    liveness: LivenessProbe = Field(
        default=LivenessProbe(),  # one shared value: the models are frozen
        description="How a ready worker is checked, and when it is restarted as unhealthy.",
    )
    rollout: RolloutPolicy = Field(
        default=RolloutPolicy(),
        description="How replicas are replaced when the model's settings change.",
    )
    standby: Standby | None = Field(
        None,
        description=(
            "Sleep until a request comes (`standby: sleep`, `standby: stop`, or {mode, level: "
            "1|2, idle_timeout}): standby models share GPU memory, woken by the gateway one "
            "at a time per GPU (several while they fit). Unset: always awake."
        ),
    )


class ModelSpec(ModelSettings):
    """One model the garden serves."""

    name: Name = Field(description="Unique in the garden; workers are <garden>/<name>/<replica>.")
    model: str = Field(min_length=1, description="Hugging Face id or local path of the model.")
    served_model_name: str | None = Field(
        None, min_length=1, description="Name clients use in requests; defaults to `name`."
    )


class GpuGroupSpec(_Strict):
    """`count` identical GPUs of one node."""

    name: str = Field(min_length=1, description="e.g. NVIDIA A10G")
    memory: ByteSize = Field(gt=0, description="Total memory of one GPU, e.g. 24GiB.")
    count: int = Field(1, ge=1, le=64)
    used: ByteSize = Field(0, description="Memory already used by processes that are not ours.")


class NodeSpec(_Strict):
    name: Name
    gpus: list[GpuGroupSpec] = Field(min_length=1)
    host_memory: ByteSize | None = Field(
        None, gt=0,
        description=(
            "The node's host RAM (e.g. 512GiB): level-1 standby models keep their weights "
            "there while asleep. Unset: not checked for a declared node."
        ),
    )


class InventorySpec(_Strict):
    """Declared hardware: used instead of GPU discovery (CI, planning, simulated GPUs)."""

    nodes: list[NodeSpec] = Field(min_length=1)


class PlacementPolicy(_Strict):
    min_available_gpu_fraction: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="A GPU whose unclaimed share of its memory is below this takes no new worker.",
    )
    reserve: ByteSize = Field(512 * 1024**2, description="Per GPU, never claimed by any worker.")
    utilization_policy: UtilizationPolicy = Field(
        "fit",
        description=(
            "fit: claim the estimate plus safety_margin; fill: share each GPU's spare memory "
            "among its new workers (more KV cache); tiered: model-garden's bands, for a model "
            "alone on its GPU."
        ),
    )
    safety_margin: float = Field(
        0.05, ge=0, le=1, description="Added to the estimate under the fit and fill policies."
    )
    estimator: EstimatorName = Field(
        "gardenctl",
        description="gardenctl (itemised), or a seed project's estimator as a baseline.",
    )
    base_port: int = Field(8001, ge=1024, le=65535, description="First port assigned.")
    standby_host_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "Share of a node's host RAM that the weights of its level-1 sleeping workers may "
            "take (vLLM backs them up in pinned memory, which the OS cannot swap out)."
        ),
    )


class RuntimeSpec(_Strict):
    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray cluster address (kind: ray), e.g. auto.")


def _check_key_reference(value: Any) -> Any:
    if not isinstance(value, str) or ENV_REFERENCE.match(value) is None:
        raise ValueError(  # the value is not repeated: it is a secret
            "the gateway's api_key must be an environment reference like ${GATEWAY_API_KEY}: "
            "a key written in the file is readable by whoever reads the file")
    return value


class GatewaySpec(_Strict):
    """`gardenctl gateway`: one OpenAI-compatible endpoint that routes each request to a ready
    worker of the model it names."""

    host: str = Field("127.0.0.1", min_length=1, description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    api_key: Annotated[str, BeforeValidator(_check_key_reference)] | None = Field(
        None,
        description=(
            "Clients must send `Authorization: Bearer KEY`; only as an environment reference "
            "(${NAME}), resolved when the gateway starts. Workers get their own VLLM_API_KEY."
        ),
    )
    connect_timeout: Seconds = Field(
        5.0, gt=0, description="Seconds to connect to a worker before trying another replica."
    )
    read_timeout: Seconds = Field(
        600.0, gt=0,
        description="Seconds a worker may stay silent (before its answer or between two chunks).",
    )
    wake_timeout: Seconds = Field(
        120.0, gt=0,
        description=(
            "How long a request for a sleeping model may wait while the gateway wakes it (and "
            "first puts idle models to sleep to make room); then 503 with Retry-After. A "
            "`standby: stop` model is started cold (its weights loaded again, a minute or more "
            "for large models): raise it (e.g. 5m) in gardens that have them."
        ),
    )

    @model_validator(mode="after")
    def _key_beyond_loopback(self) -> GatewaySpec:
        if self.host not in LOOPBACK_HOSTS and self.api_key is None:
            raise ValueError(
                f"host {self.host} exposes every model beyond this machine without an API key; "
                "set api_key: \"${GATEWAY_API_KEY}\" or listen on 127.0.0.1")
        return self


class Garden(_Strict):
    """A garden: the models a team wants served, and where they may run."""

    name: Name = Field(description="The garden's name; it prefixes every worker id.")
    defaults: ModelSettings = Field(default_factory=ModelSettings)
    placement: PlacementPolicy = Field(default_factory=PlacementPolicy)
    inventory: InventorySpec | None = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    gateway: GatewaySpec | None = Field(
        None, description="`gardenctl gateway`: one OpenAI endpoint for every model."
    )
    models: list[ModelSpec] = Field(default_factory=list)

    def resolved_models(self) -> list[ModelSpec]:
        """Models with `defaults:` applied: a model's own value wins; `env` is merged."""
        return [resolve_model(self.defaults, m) for m in self.models]


def resolve_model(defaults: ModelSettings, model: ModelSpec) -> ModelSpec:
    update: dict[str, Any] = {
        key: getattr(defaults, key)
        for key in defaults.model_fields_set
        if key not in model.model_fields_set
    }
    if "env" in defaults.model_fields_set and "env" in model.model_fields_set:
        update["env"] = {**defaults.env, **model.env}
    return model.model_copy(update=update) if update else model


def env_reference(value: str) -> str | None:
    """The variable a `${NAME}` value refers to, or None for a literal."""
    match = ENV_REFERENCE.match(value)
    return match.group(1) if match else None


def looks_secret(env_name: str) -> bool:
    upper = env_name.upper()
    return any(hint in upper for hint in SECRET_KEY_HINTS)
