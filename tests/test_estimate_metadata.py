"""read_model_metadata: local folders, the offline Hugging Face cache, the built-in catalog."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest
from model_folders import (
    DEFAULT_COMMIT,
    isolate_hf_cache,
    make_hf_cache,
    make_model_folder,
    model_tensors,
    write_safetensors,
)

from gardenctl.errors import ModelMetadataError
from gardenctl.estimate import EstimateRequest, estimate_memory, read_model_metadata
from gardenctl.estimate.safetensors_headers import summarize_remote
from gardenctl.units import GiB


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    return isolate_hf_cache(monkeypatch, tmp_path)


def test_local_folder_gives_exact_bytes_params_and_dtypes_from_sharded_headers(tmp_path):
    folder = make_model_folder(tmp_path, "Qwen/Qwen2.5-7B-Instruct", shard_bytes=4 * GiB)
    tensors = model_tensors("Qwen/Qwen2.5-7B-Instruct")

    metadata = read_model_metadata(str(folder))

    assert (folder / "model.safetensors.index.json").is_file()
    assert metadata.safetensors_bytes == sum(t.nbytes for t in tensors)
    assert metadata.safetensors_params == sum(math.prod(t.shape) for t in tensors)
    assert metadata.safetensors_dtypes == {"BF16": sum(t.nbytes for t in tensors)}
    assert metadata.config["num_key_value_heads"] == 4
    assert metadata.config_source == f"config.json in local folder {folder}"
    assert "4 files" in metadata.safetensors_source


def test_fixture_files_are_sparse(tmp_path):
    folder = make_model_folder(tmp_path, "meta-llama/Llama-3.3-70B-Instruct")

    apparent = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    on_disk = sum(p.stat().st_blocks * 512 for p in folder.glob("*.safetensors"))

    assert apparent > 130 * GiB
    assert on_disk < 64 * 1024 * 1024


def test_single_file_checkpoint_is_read_without_an_index(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=10 * GiB)

    metadata = read_model_metadata(str(folder))

    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert metadata.safetensors_bytes == sum(t.nbytes for t in model_tensors("microsoft/phi-2"))


def test_hf_id_resolves_offline_in_the_cache_through_refs_main(hf_home):
    snapshot = make_hf_cache(hf_home, "Qwen/Qwen2.5-7B-Instruct")

    metadata = read_model_metadata("Qwen/Qwen2.5-7B-Instruct")

    assert metadata.config_source == f"config.json in HF cache {snapshot}"
    assert metadata.safetensors_bytes == sum(
        t.nbytes for t in model_tensors("Qwen/Qwen2.5-7B-Instruct")
    )
    assert metadata.published_params == 7_620_000_000  # the catalog still adds what it knows


def test_hf_cache_resolves_a_commit_given_as_revision(hf_home):
    make_hf_cache(hf_home, "microsoft/phi-2", revision="main", commit="f" * 40)

    metadata = read_model_metadata("microsoft/phi-2", revision="f" * 40)

    assert f"snapshots/{'f' * 40}" in metadata.config_source


def test_hf_hub_cache_variable_wins_over_hf_home(tmp_path, hf_home, monkeypatch):
    other = tmp_path / "elsewhere"
    make_hf_cache(other, "microsoft/phi-2")
    monkeypatch.setenv("HF_HUB_CACHE", str(other / "hub"))

    metadata = read_model_metadata("microsoft/phi-2")

    assert str(other) in metadata.config_source


def test_unknown_revision_is_not_found_and_falls_back_to_the_catalog(hf_home):
    make_hf_cache(hf_home, "microsoft/phi-2")

    metadata = read_model_metadata("microsoft/phi-2", revision="v9")

    assert metadata.config_source == "built-in catalog: config.json values of microsoft/phi-2"
    assert metadata.safetensors_bytes is None


def test_uncached_well_known_model_gets_config_values_from_the_builtin_catalog(hf_home):
    metadata = read_model_metadata("Qwen/Qwen2.5-7B-Instruct")

    assert (
        metadata.config_source == "built-in catalog: config.json values of Qwen/Qwen2.5-7B-Instruct"
    )
    assert metadata.config["hidden_size"] == 3584
    assert any("not in the Hugging Face cache" in note for note in metadata.notes)


def test_quantized_alias_gets_the_base_architecture_and_its_quantization(hf_home):
    metadata = read_model_metadata("redhatai/meta-llama-3.1-8b-instruct-quantized.w4a16")
    estimate = estimate_memory(EstimateRequest(model=metadata.ref, max_model_len=8192), metadata)

    assert metadata.config_source.startswith(
        "built-in catalog: config.json values of meta-llama/Llama-3.1-8B-Instruct"
    )
    assert (
        metadata.config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"]
        == 4
    )
    assert 5.2 * GiB < estimate.weights.bytes < 5.5 * GiB  # vLLM logged 5.38 GiB (row 58)


def test_unknown_model_is_not_an_error_and_says_why(hf_home):
    metadata = read_model_metadata("someone/never-heard-of-it")

    assert metadata.config is None and metadata.safetensors_bytes is None
    assert any("not in the built-in catalog" in note for note in metadata.notes)


def test_missing_local_folder_is_a_note(tmp_path):
    metadata = read_model_metadata(str(tmp_path / "absent"))

    assert metadata.notes == (f"no folder at {tmp_path / 'absent'}",)


def test_truncated_safetensors_header_raises_with_the_file_path(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=10 * GiB)
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": ')

    with pytest.raises(ModelMetadataError) as caught:
        read_model_metadata(str(folder))

    assert str(path) in str(caught.value)
    assert "truncated safetensors header" in str(caught.value)


def test_header_that_is_not_json_raises(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=10 * GiB)
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"nope" + b"\0" * 16)

    with pytest.raises(ModelMetadataError) as caught:
        read_model_metadata(str(folder))

    assert f"{path}: corrupt safetensors header" in str(caught.value)


def test_data_section_shorter_than_the_header_says_raises(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=10 * GiB)
    path = folder / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1)

    with pytest.raises(ModelMetadataError) as caught:
        read_model_metadata(str(folder))

    assert "incomplete download" in str(caught.value)


def test_config_json_that_is_not_json_raises_with_its_path(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2")
    (folder / "config.json").write_text("{oops")

    with pytest.raises(ModelMetadataError) as caught:
        read_model_metadata(str(folder))

    assert str(folder / "config.json") in str(caught.value)


def test_missing_shard_leaves_weights_inexact_with_a_note(tmp_path):
    folder = make_model_folder(tmp_path, "Qwen/Qwen2.5-7B-Instruct", shard_bytes=4 * GiB)
    (folder / "model-00002-of-00004.safetensors").unlink()

    metadata = read_model_metadata(str(folder))

    assert metadata.safetensors_bytes is None
    assert any("1 of 4 safetensors files are missing" in note for note in metadata.notes)


def test_consolidated_checkpoint_beside_hf_shards_is_not_counted_twice(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=1 * GiB)
    (folder / "model.safetensors.index.json").unlink()
    tensors = model_tensors("microsoft/phi-2")
    write_safetensors(folder / "consolidated.safetensors", tensors)

    metadata = read_model_metadata(str(folder))

    assert metadata.safetensors_bytes == sum(t.nbytes for t in tensors)


def test_weight_files_bytes_counts_safetensors_and_bin_files_on_disk(tmp_path):
    folder = make_model_folder(tmp_path, "microsoft/phi-2", shard_bytes=10 * GiB)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        handle.truncate(GiB)

    metadata = read_model_metadata(str(folder))

    assert metadata.weight_files_bytes == (folder / "model.safetensors").stat().st_size + GiB


def test_config_json_without_weights_is_read_and_noted(tmp_path):
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))

    metadata = read_model_metadata(str(folder))

    assert metadata.config == {"hidden_size": 8}
    assert any("no *.safetensors files" in note for note in metadata.notes)


def test_importing_the_estimator_does_not_import_huggingface_hub():
    code = (
        "import sys, gardenctl.estimate; "
        "print('huggingface_hub' in sys.modules, 'pydantic' in sys.modules)"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "False False"


def test_default_commit_constant_is_a_full_sha():
    assert len(DEFAULT_COMMIT) == 40


def test_hub_safetensors_metadata_sums_like_local_headers():
    from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, TensorInfo

    tensors = model_tensors("microsoft/phi-2")
    infos, offset = {}, 0
    for t in tensors:
        infos[t.name] = TensorInfo(
            dtype=t.dtype, shape=list(t.shape), data_offsets=(offset, offset + t.nbytes)
        )
        offset += t.nbytes
    remote = {"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=infos)}

    summary = summarize_remote(remote)

    assert summary.data_bytes == sum(t.nbytes for t in tensors)
    assert summary.tensors == len(tensors)
