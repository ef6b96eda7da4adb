"""`gardenctl plan`: the dry run a person reads and a script parses, and its exit codes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path
from textwrap import dedent

import psutil
import pytest
from conftest import REPO
from fake_nvml import NVML_ERROR_DRIVER_NOT_LOADED, FakeGpu, FakeNvml, FakeProcess

GiB = 1024**3

# Two identical GPUs and two models with two identical replicas each: ties everywhere, which
# must still give the same plan byte for byte.
TIES = """\
name: lab
inventory:
  nodes:
    - name: node-a
      gpus: [{name: NVIDIA L4, memory: 24GiB, count: 2}]
models:
  - {name: beta, model: Qwen/Qwen3-0.6B, max_model_len: 4096, replicas: 2}
  - {name: alpha, model: Qwen/Qwen3-0.6B, max_model_len: 4096, replicas: 2}
"""

NOTHING_TO_DO = """\
name: lab
inventory:
  nodes:
    - name: node-a
      gpus: [{name: NVIDIA L4, memory: 24GiB}]
models: []
"""

# A 70B model cannot fit one 24 GiB GPU; the small one can.
ONE_UNPLACEABLE = """\
name: lab
inventory:
  nodes:
    - name: node-a
      gpus: [{name: NVIDIA L4, memory: 24GiB}]
models:
  - {name: small, model: Qwen/Qwen3-0.6B, max_model_len: 4096}
  - {name: huge, model: meta-llama/Llama-3.3-70B-Instruct, max_model_len: 8192}
"""

INVALID = """\
name: lab
models:
  - name: a
    model: org/a
    max_model_lenn: 4096
"""

ACTION_KEYS = {"action", "worker", "model", "node", "gpus", "claim_bytes",
               "gpu_memory_utilization", "cause"}
GPU_KEYS = {"node", "index", "name", "total_bytes", "used_by_others_bytes",
            "claimed_before_bytes", "claimed_after_bytes"}


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(dedent(text))
    return name


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def repo_garden(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The repository's example garden; its workers get HF_TOKEN=${HF_TOKEN}, set here."""
    shutil.copy(REPO / "garden.yaml", workdir / "garden.yaml")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return "garden.yaml"


def test_plan_text_shows_each_action_with_its_cause_and_every_gpu_before_and_after(
        gardenctl, repo_garden):
    result = gardenctl("plan")
    lines = result.out.splitlines()

    assert result.code == 0, result.err
    assert lines[0] == "Plan for garden research-lab (garden.yaml; GPUs declared in garden.yaml)"
    workers = ["research-lab/llama-8b/0", "research-lab/qwen-7b/0",
               "research-lab/qwen-small/0", "research-lab/qwen-small/1"]
    for worker in workers:
        (index,) = [i for i, line in enumerate(lines)
                    if line.split()[1:4] == ["+", "start", worker]]
        assert "workstation GPU" in lines[index] and "claims" in lines[index]
        model = worker.split("/")[1]
        assert lines[index + 1].strip() == f"model {model} added to the garden"
    for gpu in ("workstation GPU 0  NVIDIA L40S  48.0 GiB", "workstation GPU 1  NVIDIA L40S"):
        (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(gpu)]
        assert lines[index + 1].strip().startswith("before [")
        assert lines[index + 2].strip().startswith("after  [")
        assert "claimed" in lines[index + 2] and "free" in lines[index + 2]
    assert lines[-1] == "Plan: 4 to start, 0 to replace, 0 to restart, 0 to stop, 0 unchanged."


def test_plan_json_has_the_contract_fields_and_consistent_gpu_ledgers(gardenctl, repo_garden):
    result = gardenctl("plan", "-o", "json")
    document = json.loads(result.out)

    assert result.code == 0, result.err
    assert document["format_version"] == 2
    assert {a["action"] for a in document["actions"]} == {"start"}
    for action in document["actions"]:
        assert set(action) >= ACTION_KEYS
        assert action["node"] == "workstation" and action["gpus"]
        assert 0 < action["gpu_memory_utilization"] <= 1
        assert action["claim_bytes"] > 0 and action["cause"]
    for gpu in document["gpus"]:
        assert set(gpu) >= GPU_KEYS
        assert gpu["claimed_before_bytes"] == 0  # nothing runs yet
        on_this_gpu = [a["claim_bytes"] for a in document["actions"]
                       if a["node"] == gpu["node"] and gpu["index"] in a["gpus"]]
        assert gpu["claimed_after_bytes"] == sum(on_this_gpu)
        # never over-committed: claims + others + reserve fit the GPU
        assert (gpu["claimed_after_bytes"] + gpu["used_by_others_bytes"]
                + gpu["reserve_bytes"]) <= gpu["total_bytes"]
    assert document["unplaced"] == []


def test_plan_output_is_byte_identical_across_runs(gardenctl_process, workdir):
    write(workdir, "garden.yaml", TIES)

    runs = []
    for seed in ("0", "1"):  # different hash seeds: set and dict order must not leak out
        result = gardenctl_process("plan", "--out", "plan.json", env={"PYTHONHASHSEED": seed})
        assert result.code == 0, result.err
        runs.append((result.out, (workdir / "plan.json").read_bytes()))

    assert runs[0] == runs[1]
    workers = [a["worker"] for a in json.loads(runs[0][1])["actions"]]
    assert sorted(workers) == ["lab/alpha/0", "lab/alpha/1", "lab/beta/0", "lab/beta/1"]


def test_plan_out_saves_the_json_plan_readable_only_by_its_owner(gardenctl, repo_garden,
                                                                 workdir):
    printed = gardenctl("plan", "-o", "json", "--out", "plan.json")
    text = gardenctl("plan", "--out", "saved.json")

    assert printed.code == 0 and text.code == 0
    assert json.loads((workdir / "plan.json").read_text()) == json.loads(printed.out)
    assert json.loads((workdir / "saved.json").read_text()) == json.loads(printed.out)
    for name in ("plan.json", "saved.json"):
        assert stat.S_IMODE((workdir / name).stat().st_mode) == 0o600
    assert text.out.rstrip().endswith(
        "Saved to saved.json; run `gardenctl apply saved.json` to execute it.")


def test_plan_detailed_exitcode_is_2_with_changes_and_0_without(gardenctl_process, workdir):
    write(workdir, "changes.yaml", TIES)
    write(workdir, "nothing.yaml", NOTHING_TO_DO)

    changes = gardenctl_process("plan", "-f", "changes.yaml", "--detailed-exitcode")
    nothing = gardenctl_process("plan", "-f", "nothing.yaml", "--detailed-exitcode")
    plain = gardenctl_process("plan", "-f", "changes.yaml")

    assert (changes.code, changes.err) == (2, "")
    assert "Plan: 4 to start" in changes.out
    assert (nothing.code, nothing.err) == (0, "")
    assert "No changes" in nothing.out
    assert plain.code == 0  # without the flag, pending changes are not an error


def test_plan_with_an_unplaceable_model_exits_1_and_lists_structured_reasons(gardenctl,
                                                                              workdir):
    write(workdir, "garden.yaml", ONE_UNPLACEABLE)

    text = gardenctl("plan")
    result = gardenctl("plan", "-o", "json")
    document = json.loads(result.out)

    assert text.code == 1 and result.code == 1
    assert "Unplaced (1):" in text.out and "! lab/huge/0: not placed" in text.out
    assert [a["worker"] for a in document["actions"]] == ["lab/small/0"]
    (unplaced,) = document["unplaced"]
    assert unplaced["worker"] == "lab/huge/0"
    (reason,) = unplaced["reasons"]
    assert (reason["node"], reason["gpu"], reason["total_bytes"]) == ("node-a", 0, 24 * GiB)
    assert reason["requested_bytes"] > reason["total_bytes"]
    assert reason["code"] and "node-a GPU 0: needs" in reason["message"]


def test_unplaceable_model_exits_1_even_with_detailed_exitcode(gardenctl_process, workdir):
    write(workdir, "garden.yaml", ONE_UNPLACEABLE)

    result = gardenctl_process("plan", "--detailed-exitcode")

    assert result.code == 1  # an error, although lab/small/0 would start
    assert "lab/huge/0" in result.out


@pytest.mark.parametrize("argv", [
    ["plan", "--detailed-exitcode", "--no-such-option"],
    ["plan", "--detailed-exitcode", "-o", "yaml"],
    ["plna", "--detailed-exitcode"],
], ids=["unknown-option", "bad-choice", "unknown-command"])
def test_usage_errors_exit_1_never_2(gardenctl_process, repo_garden, argv):
    result = gardenctl_process(*argv)

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("Usage: gardenctl")
    assert "Error:" in result.err


def test_plan_of_an_invalid_file_exits_1_with_a_located_message(gardenctl_process, workdir):
    write(workdir, "garden.yaml", INVALID)

    result = gardenctl_process("plan", "--detailed-exitcode")

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("gardenctl: 1 error in the garden file:\n"
                                 "  garden.yaml:5:5: error: models[0].max_model_lenn: unknown key")
    assert "did you mean 'max_model_len'?" in result.err
    assert "Traceback" not in result.err and "internal error" not in result.err


def test_plan_starts_nothing_and_leaves_no_state(gardenctl, repo_garden, state_dir):
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}

    result = gardenctl("plan")

    assert result.code == 0
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before
    assert not state_dir.exists()


def test_plan_writes_no_worker_record_into_an_existing_state_dir(gardenctl, repo_garden,
                                                                 state_dir):
    (state_dir / "gardens").mkdir(parents=True)

    result = gardenctl("plan", "-o", "json")

    assert result.code == 0
    assert files_under(state_dir) == []
    assert all(a["action"] == "start" for a in json.loads(result.out)["actions"])


def test_plan_against_the_gpus_nvml_reports_counts_other_processes(gardenctl, workdir,
                                                                   monkeypatch):
    nvml = FakeNvml([FakeGpu("NVIDIA L4", total=24 * GiB, used=3 * GiB,
                             compute=[FakeProcess(pid=31337, usedGpuMemory=3 * GiB)])])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    write(workdir, "garden.yaml", "name: lab\nmodels:\n"
          "  - {name: small, model: Qwen/Qwen3-0.6B, max_model_len: 4096}\n")

    result = gardenctl("plan", "-o", "json")
    document = json.loads(result.out)

    assert result.code == 0, result.err
    assert document["inventory_source"] == "nvml"
    (gpu,) = document["gpus"]
    assert (gpu["name"], gpu["total_bytes"], gpu["used_by_others_bytes"]) == (
        "NVIDIA L4", 24 * GiB, 3 * GiB)
    assert [a["worker"] for a in document["actions"]] == ["lab/small/0"]
    assert nvml.init_count == 0


def test_plan_without_gpus_or_declared_inventory_says_what_to_do(gardenctl, workdir,
                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(init_error=NVML_ERROR_DRIVER_NOT_LOADED))
    write(workdir, "garden.yaml", "name: lab\nmodels: []\n")

    result = gardenctl("plan")

    assert (result.code, result.out) == (1, "")
    assert "NVML: Driver Not Loaded" in result.err and "--inventory FILE" in result.err
    assert os.listdir(workdir) == ["garden.yaml"]


def test_plan_warns_that_a_secret_is_not_set_and_apply_would_not_start_the_worker(
        gardenctl, repo_garden, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")

    result = gardenctl("plan")

    assert result.code == 0, result.err
    lines = result.out.splitlines()
    waiting = [i for i, line in enumerate(lines) if line.split()[1:3] == ["!", "wait"]]
    assert len(waiting) == 4  # every model gets HF_TOKEN from the defaults
    for index in waiting:
        assert "environment variable HF_TOKEN not set" in lines[index + 1]
    assert "4 waiting (see Warnings)" in lines[-1]
    warnings = lines[lines.index("Warnings:"):]
    assert sum("HF_TOKEN not set" in line for line in warnings) == 4
