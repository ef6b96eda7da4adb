"""Memory truth end to end: workers are measured from their own vLLM log, the measurement is
learned as a profile, and the next plan sizes the model from it. Real stand-in processes
speaking a chosen vLLM release's start-up lines; the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from e2e_helpers import garden_at, model

from gardenctl.units import GiB

pytestmark = pytest.mark.e2e

LOGS = REPO / "tests" / "data" / "vllm-logs"


@pytest.fixture
def garden(tmp_path):
    with garden_at(tmp_path / "garden") as created:
        yield created


def plan_models(garden) -> dict[str, dict]:
    run = garden.run("plan", "-o", "json")
    assert run.code in (0, 2), str(run)
    return {m["name"]: m for m in run.json()["models"]}


def test_a_worker_is_measured_learned_and_sizes_the_next_plan(garden):
    # The stand-in plays vLLM 0.19.0 whose profile run peaks at 2 GiB: more than the
    # estimate assumes for this small model, as a real release might.
    env = {"STANDIN_VLLM_VERSION": "0.19.0", "STANDIN_VLLM_ACTIVATION": "2GiB"}
    garden.write([model("chat", env=env)])
    assert plan_models(garden)["chat"]["memory_source"] == "estimate"
    run = garden.apply()
    assert run.code == 0, str(run)

    worker = garden.workers()[garden.worker_id("chat")]
    measured = worker["measured"]
    assert measured["vllm_version"] == "0.19.0"
    assert measured["kv_cache_tokens"] > 2048
    assert measured["max_concurrency"] == pytest.approx(measured["kv_cache_tokens"] / 2048,
                                                        abs=0.01)
    # What the log says the worker took outside its KV cache: its weights (1 GiB), the
    # activation peak it was told to have, non-torch memory and the graph pool.
    assert measured["non_kv_bytes"] > measured["weights_bytes"] + 2 * GiB
    # From now on the plan sizes the model from what was measured, but the running worker
    # keeps its claim: learning never restarts a healthy worker.
    assert worker["memory_source"] == "measured"
    assert garden.status()["in_sync"] is True

    profiles = garden.run("profiles", "-o", "json")
    assert profiles.code == 0, str(profiles)
    [learned] = profiles.json()["profiles"]
    assert learned["key"]["model"] == "org/chat-1b"
    assert learned["key"]["vllm_version"] == "0.19.0"
    assert learned["key"]["gpu_name"] == "simulated"
    assert learned["non_kv_bytes"] == measured["non_kv_bytes"]

    sized = plan_models(garden)["chat"]
    assert sized["memory_source"] == "measured"
    assert (sized["vllm_version"], sized["vllm_version_assumed"]) == ("0.19.0", False)
    assert sized["memory_note"].startswith("measured on simulated, vLLM 0.19.0, ")
    text = garden.run("plan")
    assert "measured on simulated, vLLM 0.19.0" in text.out, str(text)


def test_status_flags_a_worker_whose_concurrency_is_below_its_minimum(garden):
    # A budget of 5 GiB (10 GiB x 0.5): weights 1 GiB, activation 0.77, non-torch 0.25, and
    # graphs of 2.5 GiB (told to the stand-in; far more than estimated) leave 0.48 GiB of KV
    # cache: 1.9 sequences of 2,048 tokens at 128 KiB per token. Status says so.
    env = {"STANDIN_VLLM_VERSION": "0.32.0", "STANDIN_VLLM_CUDA_GRAPH": "2.5GiB"}
    garden.applied([model("chat", env=env, min_concurrency=2, gpu_memory_utilization=0.5)])
    worker = garden.workers()[garden.worker_id("chat")]
    assert worker["measured"]["max_concurrency"] < 2
    assert any("below min_concurrency 2" in note for note in worker["memory_notes"])
    text = garden.run("status")
    assert "below min_concurrency 2" in text.out, str(text)
    assert "CLAIMED" in text.out and "MEASURED" in text.out and "ESTIMATED" in text.out


@pytest.mark.parametrize("log,options,per_token,non_kv_gib", [
    # Real log of calibration row 2 (DEBUG): vLLM states the non-KV total itself.
    ("v0.19.0-v1-codellama-7b-debug.log", [], 524_288, 13.57),
    # INFO only: the non-KV part is the log's own utilization x the GPU total, less the KV.
    ("v0.11.0-v1-mistral-small-3.2-24b.log", ["--gpu-memory", "79.19GiB"], 163_840, 47.03),
    # V0 without a banner or args: the model and release come from the options.
    ("v0.7.2-v0-qwen2.5-1.5b.log", ["--model", "Qwen/Qwen2.5-1.5B-Instruct",
                                    "--vllm-version", "0.7.2"], 28_672, 4.92),
])
def test_profiles_import_learns_from_a_start_up_log(garden, log, options, per_token, non_kv_gib):
    run = garden.run("profiles", "import", str(LOGS / log), "--gpu", "NVIDIA H100 80GB HBM3",
                     *options, "-o", "json")
    assert run.code == 0, str(run)
    [profile] = run.json()["imported"]
    # Bytes per token read back from "X.XX GiB" and whole blocks: the model's own figure
    # within rounding.
    assert profile["kv_bytes_per_token"] == pytest.approx(per_token, rel=0.002)
    assert profile["non_kv_bytes"] / GiB == pytest.approx(non_kv_gib, abs=0.01)
    listed = garden.run("profiles")
    assert profile["key"]["model"] in listed.out, str(listed)


@pytest.mark.parametrize("log,missing", [
    ("v0.8.2-v1-llama-3.1-8b.log", "kv_cache_bytes"),  # 0.8 logs no KV memory line at INFO
    ("v0.19.0-failed-free-memory-tp2.log", "weights_bytes"),  # it never loaded
    ("v0.32.0-two-starts.log", "non_kv_bytes"),  # INFO only, and no GPU total given
])
def test_profiles_import_says_what_a_log_lacks_and_learns_nothing(garden, log, missing):
    run = garden.run("profiles", "import", str(LOGS / log), "--gpu", "NVIDIA H100 80GB HBM3")
    assert run.code == 1
    assert "lacks what a profile needs" in run.err and missing in run.err, str(run)
    assert json.loads(garden.run("profiles", "-o", "json").out)["profiles"] == []


def test_a_damaged_profile_database_degrades_to_the_estimate_and_forget_repairs_it(garden):
    garden.write([model("chat")])
    garden.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    database = garden.state / "profiles.sqlite3"
    database.write_bytes(b"not a database" * 100)

    plan = garden.run("plan", "-o", "json")
    assert plan.code in (0, 2), str(plan)
    assert any("sized from the static estimate" in w and "profiles forget" in w
               for w in plan.json()["warnings"])
    run = garden.apply()
    assert run.code == 0, str(run)  # the workers start; only learning is lost
    assert "nothing learned from the workers' start-ups" in run.err
    assert garden.workers()[garden.worker_id("chat")]["phase"] == "ready"

    listed = garden.run("profiles")
    assert listed.code == 1 and "profiles forget" in listed.err
    assert garden.run("profiles", "forget").code == 0
    assert garden.run("profiles", "-o", "json").json()["profiles"] == []


def test_learning_never_restarts_a_capped_worker(garden):
    # A capped worker's limit comes from its claim, which a running worker keeps: the profile
    # learned from it changes the next plan's sizing, not the worker.
    env = {"STANDIN_VLLM_VERSION": "0.32.0", "STANDIN_VLLM_CUDA_GRAPH": "1GiB"}
    garden.applied([model("chat", env=env, memory_cap=True)])
    pid = garden.pids()[garden.worker_id("chat")]
    assert plan_models(garden)["chat"]["memory_source"] == "measured"
    again = garden.apply()
    assert again.code == 0, str(again)
    assert "No changes" in again.out, str(again)
    assert garden.pids()[garden.worker_id("chat")] == pid


def test_a_start_that_failed_for_memory_is_retried_with_what_its_log_taught(garden):
    # The stand-in's graphs take 3.5 GiB (far more than estimated): the KV cache left cannot
    # hold one 2,048-token sequence and vLLM refuses to start, saying how much it lacked.
    env = {"STANDIN_VLLM_VERSION": "0.32.0", "STANDIN_VLLM_CUDA_GRAPH": "3.5GiB"}
    garden.write([model("chat", env=env)])
    first = garden.apply()
    assert first.code == 1, str(first)
    worker = garden.workers()[garden.worker_id("chat")]
    assert worker["cause"] == "kv_cache_too_small", worker
    assert "max_model_len" in worker["hint"]

    plan = garden.run("plan")
    assert "resized after a failed start: the KV cache could not hold one sequence" in plan.out
    assert "gpu-memory-utilization" in plan.out, str(plan)
    second = garden.apply()
    assert second.code == 0, str(second)
    assert garden.workers()[garden.worker_id("chat")]["phase"] == "ready"


def test_on_memory_error_fail_retries_nothing_new(garden):
    env = {"STANDIN_VLLM_VERSION": "0.32.0", "STANDIN_VLLM_CUDA_GRAPH": "3.5GiB"}
    garden.write([model("chat", env=env, on_memory_error="fail")])
    assert garden.apply().code == 1
    plan = garden.run("plan")
    assert "resized after a failed start" not in plan.out, str(plan)
