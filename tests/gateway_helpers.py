"""Helpers for the gateway's tests: a `gardenctl gateway` child process in front of a Garden
(tests/e2e_helpers.py) of stand-in workers, clients for any gateway's port (also one that
`watch --gateway` runs), its metrics; and fakes of the runtime, state directory and discovery
for the standby keeper's unit tests (`keeper`)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
from e2e_helpers import Garden, free_port, wait_until

from gardenctl.gateway.discovery import GardenView, routing_table, sleeps, stops
from gardenctl.gateway.metrics import Metrics
from gardenctl.gateway.sleepers import Sleepers
from gardenctl.gateway.standby import Policy
from gardenctl.gateway.upstream import Outstanding, Replica, RoutingTable
from gardenctl.observe import ObservedWorker
from gardenctl.runtime.sleepmode import SleepModeError
from gardenctl.vocab import Phase
from gardenctl.workers import DesiredWorker
from gardenctl.workers import Standby as WorkerStandby

START_TIMEOUT = 30.0
GiB = 1024**3


def write_garden(garden: Garden, models: list[dict], gateway: dict | None = None,
                 **write: Any) -> None:
    """garden.yaml with ``models`` and, when given, a `gateway:` section."""
    garden.write(models, **write)
    if gateway is not None:
        with garden.file.open("a") as handle:
            handle.write(f"gateway: {json.dumps(gateway)}\n")


class Endpoint:
    """Clients of a gateway listening on ``port`` of 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "unused", timeout: float = 30) -> openai.OpenAI:
        """An `openai` client of the gateway (no retries: each test sees the first answer)."""
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one plain HTTP request."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=data, headers={
                "Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            connection.close()

    def get(self, path: str) -> tuple[int | None, bytes]:
        try:
            status, _, body = self.request("GET", path)
        except OSError:
            return None, b""
        return status, body

    def models(self) -> set[str]:
        status, body = self.get("/health")
        return set(json.loads(body).get("models", [])) if status == 200 else set()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one series of /metrics (0 when absent)."""
        _, text = self.get("/metrics")
        return metric_value(text.decode(), name, labels)


class Gateway(Endpoint):
    """`gardenctl gateway` running in the background for ``garden`` (a Garden, or a
    WatchedGarden of tests/watch_helpers.py: its folder and environment); a Garden's tear-down
    kills it, else `stop()`; its log goes to gateway-PORT.log in the garden's folder."""

    def __init__(self, garden: Garden | Any, *args: str, port: int | None = None,
                 wait_ok: bool = True) -> None:
        super().__init__(port or free_port())
        self.garden = garden
        self.log_path = garden.root / f"gateway-{self.port}.log"
        argv = [sys.executable, "-m", "gardenctl", "gateway", *args]
        if port is None:
            argv += ["--port", str(self.port)]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(argv, cwd=garden.root, env=garden.env,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        if hasattr(garden, "background"):
            garden.background.append(self.process)
        answered = wait_until(lambda: self.exited() or self.get("/health")[0] is not None,
                              timeout=START_TIMEOUT)
        assert answered and not self.exited(), self.log()
        if wait_ok:
            assert self.get("/health")[0] == 200, self.log()

    def exited(self) -> bool:
        return self.process.poll() is not None

    def log(self) -> str:
        return Path(self.log_path).read_text()

    def stop(self) -> None:
        if not self.exited():
            self.process.kill()
        self.process.wait(timeout=10)


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


# -- fakes for the standby keeper (gardenctl.gateway.sleepers) ---------------------------------

class FakeRuntime:
    """Sleep-mode calls on workers that do as they are told, instantly unless held."""

    def __init__(self, asleep: dict[str, bool]) -> None:
        self.asleep = dict(asleep)
        self.calls: list[tuple[str, str]] = []
        self.fail_wake = False

    def is_sleeping(self, worker_id: str) -> bool | None:
        self.calls.append(("is_sleeping", worker_id))
        return self.asleep.get(worker_id)

    def put_to_sleep(self, worker_id: str) -> None:
        self.calls.append(("sleep", worker_id))
        self.asleep[worker_id] = True

    def wake_up(self, worker_id: str) -> None:
        self.calls.append(("wake", worker_id))
        if self.fail_wake:
            raise SleepModeError(f"/wake_up of {worker_id} answered 500")
        self.asleep[worker_id] = False

    def did(self, action: str) -> list[str]:
        return [w for a, w in self.calls if a == action]


class FakeState:
    def __init__(self) -> None:
        self.written: list[dict] = []
        self.demand: dict[str, float] = {}
        self.demands: list[set[str]] = []  # every version of the demand file written

    def read_standby(self, garden: str) -> dict:
        return {}

    def write_standby(self, garden: str, views: dict) -> None:
        self.written.append({k: v.state for k, v in views.items()})

    def read_demand(self, garden: str) -> dict[str, float]:
        return dict(self.demand)

    def write_demand(self, garden: str, demand: dict[str, float]) -> None:
        self.demand = dict(demand)
        self.demands.append(set(demand))


class FakeDiscovery:
    garden_path = "garden.yaml"

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.state = FakeState()
        self.workers: list = []
        self.watched = True  # a `gardenctl watch` of the garden runs

    def observe(self) -> list:
        return list(self.workers)

    def watch_running(self) -> bool:
        return self.watched


def worker(name: str, *, pid: int = 100, phase: str = "ready", gpus: tuple = (0,),
           mode: str = "sleep", awake: int = 6, asleep: int = 2) -> ObservedWorker:
    spec = DesiredWorker(
        worker_id=f"g/{name}/0", garden="g", model=name, model_ref=f"org/{name}", replica=0,
        node="n", gpus=gpus, host="127.0.0.1", port=1, served_model_name=name,
        utilization=0.5, claim_bytes=awake * GiB, argv=(), env=(), sizing_hash="",
        spec_hash="", start_timeout=60.0, shutdown_timeout=5.0,
        standby=WorkerStandby(1, asleep * GiB, mode))
    return ObservedWorker(spec=spec, phase=Phase(phase), pid=pid)


def view_of(*workers: ObservedWorker, idle_timeout: float = 300.0) -> GardenView:
    ready = {w.spec.served_model_name: (Replica(w.worker_id, w.spec.served_model_name,
                                                "127.0.0.1", 1, standby=sleeps(w)),)
             for w in workers if w.phase == Phase.READY}
    table = RoutingTable("g", frozenset(ready), ready)
    return GardenView(table, usable=True, workers=workers,
                      standby={w.spec.served_model_name: Policy(idle_timeout)
                               for w in workers if sleeps(w)})


def stopper(name: str, *, phase: str = "ready", pid: int = 100, gpus: tuple = (0,),
            awake: int = 6) -> ObservedWorker:
    """A `standby: stop` worker's run (nothing asleep)."""
    return worker(name, pid=pid, phase=phase, gpus=gpus, mode="stop", awake=awake, asleep=0)


def planned(name: str, *, gpus: tuple = (0,), awake: int = 6) -> DesiredWorker:
    """A `standby: stop` worker as the plan places it (running or not)."""
    return stopper(name, gpus=gpus, awake=awake).spec


def stop_view(*running: ObservedWorker, plan: tuple[DesiredWorker, ...] = (),
              idle_timeout: float = 300.0) -> GardenView:
    """An observation of ``running`` workers, with the plan's `standby: stop` workers ``plan``
    (the routing table as discovery makes it: stopped ones not ready)."""
    names = {w.served_model_name for w in plan} | {w.spec.served_model_name for w in running}
    table = routing_table("g", names, running, {}, plan)
    policies = {w.spec.served_model_name: Policy(idle_timeout) for w in running
                if sleeps(w) or stops(w.spec)}
    policies |= {w.served_model_name: Policy(idle_timeout) for w in plan}
    return GardenView(table, usable=True, workers=running, standby=policies, stop_planned=plan)


def keeper(asleep: dict[str, bool]) -> tuple[Sleepers, FakeRuntime, FakeDiscovery, Outstanding]:
    runtime = FakeRuntime({f"g/{k}/0": v for k, v in asleep.items()})
    discovery = FakeDiscovery(runtime)
    outstanding = Outstanding()
    return Sleepers(discovery, Metrics(), outstanding), runtime, discovery, outstanding  # type: ignore[arg-type]


async def observed(sleepers: Sleepers, view: GardenView) -> None:
    """Two observations (a new worker's state is known after the first)."""
    await sleepers.sync(view)
    await sleepers.sync(view)


def run_async(test) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))

