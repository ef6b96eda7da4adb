"""Process facts for the local runtime, through psutil: identity, groups, markers, ports.

A pid alone never identifies a worker (pids are reused): a process is ours when its pid AND its
start time match the record, or when its environment carries our marker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from gardenctl.workers import SPEC_HASH_ENV, STATE_ENV, WORKER_ID_ENV

START_TIME_TOLERANCE = 0.05  # seconds, for identities known only by their wall-clock start


@dataclass(frozen=True)
class Identity:
    """Who a process is: its pid and when it started. A pid alone is reused by the kernel.

    ``start_ticks`` (Linux: clock ticks since boot, from /proc/<pid>/stat) is exact and does not
    move when the wall clock is stepped (NTP, resume); ``create_time`` (wall clock) is the
    fallback where /proc cannot be read."""

    pid: int
    create_time: float | None = None
    start_ticks: int | None = None

    def alive(self) -> bool:
        """True when this very process is alive (not a zombie, not a newer one with its pid)."""
        stat = _proc_stat(self.pid)
        if self.start_ticks is not None and stat is not None:
            state, ticks = stat
            return state != "Z" and ticks == self.start_ticks
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE or self.create_time is None:
                return False
            return abs(process.create_time() - self.create_time) <= START_TIME_TOLERANCE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


def identity_of(pid: int) -> Identity | None:
    """The identity of the live process ``pid``, or None if it is gone."""
    try:
        create_time = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    stat = _proc_stat(pid)
    return Identity(pid, create_time, stat[1] if stat else None)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return fields[0].decode(), int(fields[19])  # field 3 (state), field 22 (starttime)


@dataclass(frozen=True)
class MarkedProcess:
    """A process group leader that carries our worker marker in its environment."""

    identity: Identity
    worker_id: str
    spec_hash: str
    cmdline: tuple[str, ...]
    cuda_visible_devices: str

    @property
    def pid(self) -> int:
        return self.identity.pid


def group_members(pgid: int, worker_id: str, leader: Identity | None = None) -> list[int]:
    """Live processes of process group ``pgid`` that belong to ``worker_id``: those whose
    environment carries its marker, and the group leader if it is ``leader``. A process whose
    environment cannot be read, or a leader that merely reuses the pid, is never included."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            marker = _environ(process).get(WORKER_ID_ENV)
            if marker == worker_id or (pid == pgid and marker is None and leader is not None
                                       and leader.pid == pid and leader.alive()):
                members.append(pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError, psutil.AccessDenied):
            continue
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
            stat = _proc_stat(pid)
            found.append(MarkedProcess(
                identity=Identity(pid, process.info["create_time"], stat[1] if stat else None),
                worker_id=worker_id, spec_hash=env.get(SPEC_HASH_ENV, ""),
                cmdline=tuple(process.info["cmdline"] or ()),
                cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES", ""),
            ))
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found, key=lambda p: p.pid)


def start_group(argv: Sequence[str], env: Mapping[str, str], log_path: Path, header: str,
                preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` (never through a shell) as the leader of a new session, with exactly
    ``env``, stdin from /dev/null and stdout+stderr appended to ``log_path`` (0600) after
    ``header``. SpawnError when the program cannot be started."""
    from gardenctl.runtime.base import SpawnError
    from gardenctl.vocab import Cause

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, header.encode())
        try:
            return subprocess.Popen(
                list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=fd,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                preexec_fn=preexec,  # noqa: PLW1509 - only prctl, on the launcher thread
            )
        except OSError as exc:
            raise SpawnError(Cause.SPAWN_FAILED, f"could not start {argv[0]}: "
                             f"{exc.strerror}") from None
    finally:
        os.close(fd)


def signal_process(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_members(pids: list[int]) -> None:
    for pid in pids:
        signal_process(pid, signal.SIGKILL)


KILL_WAIT = 5.0  # seconds SIGKILLed members may take to be gone


def kill_survivors(members_now: Callable[[], set[int]]) -> tuple[bool, list[int]]:
    """SIGKILL what ``members_now`` still finds of a worker, and wait until nothing of it is
    left: (whether anything had to be killed, the pids that survived SIGKILL)."""
    import time

    survivors = members_now()
    if not survivors:
        return False, []
    kill_members(sorted(survivors))
    deadline = time.monotonic() + KILL_WAIT
    while survivors and time.monotonic() < deadline:
        time.sleep(0.05)
        survivors = members_now()
    return True, sorted(survivors)


def listening_ports() -> dict[int, str]:
    """TCP ports something on this machine listens on, each with who ("pid 123 (python3)"
    where visible, else "another program"); empty where that cannot be read."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return {}
    ports: dict[int, str] = {}
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr:
            continue
        port = conn.laddr.port
        if conn.pid and ports.get(port, "another program") == "another program":
            ports[port] = _describe_pid(conn.pid)
        else:
            ports.setdefault(port, "another program")
    return ports


def _describe_pid(pid: int) -> str:
    try:
        return f"pid {pid} ({psutil.Process(pid).name()})"
    except psutil.Error:
        return f"pid {pid}"


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
    return listening_ports().get(port, "another program")
