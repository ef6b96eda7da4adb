"""config.json numbers outside any sane range: an error before any arithmetic uses them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gardenctl.estimate.architecture import config_out_of_range
from gardenctl.preflight.findings import Finding, error


def check_sane(config: Mapping[str, Any], where: str) -> list[Finding]:
    """One error naming every out-of-range value of ``config`` (read from ``where``)."""
    bad = config_out_of_range(config)
    if not bad:
        return []
    shown = "; ".join(f"{b.key} = {_shown(b.value)} (expected {b.low:,g} to {b.high:,g})"
                      for b in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return [error("model", f"the model's config.json ({where}) has values out of any sane "
                  f"range: {shown}{more}",
                  hint="the file is corrupt or not a model's config.json; re-download it or "
                  "point `model:` at the right folder")]


def _shown(value: Any) -> str:
    text = f"{value:,}" if isinstance(value, int) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
