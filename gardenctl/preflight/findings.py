"""`Finding`: one pre-flight problem of one model, about one of its garden.yaml fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]
# The ModelSpec field a finding is located at in garden.yaml.
Field = Literal["model", "max_model_len", "tensor_parallel_size", "dtype", "quantization", "env"]


@dataclass(frozen=True)
class Finding:
    """An error (vLLM refuses to start) or a warning (it may, or it will run differently)."""

    severity: Severity
    field: Field
    message: str  # with the numbers
    hint: str = ""

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


def error(field: Field, message: str, hint: str = "") -> Finding:
    return Finding("error", field, message, hint)


def warning(field: Field, message: str, hint: str = "") -> Finding:
    return Finding("warning", field, message, hint)
