"""The seeds' estimators reproduce their own numbers (model-garden with the tiered policy, ndif)."""

from __future__ import annotations

import pytest
from model_folders import make_model_folder

from gardenctl.errors import GardenError
from gardenctl.estimate import EstimateRequest, ModelMetadata, estimate_memory, read_model_metadata
from gardenctl.placement.utilization import tiered_utilization
from gardenctl.units import GiB, MiB


def model_garden(model: str, max_model_len: int | None, tp: int = 1):
    request = EstimateRequest(model=model, max_model_len=max_model_len, tensor_parallel_size=tp)
    return estimate_memory(request, ModelMetadata(ref=model), "model-garden")


@pytest.mark.parametrize(
    ("model", "max_model_len", "gpu_gib", "expected"),
    [
        ("Qwen/Qwen2.5-VL-3B-Instruct", 4096, 23.5, 0.58),
        ("org/model-1B", 2048, 24, 0.50),
        ("org/model-7B", 4096, 24, 0.88),
        ("org/model-7B", 8192, 24, 0.95),
    ],
)
def test_model_garden_with_tiered_policy_gives_its_documented_utilizations(
    model, max_model_len, gpu_gib, expected
):
    result = model_garden(model, max_model_len)

    assert tiered_utilization(result, int(gpu_gib * GiB)) == expected


def test_model_garden_total_is_size_plus_kv_times_its_margin():
    result = model_garden("org/model-7B", 4096, tp=2)

    size, kv = 14.0, 14.0 / 7.0 * 4.096 * 0.4
    assert result.total_bytes == round((size / 2 + kv) * 1.2 * GiB)
    assert result.weights.bytes == round(7.0 * GiB)
    assert result.kv_cache.bytes == round(kv * GiB)  # not divided by TP
    assert result.non_torch.source == "model-garden x1.2 margin (buffers, CUDA graphs)"
    assert result.cuda_context.bytes == 0


def test_model_garden_sizes_a_local_folder_from_its_weight_files(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=10 * GiB)
    on_disk = (folder / "model.safetensors").stat().st_size

    result = estimate_memory(
        EstimateRequest(model=str(folder), max_model_len=2048),
        read_model_metadata(str(folder)),
        "model-garden",
    )

    assert result.weights.bytes == on_disk
    assert result.weights.source == "model-garden: weight files on disk / 1024**3"


def test_model_garden_defaults_to_7_gb_and_4096_tokens():
    result = model_garden("org/mystery", None)

    assert result.weights.bytes == 7 * GiB
    assert result.max_model_len == 4096
    assert result.warnings


def test_model_garden_floors_tiny_models_at_1_gb():
    assert model_garden("org/model-0.3B", 4096).weights.bytes == GiB


@pytest.mark.parametrize("tp", [1, 2])
def test_ndif_requires_three_times_the_model_plus_512_mib_whatever_the_tp(tp):
    metadata = ModelMetadata(
        ref="m",
        safetensors_bytes=10 * GiB,
        safetensors_dtypes={"BF16": 10 * GiB},
        safetensors_source="safetensors headers",
    )

    result = estimate_memory(EstimateRequest(model="m", tensor_parallel_size=tp), metadata, "ndif")

    assert result.total_bytes == 32_749_125_632 == 3 * 10 * GiB + 512 * MiB
    assert result.weights.bytes == 10 * GiB
    assert result.cuda_context.bytes == 0


def test_ndif_uses_the_same_weights_figure_as_gardenctl(tmp_path):
    folder = make_model_folder(tmp_path, "Qwen/Qwen2.5-7B-Instruct")
    metadata = read_model_metadata(str(folder))
    request = EstimateRequest(model=str(folder), max_model_len=4096)

    ours = estimate_memory(request, metadata)
    ndif = estimate_memory(request, metadata, "ndif")

    assert ndif.total_bytes == 3 * ours.weights.bytes + 512 * MiB


def test_unknown_estimator_is_refused_with_the_valid_names():
    with pytest.raises(GardenError) as caught:
        estimate_memory(EstimateRequest(model="m"), ModelMetadata(ref="m"), "guesswork")

    assert "gardenctl, model-garden, ndif" in str(caught.value)
