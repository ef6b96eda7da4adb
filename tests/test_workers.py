"""Desired workers: vLLM argv (a list, never a shell), environment, identity hashes."""

from __future__ import annotations

from builders import garden_text, plan_for

from gardenctl.argv import flag_name, known_flags

EVERYTHING = """\
  - name: full
    model: Qwen/Qwen2.5-7B-Instruct
    revision: 0123456789abcdef0123456789abcdef01234567
    max_model_len: 8192
    tensor_parallel_size: 2
    dtype: bfloat16
    quantization: fp8
    kv_cache_dtype: fp8
    max_num_seqs: 32
    max_num_batched_tokens: 4096
    enforce_eager: true
    trust_remote_code: true
    host: 0.0.0.0
    served_model_name: chat
    env: {VLLM_API_KEY: "${LAB_KEY}", HF_TOKEN: "${HF_TOKEN}", HF_HOME: /data/hf}
    vllm_command: [/opt/vllm/bin/vllm]
"""


def full_worker():
    plan = plan_for(garden_text(EVERYTHING))
    return plan.steps[0].worker


def test_every_flag_gardenctl_emits_is_accepted_by_vllm_0_32():
    argv = full_worker().argv
    emitted = {flag_name(a) for a in argv} - {None}
    assert emitted, argv
    assert emitted <= known_flags(), emitted - known_flags()


def test_argv_is_the_configured_command_then_serve_model_and_flags():
    w = full_worker()
    assert w.argv[:3] == ("/opt/vllm/bin/vllm", "serve", "Qwen/Qwen2.5-7B-Instruct")
    flags = dict(zip(w.argv[3::2], w.argv[4::2], strict=False))
    assert flags["--port"] == str(w.port) and flags["--host"] == "0.0.0.0"
    assert flags["--served-model-name"] == "chat"
    assert flags["--gpu-memory-utilization"] == f"{w.utilization:.3f}"
    assert flags["--tensor-parallel-size"] == "2"


def test_secrets_stay_references_and_never_reach_argv():
    w = full_worker()
    env = dict(w.env)
    assert env["VLLM_API_KEY"] == "${LAB_KEY}" and env["HF_TOKEN"] == "${HF_TOKEN}"
    assert "--api-key" not in w.argv


def test_environment_pins_gpus_in_nvml_order():
    env = dict(full_worker().env)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS"] == "1"
    assert "VLLM_PORT" not in env


def test_hostile_model_name_stays_one_argv_word():
    text = garden_text("  - {name: x, model: 'org/m; rm -rf / $(id)', max_model_len: 1024}\n")
    worker = plan_for(text).steps[0].worker
    assert worker.argv[2] == "org/m; rm -rf / $(id)"


def test_spec_hash_is_stable_and_changes_with_argv():
    one, two = full_worker(), full_worker()
    assert one.spec_hash == two.spec_hash
    other = plan_for(garden_text(EVERYTHING.replace("max_num_seqs: 32", "max_num_seqs: 64")))
    assert other.steps[0].worker.spec_hash != one.spec_hash


def test_relative_model_path_is_anchored_at_the_garden_file(tmp_path):
    from gardenctl.spec import parse_garden

    loaded = parse_garden(b"name: lab\nmodels: [{name: m, model: ./models/m}]\n",
                          str(tmp_path / "sub" / "garden.yaml"))
    (model,) = loaded.models()
    assert model.model == str(tmp_path / "sub" / "models" / "m")


def test_assigned_ports_skip_ports_other_programs_listen_on():
    from builders import estimate, observed_from

    from gardenctl.inventory.declared import inventory_from_spec
    from gardenctl.planner import make_plan
    from gardenctl.reconcile import Circumstances
    from gardenctl.spec import parse_garden

    text = garden_text("  - {name: a, model: org/a, max_model_len: 1024}\n"
                       "  - {name: b, model: org/b, max_model_len: 1024}\n")
    loaded = parse_garden(text, "garden.yaml")
    inv = inventory_from_spec(loaded.garden.inventory, "declared")
    estimates = {m.name: estimate(4) for m in loaded.garden.resolved_models()}
    running = observed_from(plan_for(text.replace(b"name: b", b"name: zz")))  # a on 8001
    busy = {8002: "pid 2", 8003: "pid 3"}  # never the garden's own live workers' ports
    plan = make_plan(loaded, inv, running, estimates, Circumstances(busy_ports=busy))
    ports = {a.worker_id: a.port for a in plan.steps}
    assert ports["lab/a/0"] == 8001  # a running worker keeps the port it listens on
    assert ports["lab/b/0"] == 8004  # a new one skips ports other programs use

    crashed = observed_from(plan_for(text.replace(b"name: b", b"name: zz")), phase="crashed")
    taken = {8001: "pid 9 (nginx)"}  # taken by another program while a was down
    plan = make_plan(loaded, inv, crashed, estimates, Circumstances(busy_ports=taken))
    ports = {a.worker_id: a.port for a in plan.steps}
    assert ports["lab/a/0"] == 8002  # it moves rather than crash-loop on a port it lost
