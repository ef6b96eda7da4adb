"""Learned profiles: the SQLite store, and sizing a model from a profile instead of the estimate."""

from __future__ import annotations

import multiprocessing
import os
import stat
from dataclasses import replace

import pytest

from gardenctl.estimate import EstimateRequest, estimate_memory
from gardenctl.estimate.catalog import catalog_metadata, load_catalog
from gardenctl.inventory.model import Gpu, Inventory, Node
from gardenctl.profiles.model import Profile, make_key
from gardenctl.profiles.sizing import choose, gpu_name_for, profile_key, sized_estimates
from gardenctl.profiles.store import ProfileStore
from gardenctl.spec.models import ModelSpec
from gardenctl.units import GiB

H100 = "NVIDIA H100 80GB HBM3"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def key(**overrides):
    values = {"model": LLAMA, "revision": None, "vllm_version": "0.19.0", "gpu_name": H100,
              "tensor_parallel_size": 1, "dtype": "auto", "quantization": None,
              "kv_cache_dtype": "auto", "max_num_seqs": None, "max_num_batched_tokens": None,
              "enforce_eager": False}
    values.update(overrides)
    return make_key(**values)


def profile(*, non_kv_gib=16.9, at=1_700_000_000.0, source="worker demo/chat/0", **key_overrides):
    kv = int(57.2 * GiB)
    return Profile(key=key(**key_overrides), gpu_total_bytes=int(79.19 * GiB),
                   gpu_memory_utilization=0.95, weights_bytes=int(14.99 * GiB),
                   non_kv_bytes=int(non_kv_gib * GiB), kv_cache_bytes=kv,
                   kv_cache_tokens=kv // 131072 // 16 * 16, kv_bytes_per_token=131_100,
                   cuda_graph_bytes=int(0.9 * GiB), max_model_len=8192, max_concurrency=57.2,
                   measured_at=at, source=source)


def test_the_store_keeps_one_row_per_key_counts_samples_and_never_shrinks_non_kv(tmp_path):
    store = ProfileStore.in_state(tmp_path)
    assert store.all() == []
    assert not store.path.exists()  # reading creates nothing
    store.record(profile(non_kv_gib=17.0, at=1.0))
    stored = store.record(profile(non_kv_gib=16.5, at=2.0))
    assert stored.samples == 2
    assert stored.non_kv_bytes == int(16.5 * GiB)  # the latest start
    assert stored.sizing_non_kv_bytes == int(17.0 * GiB)  # the largest of the recent
    again = store.record(profile(non_kv_gib=16.5, at=2.0))  # the same run, seen again
    assert again.samples == 2
    store.record(profile(at=3.0, gpu_name="NVIDIA A100-SXM4-80GB"))
    rows = store.all()
    assert [(r.key.gpu_name, r.samples) for r in rows] == [("NVIDIA A100-SXM4-80GB", 1),
                                                           (H100, 2)]
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.forget(LLAMA) == 2 and store.all() == []


def _write_many(path: str, worker: int) -> None:
    store = ProfileStore(path)
    for i in range(20):
        store.record(profile(at=float(worker * 100 + i), source=f"worker w{worker}"))


def test_processes_writing_at_once_lose_no_sample(tmp_path):
    path = str(tmp_path / "profiles.sqlite3")
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_write_many, args=(path, n)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert ProfileStore(path).all()[0].samples == 60


def test_a_damaged_database_is_a_clear_state_error(tmp_path):
    from gardenctl.errors import StateError

    store = ProfileStore.in_state(tmp_path)
    store.path.write_bytes(b"not a database" * 100)
    try:
        store.all()
    except StateError as exc:
        assert "profiles.sqlite3" in str(exc)
    else:
        raise AssertionError("a damaged database was read as empty")


def llama_estimate(**request):
    values = {"model": LLAMA, "max_model_len": 8192, "min_concurrency": 4,
              "vllm_version": "0.19.0"}
    values.update(request)
    return estimate_memory(EstimateRequest(**values), catalog_metadata(LLAMA, load_catalog()))


def test_an_exact_profile_replaces_the_estimate_and_keeps_the_kv_tokens():
    estimate = llama_estimate()
    model = ModelSpec(name="chat", model=LLAMA, max_model_len=8192, min_concurrency=4)
    inventory = Inventory((Node("n", (Gpu("n", 0, H100, int(79.19 * GiB)),)),), "declared")
    version = estimate.vllm_version
    measured = profile(vllm_version=version)
    sized = sized_estimates([model], {"chat": estimate}, inventory, [measured])["chat"]
    assert sized.memory_source == "measured"
    assert sized.memory_note.startswith(f"measured on {H100}, vLLM {version}, 2023-11-14")
    # The footprint outside the KV cache is exactly what vLLM measured...
    assert sized.budget_bytes - sized.kv_cache.bytes == measured.sizing_non_kv_bytes
    assert sized.weights.bytes == measured.weights_bytes
    # ...and the KV cache holds the same tokens at the model's (confirmed) bytes per token.
    assert sized.kv_bytes_per_token == 131072
    assert sized.kv_cache.bytes == estimate.kv_cache.bytes
    assert "confirmed" in sized.kv_bytes_per_token_source


def test_a_measured_per_token_figure_that_disagrees_with_the_layout_wins():
    estimate = llama_estimate()
    measured = replace(profile(), kv_bytes_per_token=2 * 131072)
    model = ModelSpec(name="chat", model=LLAMA, max_model_len=8192, min_concurrency=4)
    inventory = Inventory((Node("n", (Gpu("n", 0, H100, int(79.19 * GiB)),)),), "declared")
    version = estimate.vllm_version
    measured = replace(measured, key=replace(measured.key, vllm_version=version))
    sized = sized_estimates([model], {"chat": estimate}, inventory, [measured])["chat"]
    assert sized.kv_bytes_per_token == 2 * 131072
    assert sized.kv_cache.bytes == 2 * estimate.kv_cache.bytes


def test_a_profile_of_another_release_or_gpu_is_only_a_hint():
    estimate = llama_estimate()
    model = ModelSpec(name="chat", model=LLAMA, max_model_len=8192, min_concurrency=4)
    inventory = Inventory((Node("n", (Gpu("n", 0, H100, int(79.19 * GiB)),)),), "declared")
    other_release = profile(vllm_version="0.8.5")
    sized = sized_estimates([model], {"chat": estimate}, inventory, [other_release])["chat"]
    assert sized.memory_source == "estimate"
    assert sized.budget_bytes == estimate.budget_bytes
    assert sized.memory_note.startswith("hint only (measured on")
    assert "vLLM 0.8.5" in sized.memory_note


def test_no_profile_is_used_when_the_worker_could_land_on_two_gpu_models():
    model = ModelSpec(name="chat", model=LLAMA)
    mixed = Inventory((Node("n", (Gpu("n", 0, H100, 80 * GiB),
                                  Gpu("n", 1, "NVIDIA A100-SXM4-80GB", 80 * GiB))),), "declared")
    assert gpu_name_for(model, mixed) is None
    pinned = ModelSpec(name="chat", model=LLAMA, placement={"node": "n", "gpus": [0]})
    assert gpu_name_for(pinned, mixed) == H100


def test_the_plan_key_and_the_learned_key_agree_on_unset_settings():
    model = ModelSpec(name="chat", model=LLAMA)
    assert profile_key(model, "0.19.0", H100) == key()
    assert choose([profile()], key()).exact is not None
    assert choose([profile()], key(max_num_seqs=64)).exact is None


def measured(**values):
    from gardenctl.profiles.learn import Measured

    fields = {"vllm_version": "0.32.0", "weights_bytes": 4 * GiB, "kv_cache_bytes": 2 * GiB,
              "kv_cache_tokens": 16384, "max_concurrency": 2.0, "cuda_graph_bytes": GiB // 2,
              "non_kv_bytes": 6 * GiB, "gpu_used_bytes": None}
    fields.update(values)
    return Measured(**fields)


def notes(m, claim_gib=8.5, min_concurrency=2):
    from gardenctl.profiles.learn import claim_note

    return claim_note(m, int(claim_gib * GiB), min_concurrency, 131072, 8192, GiB // 2)


def test_status_notes_flag_overruns_idle_claims_and_low_concurrency():
    assert notes(measured()) == []  # needs 6 + 2 + 0.5 GiB of its 8.5: nothing to say
    [over] = notes(measured(gpu_used_bytes=9 * GiB))
    assert over.startswith("holds 0.50 GiB more than it claimed: its neighbours are at risk")
    [idle] = notes(measured(gpu_used_bytes=5 * GiB))
    assert "far less than the 8.50 GiB it claimed: 3.50 GiB could serve other models" in idle
    [low] = notes(measured(max_concurrency=1.5))
    assert low == "maximum concurrency 1.50 is below min_concurrency 2"
    # Without NVML: what its measured footprint needs for min_concurrency, against the claim.
    [spare] = notes(measured(), claim_gib=20)
    assert spare.startswith("needs 8.50 GiB for min_concurrency 2 but claims 20.00 GiB")


def test_a_users_run_that_kept_the_graph_pool_outside_its_budget_is_sized_with_it_inside():
    from gardenctl.profiles.learn import graphs_counted

    # vLLM 0.19 counts the graph pool inside the budget only with the profiler variable, which
    # gardenctl sets for its workers and a user's own run left at its default (off).
    assert graphs_counted("0.19.0", by_gardenctl=True)
    assert not graphs_counted("0.19.0", by_gardenctl=False)
    assert graphs_counted("0.20.0", by_gardenctl=False)
    estimate = llama_estimate(vllm_version="0.19.0")
    assert estimate.graphs_in_budget
    model = ModelSpec(name="chat", model=LLAMA, max_model_len=8192, min_concurrency=4)
    inventory = Inventory((Node("n", (Gpu("n", 0, H100, int(79.19 * GiB)),)),), "declared")
    inside = profile(vllm_version="0.19.0")
    outside = replace(inside, graphs_in_budget=False)
    with_graphs = sized_estimates([model], {"chat": estimate}, inventory, [inside])["chat"]
    without = sized_estimates([model], {"chat": estimate}, inventory, [outside])["chat"]
    assert without.budget_bytes - with_graphs.budget_bytes == inside.cuda_graph_bytes


def test_an_assumed_release_never_takes_a_profile_as_the_truth():
    # No release declared or detected: the estimate assumes the newest; a profile measured
    # under that very release may still be of another one, so it is only a hint.
    estimate = llama_estimate(vllm_version=None)
    assert estimate.vllm_version_assumed
    model = ModelSpec(name="chat", model=LLAMA, max_model_len=8192, min_concurrency=4)
    inventory = Inventory((Node("n", (Gpu("n", 0, H100, int(79.19 * GiB)),)),), "declared")
    same_name = profile(vllm_version=estimate.vllm_version)
    sized = sized_estimates([model], {"chat": estimate}, inventory, [same_name])["chat"]
    assert sized.memory_source == "estimate"
    assert sized.memory_note.startswith("hint only")


@pytest.mark.parametrize("spelling", ["0.19", "v0.19.0", "0.19.0+cu126", "0.19.0"])
def test_release_spellings_key_alike(spelling):
    assert key(vllm_version=spelling).vllm_version == "0.19.0"
    assert key(vllm_version=None).vllm_version == ""


def test_the_learner_reads_from_a_workers_argv_the_key_the_planner_builds_from_its_model():
    from builders import garden_text, plan_for

    from gardenctl.profiles.learn import key_of
    from gardenctl.spec import parse_garden

    models = ("  - {name: a, model: org/a, revision: abc123, dtype: float16, quantization: fp8,\n"
              "     kv_cache_dtype: fp8, max_num_seqs: 64, max_num_batched_tokens: 4096,\n"
              "     enforce_eager: true, tensor_parallel_size: 2,\n"
              "     args: [--enable-prefix-caching, --block-size, '32'],\n"
              "     env: {VLLM_ATTENTION_BACKEND: FLASHINFER, HF_TOKEN: '${HF_TOKEN}'}}\n"
              "  - {name: b, model: org/b}\n")
    text = garden_text(models)
    plan = plan_for(text)
    specs = {s.worker.model: s.worker for s in plan.steps if s.worker is not None}
    for model in parse_garden(text, "garden.yaml").garden.resolved_models():
        learned = key_of(specs[model.name], vllm_version="0.19.0", gpu_name="L4")
        assert learned == profile_key(model, "0.19.0", "L4")
    a = profile_key(parse_garden(text, "garden.yaml").garden.resolved_models()[0], "0.19", "L4")
    assert a.other == "--block-size=32 --enable-prefix-caching VLLM_ATTENTION_BACKEND=FLASHINFER"


def test_a_profile_learned_without_a_flag_is_only_a_hint_for_a_model_that_adds_it():
    estimate = llama_estimate()
    plain = profile(vllm_version="0.19.0")
    model = ModelSpec(name="chat", model=LLAMA, max_model_len=8192, min_concurrency=4,
                      args=["--speculative-config", '{"model": "org/draft"}'])
    inventory = Inventory((Node("n", (Gpu("n", 0, H100, int(79.19 * GiB)),)),), "declared")
    sized = sized_estimates([model], {"chat": estimate}, inventory, [plain])["chat"]
    assert sized.memory_source == "estimate"  # the draft model's weights were never measured


def test_an_outlier_start_stops_counting_after_five_more(tmp_path):
    store = ProfileStore.in_state(tmp_path)
    store.record(profile(non_kv_gib=20.0, at=1.0))  # disturbed by a neighbour
    for at in range(2, 7):
        stored = store.record(profile(non_kv_gib=16.5, at=float(at)))
    assert stored.samples == 6
    assert stored.sizing_non_kv_bytes == int(16.5 * GiB)


def test_graph_capture_beyond_vllms_estimate_is_claimed_outside_the_budget():
    # vLLM 0.19 (row 2 of the calibration data): the budget held a 0.84 GiB estimate, the
    # capture took 0.89 GiB after the KV cache was sized.
    estimate = llama_estimate()
    model = ModelSpec(name="chat", model=LLAMA, max_model_len=8192, min_concurrency=4)
    inventory = Inventory((Node("n", (Gpu("n", 0, H100, int(79.19 * GiB)),)),), "declared")
    exact = replace(profile(vllm_version="0.19.0"), cuda_graph_bytes=int(0.89 * GiB),
                    cuda_graph_estimated_bytes=int(0.84 * GiB))
    plain = replace(exact, cuda_graph_estimated_bytes=None)
    over = sized_estimates([model], {"chat": estimate}, inventory, [exact])["chat"]
    same = sized_estimates([model], {"chat": estimate}, inventory, [plain])["chat"]
    assert over.budget_bytes == same.budget_bytes
    assert over.total_bytes - same.total_bytes == int(0.89 * GiB) - int(0.84 * GiB)
    assert "beyond vLLM's estimate" in over.cuda_graph.source
    # Not in the CUDA context: a capped worker's limit (claim less context) keeps it, and a
    # kept worker's cap does not change when its model is learned.
    assert over.cuda_context == same.cuda_context == estimate.cuda_context
