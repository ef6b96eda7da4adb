"""End-to-end helpers: a garden in a temporary folder, driven through the real command line.

A `Garden` has a unique name, its own state directory (``GARDENCTL_STATE_DIR``), an isolated
Hugging Face cache and a block of free ports (``placement.base_port``). Every gardenctl call is
``python -m gardenctl ...`` as a child process, from an argv list, never through a shell, run in
the garden's folder (so ``garden.yaml`` is the default file). Workers are gardenctl's stand-in
for ``vllm serve`` (``vllm_command: [<this Python>, -m, gardenctl.testing.standin_vllm]``: no
console script needed, so the tests run from any install) on simulated GPUs declared in the
file.

`Garden.tear_down()` (called by the fixtures) stops every gardenctl it started in the
background, runs ``gardenctl down --yes``, then SIGKILLs the process group of anything that still
carries this garden's worker marker in its environment, and checks with psutil that nothing is
left. What ``down`` left behind is returned, so a fixture can fail the test on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

WORKER_ID_ENV = "GARDENCTL_WORKER_ID"  # gardenctl's marker in every worker's environment
STATE_ENV = "GARDENCTL_STATE"  # and the state directory that owns it
READY_DELAY = "0.2"  # seconds the stand-in "loads" before it answers /health 200
# Simulated GPUs small enough that each holds one worker (a claim of the small models used here
# is about 6 GiB): workers land on different GPUs and so start in parallel, keeping tests quick.
GPU_MEMORY = "10GiB"
GPU_COUNT = 6
COMMAND_TIMEOUT = 90.0
STANDIN = (sys.executable, "-m", "gardenctl.testing.standin_vllm")  # the stand-in `vllm`


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int = 16) -> int:
    """The first of ``count`` consecutive free ports, below the kernel's ephemeral range (so an
    outgoing connection never takes one of them meanwhile)."""
    rng = random.Random(uuid.uuid4().int)
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        if all(_is_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value, or the last falsy one
    once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def model(name: str, **fields: Any) -> dict:
    """One entry of `models:`; the HF id carries a size so the estimate is quick and small."""
    return {"name": name, "model": f"org/{name}-1b", **fields}


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int | None, Any]:
    """(status, JSON body or None) of GET http://127.0.0.1:PORT/PATH; (None, None) when nothing
    answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None, None
    finally:
        connection.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, None


def served_names(port: int) -> set[str]:
    status, body = http_get(port, "/v1/models")
    if status != 200 or not isinstance(body, dict):
        return set()
    return {entry.get("id") for entry in body.get("data", [])}


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def lock_is_free(path: Path) -> bool:
    """Can an exclusive flock on ``path`` be taken right now? (released again at once)"""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Run:
    """One finished gardenctl command."""

    argv: tuple[str, ...]
    code: int
    out: str
    err: str
    elapsed: float

    @property
    def text(self) -> str:
        return self.out + self.err

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:  # shown by pytest when an assertion on a Run fails
        return (f"$ gardenctl {' '.join(self.argv)}  -> exit {self.code} in {self.elapsed:.2f}s\n"
                f"--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}")


class Garden:
    """A garden file, its state directory and the gardenctl commands run on it."""

    def __init__(self, root: Path, *, name: str | None = None, gpus: int = GPU_COUNT,
                 state: Path | None = None, extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.name = name or f"e2e-{uuid.uuid4().hex[:8]}"
        self.file = root / "garden.yaml"
        self.state = state or root / "state"
        self.gpus = gpus
        self.base_port = free_port_block()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GARDENCTL_")}
        self.env.update({"GARDENCTL_STATE_DIR": str(self.state), "HF_HOME": str(root / "hf"),
                         "HF_HUB_OFFLINE": "1", **(extra_env or {})})
        for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            self.env.pop(key, None)
        self.runs: list[Run] = []
        self.background: list[subprocess.Popen] = []

    # -- the file --------------------------------------------------------------------------

    def write(self, models: list[dict], *, comment: str = "", defaults: dict | None = None) -> None:
        """Write garden.yaml: the stand-in on simulated GPUs, ``models`` as given (each a flow
        mapping in JSON syntax, which YAML reads as it is)."""
        env = {"STANDIN_VLLM_READY_DELAY": READY_DELAY, "STANDIN_VLLM_GPU_MEMORY": GPU_MEMORY}
        settings = {"vllm_command": list(STANDIN), "max_model_len": 2048,
                    "shutdown_timeout": "5s", "start_timeout": "60s", **(defaults or {})}
        settings["env"] = {**env, **settings.get("env", {})}
        lines = [f"# {comment}" if comment else "# e2e test garden",
                 f"name: {self.name}",
                 f"defaults: {json.dumps(settings)}",
                 f"placement: {json.dumps({'base_port': self.base_port})}",
                 "inventory:",
                 "  nodes:",
                 "    - name: local",
                 f"      gpus: [{{name: simulated, memory: {GPU_MEMORY}, count: {self.gpus}}}]",
                 "models:"]
        lines += [f"  - {json.dumps(m)}" for m in models]
        self.file.write_text("\n".join(lines) + "\n")

    # -- commands --------------------------------------------------------------------------

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = COMMAND_TIMEOUT) -> Run:
        """Run ``gardenctl ARGS`` to completion (stdin is not a terminal)."""
        argv = [sys.executable, "-m", "gardenctl", *args]
        started = time.monotonic()
        completed = subprocess.run(argv, cwd=self.root, env={**self.env, **(env or {})},
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=timeout, check=False)
        run = Run(tuple(args), completed.returncode, completed.stdout, completed.stderr,
                  time.monotonic() - started)
        self.runs.append(run)
        return run

    def start(self, *args: str) -> subprocess.Popen:
        """Start ``gardenctl ARGS`` in the background; tear_down kills it if still running."""
        process = subprocess.Popen([sys.executable, "-m", "gardenctl", *args], cwd=self.root,
                                   env=self.env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.background.append(process)
        return process

    def apply(self, *args: str) -> Run:
        return self.run("apply", "--yes", *args)

    def apply_json(self, *args: str) -> tuple[Run, dict]:
        run = self.apply("-o", "json", *args)
        return run, run.json()

    def applied(self, models: list[dict], **write: Any) -> Run:
        """Write the file and apply it; the apply must succeed."""
        self.write(models, **write)
        run = self.apply()
        assert run.code == 0, str(run)
        return run

    def status(self) -> dict:
        run = self.run("status", "-o", "json")
        assert run.code == 0, str(run)
        return run.json()

    def workers(self) -> dict[str, dict]:
        """status -o json's workers by worker id."""
        return {w["worker"]: w for w in self.status()["workers"]}

    def worker_id(self, model_name: str, replica: int = 0) -> str:
        return f"{self.name}/{model_name}/{replica}"

    def pids(self) -> dict[str, int]:
        """Worker id -> main pid of every worker whose process is alive (from the records)."""
        found = {}
        for path in sorted(self.records_dir.glob("*.json")):
            record = json.loads(path.read_text())
            if record.get("pid") and alive(record["pid"]):
                found[record["spec"]["worker_id"]] = record["pid"]
        return found

    # -- the state directory ---------------------------------------------------------------

    @property
    def records_dir(self) -> Path:
        return self.state / "gardens" / self.name / "workers"

    @property
    def lock_path(self) -> Path:
        """The garden's writer lock (apply, down and watch of this garden take it)."""
        return self.state / "gardens" / self.name / "lock"

    @property
    def logs_dir(self) -> Path:
        return self.state / "gardens" / self.name / "logs"

    def record_path(self, worker_id: str) -> Path:
        _, model_name, replica = worker_id.split("/")
        return self.records_dir / f"{model_name}.{replica}.json"

    def record(self, worker_id: str) -> dict | None:
        path = self.record_path(worker_id)
        return json.loads(path.read_text()) if path.exists() else None

    # -- processes -------------------------------------------------------------------------

    def processes(self) -> list[psutil.Process]:
        """Every live process that carries the marker of one of this garden's workers and was
        started under this garden's state directory (workers and their children)."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = process.environ()
            except (psutil.Error, OSError):
                continue
            if env.get(WORKER_ID_ENV, "").startswith(self.name + "/") and self.owns(env):
                found.append(process)
        return found

    def owns(self, env: dict[str, str]) -> bool:
        """Was the marked process started by this garden's runtime (its state directory)?"""
        return env.get(STATE_ENV) == str(self.state.resolve())

    def process_groups(self) -> dict[str, set[int]]:
        """Worker id -> pids of the live processes carrying its marker."""
        groups: dict[str, set[int]] = {}
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                groups.setdefault(process.environ()[WORKER_ID_ENV], set()).add(process.pid)
        return groups

    def group_leaders(self) -> dict[str, set[int]]:
        """Worker id -> pids of its marked process-group leaders (one per running worker)."""
        leaders: dict[str, set[int]] = {}
        for worker_id, pids in self.process_groups().items():
            for pid in pids:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:
                        leaders.setdefault(worker_id, set()).add(pid)
        return leaders

    # -- clean-up --------------------------------------------------------------------------

    def tear_down(self) -> list[str]:
        """Stop everything this garden caused; return what `gardenctl down` left running."""
        for process in self.background:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)
        down = self.run("down", "--yes", "--garden", self.name, timeout=120)
        left = [f"pid {p.pid} {' '.join(_cmdline(p))[:120]}" for p in self.processes()]
        if left:
            left.append(f"(down exited {down.code}: {down.text.strip()[-300:]})")
        for process in self.processes():
            with contextlib.suppress(psutil.Error, OSError):
                os.killpg(os.getpgid(process.pid), signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                process.kill()
        survivors = wait_until(lambda: not self.processes(), timeout=10)
        assert survivors, f"processes of {self.name} survived SIGKILL: {self.processes()}"
        return left


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return ["?"]


@contextlib.contextmanager
def garden_at(root: Path, **options: Any) -> Iterator[Garden]:
    """A Garden that is torn down afterwards. A process that `gardenctl down` failed to stop
    fails the test (after it has been killed)."""
    garden = Garden(root, **options)
    try:
        yield garden
    finally:
        left = garden.tear_down()
        if left:
            raise AssertionError("gardenctl down left processes running:\n" + "\n".join(left))
