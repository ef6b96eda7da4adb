"""config.json's `architectures` against the registry of the vLLM release that will run.

vLLM loads a model by the first of its `architectures` found in its registry
(vllm/model_executor/models/registry.py, the `_..._MODELS` dictionaries); an architecture it
dropped is listed in `_PREVIOUSLY_SUPPORTED_MODELS` with the last release that had it and is
refused with "Model architecture X was supported in vLLM until vX, and is not supported
anymore"; any other unknown one is refused with "Model architectures [...] are not supported
for now", unless the installed transformers implements it (vLLM's Transformers backend) or the
config's `auto_map` brings custom code. gardenctl ships the registry of one release
(gardenctl/data/vllm-architectures-<release>.txt, scripts/vllm_architectures.py): for that
release and older ones an unknown architecture is an error; for a newer or an unknown release,
only a warning (a newer release may have added it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from gardenctl.errors import GardenError
from gardenctl.estimate.releases import parse_version
from gardenctl.preflight.findings import Finding, error, warning

REGISTRY_RELEASE = "0.13"
REGISTRY_FILE = f"vllm-architectures-{REGISTRY_RELEASE}.txt"


@dataclass(frozen=True)
class Registry:
    release: str
    supported: frozenset[str]
    removed: Mapping[str, str]  # architecture -> last release that had it


@lru_cache(maxsize=1)
def shipped_registry() -> Registry:
    text = resources.files("gardenctl.data").joinpath(REGISTRY_FILE).read_text()
    supported: set[str] = set()
    removed: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            name, _, last = line[1:].partition(" ")
            removed[name] = last.strip()
        else:
            supported.add(line)
    return Registry(REGISTRY_RELEASE, frozenset(supported), removed)


def check_architecture(config: Mapping[str, Any], vllm_version: str | None,
                       version_assumed: bool,
                       registry: Registry | None = None) -> list[Finding]:
    registry = registry or shipped_registry()
    names = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    if not names or any(name in registry.supported for name in names):
        return []
    shown = ", ".join(names)
    version = _parsed(vllm_version) if not version_assumed else None
    for name in names:
        last = registry.removed.get(name)
        if last and version is not None and version <= (_parsed(last) or version):
            return []  # that release still had it
        if last and version is not None:
            return [error("model", f"architecture {name} was removed from vLLM after {last}; "
                          f"this worker runs vLLM {vllm_version}: it refuses to start",
                          hint=f"run vLLM {last} or older for this model "
                          "(vllm_command, vllm_version), or choose another model")]
    if config.get("auto_map"):
        return [warning("model", f"architecture {shown} is not in vLLM {registry.release}'s "
                        "registry; the config's auto_map brings custom code, which vLLM runs "
                        "only through its Transformers backend with trust_remote_code",
                        hint="check that this vLLM release serves it")]
    target = _parsed(registry.release)
    if version is not None and target is not None and version[:2] <= target[:2]:
        # A warning, not an error: vLLM also serves architectures through adapters (a
        # *ForSequenceClassification or *Model of a registered *ForCausalLM) and its
        # Transformers backend, which this list cannot tell.
        return [warning("model", f"architecture {shown} is not in the registry of vLLM "
                        f"{registry.release} or older (this worker runs {vllm_version}): it "
                        "starts only through an adapter or the installed transformers "
                        "(vLLM's Transformers backend)",
                        hint="choose a model of a supported architecture or a newer vLLM")]
    which = (f"vLLM {vllm_version} is newer than {registry.release}" if version is not None
             else "the vLLM release is not known")
    return [warning("model", f"architecture {shown} is not in vLLM {registry.release}'s "
                    f"registry and {which}: it may not be supported",
                    hint="declare vllm_version, or check the model list of your release")]


def _parsed(version: str | None) -> tuple[int, int, int] | None:
    if not version:
        return None
    try:
        return parse_version(version)
    except GardenError:
        return None
