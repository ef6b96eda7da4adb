"""Whether the model exists on the Hugging Face Hub and whether it is gated.

The Hub is asked only where it can be (huggingface_hub installed, HF_HUB_OFFLINE unset, the
caller allows the network), with a short timeout, through `ask_hub`: one call of
`GET {HF_ENDPOINT}/api/models/{repo}` (huggingface_hub's `model_info`), whose `gated` is false,
"auto" or "manual". A gated repository needs a token in the worker's environment (HF_TOKEN or
HUGGING_FACE_HUB_TOKEN; huggingface_hub also reads the token file `huggingface-cli login`
writes), else vLLM fails with 401/403 when it downloads: a warning, since the token may be
granted elsewhere. Tests pass their own `HubInfo` or point HF_ENDPOINT at a local server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from gardenctl.preflight.findings import Finding, warning

TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HubAnswer:
    """What the Hub said of a repository; `exists` None: it could not be asked or answered."""

    exists: bool | None
    gated: bool = False
    gate: str = ""  # "auto" or "manual" when gated
    detail: str = ""  # why there is no answer


HubInfo = Callable[[str, "str | None"], HubAnswer]


def hub_available() -> bool:
    """huggingface_hub is importable and HF_HUB_OFFLINE is not set."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def ask_hub(repo: str, revision: str | None) -> HubAnswer:
    """The Hub's answer for ``repo`` (HF_ENDPOINT as set now, a short timeout); never raises."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        return HubAnswer(None, detail="huggingface_hub is not installed")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        info = api.model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError:
        return HubAnswer(False, detail=f"revision {revision} not found")
    except RepositoryNotFoundError:
        return HubAnswer(False, detail="repository not found (or private)")
    except Exception as exc:  # noqa: BLE001 - any network failure only means "no answer"
        return HubAnswer(None, detail=f"{type(exc).__name__}: {exc}"[:200])
    gate = info.gated if isinstance(info.gated, str) else ""
    return HubAnswer(True, gated=bool(info.gated), gate=gate)


def check_gated(repo: str, answer: HubAnswer | None, env_names: frozenset[str]) -> list[Finding]:
    if answer is None or not answer.gated:
        return []
    if any(name in env_names for name in TOKEN_NAMES):
        return []
    kind = f" ({answer.gate} approval)" if answer.gate else ""
    return [warning("env", f"{repo} is a gated repository on the Hugging Face Hub{kind} and "
                    "the worker's environment has no HF_TOKEN: vLLM's download fails with "
                    "401/403 unless the model is already in the cache",
                    hint="add HF_TOKEN: ${HF_TOKEN} to env, with a token whose account was "
                    "granted access")]
