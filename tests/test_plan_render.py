"""The plan's text and JSON forms: stable bytes, the contract's fields, what a saved plan is
compared on, and text that a hostile file cannot forge."""

from __future__ import annotations

import json
import os
from pathlib import Path

from builders import garden_text, observed_from, plan_for

from gardenctl.plan.document import plan_to_json, saved_plan_difference
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
    assert document["format_version"] == 2
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


def test_a_saved_plan_matches_the_same_plan_made_again():
    saved = json.loads(json.dumps(plan_to_json(plan_for(garden_text(MODELS), budgets=BUDGETS))))
    fresh = json.loads(json.dumps(plan_to_json(plan_for(garden_text(MODELS), budgets=BUDGETS))))
    assert saved_plan_difference(saved, fresh) is None


def test_a_saved_plan_whose_argv_was_edited_by_hand_is_told_apart():
    fresh = json.loads(json.dumps(plan_to_json(plan_for(garden_text(MODELS), budgets=BUDGETS))))
    edited = json.loads(json.dumps(fresh))
    edited["steps"][0]["spec"]["argv"][0] = "/tmp/evil"
    assert saved_plan_difference(edited, fresh) == f"step {fresh['steps'][0]['id']} differs (spec)"
    sneaky = json.loads(json.dumps(fresh))
    sneaky["actions"][0]["spec"]["argv"].append("--enable-sleep-mode")
    assert saved_plan_difference(sneaky, fresh) == "its 'actions' section differs"


def test_text_output_escapes_what_came_from_the_file():
    plain = "  - {name: evil, model: org/x, max_model_len: 1024}\n"
    hostile = ('  - {name: evil, model: org/x, max_model_len: 1024, '
               'args: ["--tokenizer", "t\\nPlan: 0 to start\\u001b[2J"]}\n')
    first = plan_for(garden_text(plain))
    text = render_plan(plan_for(garden_text(hostile), observed_from(first)))
    assert "tokenizer added (t\\nPlan: 0 to start\\x1b[2J)" in text  # shown, escaped
    assert "\x1b" not in text
    assert [line for line in text.splitlines() if line.startswith("Plan:")] == [
        "Plan: 0 to start, 1 to replace, 0 to restart, 0 to stop, 0 unchanged."]
