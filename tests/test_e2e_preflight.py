"""Pre-flight checks at plan, apply and watch: a garden version vLLM would refuse starts
nothing and disturbs nothing running (real CLI, real stand-in workers, a model folder built
from Qwen2.5-7B's published config)."""

from __future__ import annotations

import pytest
from e2e_helpers import garden_at, model
from model_folders import make_model_folder

pytestmark = pytest.mark.e2e

QWEN = "Qwen/Qwen2.5-7B-Instruct"  # max_position_embeddings 32,768, 28 attention heads


@pytest.fixture
def garden(tmp_path):
    with garden_at(tmp_path / "garden") as created:
        yield created


def test_plan_and_apply_refuse_what_vllm_would_refuse_and_leave_running_workers_alone(
        garden, tmp_path):
    folder = make_model_folder(tmp_path, QWEN)
    garden.applied([model("a")])
    running = garden.pids()

    garden.write([model("a"), {"name": "qwen", "model": str(folder), "max_model_len": 65536}])
    plan = garden.run("plan")
    apply = garden.apply()

    for run in (plan, apply):
        assert run.code == 1, str(run)
        assert "garden.yaml:" in run.err and "models[1].max_model_len" in run.err
        assert "65,536 is above the model's limit 32,768" in run.err
    assert garden.pids() == running  # nothing started, nothing stopped
    assert garden.status()["workers"][0]["phase"] == "ready"  # status still shows what runs
