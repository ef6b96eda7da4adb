"""KV-cache bytes per token and per sequence, against vLLM's own numbers (docs/vllm.md
section 14; kv_check in tests/data/model-configs.json)."""

from __future__ import annotations

import pytest

from gardenctl.estimate import EstimateRequest, ModelMetadata, estimate_memory
from gardenctl.estimate.catalog import catalog_metadata, load_catalog

CATALOG = load_catalog()


def estimate(model: str, **request):
    request.setdefault("max_model_len", 8192)
    return estimate_memory(
        EstimateRequest(model=model, **request), catalog_metadata(model, CATALOG)
    )


@pytest.mark.parametrize(
    ("model", "tp", "kv_cache_dtype", "expected"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 1, "auto", 131_072),  # GQA
        ("Qwen/Qwen2.5-7B-Instruct", 1, "auto", 57_344),
        ("Qwen/Qwen2.5-7B-Instruct", 4, "auto", 14_336),  # 4 KV heads over 4 ranks
        ("microsoft/phi-2", 1, "auto", 327_680),  # MHA, head_dim 80
        ("google/gemma-7b", 1, "auto", 458_752),  # head_dim 256 != hidden / heads
        ("meta-llama/Llama-3.3-70B-Instruct", 2, "auto", 163_840),
        ("Qwen/Qwen3-235B-A22B", 4, "auto", 48_128),  # 4 KV heads / TP 4 = 1 per GPU
        ("Qwen/Qwen3-235B-A22B", 8, "auto", 48_128),  # fewer heads than ranks: replicated
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", 4, "auto", 49_152),
        ("openai/gpt-oss-20b", 2, "auto", 24_576),
        ("meta-llama/Llama-3.1-8B-Instruct", 1, "fp8", 65_536),  # fp8 KV halves it
    ],
)
def test_kv_bytes_per_token_per_gpu_match_vllm(model, tp, kv_cache_dtype, expected):
    result = estimate(model, tensor_parallel_size=tp, kv_cache_dtype=kv_cache_dtype)

    assert result.kv_bytes_per_token == expected


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mla_latent_cache_is_not_divided_by_tensor_parallelism(tp):
    result = estimate("deepseek-ai/DeepSeek-V2-Lite-Chat", tensor_parallel_size=tp)

    assert result.kv_bytes_per_token == 27 * (512 + 64) * 2 == 31_104
    assert "MLA" in result.kv_bytes_per_token_source


def test_mla_fp8_ds_mla_stores_656_bytes_per_layer():
    result = estimate("deepseek-ai/DeepSeek-V2-Lite-Chat", kv_cache_dtype="fp8_ds_mla")

    assert result.kv_bytes_per_token == 27 * 656


def test_fp8_kv_cache_halves_the_kv_of_a_sequence():
    full = estimate("Qwen/Qwen2.5-7B-Instruct")
    fp8 = estimate("Qwen/Qwen2.5-7B-Instruct", kv_cache_dtype="fp8_e5m2")

    assert fp8.kv_cache.bytes * 2 == full.kv_cache.bytes


@pytest.mark.parametrize(
    ("model", "slots", "per_layer"),
    [
        ("google/gemma-3-27b-it", 70, 2 * 16 * 128 * 2),  # 62 layers: 10 full + 52 sliding -> 70
        ("google/gemma-3-4b-it", 35, 2 * 4 * 256 * 2),  # 34 layers: 5 full + 29 sliding -> 35
        ("google/gemma-3-12b-it", 48, 2 * 8 * 256 * 2),  # 8 full + 40 sliding: no padding
    ],
)
def test_hybrid_gemma3_layers_are_padded_to_whole_groups(model, slots, per_layer):
    result = estimate(model)

    assert result.kv_bytes_per_token == slots * per_layer
    assert "padding layers" in result.kv_bytes_per_token_source


def test_sliding_window_saves_nothing_when_batched_tokens_reach_max_model_len():
    result = estimate("google/gemma-2-9b-it", max_model_len=8192, max_num_batched_tokens=8192)

    assert result.kv_bytes_per_token == 344_064
    assert result.kv_cache.bytes >= 344_064 * 8192
    assert "saves nothing" in result.kv_cache.source


def test_sliding_layers_hold_only_the_window_when_the_sequence_is_longer():
    long = estimate("openai/gpt-oss-120b", max_model_len=131_072, max_num_batched_tokens=8192)
    per_layer = 2 * 8 * 64 * 2

    full_layers = 18 * 131_072 * per_layer
    sliding_layers = 18 * (8192 + 128 + 16) * per_layer  # window - 1 + batch, +1 block, in blocks
    assert long.kv_cache.bytes == full_layers + sliding_layers


def test_qwen2_sliding_window_is_ignored_when_use_sliding_window_is_false():
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "max_position_embeddings": 32768,
    }
    metadata = ModelMetadata(ref="local", config=config, config_source="config.json")

    result = estimate_memory(EstimateRequest(model="local", max_model_len=32768), metadata)

    assert result.kv_cache.bytes == 57_344 * 32768


def test_kv_cache_holds_min_concurrency_sequences_of_max_model_len():
    one = estimate("meta-llama/Llama-3.1-8B-Instruct", max_model_len=16384)
    four = estimate("meta-llama/Llama-3.1-8B-Instruct", max_model_len=16384, min_concurrency=4)

    assert one.kv_cache.bytes == 131_072 * 16384
    assert four.kv_cache.bytes == 4 * one.kv_cache.bytes


def test_max_model_len_is_rounded_up_to_whole_kv_blocks():
    result = estimate("meta-llama/Llama-3.1-8B-Instruct", max_model_len=1000)

    assert result.kv_cache.bytes == 131_072 * 1008  # 63 blocks of 16 tokens
