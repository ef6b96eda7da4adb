"""Pre-flight checks (gardenctl.preflight): each rule with its numbers, and through
`gardenctl validate` (file:line of the field, exit 1 for errors, 0 with warnings)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from textwrap import dedent

import pytest
from model_folders import config_json, make_model_folder

from gardenctl.estimate.types import ModelMetadata
from gardenctl.preflight import HubAnswer, ask_hub, check_model, compute_capability
from gardenctl.preflight.architectures import Registry, check_architecture
from gardenctl.spec.models import ModelSpec

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"


def llama31() -> dict:
    config = config_json(LLAMA)
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0,
                              "original_max_position_embeddings": 8192}
    return config


def run(config: dict | None, gpus: tuple[str, ...] = (), version: str | None = "0.13.0",
        env_names: frozenset[str] = frozenset(), hub: HubAnswer | None = None, **fields):
    model = ModelSpec(name="m", model=fields.pop("model", "org/m"), **fields)
    metadata = ModelMetadata(ref=model.model, config=config,
                             config_source="config.json in /models/m" if config else None)
    return check_model(model, metadata, list(gpus), version, version is None, env_names, hub)


def only(findings, field: str):
    chosen = [f for f in findings if f.field == field]
    assert len(chosen) == 1, findings
    return chosen[0]


# -- max_model_len ---------------------------------------------------------------------------

def test_llama_3_1_limit_is_131072_with_llama3_rope_scaling_not_multiplied():
    assert run(llama31(), max_model_len=131072) == []
    found = only(run(llama31(), max_model_len=131073), "max_model_len")
    assert found.severity == "error"
    assert "max_model_len 131,073 is above the model's limit 131,072" in found.message
    assert "max_position_embeddings" in found.message and "131,072 or less" in found.hint


def test_qwen2_5_limit_is_32768_and_yarn_multiplies_the_original_length():
    assert only(run(config_json(QWEN), max_model_len=65536), "max_model_len").severity == "error"
    yarn = config_json(QWEN) | {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}}
    assert run(yarn, max_model_len=131072) == []
    found = only(run(yarn, max_model_len=131073), "max_model_len")
    assert "limit 131,072" in found.message and "yarn" in found.message


def test_allow_long_max_model_len_turns_the_error_into_a_warning():
    found = only(run(config_json(QWEN), max_model_len=65536,
                     env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}), "max_model_len")
    assert found.severity == "warning" and "NaN" in found.message


def test_unset_max_model_len_is_the_model_limit_or_a_plain_unknown():
    assert run(config_json(QWEN)) == []
    config = {k: v for k, v in config_json(QWEN).items() if k != "max_position_embeddings"}
    found = only(run(config), "max_model_len")
    assert found.severity == "warning"
    assert found.message.startswith("max_model_len is unknown: it is not set and the model's "
                                    "config.json")


# -- tensor_parallel_size --------------------------------------------------------------------

def test_tp_3_does_not_divide_32_heads_nor_8_kv_heads():
    findings = run(llama31(), tensor_parallel_size=3)
    messages = [f.message for f in findings if f.field == "tensor_parallel_size"]
    assert any("does not divide the model's 32 attention heads" in m for m in messages)
    assert any("does not divide the model's 8 KV heads" in m for m in messages)
    assert all(f.severity == "error" for f in findings)
    assert "2, 4" in findings[0].hint


def test_tp_above_kv_heads_must_be_a_multiple_of_them():
    config = config_json(QWEN) | {"num_attention_heads": 32}  # 4 KV heads
    assert run(config, tensor_parallel_size=8) == []
    found = run(config | {"num_attention_heads": 36, "num_key_value_heads": 3},
                tensor_parallel_size=4)
    assert any("is not a multiple of the model's 3 KV heads" in f.message for f in found)


# -- dtype and quantization vs the GPU ---------------------------------------------------------

@pytest.mark.parametrize(("gpu", "cc"), [("Tesla T4", 7.5), ("Tesla V100-SXM2-16GB", 7.0),
                                         ("NVIDIA A100-SXM4-80GB", 8.0), ("NVIDIA L40S", 8.9),
                                         ("NVIDIA H100 80GB HBM3", 9.0), ("A10G", 8.6)])
def test_compute_capability_from_the_gpu_name(gpu, cc):
    assert compute_capability(gpu) == cc


@pytest.mark.parametrize("gpu", ["Tesla T4", "Tesla V100"])
def test_bfloat16_before_compute_capability_8(gpu):
    found = only(run(llama31(), (gpu,), dtype="bfloat16"), "dtype")
    assert found.severity == "error" and "needs compute capability 8.0" in found.message
    assert found.hint == "set dtype: float16"
    assert only(run(llama31(), (gpu,)), "dtype").severity == "warning"  # auto: falls back
    assert run(llama31(), (gpu,), dtype="float16") == []


def test_fp8_on_a100_is_weight_only_and_native_on_l40s():
    found = only(run(llama31(), ("NVIDIA A100",), quantization="fp8"), "quantization")
    assert found.severity == "warning" and "Marlin" in found.message
    assert run(llama31(), ("NVIDIA L40S",), quantization="fp8") == []
    refused = only(run(llama31(), ("Tesla T4",), quantization="fp8", dtype="float16"),
                   "quantization")
    assert refused.severity == "error" and "needs compute capability 8.0" in refused.message


def test_a_mixed_fleet_warns_where_only_the_weaker_gpus_cannot():
    found = only(run(llama31(), ("Tesla T4", "NVIDIA H100"), dtype="bfloat16"), "dtype")
    assert found.severity == "warning" and "placement may put" in found.message


def test_quantization_from_the_checkpoint_config_is_checked_too():
    config = llama31() | {"quantization_config": {"quant_method": "fp8"}}
    assert only(run(config, ("Tesla V100",), dtype="float16"), "quantization").is_error


def test_unknown_quantization_name():
    found = only(run(llama31(), quantization="gptqq"), "quantization")
    assert found.severity == "error" and "did you mean 'gptq'" in found.hint


# -- architecture ---------------------------------------------------------------------------

def test_an_architecture_missing_from_the_registry_is_a_warning_that_names_the_release():
    # Never an error: vLLM also serves architectures through adapters and its Transformers
    # backend, which the registry list cannot tell (a false error would block apply).
    config = llama31() | {"architectures": ["NoSuchModelForCausalLM"]}
    known = only(run(config, version="0.11.2"), "model")
    assert known.severity == "warning" and "registry of vLLM 0.13 or older" in known.message
    assert only(run(config, version="0.32.0"), "model").severity == "warning"
    assert only(run(config, version=None), "model").severity == "warning"
    assert run(llama31(), version="0.13.0") == []


def test_removed_architecture_names_its_last_release():
    registry = Registry("0.13", frozenset({"LlamaForCausalLM"}), {"OldForCausalLM": "0.10.2"})
    config = {"architectures": ["OldForCausalLM"]}
    found = check_architecture(config, "0.11.0", False, registry)
    assert found[0].is_error and "removed from vLLM after 0.10.2" in found[0].message
    assert check_architecture(config, "0.10.1", False, registry) == []  # it still had it


def test_the_shipped_registry_is_generated_by_the_script(tmp_path):
    import subprocess
    import sys

    registry = tmp_path / "registry.py"
    registry.write_text(dedent('''\
        _TEXT_GENERATION_MODELS = {
            "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
            # a comment
            "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
        }
        _PREVIOUSLY_SUPPORTED_MODELS = {"Phi3SmallForCausalLM": "0.9.2"}
        '''))
    script = Path(__file__).resolve().parents[1] / "scripts" / "vllm_architectures.py"
    out = subprocess.run([sys.executable, str(script), str(registry), "9.9", "test"],
                         capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert lines == ["LlamaForCausalLM", "Qwen2ForCausalLM", "-Phi3SmallForCausalLM 0.9.2"]


# -- sane ranges, references, the Hub --------------------------------------------------------

def test_a_hostile_config_is_a_clear_error_never_a_memory_error():
    config = llama31() | {"num_hidden_layers": 10**12, "max_position_embeddings": 2**80}
    found = run(config, max_model_len=4096, tensor_parallel_size=3)
    assert len(found) == 1 and found[0].is_error
    assert "num_hidden_layers = 1,000,000,000,000" in found[0].message


def test_a_missing_local_folder_is_a_warning_it_may_exist_where_workers_run():
    found = only(run(None, model="/nowhere/model"), "model")
    assert not found.is_error and "not a folder on this machine" in found.message


def test_not_on_the_hub_is_an_error_and_gated_without_token_a_warning():
    assert only(run(None, hub=HubAnswer(False, detail="repository not found")),
                "model").is_error
    gated = HubAnswer(True, gated=True, gate="manual")
    found = only(run(llama31(), hub=gated), "env")
    assert found.severity == "warning" and "gated" in found.message
    assert run(llama31(), hub=gated, env_names=frozenset({"HF_TOKEN"})) == []


class _Hub(BaseHTTPRequestHandler):
    """The one Hub endpoint ask_hub uses: GET /api/models/{repo}[/revision/{rev}]."""

    def do_GET(self):
        if self.path.startswith("/api/models/org/gated"):
            body, code = {"id": "org/gated", "gated": "manual", "sha": "0" * 40}, 200
        elif self.path.startswith("/api/models/org/open"):
            body, code = {"id": "org/open", "gated": False, "sha": "0" * 40}, 200
        else:
            body, code = {"error": "Repository not found"}, 404
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        if code == 404:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_endpoint(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    server.shutdown()
    server.server_close()


def test_ask_hub_reads_gated_and_not_found_from_a_local_hub(hub_endpoint):
    assert ask_hub("org/gated", None) == HubAnswer(True, gated=True, gate="manual")
    assert ask_hub("org/open", None) == HubAnswer(True)
    missing = ask_hub("org/missing", None)
    assert missing.exists is False


# -- through `gardenctl validate` -------------------------------------------------------------

GARDEN = """\
name: lab
inventory:
  nodes:
    - name: n
      gpus: [{{name: {gpu}, memory: 80GiB, count: 4}}]
models:
  - name: llama
    model: {folder}
    vllm_version: 0.13.0
{extra}"""


def _garden(workdir: Path, tmp_path: Path, gpu: str = "NVIDIA H100", extra: str = "") -> None:
    folder = make_model_folder(tmp_path, QWEN)
    (workdir / "garden.yaml").write_text(GARDEN.format(gpu=gpu, folder=folder, extra=extra))


def test_validate_refuses_a_long_max_model_len_at_its_line(gardenctl, workdir, tmp_path):
    _garden(workdir, tmp_path, extra="    max_model_len: 65536\n")

    result = gardenctl("validate")

    assert result.code == 1
    assert ("garden.yaml:10:20: error: models[0].max_model_len: llama: max_model_len 65,536 is "
            "above the model's limit 32,768") in result.err


def test_validate_refuses_tp_3_at_its_line(gardenctl, workdir, tmp_path):
    _garden(workdir, tmp_path, extra="    tensor_parallel_size: 3\n")

    result = gardenctl("validate", "-o", "json")

    assert result.code == 1
    issues = json.loads(result.out)["issues"]
    tp = [i for i in issues if i["path"] == "models[0].tensor_parallel_size"]
    assert tp and tp[0]["line"] == 10 and "28 attention heads" in tp[0]["message"]


def test_validate_refuses_bf16_on_a_t4_and_passes_with_a_warning_on_auto(gardenctl, workdir,
                                                                         tmp_path):
    _garden(workdir, tmp_path, gpu="Tesla T4", extra="    dtype: bfloat16\n")
    result = gardenctl("validate")
    assert result.code == 1
    assert "models[0].dtype: llama: dtype bfloat16 needs compute capability 8.0" in result.err

    _garden(workdir, tmp_path, gpu="Tesla T4", extra="    max_model_len: 4096\n")
    result = gardenctl("validate")
    assert result.code == 0, result.err
    assert "warning: models[0]: llama: the model is bfloat16" in result.out


def test_validate_reports_a_hostile_config_without_running_out_of_memory(gardenctl, workdir,
                                                                         tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama31() | {"num_hidden_layers": 10**12}))
    (workdir / "garden.yaml").write_text(GARDEN.format(gpu="NVIDIA H100", folder=folder,
                                                       extra=""))
    result = gardenctl("validate")

    assert result.code == 1
    assert "models[0].model: llama: the model's config.json" in result.err
    assert "out of any sane range: num_hidden_layers = 1,000,000,000,000" in result.err
