"""vLLM release ranges: which one a version picks, and what that changes in the estimate."""

from __future__ import annotations

import json

import pytest

from gardenctl.cli import main
from gardenctl.errors import GardenError
from gardenctl.estimate import EstimateRequest, estimate_memory
from gardenctl.estimate.catalog import catalog_metadata, load_catalog
from gardenctl.estimate.releases import NEWEST, RELEASES, parse_version, traits_for
from gardenctl.placement.utilization import claim_bytes, fit_utilization
from gardenctl.planner import gather_estimates
from gardenctl.spec.models import ModelSpec
from gardenctl.units import GiB

CATALOG = load_catalog()
MODEL = "Qwen/Qwen2.5-7B-Instruct"


def estimate(version=None, model=MODEL, **request):
    request.setdefault("max_model_len", 8192)
    return estimate_memory(
        EstimateRequest(model=model, vllm_version=version, **request),
        catalog_metadata(model, CATALOG),
    )


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.19.1", (0, 19, 1)),
        ("0.19", (0, 19, 0)),
        ("v0.32.0", (0, 32, 0)),
        ("0.7.1.dev12+g1234", (0, 7, 1)),
        ("0.6.6.post1", (0, 6, 6)),
        ("0.10.1.1", (0, 10, 1)),
        ("0.11.0rc2", (0, 11, 0)),
    ],
)
def test_versions_parse_with_their_suffixes(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize("text", ["abc", "", "0", "1.x", "0.19.1 extra"])
def test_a_malformed_version_is_an_error_naming_the_expected_form(text):
    with pytest.raises(GardenError) as caught:
        parse_version(text)

    assert "expected X.Y or X.Y.Z" in str(caught.value)


@pytest.mark.parametrize(
    ("version", "label"),
    [
        ("0.6.6", "0.6-0.7"),
        ("0.7.2", "0.6-0.7"),
        ("0.8.0", "0.8-0.10"),
        ("0.10.2", "0.8-0.10"),
        ("0.11.0", "0.11-0.17"),
        ("0.17.1", "0.11-0.17"),
        ("0.18.0", "0.18-0.19"),
        ("0.19.1", "0.18-0.19"),
        ("0.20.0", "0.20-0.27"),
        ("0.27.9", "0.20-0.27"),
        ("0.28.0", "0.28-0.32"),
        ("0.32.0", "0.28-0.32"),
        ("0.32.4", "0.28-0.32"),
    ],
)
def test_each_version_picks_its_range_without_a_note(version, label):
    traits, assumed, note = traits_for(version)

    assert (traits.label, assumed, note) == (label, False, "")


def test_ranges_are_ordered_and_every_one_cites_vllm_source():
    firsts = [t.first for t in RELEASES]

    assert firsts == sorted(firsts)
    for traits in RELEASES:
        assert traits.sources
        assert all("github.com/vllm-project/vllm/blob/v" in s for s in traits.sources)


@pytest.mark.parametrize(
    ("version", "label", "says"),
    [
        (None, "0.28-0.32", "assumed vLLM 0.32.0"),
        ("0.33.0", "0.28-0.32", "newer than the newest modelled release"),
        ("1.2.0", "0.28-0.32", "newer than the newest modelled release"),
        ("0.5.4", "0.6-0.7", "older than every modelled release"),
    ],
)
def test_unknown_versions_map_to_the_nearest_range_with_a_note(version, label, says):
    traits, assumed, note = traits_for(version)

    assert traits.label == label
    assert assumed
    assert says in note


def test_an_estimate_without_a_release_assumes_the_newest_and_warns():
    result = estimate()

    assert result.vllm_version == NEWEST.newest_label == "0.32.0"
    assert result.graphs_in_budget
    assert any("assumed vLLM 0.32" in w and "defaults.vllm_version" in w for w in result.warnings)
    assert not any("assumed vLLM" in w for w in estimate("0.32.0").warnings)


def test_graphs_move_out_of_the_budget_before_0_18():
    new = estimate("0.19.0")
    old = estimate("0.17.0")

    assert new.graphs_in_budget and not old.graphs_in_budget
    # Same capture list (51 sizes) in both ranges: the same graph pool, booked elsewhere.
    assert old.cuda_graph.bytes == new.cuda_graph.bytes > 0
    assert old.budget_bytes == new.budget_bytes - new.cuda_graph.bytes
    assert old.outside_budget_bytes == old.cuda_context.bytes + old.cuda_graph.bytes
    assert new.outside_budget_bytes == new.cuda_context.bytes
    assert old.total_bytes == new.total_bytes
    assert "OUTSIDE the budget" in old.cuda_graph.source


def test_the_claim_of_an_old_release_covers_the_graph_pool_outside_f():
    old = estimate("0.17.0")
    gpu = 80 * GiB

    utilization = fit_utilization(old, gpu, 0.0)
    claim = claim_bytes(utilization, gpu, old.outside_budget_bytes)

    assert utilization * gpu >= old.budget_bytes
    assert claim >= old.total_bytes
    assert utilization < fit_utilization(estimate("0.19.0"), gpu, 0.0)


def test_enforce_eager_leaves_nothing_outside_but_the_context():
    old = estimate("0.10.2", enforce_eager=True)

    assert old.cuda_graph.bytes == 0
    assert old.outside_budget_bytes == old.cuda_context.bytes


def test_piecewise_releases_capture_more_graphs_per_layer():
    piecewise = estimate("0.9.2")  # 67 capture sizes
    full_and_piecewise = estimate("0.19.0")  # 51 sizes

    assert piecewise.cuda_graph.bytes > full_and_piecewise.cuda_graph.bytes
    assert "67 sizes" in piecewise.cuda_graph.source


def test_nccl_is_inside_the_budget_up_to_0_10_at_tp_above_1():
    old = estimate("0.10.2", tensor_parallel_size=2)
    new = estimate("0.11.0", tensor_parallel_size=2)

    assert old.cuda_context.bytes < new.cuda_context.bytes
    assert old.non_torch.bytes > new.non_torch.bytes
    assert old.non_torch.bytes + old.cuda_context.bytes == (
        new.non_torch.bytes + new.cuda_context.bytes
    )


def test_v0_profiles_max_model_len_tokens_over_256_sequences():
    # Row 86 of the calibration data: vLLM 0.7.2 (V0), Qwen2.5-1.5B, max_model_len 32768,
    # activation peak 2.02 GiB; the V1 defaults (8192 tokens, 1024 sequences) say 2.28 GiB.
    v0 = estimate("0.7.2", model="Qwen/Qwen2.5-1.5B-Instruct", max_model_len=32768)
    v1 = estimate("0.19.0", model="Qwen/Qwen2.5-1.5B-Instruct", max_model_len=32768)

    assert "32,768 batched tokens (assumed: V0" in v0.activation.source
    assert abs(v0.activation.bytes / GiB - 2.02) < abs(v1.activation.bytes / GiB - 2.02)
    long_context = estimate("0.7.2", model="Qwen/Qwen2.5-1.5B-Instruct", max_model_len=65536)
    assert "2,048 batched tokens" in long_context.activation.source


def test_an_explicit_batch_overrides_every_release_default():
    v0 = estimate("0.7.2", max_num_batched_tokens=4096, max_num_seqs=128)
    v1 = estimate("0.32.0", max_num_batched_tokens=4096, max_num_seqs=128)

    assert v0.activation.bytes == v1.activation.bytes


def test_baselines_say_which_release_they_were_asked_for():
    result = estimate_memory(
        EstimateRequest(model=MODEL, max_model_len=8192, vllm_version="0.11.0"),
        catalog_metadata(MODEL, CATALOG),
        "model-garden",
    )

    assert result.vllm_version == "0.11.0"
    assert result.vllm_range == "0.11-0.17"


def test_gather_estimates_prefers_the_declared_version_and_adds_the_detection_note():
    declared = ModelSpec(name="a", model=MODEL, max_model_len=8192, vllm_version="0.17.0")
    undeclared = ModelSpec(name="b", model=MODEL, max_model_len=8192)
    asked = []

    def version_of(model):
        asked.append(model.name)
        if model.vllm_version:
            return model.vllm_version, ""
        return None, "the vLLM release could not be detected"

    def reader(ref, revision):
        return catalog_metadata(ref, CATALOG)

    result = gather_estimates([declared, undeclared], "gardenctl", reader, version_of)
    plain = gather_estimates([declared, undeclared], "gardenctl", reader)

    assert asked == ["a", "b"]
    assert result["a"].vllm_version == "0.17.0" and not result["a"].graphs_in_budget
    assert result["b"].vllm_version == "0.32.0"
    assert result["b"].warnings[0].startswith(
        "assumed vLLM 0.32.0: the vLLM release could not be detected; declare it")
    assert plain["a"].vllm_version == "0.17.0"  # the declared version without a version_of
    assert not any("could not be detected" in w for w in plain["b"].warnings)


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exited:
        main(["estimate", *argv])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_cli_json_says_which_release_it_assumed(capsys):
    code, out, _ = run_cli(capsys, MODEL, "--max-model-len", "8192", "-o", "json")
    assumed = json.loads(out)
    code_old, out_old, _ = run_cli(
        capsys, MODEL, "--max-model-len", "8192", "--vllm-version", "0.10.1.1", "-o", "json"
    )
    old = json.loads(out_old)

    assert code == code_old == 0
    assert assumed["vllm_version"] == "0.32.0"
    assert assumed["cuda_graphs_in_budget"] is True
    assert any("assumed vLLM 0.32" in w for w in assumed["warnings"])
    assert old["vllm_version"] == "0.10.1.1"
    assert old["vllm_range"] == "0.8-0.10"
    assert old["cuda_graphs_in_budget"] is False
    gpu = old["per_gpu"]
    assert gpu["outside_budget_bytes"] == gpu["cuda_context_bytes"] + gpu["cuda_graph_bytes"]
    assert gpu["total_bytes"] == gpu["budget_bytes"] + gpu["outside_budget_bytes"]


def test_cli_text_names_the_release_and_where_the_graphs_are(capsys):
    _, out, _ = run_cli(
        capsys, MODEL, "--max-model-len", "8192", "--vllm-version", "0.17.0",
        "--gpu-memory", "80GiB",
    )

    assert "vLLM           0.17.0 (modelled as 0.11-0.17; CUDA graphs OUTSIDE" in out
    assert "CUDA context + " in out and "CUDA graphs" in out.split("claim")[-1]


def test_cli_rejects_a_malformed_version_naming_the_expected_form(capsys):
    code, _, err = run_cli(capsys, MODEL, "--vllm-version", "abc")

    assert code != 0
    assert "--vllm-version" in err and "'abc'" in err and "expected X.Y or X.Y.Z" in err
