"""Reading safetensors headers (never the tensor data) and summing them.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({"name": {"dtype": "BF16", "shape": [...], "data_offsets": [start, end]}, "__metadata__": {...}}),
then the tensor data. Only the first 8 + N bytes are read, so a 140 GiB checkpoint costs a few
kilobytes of I/O. A header that is cut short, too long for its file or not JSON is corrupt: the
error names the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gardenctl.errors import ModelMetadataError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorSummary:
    """Sums over the tensors of one or more safetensors files."""

    data_bytes: int = 0
    elements: int = 0
    tensors: int = 0
    dtype_bytes: Mapping[str, int] = field(default_factory=dict)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of ``path``; ModelMetadataError if it is corrupt."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelMetadataError(
                    f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header "
                    "length); delete it and download it again"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ModelMetadataError(
                    f"{path}: truncated safetensors header (declares {length:,} header bytes, the "
                    f"file has {size:,}); delete it and download it again"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise ModelMetadataError(
            f"{path}: cannot read safetensors header: {exc.strerror or exc}"
        ) from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelMetadataError(f"{path}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ModelMetadataError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _start, end = _offsets(path, name, info)
        if end > data_size:
            raise ModelMetadataError(
                f"{path}: tensor {name!r} ends at byte {end:,} of a {data_size:,}-byte data "
                "section (incomplete download?); delete it and download it again"
            )
    return header


def summarize_headers(headers: Iterable[Mapping[str, Any]]) -> TensorSummary:
    data_bytes = elements = tensors = 0
    per_dtype: dict[str, int] = {}
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            n_bytes = end - start
            data_bytes += n_bytes
            elements += math.prod(info.get("shape") or [])
            tensors += 1
            dtype = str(info.get("dtype", "?"))
            per_dtype[dtype] = per_dtype.get(dtype, 0) + n_bytes
    return TensorSummary(data_bytes, elements, tensors, dict(sorted(per_dtype.items())))


def summarize_remote(files_metadata: Mapping[str, Any]) -> TensorSummary:
    """The same sums from huggingface_hub's `get_safetensors_metadata(...).files_metadata`."""
    headers = []
    for file_metadata in files_metadata.values():
        headers.append(
            {
                name: {
                    "dtype": info.dtype,
                    "shape": list(info.shape),
                    "data_offsets": list(info.data_offsets),
                }
                for name, info in file_metadata.tensors.items()
            }
        )
    return summarize_headers(headers)


def _offsets(path: Path, name: str, info: Any) -> tuple[int, int]:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
        or not isinstance(info.get("dtype"), str)
        or not isinstance(info.get("shape"), list)
    ):
        raise ModelMetadataError(
            f"{path}: corrupt safetensors header (tensor {name!r} lacks a valid dtype, shape or "
            "data_offsets)"
        )
    return offsets[0], offsets[1]
