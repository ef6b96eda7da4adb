"""Fractional placement: which GPUs each worker gets, and its --gpu-memory-utilization."""

from gardenctl.placement.ledger import accepts_new_worker
from gardenctl.placement.model import (
    Assignment,
    Holding,
    LedgerRow,
    Placement,
    Reason,
    Unplaced,
    WorkerRequest,
)
from gardenctl.placement.solver import place

__all__ = [
    "Assignment",
    "Holding",
    "LedgerRow",
    "Placement",
    "Reason",
    "Unplaced",
    "WorkerRequest",
    "accepts_new_worker",
    "place",
]
