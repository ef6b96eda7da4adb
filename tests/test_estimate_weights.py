"""Weights per GPU: exact headers, config arithmetic, names, and the flagged default."""

from __future__ import annotations

import json

import pytest
from model_folders import isolate_hf_cache, make_model_folder, model_tensors

from gardenctl.estimate import EstimateRequest, ModelMetadata, estimate_memory, read_model_metadata
from gardenctl.estimate.architecture import read_architecture
from gardenctl.estimate.catalog import catalog_metadata, load_catalog
from gardenctl.estimate.weights import count_params, infer_missing_widths
from gardenctl.units import GiB

CATALOG = load_catalog()
TEXT_ONLY = sorted(
    model for model, record in CATALOG["models"].items() if "text_config" not in record["config"]
)


def estimate_folder(folder, **request):
    metadata = read_model_metadata(str(folder))
    return estimate_memory(
        EstimateRequest(model=str(folder), max_model_len=4096, **request), metadata
    )


def estimate_catalog(model, **request):
    request.setdefault("max_model_len", 4096)
    return estimate_memory(
        EstimateRequest(model=model, **request), catalog_metadata(model, CATALOG)
    )


def test_weights_are_the_exact_header_bytes(tmp_path):
    folder = make_model_folder(tmp_path, "meta-llama/Llama-3.1-8B-Instruct")

    result = estimate_folder(folder)

    assert result.weights.bytes == sum(
        t.nbytes for t in model_tensors("meta-llama/Llama-3.1-8B-Instruct")
    )
    assert result.weights.source.startswith("exact: safetensors headers")


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallelism_divides_the_weights(tmp_path, tp):
    folder = make_model_folder(tmp_path, "meta-llama/Llama-3.3-70B-Instruct")
    total = sum(t.nbytes for t in model_tensors("meta-llama/Llama-3.3-70B-Instruct"))

    result = estimate_folder(folder, tensor_parallel_size=tp)

    assert result.weights.bytes == -(-total // tp)
    assert result.weights.source.endswith(f"/ TP {tp}")


def test_float32_checkpoint_is_counted_in_the_dtype_vllm_loads(tmp_path):
    folder = make_model_folder(tmp_path, "Qwen/Qwen2.5-1.5B-Instruct", dtype="float32")
    stored = sum(t.nbytes for t in model_tensors("Qwen/Qwen2.5-1.5B-Instruct", dtype="float32"))

    auto = estimate_folder(folder)
    fp32 = estimate_folder(folder, dtype="float32")

    assert auto.weights.bytes == stored // 2  # vLLM casts float32 checkpoints to bfloat16
    assert fp32.weights.bytes == stored


def test_exact_and_config_arithmetic_agree_for_a_dense_model(tmp_path):
    folder = make_model_folder(tmp_path, "Qwen/Qwen2.5-7B-Instruct")
    config = json.loads((folder / "config.json").read_text())

    exact = estimate_folder(folder)
    arithmetic = estimate_memory(
        EstimateRequest(model="x", max_model_len=4096),
        ModelMetadata(ref="x", config=config, config_source="config.json"),
    )

    assert arithmetic.weights.bytes == pytest.approx(exact.weights.bytes, rel=0.001)


@pytest.mark.parametrize("model", TEXT_ONLY)
def test_config_arithmetic_reproduces_published_parameter_counts(model):
    metadata = catalog_metadata(model, CATALOG)
    arch, _ = infer_missing_widths(read_architecture(metadata.config), metadata.published_params)

    counts = count_params(arch)

    assert counts.total == pytest.approx(metadata.published_params, rel=0.01)


@pytest.mark.parametrize(
    ("model", "measured_gib", "tolerance"),
    [
        # vLLM's "Model loading took X GiB" (calibration rows 58, 61, 6, 81, 84, 68; TP 1)
        ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16", 5.38, 0.03),
        ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w8a8", 8.49, 0.02),
        ("RedHatAI/Qwen2.5-7B-Instruct-fp8-dynamic", 8.14, 0.02),
        ("neuralmagic/Meta-Llama-3.1-70B-Instruct-quantized.w8a8", 67.72, 0.02),
        ("Qwen/Qwen2.5-7B-Instruct-AWQ", 5.2, 0.03),
        ("openai/gpt-oss-120b", 64.38, 0.03),  # mxfp4 experts, padded for vLLM's kernel
    ],
)
def test_quantized_weights_from_config_arithmetic_match_vllm(model, measured_gib, tolerance):
    result = estimate_catalog(model)

    assert result.weights.bytes / GiB == pytest.approx(measured_gib, rel=tolerance)


def test_quantized_embeddings_and_lm_head_stay_16_bit():
    w4 = estimate_catalog("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16")
    embeddings_and_head = 2 * 128_256 * 4096 * 2

    assert w4.weights.bytes > embeddings_and_head + 6.98e9 * 0.5


def test_mxfp4_checkpoint_headers_gain_the_kernel_padding(tmp_path):
    folder = make_model_folder(tmp_path, "openai/gpt-oss-20b")
    stored = sum(t.nbytes for t in model_tensors("openai/gpt-oss-20b"))

    result = estimate_folder(folder)

    assert result.weights.bytes > stored
    assert "mxfp4 expert padding" in result.weights.source


def test_online_fp8_quantization_of_a_bf16_checkpoint_halves_the_linear_layers(tmp_path):
    folder = make_model_folder(tmp_path, "Qwen/Qwen2.5-7B-Instruct")

    bf16 = estimate_folder(folder)
    fp8 = estimate_folder(folder, quantization="fp8")

    assert 8.0 * GiB < fp8.weights.bytes < 8.3 * GiB < bf16.weights.bytes
    assert any("quantized by vLLM at load" in w for w in fp8.warnings)


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("someone/Mystery-7B-Instruct", 7e9),
        ("someone/tiny-0.5B", 0.5e9),
        ("someone/Blend-8x7B", 56e9),
        ("someone/Sparse-30B-A3B", 30e9),
        ("someone/Small-135M", 135e6),
    ],
)
def test_name_fallback_guesses_the_parameter_count_and_warns(tmp_path, monkeypatch, model, params):
    isolate_hf_cache(monkeypatch, tmp_path)

    result = estimate_memory(EstimateRequest(model=model), read_model_metadata(model))

    assert result.weights.bytes == int(params * 2)
    assert result.weights.source.startswith("guessed from name")
    assert any("guessed from its name" in w for w in result.warnings)


def test_name_with_awq_is_guessed_at_four_bits(tmp_path, monkeypatch):
    isolate_hf_cache(monkeypatch, tmp_path)
    model = "someone/Mystery-14B-AWQ"

    result = estimate_memory(EstimateRequest(model=model), read_model_metadata(model))

    assert result.weights.bytes == int(14e9 * 0.5625)


def test_unknown_model_gets_a_loudly_flagged_default(tmp_path, monkeypatch):
    isolate_hf_cache(monkeypatch, tmp_path)

    result = estimate_memory(
        EstimateRequest(model="someone/mystery"), read_model_metadata("someone/mystery")
    )

    assert result.weights.source.startswith("DEFAULT")
    assert result.weights.bytes == 7_000_000_000 * 2
    assert any(w.startswith("WEIGHTS ARE A DEFAULT") for w in result.warnings)
    assert any("max_model_len is a DEFAULT" in w for w in result.warnings)
    assert result.max_model_len == 4096


def test_vision_tower_missing_from_the_config_is_counted_from_the_published_total():
    result = estimate_catalog("google/gemma-3-27b-it")

    assert result.weights.bytes == pytest.approx(27.4e9 * 2, rel=0.001)
    assert "vision" in result.weights.source
