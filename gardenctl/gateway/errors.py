"""The gateway's own error answers, in OpenAI's format:
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status clients expect
(the `openai` package maps 401, 404, 503, ... to its exception classes by status).
Errors a worker answers are passed through as they are, status and body."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RETRY_AFTER_S = 1  # what a 503 asks clients to wait: the gateway re-reads the garden every ~1 s


@dataclass(frozen=True)
class GatewayError:
    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=())

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def unauthorized() -> GatewayError:
    return GatewayError(401, "Incorrect or missing API key: send Authorization: Bearer KEY "
                        "with the gateway's key.", "invalid_request_error", "invalid_api_key")


def key_not_set(variable: str) -> GatewayError:
    return GatewayError(503, f"The gateway's api_key refers to ${{{variable}}}, which is not set "
                        "in the gateway's environment; it refuses every request until it is.",
                        "server_error", "gateway_key_not_set",
                        headers=(("Retry-After", str(RETRY_AFTER_S)),))


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", None, param)


def model_not_found(name: str, served: list[str]) -> GatewayError:
    listing = ", ".join(served) if served else "none is ready"
    return GatewayError(404, f"The model `{name}` does not exist in this garden (served: "
                        f"{listing}).", "invalid_request_error", "model_not_found", "model")


def no_ready_replica(name: str) -> GatewayError:
    return GatewayError(503, f"The model `{name}` has no ready worker now (loading, stopped or "
                        "failed: see `gardenctl status`); retry later.", "server_error",
                        "model_not_ready", "model",
                        headers=(("Retry-After", str(RETRY_AFTER_S)),))


def unreachable(name: str, tried: int) -> GatewayError:
    return GatewayError(503, f"No worker of `{name}` answered ({tried} tried: connection "
                        "refused, reset or timed out); retry later.", "server_error",
                        "worker_unreachable", "model",
                        headers=(("Retry-After", str(RETRY_AFTER_S)),))


def wake_timeout(name: str, seconds: float, why: str, *, stopped: bool = False) -> GatewayError:
    """``stopped``: a `standby: stop` model, started (a cold start) rather than woken."""
    doing = ("is stopped (standby: stop) and could not be started" if stopped
             else "is asleep and could not be woken")
    return GatewayError(503, f"The model `{name}` {doing} within {seconds:g} s (the gateway's "
                        f"wake_timeout): {why}; retry later.", "server_error", "wake_timeout",
                        "model", headers=(("Retry-After", str(RETRY_AFTER_S)),))


def wake_failed(name: str, why: str, *, stopped: bool = False) -> GatewayError:
    doing = ("is stopped (standby: stop) and starting it" if stopped
             else "is asleep and waking it")
    return GatewayError(503, f"The model `{name}` {doing} failed: {why}; retry later.",
                        "server_error", "wake_failed", "model",
                        headers=(("Retry-After", str(RETRY_AFTER_S)),))


def stopped_no_watch(name: str) -> GatewayError:
    """A `standby: stop` model that is stopped, where nothing would start it: no Retry-After
    (retrying does not help until a watch runs)."""
    return GatewayError(503, f"The model `{name}` is stopped (standby: stop) and no `gardenctl "
                        "watch` of the garden runs to start it: run `gardenctl watch --gateway` "
                        "(or `watch` beside the gateway).", "server_error", "model_stopped",
                        "model")


def upstream_timeout(name: str, seconds: float) -> GatewayError:
    return GatewayError(504, f"The worker of `{name}` sent nothing for {seconds:g} s "
                        "(the gateway's read_timeout).", "timeout_error", "worker_timeout",
                        "model")


def upstream_failed(name: str, why: str) -> GatewayError:
    return GatewayError(502, f"The worker of `{name}` failed before answering: {why}.",
                        "server_error", "worker_failed", "model")


def unknown_route(method: str, path: str) -> GatewayError:
    return GatewayError(404, f"Invalid URL ({method} {path})", "invalid_request_error",
                        "unknown_url")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"Method {method} is not allowed on {path}",
                        "invalid_request_error", "method_not_allowed")


__all__ = ["RETRY_AFTER_S", "GatewayError", "bad_request", "key_not_set", "method_not_allowed",
           "model_not_found", "no_ready_replica", "stopped_no_watch", "unauthorized",
           "unknown_route", "unreachable", "upstream_failed", "upstream_timeout", "wake_failed",
           "wake_timeout"]
