"""The gateway's metrics, written in Prometheus' text exposition format (version 0.0.4).

Per model (the served name a request asked for; names the garden does not know are counted
under "_unknown", so a client cannot grow the label set): requests by status code, errors by
kind, requests in flight, request latency (to the last byte, streams included), failovers;
for standby models, wake-ups and their duration, sleeps by reason (idle: past its idle
timeout; evicted: put to sleep to make room for another) and the workers awake now; a
`standby: stop` model's start on demand counts as a wake-up (its cold start included), its stop
as a sleep. Written by
hand: a few counters do not need a client library.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_MODEL = "_unknown"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
WAKE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "gardenctl_gateway_"
SLEEP_REASONS = ("idle", "evicted")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last: +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else _number(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {_number(self.total)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass
class ModelMetrics:
    requests: dict[int, int] = field(default_factory=dict)  # status code -> count
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    in_flight: int = 0
    failovers: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    wakeups: int = 0
    wake: Histogram = field(default_factory=lambda: Histogram(WAKE_BUCKETS))
    sleeps: dict[str, int] = field(default_factory=dict)  # reason -> count




class Metrics:
    """Every series, kept in the event loop's thread (no locks)."""

    def __init__(self) -> None:
        self.models: dict[str, ModelMetrics] = {}
        self.ready_replicas: dict[str, int] = {}
        self.standby_awake: dict[str, int] = {}  # standby model -> workers awake now
        self.refreshes = 0
        self.refresh_errors = 0

    def of(self, model: str) -> ModelMetrics:
        return self.models.setdefault(model, ModelMetrics())

    def know(self, models: Iterable[str]) -> None:
        """Models whose series exist even before their first request (they read 0)."""
        for model in models:
            self.of(model)

    def begin(self, model: str) -> None:
        self.of(model).in_flight += 1

    def finish(self, model: str, status: int, seconds: float, error: str | None = None) -> None:
        entry = self.of(model)
        entry.in_flight -= 1
        entry.requests[status] = entry.requests.get(status, 0) + 1
        entry.latency.observe(seconds)
        if error is not None:
            entry.errors[error] = entry.errors.get(error, 0) + 1

    def woke(self, model: str, seconds: float) -> None:
        entry = self.of(model)
        entry.wakeups += 1
        entry.wake.observe(seconds)

    def slept(self, model: str, reason: str) -> None:
        entry = self.of(model)
        entry.sleeps[reason] = entry.sleeps.get(reason, 0) + 1

    def reject(self, model: str, status: int, error: str) -> None:
        """A request answered by the gateway itself before any worker was involved."""
        self.begin(model)
        self.finish(model, status, 0.0, error)

    def render(self) -> str:
        lines: list[str] = []
        ordered = sorted(self.models.items())

        def family(name: str, kind: str, help_text: str) -> str:
            full = PREFIX + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            return full

        name = family("requests_total", "counter", "Requests answered, by model and status code.")
        for model, m in ordered:
            for code, count in sorted(m.requests.items()):
                lines.append(f'{name}{{{_label(model)},code="{code}"}} {count}')
        name = family("errors_total", "counter",
                      "Requests that failed, by model and kind (the error's code).")
        for model, m in ordered:
            for kind, count in sorted(m.errors.items()):
                lines.append(f'{name}{{{_label(model)},kind="{_escape(kind)}"}} {count}')
        name = family("requests_in_flight", "gauge", "Requests being answered now.")
        for model, m in ordered:
            lines.append(f"{name}{{{_label(model)}}} {m.in_flight}")
        name = family("failovers_total", "counter",
                      "Attempts moved to another replica after a connection failed.")
        for model, m in ordered:
            lines.append(f"{name}{{{_label(model)}}} {m.failovers}")
        name = family("request_duration_seconds", "histogram",
                      "Seconds from a request's arrival to its last byte, streams included.")
        for model, m in ordered:
            lines += m.latency.lines(name, _label(model))
        name = family("wakeups_total", "counter",
                      "Sleeping standby workers woken (stopped ones started) for a request.")
        for model, m in ordered:
            lines.append(f"{name}{{{_label(model)}}} {m.wakeups}")
        name = family("wake_seconds", "histogram",
                      "Seconds from a wake-up's first request to its worker being awake "
                      "(putting idle workers to sleep first included).")
        for model, m in ordered:
            lines += m.wake.lines(name, _label(model))
        name = family("sleeps_total", "counter",
                      "Standby workers put to sleep (or stopped), by reason (idle: past its "
                      "idle_timeout; evicted: to make room for another).")
        for model, m in ordered:
            if model in self.standby_awake or m.sleeps:
                for reason in sorted(set(SLEEP_REASONS) | set(m.sleeps)):
                    lines.append(f'{name}{{{_label(model)},reason="{_escape(reason)}"}} '
                                 f"{m.sleeps.get(reason, 0)}")
        name = family("standby_awake_workers", "gauge",
                      "Standby workers awake now (able to answer at once).")
        for model, count in sorted(self.standby_awake.items()):
            lines.append(f"{name}{{{_label(model)}}} {count}")
        name = family("ready_replicas", "gauge", "Ready workers per served model name.")
        for model, count in sorted(self.ready_replicas.items()):
            lines.append(f"{name}{{{_label(model)}}} {count}")
        name = family("garden_refreshes_total", "counter", "Observations of the garden.")
        lines.append(f"{name} {self.refreshes}")
        name = family("garden_refresh_errors_total", "counter",
                      "Observations of the garden that failed (the last good view stays).")
        lines.append(f"{name} {self.refresh_errors}")
        return "\n".join(lines) + "\n"


def _label(model: str) -> str:
    return f'model="{_escape(model)}"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{value:.1f}"


__all__ = ["CONTENT_TYPE", "SLEEP_REASONS", "UNKNOWN_MODEL", "Histogram", "Metrics",
           "ModelMetrics"]
