"""Drive a real `gardenctl watch -o json` from outside: a garden in a folder, saves, events.

Used by tests/test_e2e_watch.py and benchmarks/watch_reaction.py.

- `WatchedGarden` is a garden file in its own folder with a private state directory
  (``GARDENCTL_STATE_DIR``), an isolated Hugging Face cache and a block of free ports
  (``placement.base_port``); its workers are gardenctl's stand-in for ``vllm serve`` on simulated
  GPUs of one declared node. Every gardenctl it runs is ``python -m gardenctl ...`` from an argv
  list, in the garden's folder.
- `Watch` is one running ``gardenctl watch -o json``: a thread reads its JSON event lines as they
  come and stamps each with ``time.monotonic()``; tests wait on conditions over those events
  with deadlines (never fixed sleeps).
- Saves are complete when they land: `save_atomic` writes a temporary file beside the garden
  and renames it over ``garden.yaml`` (what most editors do).
- `WatchedGarden.tear_down()` stops every watcher it started, runs ``gardenctl down --yes`` and
  returns whatever still carries this state directory's marker (``GARDENCTL_STATE=<state>`` in a
  process's environment), SIGKILLing it so that nothing leaks past a test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from e2e_helpers import STANDIN, free_port_block

GARDENCTL = (sys.executable, "-m", "gardenctl")
STATE_ENV = "GARDENCTL_STATE"  # the state directory that owns a worker (in its environment)
WORKER_ID_ENV = "GARDENCTL_WORKER_ID"
MODEL_ID = "Qwen/Qwen3-0.6B"  # in gardenctl's catalog: estimated offline, about 5.5 GiB a worker
READY_DELAY = "0.25"  # seconds the stand-in "loads" before /health answers 200
GPU_MEMORY = "48GiB"
GPU_COUNT = 2
COMMAND_TIMEOUT = 60.0


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 20.0,
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


# -- ports, files ------------------------------------------------------------------------------

def save_atomic(path: Path, text: str) -> float:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``.
    Returns time.monotonic() right after the rename: the moment the new version exists."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(text)
    os.rename(temporary, path)
    return time.monotonic()


def model(name: str, **fields: Any) -> dict:
    """One entry of `models:` (a small catalogued model unless ``model=`` says otherwise)."""
    return {"name": name, "model": MODEL_ID, **fields}


def render_garden(name: str, models: Iterable[dict], base_port: int, *,
                  gpus: int = GPU_COUNT) -> str:
    """A garden file: the stand-in on ``gpus`` simulated GPUs of one node, one model per line
    (a JSON object is a YAML flow mapping), so model i (0-based) is on line MODELS_LINE + i."""
    defaults = {"vllm_command": list(STANDIN), "max_model_len": 2048,
                "shutdown_timeout": "5s", "start_timeout": "60s",
                "env": {"STANDIN_VLLM_READY_DELAY": READY_DELAY,
                        "STANDIN_VLLM_GPU_MEMORY": GPU_MEMORY}}
    lines = ["# gardenctl watch end-to-end garden",
             f"name: {name}",
             f"defaults: {json.dumps(defaults)}",
             f"placement: {json.dumps({'base_port': base_port})}",
             "inventory:",
             "  nodes:",
             "    - name: local",
             f"      gpus: [{{name: simulated L40S, memory: {GPU_MEMORY}, count: {gpus}}}]",
             "models:"]
    lines += [f"  - {json.dumps(m)}" for m in models]
    return "\n".join(lines) + "\n"


MODELS_LINE = 10  # line number of the first model in render_garden's output


# -- events --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    at: float  # time.monotonic() when the line was read
    data: dict

    @property
    def name(self) -> str:
        return self.data.get("event", "")

    @property
    def worker(self) -> str | None:
        return self.data.get("worker")

    def __str__(self) -> str:
        worker = f" {self.worker}" if self.worker else ""
        return f"[{self.at:.3f}] {self.name}{worker}: {self.data.get('message', '')}"


class Watch:
    """One running `gardenctl watch -o json`, its events collected as they arrive."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str],
                 stderr_path: Path) -> None:
        self.argv = argv
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - open while the watch runs
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=self._stderr)
        self.events: list[Event] = []
        self.garbage: list[str] = []  # stdout lines that are not JSON events
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="watch events", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            now = time.monotonic()
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            with self._changed:
                try:
                    self.events.append(Event(now, json.loads(line)))
                except ValueError:
                    self.garbage.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    # -- waiting on events ---------------------------------------------------------------------

    def mark(self) -> int:
        """An index into the events: pass it as ``since`` to look only at what comes after."""
        with self._changed:
            return len(self.events)

    def since(self, index: int = 0, name: str | None = None,
              worker: str | None = None) -> list[Event]:
        with self._changed:
            events = self.events[index:]
        return [e for e in events if (name is None or e.name == name)
                and (worker is None or e.worker == worker)]

    def wait_for(self, what: str, predicate: Callable[[Event], bool], *, since: int = 0,
                 timeout: float = 20.0) -> Event:
        """The first event from ``since`` on that satisfies ``predicate``; AssertionError with
        the event log if none comes within ``timeout`` seconds (or the watcher exits)."""
        deadline = time.monotonic() + timeout
        seen = since
        with self._changed:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and seen == len(self.events)):
                    break
                self._changed.wait(min(left, 0.2))
        raise AssertionError(f"no {what} within {timeout:g}s\n{self.describe()}")

    def wait_event(self, name: str, worker: str | None = None, *, since: int = 0,
                   timeout: float = 20.0, where: Callable[[Event], bool] | None = None) -> Event:
        def matches(event: Event) -> bool:
            return (event.name == name and (worker is None or event.worker == worker)
                    and (where is None or where(event)))

        label = f"{name!r} event" + (f" for {worker}" if worker else "")
        return self.wait_for(label, matches, since=since, timeout=timeout)

    def index(self, event: Event) -> int:
        """The position of ``event``: pass it as ``since`` to look from there on."""
        with self._changed:
            return self.events.index(event)

    def wait_quiet(self, seconds: float, *, timeout: float = 30.0) -> None:
        """Until no event has arrived for ``seconds`` (the watcher is idle)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                last = self.events[-1].at if self.events else self.started_at
            now = time.monotonic()
            if now - last >= seconds:
                return
            if now >= deadline:
                raise AssertionError(f"watch never went quiet for {seconds}s\n{self.describe()}")
            time.sleep(min(0.05, seconds))

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL after ``timeout``: a test failure)."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"watch did not exit within {timeout}s of SIGTERM\n"
                                 f"{self.describe()}") from None
        self._reader.join(timeout=5)
        self._stderr.close()
        return code

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self, last: int = 60) -> str:
        with self._changed:
            events = self.events[-last:]
        lines = [f"$ {' '.join(self.argv[1:])}  (pid {self.pid}, "
                 f"{'running' if self.running else f'exit {self.process.returncode}'})",
                 f"--- last {len(events)} events ---", *map(str, events)]
        if self.garbage:
            lines += ["--- non-JSON stdout ---", *self.garbage[-10:]]
        lines += ["--- stderr ---", self.stderr()[-3000:]]
        return "\n".join(lines)


# -- the garden ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return (f"$ gardenctl {' '.join(self.argv)} -> exit {self.code}\n--- stdout ---\n"
                f"{self.out[-3000:]}\n--- stderr ---\n{self.err[-3000:]}")


class WatchedGarden:
    """A garden file in ``root`` with its own state directory, driven by real gardenctl."""

    def __init__(self, root: Path, name: str = "lab", *, gpus: int = GPU_COUNT) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.gpus = gpus
        self.file = root / "garden.yaml"
        self.state = root / "state"
        self.base_port = free_port_block()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GARDENCTL_")}
        self.env.update({"GARDENCTL_STATE_DIR": str(self.state), "HF_HOME": str(root / "hf"),
                         "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            self.env.pop(key, None)
        self.watches: list[Watch] = []

    def worker_id(self, model_name: str, replica: int = 0) -> str:
        return f"{self.name}/{model_name}/{replica}"

    # -- the file ----------------------------------------------------------------------------

    def text(self, models: Iterable[dict]) -> str:
        return render_garden(self.name, models, self.base_port, gpus=self.gpus)

    def save(self, models: Iterable[dict]) -> float:
        """Save a new version atomically; time.monotonic() of the rename."""
        return save_atomic(self.file, self.text(models))

    def save_text(self, text: str) -> float:
        return save_atomic(self.file, text)

    # -- commands ----------------------------------------------------------------------------

    def run(self, *argv: str, timeout: float = COMMAND_TIMEOUT) -> Run:
        done = subprocess.run([*GARDENCTL, *argv], cwd=self.root, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
        return Run(tuple(argv), done.returncode, done.stdout, done.stderr)

    def watch(self, *args: str) -> Watch:
        """Start `gardenctl watch -o json ARGS...` on garden.yaml."""
        argv = [*GARDENCTL, "watch", "-o", "json", *args]
        watch = Watch(argv, cwd=self.root, env=self.env,
                      stderr_path=self.root / f"watch-{len(self.watches)}.stderr")
        self.watches.append(watch)
        return watch

    def status(self) -> dict:
        run = self.run("status", "-o", "json")
        assert run.code == 0, str(run)
        return run.json()

    def watch_status(self) -> dict:
        """<state>/gardens/<garden>/watch.json, as the watcher last wrote it."""
        return json.loads((self.state / "gardens" / self.name / "watch.json").read_text())

    # -- processes ---------------------------------------------------------------------------

    def processes(self) -> list[psutil.Process]:
        """Every live process that carries this state directory's marker."""
        owner = str(self.state.resolve())
        found = []
        for process in psutil.process_iter():
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                if process.environ().get(STATE_ENV) == owner:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def worker_pids(self) -> dict[str, int]:
        """Worker id -> pid of its running main process (its process group leader)."""
        pids = {}
        for process in self.processes():
            try:
                if os.getpgid(process.pid) == process.pid:
                    pids[process.environ()[WORKER_ID_ENV]] = process.pid
            except (OSError, KeyError, psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return pids

    def cmdline(self, worker_id: str) -> list[str]:
        pid = self.worker_pids().get(worker_id)
        if pid is None:
            return []
        try:
            return psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            return []

    def flag(self, worker_id: str, name: str) -> str | None:
        """The value of ``--name`` on the running worker's command line."""
        argv = self.cmdline(worker_id)
        for i, word in enumerate(argv[:-1]):
            if word == name:
                return argv[i + 1]
        return None

    # -- cleaning up -------------------------------------------------------------------------

    def tear_down(self) -> list[str]:
        """Stop the watchers, `gardenctl down --yes`, and return what survived (SIGKILLed)."""
        problems = []
        for watch in self.watches:
            if watch.running:
                try:
                    watch.stop(timeout=20)
                except AssertionError as exc:
                    problems.append(str(exc).splitlines()[0])
        if self.state.exists():
            down = self.run("down", "--yes")
            if down.code != 0:
                problems.append(f"`gardenctl down --yes` failed:\n{down}")
        deadline = time.monotonic() + 10
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.processes()
        for process in left:
            try:
                problems.append(f"survived down: pid {process.pid} {process.cmdline()}")
                os.killpg(os.getpgid(process.pid), signal.SIGKILL)
            except (OSError, psutil.NoSuchProcess):
                pass
        return problems
