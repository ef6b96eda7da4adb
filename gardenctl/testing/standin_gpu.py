"""Real GPU memory for the stand-in vLLM server (``STANDIN_VLLM_ALLOCATE=1``).

The process that plays EngineCore really allocates, with PyTorch's caching allocator on
``cuda:0`` of its ``CUDA_VISIBLE_DEVICES``, the bytes the stand-in reports (weights + KV cache
+ CUDA-graph pool), before the server says it is ready, and holds them until it exits;
``STANDIN_VLLM_OVERRUN`` then asks for more, as a worker that takes more than it claimed.
torch is imported only here, and only when asked for: the stand-in starts fast and its tests
run without torch.

- ``LocalGpu``: the memory is held by this process (no EngineCore child).
- ``ChildGpu``: a child Python process (its command line carries ``VLLM::EngineCore``) imports
  torch, allocates and reports over a pipe. It is a fresh interpreter started with
  ``sys.executable`` and this process's environment, so whatever a ``sitecustomize`` on
  ``PYTHONPATH`` sets up (a per-process memory cap, say) applies to it too. Like vLLM's
  EngineCore it survives a SIGKILL of its parent alone, keeping its memory, and dies with its
  process group.

Child -> parent, one line each on the status pipe: ``torch-ok``, ``allocated``,
``overrun-ok``, ``oom <torch's message>``, ``error <why>``. Parent -> child on stdin:
``overrun``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ENGINE_CORE_TITLE = "VLLM::EngineCore"
MAX_LIFETIME_S = 3600  # an orphaned child gives its memory back after an hour at most
_POLL_S = 0.1
_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the gardenctl package


class GpuUnavailable(Exception):
    """STANDIN_VLLM_ALLOCATE=1 but PyTorch or a CUDA device is missing."""


class GpuOutOfMemory(Exception):
    """torch raised OutOfMemoryError; the message is torch's, on one line."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


class LocalGpu:
    """GPU memory held by this process through torch's caching allocator."""

    def __init__(self) -> None:
        try:
            torch: Any = importlib.import_module("torch")
        except ImportError as error:
            raise GpuUnavailable(f"PyTorch is not installed ({error})") from None
        if not torch.cuda.is_available():
            raise GpuUnavailable("PyTorch sees no CUDA device (torch.cuda.is_available() is "
                                 "False; check CUDA_VISIBLE_DEVICES and the driver)")
        self._torch = torch
        self._oom: type[BaseException] = getattr(torch, "OutOfMemoryError",
                                                 torch.cuda.OutOfMemoryError)
        self._held: list[tuple[str, Any]] = []  # (tag, block)
        self._released: list[tuple[str, int]] = []  # (tag, bytes) given back by a sleep

    def allocate(self, n_bytes: int, tag: str = "") -> None:
        """Allocate and keep ``n_bytes`` on cuda:0; raises GpuOutOfMemory."""
        if n_bytes <= 0:
            return
        try:
            block = self._torch.empty(n_bytes, dtype=self._torch.uint8, device="cuda:0")
        except self._oom as error:
            raise GpuOutOfMemory(_one_line(str(error))) from None
        self._held.append((tag, block))

    def release(self, tags: Sequence[str]) -> None:
        """Free the blocks allocated under ``tags`` (sleep mode), remembering their sizes."""
        kept = []
        for tag, block in self._held:
            if tag in tags:
                self._released.append((tag, int(block.numel())))
            else:
                kept.append((tag, block))
        self._held = kept
        empty_cache = getattr(getattr(self._torch, "cuda", None), "empty_cache", None)
        if callable(empty_cache):
            empty_cache()  # give the freed blocks back to the driver, as vLLM's cumem does

    def restore(self, tags: Sequence[str]) -> None:
        """Allocate again what ``release`` freed under ``tags``; raises GpuOutOfMemory."""
        waiting = [(tag, n) for tag, n in self._released if tag in tags]
        self._released = [(tag, n) for tag, n in self._released if tag not in tags]
        for index, (tag, n_bytes) in enumerate(waiting):
            try:
                self.allocate(n_bytes, tag)
            except GpuOutOfMemory:
                self._released.extend(waiting[index:])  # what did not fit stays asleep
                raise

    @property
    def held_bytes(self) -> int:
        return sum(int(block.numel()) for _, block in self._held)


def child_main(argv: Sequence[str]) -> int:
    """The EngineCore child: allocate ``--bytes``, report, then serve ``overrun`` requests."""
    parser = argparse.ArgumentParser(prog=ENGINE_CORE_TITLE)
    parser.add_argument("title", nargs="?")
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--bytes", type=int, nargs="*", default=[])
    parser.add_argument("--tags", nargs="*", default=[])
    parser.add_argument("--overrun", type=int, default=0)
    args = parser.parse_args(argv)
    status = os.fdopen(args.status_fd, "w", buffering=1)

    def say(line: str) -> None:
        status.write(line + "\n")
        status.flush()

    try:
        gpu = LocalGpu()
    except GpuUnavailable as error:
        say(f"error {_one_line(str(error))}")
        return 2
    say("torch-ok")
    try:
        tags = args.tags if len(args.tags) == len(args.bytes) else [""] * len(args.bytes)
        for n_bytes, tag in zip(args.bytes, tags, strict=True):
            gpu.allocate(n_bytes, tag)
        say("allocated")
        for line in sys.stdin:
            command, *tags = line.split()
            if command == "overrun":
                gpu.allocate(args.overrun)
                say("overrun-ok")
            elif command == "release":
                gpu.release(tags)
                say("released")
            elif command == "restore":
                try:
                    gpu.restore(tags)
                except GpuOutOfMemory as error:
                    say(f"restore-oom {error}")  # the engine stays up, asleep
                else:
                    say("restored")
    except GpuOutOfMemory as error:
        say(f"oom {error}")
        return 1
    # stdin closed: the parent is gone. Keep the memory, as an orphaned EngineCore does.
    time.sleep(MAX_LIFETIME_S)
    return 0


class ChildGpu:
    """The EngineCore child that allocates, seen from the stand-in's main process."""

    def __init__(self, sizes: Sequence[tuple[str, int]], overrun: int) -> None:
        read_fd, write_fd = os.pipe()
        code = (f"import sys; sys.path.insert(0, {_ROOT!r}); "
                "from gardenctl.testing.standin_gpu import child_main; "
                "sys.exit(child_main(sys.argv[1:]))")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, ENGINE_CORE_TITLE, "--status-fd", str(write_fd),
             "--bytes", *(str(n) for _, n in sizes), "--tags", *(t for t, _ in sizes),
             "--overrun", str(overrun)],
            stdin=subprocess.PIPE, pass_fds=(write_fd,), text=True,
        )
        os.close(write_fd)
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()
        self._commands = threading.Lock()  # one sleep-mode command at a time
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True,
                                        name="engine-core-status")
        self._reader.start()

    def _read(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "r") as status:
            for line in status:
                kind, _, rest = line.rstrip("\n").partition(" ")
                self._events.put((kind, rest))
        self._events.put(("exit", ""))

    def wait_for(self, wanted: str, stopped: Callable[[], bool],
                 also: Sequence[str] = ()) -> tuple[str, str]:
        """The next event: ``wanted``, ``oom``, ``error``, ``exit``, ``stopped`` or ``also``."""
        while True:
            try:
                kind, rest = self._events.get(timeout=_POLL_S)
            except queue.Empty:
                if stopped():
                    return "stopped", ""
                continue
            if kind == "exit":
                code = self.process.wait()
                return "exit", f"EngineCore exited with status {code}"
            if kind in (wanted, "oom", "error", *also):
                return kind, rest

    def release(self, tags: Sequence[str]) -> None:
        """Sleep mode: the child frees its blocks under ``tags``."""
        with self._commands:
            self._send("release " + " ".join(tags))
            self.wait_for("released", lambda: False)

    def restore(self, tags: Sequence[str]) -> None:
        """Wake-up: the child allocates them again; raises GpuOutOfMemory if they do not fit."""
        with self._commands:
            self._send("restore " + " ".join(tags))
            kind, detail = self.wait_for("restored", lambda: False, also=("restore-oom",))
            if kind != "restored":
                raise GpuOutOfMemory(detail or "EngineCore exited")

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the child is gone: wait_for reports it

    def request_overrun(self) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("overrun\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the child is gone: wait_for reports it
