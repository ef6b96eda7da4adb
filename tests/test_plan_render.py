"""The plan's text and JSON forms: stable bytes, the contract's fields, round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

from builders import garden_text, observed_from, plan_for

from gardenctl.plan.document import plan_from_json, plan_to_json
from gardenctl.plan.render import render_plan

GOLDEN = Path(__file__).parent / "golden"
MODELS = """\
  - {name: qwen, model: Qwen/Qwen2.5-7B-Instruct, max_model_len: 8192}
  - {name: phi, model: microsoft/phi-2, max_model_len: 2048, replicas: 2}
  - {name: big, model: meta-llama/Llama-3.3-70B-Instruct, max_model_len: 8192}
"""
BUDGETS = {"qwen": 9, "phi": 4, "big": 40}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GARDENCTL_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; GARDENCTL_UPDATE_GOLDEN=1 to accept"


def test_first_plan_text_is_stable():
    check_golden("plan_first.txt", render_plan(plan_for(garden_text(MODELS), budgets=BUDGETS)))


def test_edit_plan_text_is_stable():
    first = plan_for(garden_text(MODELS), budgets=BUDGETS)
    edited = MODELS.replace("replicas: 2", "replicas: 1").replace("8192}\n  - {name: phi",
                                                                  "16384}\n  - {name: phi")
    plan = plan_for(garden_text(edited), observed_from(first), budgets={**BUDGETS, "qwen": 11})
    check_golden("plan_edit.txt", render_plan(plan))


def test_json_has_the_contract_fields():
    document = plan_to_json(plan_for(garden_text(MODELS), budgets=BUDGETS))
    assert document["format_version"] == 1
    action = document["actions"][0]
    for key in ("action", "worker", "model", "node", "gpus", "claim_bytes",
                "gpu_memory_utilization", "cause"):
        assert key in action
    gpu = document["gpus"][0]
    for key in ("node", "index", "name", "total_bytes", "used_by_others_bytes",
                "claimed_before_bytes", "claimed_after_bytes"):
        assert key in gpu
    unplaced = document["unplaced"][0]
    assert unplaced["worker"] == "lab/big/0" and unplaced["reasons"]


def test_same_input_gives_byte_identical_json():
    one = json.dumps(plan_to_json(plan_for(garden_text(MODELS), budgets=BUDGETS)))
    two = json.dumps(plan_to_json(plan_for(garden_text(MODELS), budgets=BUDGETS)))
    assert one == two


def test_saved_plan_round_trips():
    plan = plan_for(garden_text(MODELS), budgets=BUDGETS)
    again = plan_from_json(json.loads(json.dumps(plan_to_json(plan))))
    assert again == plan
