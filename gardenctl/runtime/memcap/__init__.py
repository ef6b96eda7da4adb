"""The memory-cap hook (`memory_cap: true`): a directory put first on a worker's PYTHONPATH.

Its `sitecustomize.py` runs at the start-up of every Python process of the worker (the vLLM API
server, the EngineCore child, tensor-parallel workers: spawned, forkserver'd or forked) and, when
GARDENCTL_MEMORY_CAP_BYTES is set, makes PyTorch's caching allocator refuse to hold more than that
many bytes per GPU in that process (`torch.cuda.set_per_process_memory_fraction`). See
docs/memory-cap.md. The two modules in this directory import nothing from gardenctl: they run in
the worker's interpreter, which may not have gardenctl installed.
"""

from __future__ import annotations

from pathlib import Path

HOOK_DIR = str(Path(__file__).resolve().parent)
CAP_ENV = "GARDENCTL_MEMORY_CAP_BYTES"
PATH_ENV = "GARDENCTL_MEMORY_CAP_PYTHONPATH"  # a PYTHONPATH the garden gave as a ${NAME} reference
DEBUG_ENV = "GARDENCTL_MEMORY_CAP_DEBUG"

__all__ = ["CAP_ENV", "DEBUG_ENV", "HOOK_DIR", "PATH_ENV"]
