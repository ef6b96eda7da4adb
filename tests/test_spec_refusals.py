"""What a model's `args` and `env` may not say: anything that would make a worker use other GPUs
or other GPU memory than gardenctl's plan assigned it, in every spelling vLLM's parser accepts.

Every garden refused here validated before these rules existed (the flags are real `vllm serve`
flags, the variables plain environment): each test also checks that the same garden without
the offending entry is valid.
"""

from __future__ import annotations

import json

import pytest

from gardenctl.argv import SHORT_FLAGS, known_flags
from gardenctl.errors import SpecError, SpecIssue
from gardenctl.spec import parse_garden
from gardenctl.spec.checks import ARG_RULES, ENV_RULES
from gardenctl.testing.standin_args import SHORT_ALIASES
from gardenctl.workers import MARKER_ENVS

MODEL = "name: lab\nmodels:\n  - name: a\n    model: org/a\n"


def refusal(text: str, line: int) -> SpecIssue:
    """The one error of ``text``, after checking that the garden is valid without ``line``."""
    lines = text.splitlines(keepends=True)
    parse_garden("".join(lines[:line - 1] + lines[line:]).encode(), "garden.yaml")
    with pytest.raises(SpecError) as caught:
        parse_garden(text.encode(), "garden.yaml")
    errors = [i for i in caught.value.issues if i.severity == "error"]
    assert len(errors) == 1, errors
    return errors[0]


ENV_CASES = {
    "CUDA_VISIBLE_DEVICES": "selects the worker's GPUs, which gardenctl sets from its plan",
    "CUDA_DEVICE_ORDER": "changes what GPU indexes mean",
    "NVIDIA_VISIBLE_DEVICES": "selects GPUs in NVIDIA's container runtime",
    "HIP_VISIBLE_DEVICES": "selects AMD GPUs apart from gardenctl's plan",
    "ROCR_VISIBLE_DEVICES": "selects AMD GPUs apart from gardenctl's plan",
    "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS": "CUDA-graph pool is inside",
    "VLLM_PORT": "two workers given the same one collide",
    "GARDENCTL_WORKER_ID": "one of gardenctl's markers",
    "GARDENCTL_SPEC_HASH": "one of gardenctl's markers",
    "GARDENCTL_STATE": "one of gardenctl's markers",
    "GARDENCTL_ANYTHING": "a prefix reserved for gardenctl's own markers",
}


@pytest.mark.parametrize("variable, why", ENV_CASES.items(), ids=list(ENV_CASES))
def test_env_that_overrides_gpus_memory_ports_or_markers_is_refused_at_its_key(variable, why):
    issue = refusal(MODEL + "    env:\n" + f"      {variable}: '0'\n" + "      HF_HOME: /hf\n", 6)

    assert (issue.path, issue.line, issue.column) == (f"models[0].env.{variable}", 6, 7)
    assert issue.message.startswith(f"{variable} ") and why in issue.message
    assert issue.hint


def test_env_refused_in_defaults_is_reported_once_where_it_is_written():
    with pytest.raises(SpecError) as caught:
        parse_garden(b"""\
name: lab
defaults:
  env: {CUDA_VISIBLE_DEVICES: "1"}
models:
  - {name: a, model: org/a}
  - {name: b, model: org/b}
""", "garden.yaml")

    (issue,) = caught.value.issues
    assert (issue.path, issue.line, issue.column) == ("defaults.env.CUDA_VISIBLE_DEVICES", 3, 9)
    assert "placement.gpus" in issue.hint


KV = "sets the KV cache outside --gpu-memory-utilization"
PP = "multiplies the GPUs a worker uses"
DP = "configures data parallelism"
ARG_CASES = {
    # spelling (the line's args) -> (what the message starts with, why)
    "[--pipeline-parallel-size, '2']": ("--pipeline-parallel-size ", PP),
    "[--pipeline-parallel-size=2]": ("--pipeline-parallel-size ", PP),
    "[--pipeline_parallel_size, '2']": ("--pipeline-parallel-size ", PP),
    "[-pp, '2']": ("-pp (--pipeline-parallel-size) ", PP),
    "[-pp=2]": ("-pp (--pipeline-parallel-size) ", PP),
    "[--pipeline-parallel, '2']": ("--pipeline-parallel (vLLM's parser completes it to "
                                   "--pipeline-parallel-size) ", PP),
    "[--prefill-context-parallel-size, '2']": ("--prefill-context-parallel-size ", PP),
    "[-pcp, '2']": ("-pcp (--prefill-context-parallel-size) ", PP),
    "[--data-parallel-size, '2']": ("--data-parallel-size ", DP),
    "[-dp, '2']": ("-dp (--data-parallel-size) ", DP),
    "[--data_parallel_size_local=2]": ("--data-parallel-size-local ", DP),
    "[-dpl, '1']": ("-dpl (--data-parallel-size-local) ", DP),
    "[--data-parallel-backend, ray]": ("--data-parallel-backend ", DP),
    "[--data-parallel-external-lb]": ("--data-parallel-external-lb ", DP),
    "[-dpe]": ("-dpe (--data-parallel-external-lb) ", DP),
    "[--enable-elastic-ep]": ("--enable-elastic-ep ", DP),
    "[--kv-cache-memory-bytes, 8G]": ("--kv-cache-memory-bytes ", KV),
    "[--kv_cache_memory_bytes=8G]": ("--kv-cache-memory-bytes ", KV),
    "[--num-gpu-blocks-override, '4096']": ("--num-gpu-blocks-override ",
                                            "forces the KV cache's size"),
    "[--device-ids, '2,3']": ("--device-ids ", "chooses the worker's GPUs itself"),
    "[--device-memory-utilization, '0.5']": ("--device-memory-utilization ",
                                             "set by gardenctl from the model's "
                                             "`gpu_memory_utilization` field"),
    "[-qawq]": ("-qawq (--quantization) ", "set by gardenctl"),
    # vLLM's Ray executor asks Ray for whole GPUs of its own (docs/vllm.md section 15)
    "[--distributed-executor-backend, ray]": ("--distributed-executor-backend ",
                                              "is set by gardenctl (mp"),
}


@pytest.mark.parametrize("args, expected", ARG_CASES.items(), ids=list(ARG_CASES))
def test_args_that_override_gpus_or_memory_are_refused_in_every_spelling(args, expected):
    start, why = expected

    issue = refusal(MODEL + f"    args: {args}\n" + "    max_model_len: 4096\n", 5)

    assert (issue.path, issue.line, issue.column) == ("models[0].args[0]", 5, 12)
    assert issue.message.startswith(start) and why in issue.message
    assert issue.hint


def test_kv_cache_memory_bytes_message_says_why_and_what_to_do_instead():
    issue = refusal(MODEL + "    args: [--kv-cache-memory-bytes, 8G]\n    max_model_len: 4096\n", 5)

    assert issue.message == ("--kv-cache-memory-bytes sets the KV cache outside "
                             "--gpu-memory-utilization, so the memory gardenctl claimed for the "
                             "worker would be wrong")
    assert "min_concurrency and max_model_len" in issue.hint


def test_refused_args_in_defaults_are_reported_once_where_they_are_written():
    with pytest.raises(SpecError) as caught:
        parse_garden(b"""\
name: lab
defaults:
  args: [--enable-prefix-caching, -dp, '2']
models:
  - {name: a, model: org/a}
  - {name: b, model: org/b}
""", "garden.yaml")

    (issue,) = caught.value.issues
    assert (issue.path, issue.line) == ("defaults.args[1]", 3)


@pytest.mark.parametrize("args", [
    "[--decode-context-parallel-size, '2', -dcp, '2']",
    "[--cpu-offload-gb, '4', --kv-offloading-size, '8']",
    "[--mm-ipc-gpu-memory-gb, '1', --enable-expert-parallel, -ep]",
    "[--no-data-parallel-external-lb, --no-enable-elastic-ep]",
])
def test_flags_that_keep_the_planned_gpus_and_memory_stay_allowed(args):
    loaded = parse_garden((MODEL + f"    args: {args}\n").encode(), "garden.yaml")

    assert loaded.warnings == ()


def test_validate_refuses_a_gpu_override_with_file_line_path_and_reason(gardenctl, workdir):
    (workdir / "garden.yaml").write_text(MODEL + "    env: {CUDA_VISIBLE_DEVICES: '3'}\n"
                                         "    args: [--data-parallel-size, '2']\n")

    text = gardenctl("validate")
    document = json.loads(gardenctl("validate", "-o", "json").out)

    assert text.code == 1
    assert text.err.splitlines()[:2] == [
        "garden.yaml:5:11: error: models[0].env.CUDA_VISIBLE_DEVICES: CUDA_VISIBLE_DEVICES "
        "selects the worker's GPUs, which gardenctl sets from its plan (pin the model's GPUs "
        "with placement.gpus and placement.node instead)",
        "garden.yaml:6:12: error: models[0].args[0]: --data-parallel-size configures data "
        "parallelism: vLLM would start engine ranks on GPUs of their own that gardenctl's plan "
        "never gave the worker (use replicas: gardenctl places each replica on GPUs of its own)",
    ]
    assert [(i["path"], i["line"]) for i in document["issues"]] == [
        ("models[0].env.CUDA_VISIBLE_DEVICES", 5), ("models[0].args[0]", 6)]


# -- the tables stay true to vLLM 0.32 and to gardenctl ----------------------------------------


def test_every_refused_flag_is_a_vllm_serve_flag():
    assert set(ARG_RULES) <= known_flags()


def test_every_data_parallel_flag_of_vllm_is_refused():
    data_parallel = {f for f in known_flags() if f.startswith("--data-parallel-")}

    assert data_parallel and data_parallel <= set(ARG_RULES)


def test_short_flags_are_vllms_and_the_stand_ins():
    listed = {f for f in known_flags() if not f.startswith("--")} - {"-h"}

    assert SHORT_FLAGS == SHORT_ALIASES
    assert set(SHORT_FLAGS) == listed
    assert set(SHORT_FLAGS.values()) <= known_flags()


def test_gardenctls_markers_are_refused_in_env():
    assert set(MARKER_ENVS) <= set(ENV_RULES)


@pytest.mark.parametrize("field", ["revision", "quantization", "served_model_name"])
def test_a_flag_value_that_starts_with_a_dash_is_refused(field):
    issue = refusal(MODEL + f"    {field}: '--trust-remote-code'\n", 5)
    assert issue.line == 5 and issue.path == f"models[0].{field}"
    assert "starts with '-', so vLLM would read it as a flag" in issue.message
