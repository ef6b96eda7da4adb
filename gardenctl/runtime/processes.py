"""Process facts for the local runtime, through psutil: identity, groups, markers, ports.

A pid alone never identifies a worker (pids are reused): a process is ours when its pid AND its
start time match the record, or when its environment carries our marker.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass

import psutil

from gardenctl.workers import SPEC_HASH_ENV, STATE_ENV, WORKER_ID_ENV

START_TIME_TOLERANCE = 0.05  # seconds; psutil's create_time is rounded by the kernel clock tick


@dataclass(frozen=True)
class MarkedProcess:
    """A process group leader that carries our worker marker in its environment."""

    pid: int
    worker_id: str
    spec_hash: str
    create_time: float
    cmdline: tuple[str, ...]
    cuda_visible_devices: str


def is_same_process(pid: int | None, create_time: float | None) -> bool:
    """True when ``pid`` is alive and is the very process that started at ``create_time``."""
    if pid is None or create_time is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - create_time) <= START_TIME_TOLERANCE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def create_time_of(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def group_members(pgid: int, worker_id: str | None = None) -> list[int]:
    """Live processes of process group ``pgid``; with ``worker_id``, only those whose
    environment carries that marker (or cannot be read), so a reused group id is never hit."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if worker_id is not None:
                marker = _environ(process).get(WORKER_ID_ENV)
                if marker is not None and marker != worker_id:
                    continue
                if marker is None and pid != pgid:
                    continue
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
        except (PermissionError, psutil.AccessDenied):
            continue
        members.append(pid)
    return sorted(members)


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess, OSError):
        return {}


def marked_group_leaders(state: str) -> list[MarkedProcess]:
    """Every live process group leader carrying the marker of the state directory ``state``
    (readable by this user). Workers of other state directories are not ours to touch."""
    found = []
    for process in psutil.process_iter(["pid", "create_time", "cmdline"]):
        try:
            pid = process.info["pid"]
            if os.getpgid(pid) != pid:
                continue
            env = _environ(process)
            worker_id = env.get(WORKER_ID_ENV)
            if not worker_id or env.get(STATE_ENV) != state:
                continue
            found.append(MarkedProcess(
                pid=pid, worker_id=worker_id, spec_hash=env.get(SPEC_HASH_ENV, ""),
                create_time=process.info["create_time"],
                cmdline=tuple(process.info["cmdline"] or ()),
                cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES", ""),
            ))
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found, key=lambda p: p.pid)


def signal_process(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_members(pids: list[int]) -> None:
    for pid in pids:
        signal_process(pid, signal.SIGKILL)


def listening_ports() -> set[int]:
    """TCP ports something on this machine listens on (empty where that cannot be read)."""
    try:
        return {conn.laddr.port for conn in psutil.net_connections(kind="inet")
                if conn.status == psutil.CONN_LISTEN and conn.laddr}
    except (psutil.AccessDenied, OSError):
        return set()


def port_owner(host: str, port: int) -> str | None:
    """Who listens on host:port, if anything does ("pid 123 (python3)" when visible)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = {"localhost": "127.0.0.1", "": "0.0.0.0"}.get(host, host)
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((bind_host, port))
        return None
    except OSError:
        pass
    finally:
        probe.close()
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid:
                    try:
                        return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                    except psutil.Error:
                        return f"pid {conn.pid}"
    except psutil.AccessDenied:
        pass
    return "another process"
