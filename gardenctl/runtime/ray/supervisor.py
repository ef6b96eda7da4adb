"""The worker actor's body: it supervises one `vllm serve` process on its Ray node.

One detached, named actor per worker runs this class on the node the plan chose. It does there
what the local runtime does on its own machine, with the same helpers (runtime.processes): the
process in its own session (so the whole group can be signalled), stdout+stderr to a log file
rotated per start, the identity check (pid + start time), SIGTERM / grace / SIGKILL of the
group with a check that nothing survives, and the probes of /health and /v1/models (a worker
often listens on 127.0.0.1 of its node: only the node can reach it).

This module imports no Ray: `gardenctl.runtime.ray.cluster` wraps the class as an actor. When
the actor dies (killed, or its node lost), its vLLM dies with it rather than holding GPU memory
with nobody supervising it: `vllm serve` gets PR_SET_PDEATHSIG (started from one long-lived
thread of the actor: the death signal follows the thread that forked, not the process), and each
run has a detached watchdog (`reaper`) that SIGKILLs the run's whole process group when the
actor's process ends, EngineCore and tensor-parallel processes included (they outlive a killed
API server).
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gardenctl.files import rotate
from gardenctl.runtime import base
from gardenctl.runtime import processes as procs
from gardenctl.runtime.environment import worker_environment
from gardenctl.runtime.health import latest_milestone, probe_liveness, probe_ready
from gardenctl.runtime.records import read_log_head, read_run_log
from gardenctl.vocab import Cause

LOGS_KEPT = 3  # a worker's log files kept on its node: this run's and two before
PR_SET_PDEATHSIG = 1


def default_log_dir() -> Path:
    """Where workers' logs go on a node: $GARDENCTL_RAY_LOG_DIR, else a private folder in the
    node's temporary directory."""
    chosen = os.environ.get("GARDENCTL_RAY_LOG_DIR")
    if chosen:
        return Path(chosen)
    return Path(tempfile.gettempdir()) / f"gardenctl-ray-{os.getuid()}"


def _death_signal(sig: int) -> Callable[[], None]:
    def arm() -> None:  # pragma: no cover - runs in the child between fork and exec
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass

    return arm


REAPER = Path(__file__).with_name("reaper.py")


def _start_reaper(pgid: int) -> int | None:
    """The watchdog that SIGKILLs group ``pgid`` when this actor dies (see `reaper`); its pid,
    or None when it could not be started."""
    try:
        started = subprocess.run(
            [sys.executable, "-I", str(REAPER), str(pgid), str(os.getpid())],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30, check=False)
        return int(started.stdout.split()[0])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


class _Launcher:
    """A thread that lives as long as the actor and starts its processes: PR_SET_PDEATHSIG
    fires when the *thread* that forked the child ends, so the fork must happen on a thread that
    never ends while the child should live (Ray runs actor methods on pool threads)."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        thread = threading.Thread(target=self._serve, name="gardenctl-launcher", daemon=True)
        thread.start()

    def _serve(self) -> None:
        while True:
            job, reply = self._requests.get()
            try:
                reply.put((True, job()))
            except Exception as exc:  # noqa: BLE001 - handed back to the caller, who raises it
                reply.put((False, exc))

    def run(self, job: Callable[[], Any]) -> Any:
        reply: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._requests.put((job, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value


class WorkerSupervisor:
    """One worker's process on this node (see the module docstring). Every method returns
    plain values (they cross Ray's RPC)."""

    def __init__(self, worker_id: str, spec_hash: str, node: str, log_dir: str | None = None):
        self.worker_id = worker_id
        self.spec_hash = spec_hash
        self.node = node
        self.log_dir = Path(log_dir) if log_dir else default_log_dir()
        self._child: subprocess.Popen[bytes] | None = None
        self._identity: procs.Identity | None = None
        self._log_path: Path | None = None
        self._argv: tuple[str, ...] = ()
        self._cuda = ""
        self._ended_at: float | None = None
        self._launcher = _Launcher()
        self._reaper: int | None = None  # the pid of the current run's watchdog
        self._lock = threading.Lock()

    # -- start -----------------------------------------------------------------------------

    def start(self, argv: list[str], env: Mapping[str, str], markers: Mapping[str, str],
              host: str, port: int) -> dict[str, Any]:
        """Start the worker's process with the environment a local worker gets (this node's
        allowed variables, the garden's ``env``, gardenctl's ``markers``). {"pid",
        "create_time", "start_ticks", "log_path"}, or {"error": cause, "message", "hint"}
        when it cannot start."""
        from gardenctl.runtime.local import resolve_command

        with self._lock:
            if self._child is not None and self._child.poll() is None:
                return {"error": "spawn_failed", "hint": "",
                        "message": f"{self.worker_id} already runs on {self.node} (pid "
                                   f"{self._child.pid})"}
            try:
                executable = resolve_command(argv[0])
                owner = procs.port_owner(host, port)
                if owner is not None:
                    raise base.SpawnError(
                        Cause.PORT_IN_USE, f"port {port} on {host} of node {self.node} is "
                        f"already in use by {owner}",
                        hint="stop the other program, or give the model another port")
                log_path = self._new_log()
                header = (f"=== gardenctl: starting {self.worker_id} (spec {self.spec_hash}) "
                          f"on Ray node {self.node} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
                          " ===\n")
                full_env = worker_environment(os.environ, env, markers)
                child = self._launcher.run(lambda: procs.start_group(
                    [executable, *argv[1:]], full_env, log_path, header,
                    preexec=_death_signal(signal.SIGKILL)))
                self._end_reaper()
                self._reaper = _start_reaper(child.pid)
            except base.SpawnError as exc:
                return {"error": exc.cause.value, "message": str(exc), "hint": exc.hint}
            self._child, self._log_path, self._ended_at = child, log_path, None
            self._argv, self._cuda = tuple(argv), env.get("CUDA_VISIBLE_DEVICES", "")
            self._identity = procs.identity_of(child.pid)
            identity = self._identity or procs.Identity(child.pid)
            return {"pid": child.pid, "create_time": identity.create_time,
                    "start_ticks": identity.start_ticks, "log_path": str(log_path)}

    def _new_log(self) -> Path:
        folder = self.log_dir / self.worker_id.replace("/", "__")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return rotate(folder / "vllm.log", LOGS_KEPT)

    # -- what it is doing ------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Who this worker is (a controller with no record of it adopts it from this)."""
        child = self._child
        return {"worker_id": self.worker_id, "spec_hash": self.spec_hash, "node": self.node,
                "pid": child.pid if child is not None else None,
                "create_time": self._identity.create_time if self._identity else None,
                "argv": list(self._argv), "cuda_visible_devices": self._cuda,
                "log_path": str(self._log_path) if self._log_path else "",
                "alive": child is not None and child.poll() is None}

    def exit_code(self, pid: int | None) -> tuple[str, int | None, float | None]:
        """("alive", None, None) while the run of ``pid`` lives; ("exited", code, when) once it
        ended (code negative: killed by that signal); ("unknown", None, None) when this actor
        never ran ``pid`` (another actor of the same name started it)."""
        child = self._child
        if child is None or child.pid != pid:
            return ("unknown", None, None)
        code = child.poll()
        if code is None:
            return ("alive", None, None)
        if self._ended_at is None:
            self._ended_at = self._last_write()
        return ("exited", code, self._ended_at)

    def _last_write(self) -> float:
        try:
            return os.stat(self._log_path).st_mtime if self._log_path else time.time()
        except OSError:
            return time.time()

    def members(self) -> list[int]:
        child = self._child
        if child is None:
            return []
        return procs.group_members(child.pid, self.worker_id, self._identity)

    def read_log(self, limit: int, previous: bool = False) -> str:
        if self._log_path is None:
            return ""
        path = self._log_path.with_name(self._log_path.name + ".1") if previous \
            else self._log_path
        return read_run_log(str(path), limit)

    def startup_log(self) -> str:
        """The head of the current run's log, where vLLM writes its start-up figures."""
        if self._log_path is None:
            return ""
        return read_log_head(self._log_path)

    def milestone(self) -> str:
        return latest_milestone(self.read_log(16 * 1024))

    def probe_ready(self, host: str, port: int, served_name: str, api_key: str | None,
                    timeout: float) -> bool:
        return probe_ready(host, port, served_name, api_key, timeout)

    def probe_health(self, host: str, port: int, timeout: float) -> str | None:
        return probe_liveness(host, port, timeout)

    def sleep_mode(self, action: str, host: str, port: int, level: int,
                   api_key: str | None) -> bool | dict[str, str] | None:
        """A sleep-mode action (runtime.sleepmode.act) from this node; a SleepModeError comes
        back as {"error": its text}."""
        from gardenctl.runtime import sleepmode

        try:
            return sleepmode.act(action, host, port, level, api_key)
        except sleepmode.SleepModeError as exc:
            return {"error": str(exc)}

    # -- stop ------------------------------------------------------------------------------

    def stop(self, grace: float) -> dict[str, Any]:
        """SIGTERM, ``grace`` seconds, SIGKILL of the whole group, and a check that nothing of
        it survives. {"outcome": stopped | killed | gone, "pids": [...]} or {"error": ...}."""
        child = self._child
        if child is None:
            return {"outcome": "gone", "pids": []}
        pgid = child.pid

        def members_now() -> set[int]:
            return set(procs.group_members(pgid, self.worker_id, self._identity))

        members = members_now()
        alive = child.poll() is None
        outcome = "stopped" if alive else ("gone" if not members else "killed")
        if alive:
            procs.signal_process(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                outcome = "killed"
        killed, survivors = procs.kill_survivors(members_now)
        if killed:
            outcome = "killed"
        if survivors:
            return {"error": f"{self.worker_id}: processes {survivors} survived SIGKILL on node "
                             f"{self.node}"}
        try:
            child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        self._end_reaper()
        return {"outcome": outcome, "pids": sorted(members | {child.pid})}

    def _end_reaper(self) -> None:
        """The run is over: its watchdog must not outlive it (it would end by itself within a
        second; this makes it certain before a new run begins)."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            procs.signal_process(reaper, signal.SIGKILL)


__all__ = ["WorkerSupervisor", "default_log_dir"]
