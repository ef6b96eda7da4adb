"""`read_model_metadata`: the estimator's only I/O (config.json and safetensors headers).

MODEL is a local folder, or a Hugging Face id found OFFLINE in the local cache (HF_HUB_CACHE,
else HF_HOME/hub, else ~/.cache/huggingface/hub, read when called), or, when neither has a
config.json, an entry of the built-in catalog. With `allow_network=True`, huggingface_hub may
fetch config.json and the safetensors headers (HTTP range requests), never the weights.

Missing things are not errors: the metadata says in `notes` what could not be read and why.
Only a corrupt file (a truncated safetensors header, config.json that is not JSON) raises
ModelMetadataError, with the file's path in the message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

from gardenctl.errors import ModelMetadataError
from gardenctl.estimate.catalog import catalog_metadata, load_catalog
from gardenctl.estimate.safetensors_headers import (
    TensorSummary,
    read_header,
    summarize_headers,
    summarize_remote,
)
from gardenctl.estimate.types import ModelMetadata

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_model_metadata(
    model: str, revision: str | None = None, *, allow_network: bool = False
) -> ModelMetadata:
    """What can be read about ``model`` without loading it; see the module docstring."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _read_folder(model, folder, f"local folder {folder}")
    if looks_like_path(model):
        return ModelMetadata(ref=model, notes=(f"no folder at {folder}",))
    if not HF_ID.match(model):
        return ModelMetadata(
            ref=model, notes=(f"{model!r} is neither a local folder nor a Hugging Face id",)
        )
    notes: list[str] = []
    cache_dir = hub_cache_dir()
    snapshot = _cached_snapshot(model, revision, cache_dir)
    found = None
    if snapshot is None:
        notes.append(f"{model} is not in the Hugging Face cache {cache_dir} (offline)")
    else:
        found = _read_folder(model, snapshot, f"HF cache {snapshot}")
        notes.extend(found.notes)
    if (found is None or found.config is None) and allow_network:
        fetched = _fetch(model, revision, cache_dir)
        if fetched.config is not None or fetched.safetensors_bytes is not None:
            found = _merge(fetched, found)
        notes.extend(fetched.notes)
    catalog = load_catalog()
    from_catalog = catalog_metadata(model, catalog)
    if found is not None and found.config is not None:
        return _replace(found, notes=tuple(notes), published=from_catalog)
    if from_catalog is not None:
        notes.append(f"no config.json for {model} was found; using the built-in catalog")
        base = found or ModelMetadata(ref=model)
        return ModelMetadata(
            ref=model,
            config=from_catalog.config,
            config_source=from_catalog.config_source,
            safetensors_bytes=base.safetensors_bytes,
            safetensors_params=base.safetensors_params,
            safetensors_dtypes=base.safetensors_dtypes,
            safetensors_source=base.safetensors_source,
            notes=tuple(notes),
            weight_files_bytes=base.weight_files_bytes,
            published_params=from_catalog.published_params,
            published_params_source=from_catalog.published_params_source,
        )
    if found is not None:
        return _replace(found, notes=tuple(notes), published=None)
    notes.append(f"{model} is not in the built-in catalog")
    return ModelMetadata(ref=model, notes=tuple(notes))


def looks_like_path(model: str) -> bool:
    """True for refs written as paths (/x, ./x, ../x, ~/x, C:\\x), which are never HF ids."""
    return (
        model.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(model)
        or (os.sep != "/" and os.sep in model)
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (not at import time)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _cached_snapshot(model: str, revision: str | None, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of ``model`` at ``revision`` (a branch, tag or commit)."""
    if not (cache_dir / f"models--{model.replace('/', '--')}").is_dir():
        return None  # skip importing huggingface_hub for the common "not cached" case
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    config = try_to_load_from_cache(
        model, "config.json", cache_dir=str(cache_dir), revision=revision
    )
    if isinstance(config, str):
        return Path(config).parent
    try:
        folder = snapshot_download(
            model, revision=revision, cache_dir=str(cache_dir), local_files_only=True
        )
    except (OSError, ValueError):
        return None
    return Path(folder)


def _read_folder(model: str, folder: Path, where: str) -> ModelMetadata:
    notes: list[str] = []
    config = None
    config_path = folder / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
    else:
        notes.append(f"no config.json in {where}")
    files, missing = _safetensors_files(folder)
    summary: TensorSummary | None = None
    if missing:
        notes.append(
            f"{len(missing)} of {len(files) + len(missing)} safetensors files are missing in "
            f"{where} (first: {missing[0]}); exact weights unavailable"
        )
    elif files:
        summary = summarize_headers(read_header(path) for path in files)
    else:
        notes.append(f"no *.safetensors files in {where}")
    weight_files = [
        p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern) if p.exists()
    ]
    n_files = f"{len(files)} file{'s' if len(files) != 1 else ''}"
    return ModelMetadata(
        ref=model,
        config=config,
        config_source=f"config.json in {where}" if config is not None else None,
        **_weights_fields(summary, lambda t: f"safetensors headers ({n_files}, {t:,} tensors) "
                          f"in {where}"),
        notes=tuple(notes),
        weight_files_bytes=sum(p.stat().st_size for p in weight_files) or None,
    )


def _safetensors_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The files vLLM would load (those the index names, else all), and those that are absent."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelMetadataError(f"{index}: corrupt index (no weight_map object)")
        names = sorted({str(name) for name in weight_map.values()})
        present = [folder / name for name in names if (folder / name).exists()]
        missing = [name for name in names if not (folder / name).exists()]
        return present, missing
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE], []
    files = sorted(p for p in folder.glob("*.safetensors") if p.exists())
    regular = [p for p in files if not p.name.startswith("consolidated")]
    return (regular or files), []  # Mistral repos ship both formats; vLLM loads the HF one


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelMetadataError(f"{path}: not valid JSON ({exc}); fix or re-download it") from exc
    except OSError as exc:
        raise ModelMetadataError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if not isinstance(document, dict):
        raise ModelMetadataError(f"{path}: expected a JSON object")
    return document


def _fetch(model: str, revision: str | None, cache_dir: Path) -> ModelMetadata:
    """config.json and the safetensors headers from the Hub (allow_network only; no weights)."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    notes: list[str] = []
    config = config_source = None
    try:
        path = hf_hub_download(model, "config.json", revision=revision, cache_dir=str(cache_dir))
        config = _read_json(Path(path))
        config_source = f"config.json fetched from the Hugging Face Hub ({model})"
    except (OSError, ValueError) as exc:
        notes.append(f"could not fetch config.json of {model}: {type(exc).__name__}: {exc}")
    summary: TensorSummary | None = None
    try:
        remote = get_safetensors_metadata(model, revision=revision)
        summary = summarize_remote(remote.files_metadata)
    except Exception as exc:  # noqa: BLE001 - any Hub failure only means "no exact weights"
        notes.append(f"could not fetch safetensors headers of {model}: {type(exc).__name__}: {exc}")
    return ModelMetadata(
        ref=model,
        config=config,
        config_source=config_source,
        **_weights_fields(summary, lambda t: "safetensors headers from the Hugging Face Hub "
                          f"({t:,} tensors)"),
        notes=tuple(notes),
    )


class _WeightsFields(TypedDict):
    safetensors_bytes: int | None
    safetensors_params: int | None
    safetensors_dtypes: Mapping[str, int]
    safetensors_source: str | None


def _weights_fields(summary: TensorSummary | None,
                    describe: Callable[[int], str]) -> _WeightsFields:
    """ModelMetadata's safetensors fields from a header summary (or None); ``describe`` names
    the source from the number of tensors."""
    if summary is None:
        return {"safetensors_bytes": None, "safetensors_params": None,
                "safetensors_dtypes": {}, "safetensors_source": None}
    return {"safetensors_bytes": summary.data_bytes, "safetensors_params": summary.elements,
            "safetensors_dtypes": summary.dtype_bytes,
            "safetensors_source": describe(summary.tensors)}


def _merge(fetched: ModelMetadata, cached: ModelMetadata | None) -> ModelMetadata:
    if cached is None or cached.safetensors_bytes is None:
        return fetched
    return _replace(
        cached,
        notes=fetched.notes,
        published=None,
        config=fetched.config,
        config_source=fetched.config_source,
    )


def _replace(
    metadata: ModelMetadata,
    *,
    notes: tuple[str, ...],
    published: ModelMetadata | None,
    **changes: Any,
) -> ModelMetadata:
    fields = dict(metadata.__dict__)
    fields.update(changes)
    fields["notes"] = notes
    if published is not None and published.published_params:
        fields["published_params"] = published.published_params
        fields["published_params_source"] = published.published_params_source
    return ModelMetadata(**fields)
