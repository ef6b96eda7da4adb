"""Kills a worker's whole process group when the actor that supervises it dies.

`vllm serve` runs in a process group of its own with its EngineCore and tensor-parallel
processes. When its supervisor actor dies (killed, crashed, its raylet gone), nobody is left to
stop them, and killing the API server alone leaves the engine processes holding GPU memory. So
the supervisor starts this small watchdog beside each run. It detaches at once (a double fork:
Ray kills a dead worker's child processes, and this one must outlive the actor), says its pid on
stdout, then waits for the actor's process to end (a pidfd, else polling its start time) and
SIGKILLs the group. It ends by itself once the group is gone (the worker stopped or crashed).

Run by path with the standard library only (``python -I reaper.py PGID ACTOR_PID``): it needs
nothing of gardenctl's installation.
"""

from __future__ import annotations

import os
import select
import signal
import sys

POLL_MS = 1000  # how often the group is checked while the actor lives


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return None if fields[0] == b"Z" else fields[19].decode()


def watch(pgid: int, actor: int) -> None:
    """Until the group is gone: when the actor's process ends, SIGKILL the group."""
    born = _start_ticks(actor)
    try:
        pidfd: int | None = os.pidfd_open(actor)
    except (AttributeError, OSError):
        pidfd = None
    poller = select.poll()
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    while _group_alive(pgid):
        if born is None or _start_ticks(actor) != born:
            _kill_group(pgid)  # the actor is gone (or was gone before we looked)
            return
        if poller.poll(POLL_MS):  # the pidfd is readable: the actor exited
            _kill_group(pgid)
            return


def main(argv: list[str]) -> int:
    pgid, actor = int(argv[1]), int(argv[2])
    if os.fork():  # the parent returns at once: the watchdog is nobody's child
        return 0
    os.setsid()
    os.write(1, f"{os.getpid()}\n".encode())
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the starter reads stdout to its end: let it end now
        os.dup2(devnull, fd)
    os.close(devnull)
    watch(pgid, actor)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
