"""The environment variables the stand-in vLLM server reads, parsed and checked.

What each one does is documented in ``gardenctl.testing.standin_vllm``. A bad value is a usage
error (``EnvError``, exit 2) that names the variable and what would be valid.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gardenctl.testing.standin_engine import FAILURE_MODES

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}

T = TypeVar("T")


class EnvError(ValueError):
    """A STANDIN_VLLM_* (or vLLM) variable holds a value the stand-in cannot use."""


def _read_env(environ: Mapping[str, str], name: str, default: T, parse: Callable[[str], T],
              expected: str) -> T:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise EnvError(f"{name}={raw!r} is not valid: expected {expected}") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _parse_seconds(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # also rejects nan
        raise ValueError(raw)
    return value


def _parse_size(raw: str) -> int:
    """``24GiB``, ``80GB``, ``512MiB`` or a plain number of bytes; must be positive."""
    match = _SIZE_RE.fullmatch(raw)
    factor = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or factor is None or float(match.group(1)) <= 0:
        raise ValueError(raw)
    return int(float(match.group(1)) * factor)


def _parse_size_or_zero(raw: str) -> int:
    """Like ``_parse_size`` but 0 is allowed (no activation peak, no graph pool)."""
    if raw.strip() in ("0", "0.0"):
        return 0
    return _parse_size(raw)


OLDEST_VERSION = (0, 8)


def _parse_version(raw: str) -> tuple[int, ...]:
    """``0.32.0``, ``0.10.1.1`` or ``v0.8.5``: the numeric parts; 0.8 or later."""
    match = re.fullmatch(r"v?(\d+(?:\.\d+){1,3})(?:[.+-]?[A-Za-z][\w.+-]*)?", raw)
    if match is None:
        raise ValueError(raw)
    version = tuple(int(part) for part in match.group(1).split("."))
    if version < OLDEST_VERSION:
        raise ValueError(raw)
    return version


def _parse_level(raw: str) -> bool:
    """VLLM_LOGGING_LEVEL: True for DEBUG (any case); other levels are accepted."""
    return raw.upper() == "DEBUG"


def _parse_exit_code(raw: str) -> int:
    code = int(raw)
    if not 1 <= code <= 255:
        raise ValueError(raw)
    return code


def _parse_replay(raw: str) -> str:
    """The path of a readable log file."""
    try:
        with open(raw, "rb"):
            pass
    except OSError as error:
        raise ValueError(raw) from error
    return raw


def _parse_fail_mode(raw: str) -> str:
    if raw not in FAILURE_MODES:
        raise ValueError(raw)
    return raw


@dataclass(frozen=True)
class StandinEnv:
    """The environment variables the stand-in reads (see the module docstring)."""

    ready_delay: float = 0.5
    fail: str | None = None
    crash_after: float = 1.0
    exit_code: int = 1
    ignore_sigterm: bool = False
    spawn_child: bool = False
    gpu_memory_bytes: int = 80 * 1024**3
    weights_bytes: int = 1024**3
    kv_bytes_per_token: int = 131_072
    request_delay: float = 0.0
    token_delay: float = 0.005  # seconds between two generated tokens
    sleep_delay: float = 0.1  # seconds POST /sleep takes at level 1 or 2
    wake_delay: float = 0.3  # seconds POST /wake_up takes to restore level-1 weights
    wake_delay_level2: float = 0.9  # ... and level-2 weights
    dry_run: bool = False
    vllm_version: tuple[int, ...] = (0, 32, 0)
    activation_bytes: int = int(0.77 * 1024**3)
    cuda_graph_bytes: int = int(0.84 * 1024**3)
    allocate: bool = False
    overrun_bytes: int = 0
    debug_logging: bool = False  # VLLM_LOGGING_LEVEL=DEBUG
    use_v1: bool = True  # VLLM_USE_V1
    estimate_cudagraphs: bool | None = None  # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS
    api_key: str | None = None  # VLLM_API_KEY
    server_dev_mode: bool = False  # VLLM_SERVER_DEV_MODE
    keep_alive_on_engine_death: bool = False  # VLLM_KEEP_ALIVE_ON_ENGINE_DEATH
    replay: str | None = None  # STANDIN_VLLM_REPLAY: a failure log to print, then exit

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> StandinEnv:
        """Read the variables; an unset or empty one keeps its default. Raises EnvError."""
        defaults = cls()
        values = {
            field: _read_env(environ, name, getattr(defaults, field), parse, expected)
            for field, name, parse, expected in _VARIABLES
        }
        return cls(api_key=environ.get("VLLM_API_KEY") or None, **values)


_BOOLEAN = "1/0, true/false or yes/no"
_SECONDS = "a number of seconds >= 0"
_SIZE = "a positive size like 24GiB, 512MiB, 80GB or a number of bytes"

# StandinEnv field, variable, parser, what a valid value looks like
_VARIABLES: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("ready_delay", "STANDIN_VLLM_READY_DELAY", _parse_seconds, _SECONDS),
    ("fail", "STANDIN_VLLM_FAIL", _parse_fail_mode, "one of " + ", ".join(FAILURE_MODES)),
    ("crash_after", "STANDIN_VLLM_CRASH_AFTER", _parse_seconds, _SECONDS),
    ("exit_code", "STANDIN_VLLM_EXIT_CODE", _parse_exit_code, "an integer from 1 to 255"),
    ("ignore_sigterm", "STANDIN_VLLM_IGNORE_SIGTERM", _parse_bool, _BOOLEAN),
    ("spawn_child", "STANDIN_VLLM_SPAWN_CHILD", _parse_bool, _BOOLEAN),
    ("gpu_memory_bytes", "STANDIN_VLLM_GPU_MEMORY", _parse_size, _SIZE),
    ("weights_bytes", "STANDIN_VLLM_WEIGHTS", _parse_size, _SIZE),
    ("kv_bytes_per_token", "STANDIN_VLLM_KV_BYTES_PER_TOKEN", _parse_size, _SIZE),
    ("request_delay", "STANDIN_VLLM_REQUEST_DELAY", _parse_seconds, _SECONDS),
    ("token_delay", "STANDIN_VLLM_TOKEN_DELAY", _parse_seconds, _SECONDS),
    ("sleep_delay", "STANDIN_VLLM_SLEEP_DELAY", _parse_seconds, _SECONDS),
    ("wake_delay", "STANDIN_VLLM_WAKE_DELAY", _parse_seconds, _SECONDS),
    ("wake_delay_level2", "STANDIN_VLLM_WAKE_DELAY_LEVEL2", _parse_seconds, _SECONDS),
    ("dry_run", "STANDIN_VLLM_DRY_RUN", _parse_bool, _BOOLEAN),
    ("vllm_version", "STANDIN_VLLM_VERSION", _parse_version,
     "a vLLM release from 0.8 on, like 0.32.0 or 0.10.2"),
    ("activation_bytes", "STANDIN_VLLM_ACTIVATION", _parse_size_or_zero, _SIZE + " (or 0)"),
    ("cuda_graph_bytes", "STANDIN_VLLM_CUDA_GRAPH", _parse_size_or_zero, _SIZE + " (or 0)"),
    ("allocate", "STANDIN_VLLM_ALLOCATE", _parse_bool, _BOOLEAN),
    ("overrun_bytes", "STANDIN_VLLM_OVERRUN", _parse_size_or_zero, _SIZE + " (or 0)"),
    ("debug_logging", "VLLM_LOGGING_LEVEL", _parse_level, "a logging level such as DEBUG"),
    ("use_v1", "VLLM_USE_V1", _parse_bool, _BOOLEAN),
    ("estimate_cudagraphs", "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS", _parse_bool, _BOOLEAN),
    ("server_dev_mode", "VLLM_SERVER_DEV_MODE", _parse_bool, _BOOLEAN),
    ("keep_alive_on_engine_death", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", _parse_bool, _BOOLEAN),
    ("replay", "STANDIN_VLLM_REPLAY", _parse_replay, "the path of a readable log file"),
)
