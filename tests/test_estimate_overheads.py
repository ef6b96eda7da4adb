"""Activation peak, CUDA graphs, non-torch memory, CUDA context and max_model_len handling."""

from __future__ import annotations

import pytest

from gardenctl.errors import GardenError
from gardenctl.estimate import EstimateRequest, ModelMetadata, estimate_memory
from gardenctl.estimate.catalog import catalog_metadata, load_catalog
from gardenctl.units import GiB

CATALOG = load_catalog()


def estimate(model="Qwen/Qwen2.5-7B-Instruct", **request):
    request.setdefault("max_model_len", 8192)
    return estimate_memory(
        EstimateRequest(model=model, **request), catalog_metadata(model, CATALOG)
    )


def test_enforce_eager_captures_no_cuda_graphs():
    graphs = estimate()
    eager = estimate(enforce_eager=True)

    assert graphs.cuda_graph.bytes > 0.5 * GiB
    assert eager.cuda_graph.bytes == 0
    assert eager.cuda_graph.source.startswith("enforce_eager")


def test_cuda_context_sits_outside_the_budget():
    result = estimate()

    assert result.total_bytes - result.budget_bytes == result.cuda_context.bytes
    assert result.budget_bytes == (
        result.weights.bytes
        + result.kv_cache.bytes
        + result.activation.bytes
        + result.cuda_graph.bytes
        + result.non_torch.bytes
    )


@pytest.mark.parametrize(
    ("tp", "non_torch_gib", "context_gib"), [(1, 0.27, 0.52), (2, 2.25, 1.56), (8, 2.25, 1.56)]
)
def test_multi_gpu_workers_pay_for_nccl_and_a_bigger_context(tp, non_torch_gib, context_gib):
    result = estimate(tensor_parallel_size=tp)

    assert result.non_torch.bytes / GiB == pytest.approx(non_torch_gib, abs=0.005)
    assert result.cuda_context.bytes / GiB == pytest.approx(context_gib, abs=0.005)


def test_activation_does_not_depend_on_max_model_len():
    short = estimate(max_model_len=2048)
    long = estimate(max_model_len=32768)

    assert short.activation.bytes == long.activation.bytes


def test_activation_grows_with_batched_tokens_and_assumes_8192_when_unset():
    default = estimate()
    small = estimate(max_num_batched_tokens=2048, max_num_seqs=256)
    large = estimate(max_num_batched_tokens=32768)

    assert small.activation.bytes < default.activation.bytes < large.activation.bytes
    assert "8,192 batched tokens (assumed" in default.activation.source
    assert default.activation.bytes == estimate(max_num_batched_tokens=8192).activation.bytes


def test_large_vocabulary_raises_the_activation_peak():
    llama = estimate("meta-llama/Llama-3.1-8B-Instruct")  # 128k vocab
    gemma = estimate("google/gemma-2-9b-it")  # 256k vocab

    assert gemma.activation.bytes > llama.activation.bytes + 1.5 * GiB


def test_moe_models_add_the_fused_moe_workspace():
    result = estimate("Qwen/Qwen3-30B-A3B")

    assert "MoE workspace top-8" in result.activation.source
    assert result.activation.bytes / GiB == pytest.approx(2.68, rel=0.08)  # row 55: 2.68 GiB


def test_max_model_len_defaults_to_the_config_limit_and_says_so():
    result = estimate(max_model_len=None)

    assert result.max_model_len == 32768
    assert result.max_model_len_source.endswith("max_position_embeddings")
    assert result.max_model_len_source.startswith("built-in catalog")


def test_yarn_rope_scaling_extends_the_config_limit():
    config = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "max_position_embeddings": 32768,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
    }
    metadata = ModelMetadata(ref="m", config=config, config_source="config.json")

    result = estimate_memory(EstimateRequest(model="m"), metadata)

    assert result.max_model_len == 131072


def test_max_model_len_without_config_is_a_flagged_default():
    result = estimate_memory(
        EstimateRequest(model="someone/x-7B"), ModelMetadata(ref="someone/x-7B")
    )

    assert result.max_model_len == 4096
    assert result.max_model_len_source.startswith("DEFAULT")


def test_requesting_more_than_the_model_limit_warns():
    result = estimate(max_model_len=65536)

    assert any("exceeds the model's limit 32,768" in w for w in result.warnings)


def test_unknown_dimensions_fall_back_to_a_typical_model_with_a_warning():
    result = estimate_memory(
        EstimateRequest(model="someone/x-7B", max_model_len=4096), ModelMetadata(ref="someone/x-7B")
    )

    assert result.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2  # MHA upper bound of a 7B model
    assert any("typical dense 7.0B model" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tensor_parallel_size", 0, "tensor_parallel_size must be >= 1"),
        ("min_concurrency", 0, "min_concurrency must be >= 1"),
        ("dtype", "float8", "unknown dtype 'float8'"),
        ("kv_cache_dtype", "int3", "unknown kv_cache_dtype 'int3'"),
    ],
)
def test_invalid_requests_are_garden_errors_that_say_what_is_valid(field, value, message):
    with pytest.raises(GardenError) as caught:
        estimate(**{field: value})

    assert message in str(caught.value)


def test_estimates_are_deterministic():
    assert estimate() == estimate()
