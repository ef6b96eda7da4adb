"""`gardenctl estimate`: JSON contract, text table, GPU sizing and clear errors."""

from __future__ import annotations

import json
import math
import struct

import pytest
from model_folders import isolate_hf_cache, make_model_folder, model_tensors

from gardenctl.cli import main
from gardenctl.estimate import ESTIMATE_FORMAT_VERSION
from gardenctl.units import GiB

ITEM_KEYS = ("weights", "kv_cache", "activation", "cuda_graph", "non_torch", "cuda_context")


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    isolate_hf_cache(monkeypatch, tmp_path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["estimate", *argv])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_json_holds_the_itemised_estimate_with_sources(capsys, tmp_path):
    folder = make_model_folder(tmp_path, "meta-llama/Llama-3.1-8B-Instruct")

    code, out, _ = run(capsys, str(folder), "--max-model-len", "8192", "--tp", "2", "-o", "json")
    doc = json.loads(out)

    assert code == 0
    assert doc["format_version"] == ESTIMATE_FORMAT_VERSION
    assert doc["model"] == str(folder)
    assert doc["estimator"] == "gardenctl"
    assert doc["tensor_parallel_size"] == 2
    assert (doc["max_model_len"], doc["max_model_len_source"]) == (8192, "requested")
    assert doc["min_concurrency"] == 1
    assert doc["kv_bytes_per_token"] == 65_536  # 8 KV heads over 2 ranks
    assert "config.json" in doc["kv_bytes_per_token_source"]
    gpu = doc["per_gpu"]
    total = sum(t.nbytes for t in model_tensors("meta-llama/Llama-3.1-8B-Instruct"))
    assert gpu["weights_bytes"] == total // 2
    assert gpu["kv_cache_bytes"] == 65_536 * 8192
    assert gpu["overhead_bytes"] == gpu["non_torch_bytes"] + gpu["cuda_context_bytes"]
    assert gpu["budget_bytes"] == sum(gpu[f"{k}_bytes"] for k in ITEM_KEYS[:-1])
    assert gpu["total_bytes"] == gpu["budget_bytes"] + gpu["cuda_context_bytes"]
    assert sorted(gpu["sources"]) == sorted(ITEM_KEYS)
    assert gpu["sources"]["weights"].startswith("exact: safetensors headers")
    assert "gpu_memory_utilization" not in doc


def test_gpu_memory_adds_utilization_claim_and_policy(capsys):
    code, out, _ = run(
        capsys,
        "Qwen/Qwen2.5-7B-Instruct",
        "--max-model-len",
        "16384",
        "--gpu-memory",
        "80GiB",
        "-o",
        "json",
    )
    doc = json.loads(out)

    assert code == 0
    assert doc["gpu_total_bytes"] == 80 * GiB
    assert doc["policy"] == "fit" and doc["safety_margin"] == 0.05
    need = doc["per_gpu"]["budget_bytes"] * 1.05 / (80 * GiB)
    assert need <= doc["gpu_memory_utilization"] < need + 0.001
    context = doc["per_gpu"]["cuda_context_bytes"]
    assert doc["claim_bytes"] == math.ceil(doc["gpu_memory_utilization"] * 80 * GiB) + context
    assert doc["fits"] is True


def test_model_garden_estimator_defaults_to_the_tiered_policy(capsys):
    code, out, _ = run(
        capsys,
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "--estimator",
        "model-garden",
        "--max-model-len",
        "4096",
        "--gpu-memory",
        "23.5GiB",
        "-o",
        "json",
    )
    doc = json.loads(out)

    assert code == 0
    assert (doc["policy"], doc["gpu_memory_utilization"]) == ("tiered", 0.58)


def test_text_output_is_a_table_with_sources_warnings_and_the_flag_for_vllm(capsys):
    code, out, _ = run(capsys, "someone/Mystery-7B", "--gpu-memory", "24GiB")

    assert code == 0
    for label in (
        "weights",
        "KV cache",
        "activation",
        "CUDA graphs",
        "non-torch",
        "= budget",
        "CUDA context",
        "= total",
    ):
        assert f"  {label}" in out
    assert 'guessed from name "7B"' in out
    assert "warnings:\n  ! weights of someone/Mystery-7B guessed from its name" in out
    assert "  --gpu-memory-utilization 0." in out
    assert "claim " in out


def test_a_worker_too_big_for_the_gpu_is_reported(capsys):
    code, out, _ = run(
        capsys,
        "meta-llama/Llama-3.3-70B-Instruct",
        "--max-model-len",
        "8192",
        "--gpu-memory",
        "24GiB",
    )

    assert code == 0
    assert "does NOT fit" in out


def test_json_output_is_deterministic(capsys):
    first = run(capsys, "google/gemma-3-27b-it", "--gpu-memory", "80GB", "-o", "json")
    second = run(capsys, "google/gemma-3-27b-it", "--gpu-memory", "80GB", "-o", "json")

    assert first == second


def test_bad_gpu_memory_is_a_clear_error(capsys):
    code, out, err = run(capsys, "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory", "80 parsecs")

    assert code == 1
    assert err.startswith("gardenctl: --gpu-memory: ")
    assert "Traceback" not in err and out == ""


def test_missing_model_folder_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, str(tmp_path / "nowhere"))

    assert code == 1
    assert err == (
        f"gardenctl: model folder {tmp_path / 'nowhere'} does not exist; give an existing folder "
        "(with config.json) or a Hugging Face id such as Qwen/Qwen2.5-7B-Instruct\n"
    )


def test_corrupt_header_is_a_clear_error_naming_the_file(capsys, tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=10 * GiB)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 999) + b"{")

    code, _, err = run(capsys, str(folder))

    assert code == 1
    assert f"{folder / 'model.safetensors'}: truncated safetensors header" in err
    assert "internal error" not in err


def test_invalid_tensor_parallel_size_is_a_clear_error(capsys):
    code, _, err = run(capsys, "Qwen/Qwen2.5-7B-Instruct", "--tp", "0")

    assert code == 1
    assert "Invalid value for '--tp'" in err and "x>=1" in err
