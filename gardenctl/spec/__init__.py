"""The desired state: the garden file's models, its loader and its cross-field checks."""

from gardenctl.spec.loader import LoadedGarden, load_garden, parse_garden
from gardenctl.spec.models import Garden, ModelSpec

__all__ = ["Garden", "LoadedGarden", "ModelSpec", "load_garden", "parse_garden"]
