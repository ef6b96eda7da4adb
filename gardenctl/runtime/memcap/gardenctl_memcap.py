"""Caps PyTorch's CUDA caching allocator in this process at GARDENCTL_MEMORY_CAP_BYTES per GPU.

Imported by this directory's `sitecustomize.py` at interpreter start-up; the module registers
itself as `sys.modules["gardenctl_memcap"]`, which is what tests look for. It never imports
torch (that would cost seconds in every process and could initialise CUDA before vLLM chooses
its device); it waits for `torch.cuda` to be imported, then queues the cap with PyTorch's own
deferred-call mechanism. Any failure prints one line to stderr and the process carries on.

Facts relied on (PyTorch source, torch/cuda/__init__.py and torch/cuda/memory.py, read in the
2.14.1 wheel; the same in every release since the fraction API appeared in 1.8, pytorch#48172):
- `torch.cuda._lazy_call(fn)` runs ``fn`` at once when CUDA is initialised, else appends it to
  `torch.cuda._queued_calls`; `_lazy_init()` runs the queued calls right after
  `torch._C._cuda_init()`, with `_tls.is_initializing` set so that a queued call may call
  `_lazy_init()` again without recursing. A queued call that raises turns every later CUDA call
  into DeferredCudaCallError, so ours catches everything.
- A forked child gets the parent's queue (memory is copied); if the parent had initialised CUDA
  the child cannot use CUDA at all ("Cannot re-initialize CUDA in forked subprocess").
- `set_per_process_memory_fraction(f, device)` calls `_lazy_init()`, then
  `torch._C._cuda_setMemoryFraction`; the allocator then refuses (OutOfMemoryError) any new
  segment that would bring the bytes it has reserved on that device past f x the device's total
  memory (c10/cuda/CUDACachingAllocator.cpp `alloc_block`, checked before cudaMalloc and before
  expandable segments, for the default pool and for private pools such as CUDA graphs').
- Older releases' `NativeCachingAllocator::setMemoryFraction` call `cudaSetDevice(device)` and
  read the total with `cudaMemGetInfo`: setting it for a device the process does not use would
  switch its current device and create a CUDA context (~0.5 GiB) on that GPU. Hence, with more
  than one visible GPU, a device is capped when the process selects it with
  `torch.cuda.set_device` (what every vLLM GPU worker does for its rank), not all at once.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

CAP_ENV = "GARDENCTL_MEMORY_CAP_BYTES"
PATH_ENV = "GARDENCTL_MEMORY_CAP_PYTHONPATH"
DEBUG_ENV = "GARDENCTL_MEMORY_CAP_DEBUG"
PREFIX = "gardenctl memory cap:"
GIB = 1024 ** 3

cap_bytes: int | None = None  # set by install()
capped: set[int] = set()  # devices capped in this process


def say(text: str) -> None:
    try:
        sys.stderr.write(f"{PREFIX} {text}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 (a closed stderr must not break the worker)
        pass


def install(environ: Mapping[str, str] = os.environ) -> None:
    """Arm the cap for this process when the cap variable is set; a no-op otherwise."""
    global cap_bytes  # noqa: PLW0603 (one value per process, read by the deferred calls)
    raw = environ.get(CAP_ENV, "").strip()
    if not raw:
        return
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        say(f"ignoring {CAP_ENV}={raw!r}: not a positive number of bytes (no cap in pid "
            f"{os.getpid()})")
        return
    cap_bytes = value
    if environ.get(DEBUG_ENV):
        say(f"hook installed in pid {os.getpid()} ({value} bytes per GPU)")
    loaded = sys.modules.get("torch.cuda")
    if loaded is not None:  # imported before us (a .pth file): arm it now
        on_torch_cuda(loaded)
    else:
        sys.meta_path.insert(0, TorchCudaFinder())


def extend_path(environ: Mapping[str, str] = os.environ, here: str | None = None) -> None:
    """Put the garden's own PYTHONPATH (given as a ${NAME} reference, so gardenctl could not
    join it to ours when it planned) right after this directory on sys.path."""
    extra = [p for p in environ.get(PATH_ENV, "").split(os.pathsep) if p]
    if not extra:
        return
    position = len(sys.path)
    if here is not None:
        for i, entry in enumerate(sys.path):
            if _same(entry, here):
                position = i + 1
                break
    sys.path[position:position] = [p for p in extra if p not in sys.path]


def _same(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a or ".") == os.path.realpath(b)
    except (OSError, ValueError):
        return False


class TorchCudaFinder:
    """A meta path finder that only watches for `torch.cuda`: it lets the normal finders find
    it, then wraps that module's loader so that our code runs once the module has executed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "torch.cuda":
            return None
        try:
            sys.meta_path.remove(self)  # once per process
        except ValueError:
            pass
        try:
            spec = _find_with_others(fullname, path, target)
            loader = spec.loader if spec is not None else None
            inner = getattr(loader, "exec_module", None)
            if spec is None or loader is None or inner is None:
                return spec

            def exec_module(module: ModuleType) -> None:
                inner(module)  # torch.cuda itself; its errors are torch's to raise
                on_torch_cuda(module)

            loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec
        except Exception as exc:  # noqa: BLE001 (never break `import torch`)
            say(f"could not watch torch.cuda in pid {os.getpid()}: {exc!r} (no cap)")
            return None


def _find_with_others(fullname: str, path: Sequence[str] | None,
                      target: ModuleType | None) -> ModuleSpec | None:
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or isinstance(finder, TorchCudaFinder):
            continue
        spec: ModuleSpec | None = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def on_torch_cuda(cuda: ModuleType) -> None:
    """`torch.cuda` has been imported: queue the cap (or apply it, if CUDA is already up) and
    cap each device the process later selects with `torch.cuda.set_device`."""
    try:
        _wrap_set_device(cuda)
        cuda._lazy_call(functools.partial(at_cuda_init, cuda))
    except Exception as exc:  # noqa: BLE001 (never break the worker)
        say(f"could not arm the cap in pid {os.getpid()}: {exc!r} (no cap)")


def at_cuda_init(cuda: ModuleType) -> None:
    """Runs inside PyTorch's CUDA initialisation: with a single visible GPU, cap it; with more,
    wait for `set_device` (see the module's docstring). Never raises."""
    try:
        if cuda.device_count() == 1:
            cap_device(cuda, 0)
    except Exception as exc:  # noqa: BLE001 (never break the worker)
        say(f"could not cap in pid {os.getpid()}: {exc!r} (no cap)")


def _wrap_set_device(cuda: ModuleType) -> None:
    original: Callable[..., Any] = cuda.set_device
    if getattr(original, "_gardenctl_memcap", False):
        return

    @functools.wraps(original)
    def set_device(device: Any) -> None:
        original(device)
        try:
            if cuda.is_initialized():
                cap_device(cuda, int(cuda.current_device()))
        except Exception as exc:  # noqa: BLE001 (never break the worker)
            say(f"could not cap in pid {os.getpid()}: {exc!r} (no cap)")

    set_device._gardenctl_memcap = True  # type: ignore[attr-defined]
    setattr(cuda, "set_device", set_device)  # noqa: B010 (a module attribute, typed Any)


def cap_device(cuda: ModuleType, device: int) -> None:
    """Set the fraction for ``device`` once: cap bytes / the device's total memory."""
    if cap_bytes is None or device in capped:
        return
    total = int(cuda.get_device_properties(device).total_memory)
    fraction = min(1.0, cap_bytes / total) if total > 0 else 1.0
    cuda.set_per_process_memory_fraction(fraction, device)
    capped.add(device)
    say(f"{cap_bytes / GIB:.2f} GiB per GPU (fraction {fraction:.4f} of {total / GIB:.2f} GiB "
        f"on cuda:{device}) in pid {os.getpid()}")
