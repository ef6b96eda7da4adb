"""The event log of `watch`: one line per event, as text or JSON lines (for journald and tools).

Lines carry causes and outcomes, never secret values (worker environments hold references).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from gardenctl.text import shown


def iso_utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + \
        f".{int((timestamp % 1) * 1000):03d}Z"


class EventLog:
    def __init__(self, stream: TextIO | None = None, *, json_lines: bool = False,
                 wall: Callable[[], float] = time.time) -> None:
        self.stream = stream or sys.stdout
        self.json_lines = json_lines
        self.wall = wall
        self.lock = threading.Lock()

    def emit(self, event: str, message: str, **fields: Any) -> None:
        now = self.wall()
        if self.json_lines:
            line = json.dumps({"ts": iso_utc(now), "event": event, "message": message, **fields},
                              ensure_ascii=False, default=str)
        else:
            worker = fields.get("worker")
            line = (f"{iso_utc(now)}  {event:<10} " + (f"{shown(worker)}  " if worker else "")
                    + shown(message))
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()
