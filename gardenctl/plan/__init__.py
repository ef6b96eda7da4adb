"""Plans: ordered actions with causes, GPU ledgers, and their text and JSON forms."""

from gardenctl.plan.model import KEEP, REPLACE, START, STOP, Action, Plan

__all__ = ["Action", "KEEP", "Plan", "REPLACE", "START", "STOP"]
