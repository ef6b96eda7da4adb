"""Which worker answers a request: the ready replicas of each served name, and the choice.

The choice is a pure function: the replica with the fewest outstanding requests, ties broken by
the lowest worker id (deterministic), leaving out replicas already tried for this request and
preferring those that did not just refuse a connection (ejected for a few seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Replica:
    """One ready worker as the gateway reaches it (or a stopped `standby: stop` worker, where
    it will run once started: ``ready`` False)."""

    worker_id: str
    served_name: str
    host: str  # where to connect (a wildcard bind address already made concrete)
    port: int
    api_key: str | None = field(default=None, repr=False)  # the worker's own VLLM_API_KEY
    standby: bool = False  # sleeps (or is stopped) until the gateway wakes it (sleepers)
    ready: bool = True  # False: a `standby: stop` worker that does not run (or is loading)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class RoutingTable:
    """What the gateway serves now: served name -> its ready replicas (sorted by worker id;
    with the stopped `standby: stop` ones, started on demand), and the served names the garden
    file declares (a declared name with no replica is "not ready", any other name
    "unknown")."""

    garden: str | None = None
    declared: frozenset[str] = frozenset()
    ready: Mapping[str, tuple[Replica, ...]] = field(default_factory=dict)

    def served_names(self) -> list[str]:
        """The names with at least one replica (ready, or stopped until a request), sorted."""
        return sorted(name for name, replicas in self.ready.items() if replicas)

    def known(self, name: str) -> bool:
        return name in self.declared or bool(self.ready.get(name))

    def replicas(self, name: str) -> tuple[Replica, ...]:
        return self.ready.get(name, ())


def choose_replica(replicas: Collection[Replica], outstanding: Mapping[str, int],
                   tried: Collection[str] = (), ejected: Collection[str] = ()) -> Replica | None:
    """The replica for the next attempt, or None when every one was tried."""
    candidates = [r for r in replicas if r.worker_id not in tried]
    if not candidates:
        return None
    healthy = [r for r in candidates if r.worker_id not in ejected] or candidates
    return min(healthy, key=lambda r: (outstanding.get(r.worker_id, 0), r.worker_id))


class Outstanding:
    """Requests in progress per worker id (used from the event loop's thread only). A
    ``listener`` hears (worker id, requests left) after each begin and end."""

    def __init__(self, listener: Callable[[str, int], None] | None = None) -> None:
        self._counts: dict[str, int] = {}
        self.listener = listener

    def begin(self, worker_id: str) -> None:
        self._counts[worker_id] = self._counts.get(worker_id, 0) + 1
        if self.listener is not None:
            self.listener(worker_id, self._counts[worker_id])

    def end(self, worker_id: str) -> None:
        left = self._counts.get(worker_id, 0) - 1
        if left > 0:
            self._counts[worker_id] = left
        else:
            self._counts.pop(worker_id, None)
        if self.listener is not None:
            self.listener(worker_id, max(left, 0))

    def counts(self) -> Mapping[str, int]:
        return self._counts


__all__ = ["Outstanding", "Replica", "RoutingTable", "choose_replica"]
