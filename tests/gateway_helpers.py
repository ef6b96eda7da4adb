"""Helpers for the gateway's end-to-end tests: a `gardenctl gateway` child process in front
of a Garden (tests/e2e_helpers.py) of stand-in workers, clients for it, and its metrics."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
from e2e_helpers import Garden, free_port, wait_until

START_TIMEOUT = 30.0


def write_garden(garden: Garden, models: list[dict], gateway: dict | None = None,
                 **write: Any) -> None:
    """garden.yaml with ``models`` and, when given, a `gateway:` section."""
    garden.write(models, **write)
    if gateway is not None:
        with garden.file.open("a") as handle:
            handle.write(f"gateway: {json.dumps(gateway)}\n")


class Gateway:
    """`gardenctl gateway` running in the background for ``garden`` (killed by its tear-down);
    its log goes to gateway.log in the garden's folder."""

    def __init__(self, garden: Garden, *args: str, port: int | None = None,
                 wait_ok: bool = True) -> None:
        self.garden = garden
        self.port = port or free_port()
        self.log_path = garden.root / f"gateway-{self.port}.log"
        argv = [sys.executable, "-m", "gardenctl", "gateway", *args]
        if port is None:
            argv += ["--port", str(self.port)]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(argv, cwd=garden.root, env=garden.env,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        garden.background.append(self.process)
        answered = wait_until(lambda: self.exited() or self.get("/health")[0] is not None,
                              timeout=START_TIMEOUT)
        assert answered and not self.exited(), self.log()
        if wait_ok:
            assert self.get("/health")[0] == 200, self.log()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def exited(self) -> bool:
        return self.process.poll() is not None

    def log(self) -> str:
        return Path(self.log_path).read_text()

    def client(self, key: str = "unused") -> openai.OpenAI:
        """An `openai` client of the gateway (no retries: each test sees the first answer)."""
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=30)

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


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0
