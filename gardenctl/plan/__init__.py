"""Plans: steps with causes and dependencies, GPU ledgers, and their text and JSON forms."""

from gardenctl.plan.model import Launch, Needs, Plan, Step, When

__all__ = ["Launch", "Needs", "Plan", "Step", "When"]
