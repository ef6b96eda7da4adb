"""The stand-in's log output, in the formats of vLLM's loggers and of uvicorn.

vLLM 0.32 logs ``(APIServer pid=123) INFO 01-31 12:00:00 [api_server.py] message`` on stdout
(0.11+: EngineCore ``EngineCore_DP0``; 0.10: ``EngineCore_0``; before 0.10, and the V0 engine,
no process tag: ``INFO 01-31 12:00:00 [api_server.py] message``);
uvicorn logs ``INFO:     message`` on stderr; tracebacks go to stderr. The real server also
prints ``[file.py:LINE]``; the stand-in leaves the line number out (it has none to give).
Every line is written whole and flushed at once, because the caller usually redirects both
streams to one log file and reads it while the process runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

API_SERVER = "APIServer"
ENGINE_CORE = "EngineCore_DP0"


class VllmLog:
    """Writes whole, flushed log lines; safe to call from any thread and from signal handlers."""

    def __init__(
        self,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        clock: Callable[[], float] = time.time,
        version: tuple[int, ...] = (0, 32, 0),
        v0: bool = False,
    ) -> None:
        self._stdout = stdout if stdout is not None else sys.stdout
        self._stderr = stderr if stderr is not None else sys.stderr
        self._clock = clock
        # Re-entrant: a signal handler may log while the main thread is inside a write.
        self._lock = threading.RLock()
        self.api_server_pid = os.getpid()
        # The engine runs in this process unless a child stands in for EngineCore.
        self.engine_pid = self.api_server_pid
        tagged = version >= (0, 10) and not v0
        self._api_tag: str | None = API_SERVER if tagged else None
        self._engine_tag: str | None = None
        if tagged:
            self._engine_tag = ENGINE_CORE if version >= (0, 11) else "EngineCore_0"

    def api(self, level: str, source: str, message: str) -> None:
        """A line from vLLM's API server process (stdout)."""
        line = self._vllm_line(self._api_tag, self.api_server_pid, level, source, message)
        self._write(self._stdout, line)

    def engine(self, level: str, source: str, message: str) -> None:
        """A line from vLLM's EngineCore process (stdout)."""
        line = self._vllm_line(self._engine_tag, self.engine_pid, level, source, message)
        self._write(self._stdout, line)

    def uvicorn(self, level: str, message: str) -> None:
        """A line from uvicorn, vLLM's HTTP server (stderr): ``INFO:     message``."""
        self._write(self._stderr, f"{level + ':':<10}{message}")

    def stderr(self, lines: tuple[str, ...] | list[str]) -> None:
        """Raw lines on stderr, such as a traceback."""
        with self._lock:
            for line in lines:
                self._write(self._stderr, line)

    def _vllm_line(self, process: str | None, pid: int, level: str, source: str,
                   message: str) -> str:
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(self._clock()))
        tag = f"({process} pid={pid}) " if process else ""
        return f"{tag}{level} {stamp} [{source}] {message}"

    def _write(self, stream: TextIO, line: str) -> None:
        with self._lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (BrokenPipeError, ValueError):
                # The reader went away (or the stream is closed): a server keeps serving.
                pass
