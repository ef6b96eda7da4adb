"""Progress while workers stop and load: a line per change, or a live block on a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from gardenctl.text import shown

BAR = 20


class LineProgress:
    """One line each time a worker's phase or detail changes (logs, CI, pipes)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.seen: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()

    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None:
        with self.lock:
            if self.seen.get(worker_id) == (phase, detail):
                return
            self.seen[worker_id] = (phase, detail)
            text = f"{elapsed:7.1f}s  {worker_id}  {phase}"
            if detail:
                text += f": {detail}"
            print(shown(text), file=self.stream, flush=True)  # details quote worker logs

    def close(self) -> None:
        pass


class TerminalProgress:
    """A block of lines redrawn in place: each worker's phase, elapsed time and a bar that fills
    as its start timeout runs (so a slow load is visible long before it fails)."""

    def __init__(self, timeouts: dict[str, float], stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.timeouts = timeouts
        self.rows: dict[str, tuple[str, str, float]] = {}
        self.order: list[str] = []
        self.drawn = 0
        self.lock = threading.Lock()
        self.last_draw = 0.0

    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None:
        with self.lock:
            if worker_id not in self.rows:
                self.order.append(worker_id)
            previous = self.rows.get(worker_id)
            self.rows[worker_id] = (phase, detail, elapsed)
            now = time.monotonic()
            if previous and previous[:2] == (phase, detail) and now - self.last_draw < 0.5:
                return
            self.last_draw = now
            self._draw()

    def _draw(self) -> None:
        width = max(len(w) for w in self.order)
        lines = []
        for worker_id in self.order:
            phase, detail, elapsed = self.rows[worker_id]
            timeout = self.timeouts.get(worker_id)
            if phase in ("starting", "spawning") and timeout:
                filled = min(BAR, int(BAR * elapsed / timeout))
                bar = "[" + "#" * filled + "." * (BAR - filled) + "] "
            else:
                bar = ""
            text = f"  {worker_id:<{width}}  {bar}{phase:<9} {elapsed:6.1f}s"
            if detail:
                text += f"  {detail}"
            lines.append(shown(text)[:160])
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F")
        for line in lines:
            self.stream.write("\x1b[2K" + line + "\n")
        self.drawn = len(lines)
        self.stream.flush()

    def close(self) -> None:
        with self.lock:
            if self.order:
                self._draw()


def make_progress(timeouts: dict[str, float], quiet: bool = False):
    if quiet:
        return None
    if sys.stderr.isatty():
        return TerminalProgress(timeouts)
    return LineProgress()
