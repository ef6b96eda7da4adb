"""Errors that gardenctl reports to its user.

Every error a person can act on is a `GardenError`: the CLI prints its message and exits 1.
Anything else that escapes is a bug, and the CLI says so. Retry policy is expressed by type:
`TemporaryError` may succeed if tried again later (watch backs off and retries), every other
`GardenError` needs the user to change something.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class GardenError(Exception):
    """A problem the user can fix; its message says what to do."""

    exit_code = 1


class TemporaryError(GardenError):
    """May succeed when tried again (a GPU still releasing memory, a worker still loading)."""


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a garden file, located to the character."""

    message: str
    path: str = ""  # field path, e.g. "models[2].max_model_len"
    file: str = ""
    line: int = 0  # 1-based; 0 when unknown
    column: int = 0  # 1-based; 0 when unknown
    hint: str = ""  # what would be valid / what to do
    severity: str = "error"  # "error" | "warning"

    def location(self) -> str:
        where = self.file or "<garden>"
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        return where

    def format(self) -> str:
        text = f"{self.location()}: {self.severity}: "
        if self.path:
            text += f"{self.path}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text

    def to_json(self) -> dict:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


@dataclass
class SpecError(GardenError):
    """The garden file is not valid. Carries every issue found, not only the first."""

    issues: list[SpecIssue] = field(default_factory=list)
    what: str = "garden file"

    def __post_init__(self) -> None:
        super().__init__(self.__str__())

    def __str__(self) -> str:
        errors = [i for i in self.issues if i.severity == "error"]
        head = f"{len(errors)} error{'s' if len(errors) != 1 else ''} in the {self.what}"
        return head + ":\n" + "\n".join("  " + i.format() for i in self.issues)


class ModelMetadataError(GardenError):
    """A model's config.json or safetensors headers could not be read or understood."""


class InventoryError(GardenError):
    """No GPUs could be discovered or the declared inventory is unusable."""


class GpuReadError(InventoryError, TemporaryError):
    """Reading a GPU failed now (lost from the bus, driver reloading); a later try may work."""


class StateError(GardenError):
    """The state directory is unusable (permissions, corrupt records)."""


class LockHeldError(TemporaryError):
    """Another gardenctl holds the state lock."""


class StalePlanError(GardenError):
    """A saved plan no longer matches the garden file, the inventory or the running workers."""
