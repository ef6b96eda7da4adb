"""diagnose() on real vLLM failure logs (tests/data/vllm-failures/README.md gives each one's
source): the root cause wherever it is in the log, its numbers, the fix in garden.yaml terms,
and never a warning, a traceback frame or a URL as the evidence. One end-to-end test replays a
real log through the stand-in and the CLI."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gardenctl.runtime.diagnose import NO_ERROR_MESSAGE, Diagnosis, diagnose
from gardenctl.runtime.records import read_run_log
from gardenctl.vocab import Cause

FAILURES = Path(__file__).parent / "data" / "vllm-failures"
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Case:
    cause: Cause
    numbers: tuple[str, ...]  # each appears in the message, as the log writes it
    field: str  # the garden.yaml field the hint names
    values: dict[str, object] = field(default_factory=dict)  # Diagnosis attributes


CASES: dict[str, Case] = {
    "gated_model-0.10.0.log": Case(Cause.GATED_MODEL, ("401", "meta-llama/Meta-Llama-3-8B"),
                                   "HF_TOKEN"),
    "gated_model-0.6.0.log": Case(Cause.GATED_MODEL, ("401",), "HF_TOKEN"),
    "hub_unreachable-0.4-offline.log": Case(Cause.HUB_UNREACHABLE, ("offline",),
                                            "HF_HUB_OFFLINE"),
    "hub_unreachable-transformers.log": Case(Cause.HUB_UNREACHABLE, (), "HF_HUB_OFFLINE"),
    "model_not_found-0.8.4.log": Case(Cause.MODEL_NOT_FOUND,
                                      ("neuralmagic/Meta-Llama-3-8B-Instruct-FP8-dynamic",),
                                      "revision"),
    "model_not_found-0.5-ray.log": Case(Cause.MODEL_NOT_FOUND, ("'/model'",), "model:"),
    "architecture_unsupported-0.6.x-tt.log": Case(
        Cause.ARCHITECTURE_UNSUPPORTED, ("TTLlamaForCausalLM",), "vllm_command",
        {"architecture": "TTLlamaForCausalLM"}),
    "architecture_unsupported-0.6.3.log": Case(
        Cause.ARCHITECTURE_UNSUPPORTED, ("LlamaForCausalLM",), "vllm_command"),
    "max_model_len_too_long-0.4.0.log": Case(
        Cause.MAX_MODEL_LEN_TOO_LONG, ("131072", "8192"), "max_model_len",
        {"model_limit": 8192, "max_model_len": 131072}),
    "max_model_len_too_long-pydantic.log": Case(
        Cause.MAX_MODEL_LEN_TOO_LONG, ("131072", "32768", "max_position_embeddings"),
        "max_model_len", {"model_limit": 32768}),
    "tensor_parallel_not_divisible-0.3.0.log": Case(
        Cause.TP_NOT_DIVISIBLE, ("8", "52"), "tensor_parallel_size",
        {"tensor_parallel_size": 8, "attention_heads": 52}),
    "tensor_parallel_not_divisible-pydantic.log": Case(
        Cause.TP_NOT_DIVISIBLE, ("3", "64"), "tensor_parallel_size",
        {"tensor_parallel_size": 3, "attention_heads": 64}),
    "insufficient_free_memory-0.9.1.log": Case(
        Cause.FREE_MEMORY_CHECK, ("31.44/47.38", "45.01", "0.95"), "gpu_memory_utilization",
        {"free_bytes": round(31.44 * GIB), "total_bytes": round(47.38 * GIB),
         "requested_bytes": round(45.01 * GIB), "utilization": 0.95}),
    "insufficient_free_memory-0.10.1.log": Case(
        Cause.FREE_MEMORY_CHECK, ("7.34/139.72", "125.75", "0.9"), "gpu_memory_utilization",
        {"requested_bytes": round(125.75 * GIB)}),
    "insufficient_free_memory-0.10.2.log": Case(
        Cause.FREE_MEMORY_CHECK, ("3.22/4.0", "3.6"), "gpu_memory_utilization",
        {"free_bytes": round(3.22 * GIB), "total_bytes": 4 * GIB}),
    "out_of_memory-0.11-loading.log": Case(
        Cause.OUT_OF_MEMORY, ("896.00 MiB", "739.81 MiB", "93.09 GiB"), "tensor_parallel_size",
        {"during": "loading", "tried_to_allocate_bytes": 896 * MIB,
         "free_bytes": round(739.81 * MIB), "total_bytes": round(93.09 * GIB)}),
    "out_of_memory-0.8.0-tp2.log": Case(
        Cause.OUT_OF_MEMORY, ("1.74 GiB", "605.88 MiB", "23.57 GiB"), "gpu_memory_utilization",
        {"tried_to_allocate_bytes": round(1.74 * GIB)}),
    "sampler_out_of_memory-0.8.5.log": Case(
        Cause.SAMPLER_OUT_OF_MEMORY, ("256",), "max_num_seqs",
        {"during": "sampler", "sampler_requests": 256}),
    "sampler_out_of_memory-0.8.0.log": Case(
        Cause.SAMPLER_OUT_OF_MEMORY, ("1024",), "max_num_seqs",
        {"during": "sampler", "sampler_requests": 1024}),
    "kv_cache_too_small-0.8.3.log": Case(
        Cause.KV_CACHE_TOO_SMALL, ("1048576", "24.00", "9.97"), "max_model_len",
        {"suggested_max_model_len": None, "kv_needed_bytes": 24 * GIB,
         "kv_available_bytes": round(9.97 * GIB), "max_model_len": 1048576}),
    "kv_cache_too_small-0.9-tpu.log": Case(
        Cause.KV_CACHE_TOO_SMALL, ("131072", "16.00", "0.71", "5632"), "max_model_len",
        {"suggested_max_model_len": 5632, "kv_needed_bytes": 16 * GIB,
         "kv_available_bytes": round(0.71 * GIB)}),
    "kv_cache_too_small-recent.log": Case(
        Cause.KV_CACHE_TOO_SMALL, ("1048576", "44.25", "8.42", "199552"), "max_model_len",
        {"suggested_max_model_len": 199552, "kv_needed_bytes": round(44.25 * GIB)}),
    "kv_cache_too_small-0.8-v0.log": Case(
        Cause.KV_CACHE_TOO_SMALL, ("8192", "2400"), "max_model_len",
        {"suggested_max_model_len": 2400, "max_model_len": 8192}),
    "no_cache_blocks-0.6.4.log": Case(Cause.NO_CACHE_BLOCKS, (), "gpu_memory_utilization"),
    "port_in_use-0.6.x.log": Case(Cause.PORT_IN_USE, (), "port"),
    "port_in_use-0.5.4-uvicorn.log": Case(Cause.PORT_IN_USE, ("8000",), "port",
                                          {"port": 8000}),
    "unrecognised_flag-0.15.0.log": Case(Cause.UNRECOGNISED_FLAG, ("--omni",), "args",
                                         {"flags": "--omni"}),
    "unrecognised_flag-0.6.0.log": Case(Cause.UNRECOGNISED_FLAG, ("--config",), "args"),
}

FRAME = re.compile(r'^\s*(File "|Traceback|\^)')


def fixture(name: str) -> str:
    return (FAILURES / name).read_text(encoding="utf-8")


def assert_reportable(diagnosis: Diagnosis) -> None:
    """Neither the message nor the evidence is a warning, a frame, a URL or a pydantic footer."""
    for text in (diagnosis.message, diagnosis.evidence):
        assert "\n" not in text and len(text) <= 300
        assert not FRAME.match(text), text
        assert not re.match(r"^\s*(WARNING|\S*Warning:|warnings\.warn)", text), text
        assert not re.match(r"^\s*<?https?://\S+>?\s*$", text), text
        assert "For further information visit" not in text


def test_every_fixture_is_covered_and_documented():
    logs = {path.name for path in FAILURES.glob("*.log")}
    assert logs == set(CASES)
    readme = (FAILURES / "README.md").read_text(encoding="utf-8")
    for name in logs:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_failure_log_gives_its_cause_numbers_and_fix(name):
    case = CASES[name]
    diagnosis = diagnose(fixture(name))

    assert diagnosis.cause == case.cause, diagnosis
    for number in case.numbers:
        assert number in diagnosis.message, (number, diagnosis.message)
    assert case.field in diagnosis.hint, diagnosis.hint
    assert diagnosis.evidence and diagnosis.evidence in fixture(name)
    assert_reportable(diagnosis)
    for attribute, value in case.values.items():
        assert getattr(diagnosis, attribute) == value, (attribute, diagnosis)


@pytest.mark.parametrize("name", [
    "insufficient_free_memory-0.9.1.log",  # then "EngineCore failed to start." + traceback
    "out_of_memory-0.11-loading.log",  # then "EngineCore failed to start." + traceback
    "sampler_out_of_memory-0.8.0.log",  # then "WorkerProc hit an exception" + traceback
    "kv_cache_too_small-0.8-v0.log",  # then another process's traceback
])
def test_root_cause_wins_over_the_generic_lines_and_tracebacks_after_it(name):
    generic_tail = "\n".join([
        "(EngineCore_DP0 pid=7) Process EngineCore_DP0:",
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.12/multiprocessing/process.py", line 314, in _bootstrap',
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}",
        "/usr/lib/python3.12/multiprocessing/resource_tracker.py:254: UserWarning: "
        "resource_tracker: There appear to be 1 leaked shared_memory objects",
        "  warnings.warn('resource_tracker: There appear to be %d '",
    ])
    alone = diagnose(fixture(name))
    buried = diagnose(fixture(name) + "\n" + generic_tail + "\n")
    assert buried == alone
    assert buried.cause == CASES[name].cause


def test_an_oom_traceback_through_the_sampler_warm_up_is_a_sampler_oom():
    # the torch error of the 0.8.5 log's rank 0, whose frames run through _dummy_sampler_run
    log = fixture("sampler_out_of_memory-0.8.5.log").splitlines()
    frames_then_torch_oom = "\n".join(log[4:7] + [
        "(VllmWorker rank=0 pid=2445155) ERROR 05-10 16:00:15 [multiproc_executor.py:470] "
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity of 23.57 GiB of which 1.50 GiB is free."])
    diagnosis = diagnose(frames_then_torch_oom)
    assert (diagnosis.cause, diagnosis.during) == (Cause.SAMPLER_OUT_OF_MEMORY, "sampler")
    assert diagnosis.tried_to_allocate_bytes == 2 * GIB
    assert "max_num_seqs" in diagnosis.hint


def test_generic_lines_alone_are_unknown_with_an_error_line_never_a_warning():
    log = "\n".join([
        "(APIServer pid=1) INFO 09-03 11:03:30 [api_server.py:1896] vLLM API server version 0.10.1",
        "(EngineCore_DP0 pid=7) ValueError: something vLLM checks that gardenctl does not know",
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}",
        "  warnings.warn('resource_tracker: There appear to be %d '",
        "    For further information visit https://errors.pydantic.dev/2.11/v/value_error",
    ])
    diagnosis = diagnose(log)
    assert diagnosis.cause == Cause.UNKNOWN
    assert diagnosis.message.startswith("ValueError: something vLLM checks")
    assert_reportable(diagnosis)


def test_a_log_without_any_error_is_unknown_with_the_logs_pointer():
    log = ("INFO 09-03 11:03:30 [api_server.py:1896] vLLM API server version 0.10.1\n"
           "  warnings.warn('resource_tracker: There appear to be %d '\n"
           "https://docs.vllm.ai/en/latest/usage/troubleshooting.html\n")
    assert diagnose(log) == Diagnosis(Cause.UNKNOWN, NO_ERROR_MESSAGE,
                                      hint=diagnose(log).hint)
    assert diagnose("").message == NO_ERROR_MESSAGE


def test_the_run_log_is_read_bounded_from_a_line_start(tmp_path):
    path = tmp_path / "a.0.log"
    path.write_text("x" * 50 + "\n" + fixture("kv_cache_too_small-0.9-tpu.log"))
    text = read_run_log(str(path), limit=len(fixture("kv_cache_too_small-0.9-tpu.log")) + 10)
    assert text == fixture("kv_cache_too_small-0.9-tpu.log")
    assert read_run_log(str(tmp_path / "missing.log")) == ""
    assert read_run_log(None) == ""


@pytest.mark.e2e
def test_a_replayed_real_failure_is_shown_with_its_cause_and_numbers(tmp_path):
    from e2e_helpers import garden_at, model

    log = FAILURES / "sampler_out_of_memory-0.8.5.log"
    with garden_at(tmp_path / "garden") as garden:
        garden.write([model("a", env={"STANDIN_VLLM_REPLAY": str(log),
                                      "STANDIN_VLLM_READY_DELAY": "0.1"})])
        run, report = garden.apply_json()

        assert run.code == 1, str(run)
        (result,) = report["results"]
        assert result["cause"] == "sampler_out_of_memory", result
        row = garden.workers()[garden.worker_id("a")]
        assert row["phase"] == "failed" and row["cause"] == "sampler_out_of_memory", row
        assert "256 dummy requests" in row["last_error"], row
        assert "max_num_seqs" in row["hint"], row


@pytest.mark.parametrize("line", [
    "ValueError: Total number of attention heads (999999999999) must be divisible by tensor "
    "parallel size (7).",
    "ValueError: To serve at least one request with the model's max seq len (" + "9" * 5000
    + "), (1e400 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(0.5 GiB).",
    "ValueError: User-specified max_model_len (inf) is greater than the derived max_model_len "
    "(max_position_embeddings=inf or model_max_length=None in model's config.json).",
])
def test_a_hostile_log_never_raises_and_never_yields_absurd_numbers(line):
    # The model's own code writes the worker's log: whatever it prints, diagnosis ends, and
    # no number beyond any real GPU becomes a fact the next start is sized from.
    diagnosis = diagnose(f"INFO starting\n{line}\nRuntimeError: Engine core initialization "
                         "failed. See root cause above.\n")
    for name, value in diagnosis.facts().items():
        if isinstance(value, (int, float)):
            assert abs(value) <= 1 << 44, (name, value)


def test_gated_and_not_found_are_told_apart():
    # huggingface_hub's not-found text mentions gated repos, and the Hub answers 401 for a
    # repository that does not exist: neither makes it gated. A GatedRepoError does, even
    # when vLLM then reports an invalid repository id.
    not_found = ("huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. "
                 "(Request ID: x)\nRepository Not Found for url: https://huggingface.co/api/"
                 "models/org/nope/revision/main.\nIf you are trying to access a private or "
                 "gated repo, make sure you are authenticated.\n")
    assert diagnose(not_found).cause == Cause.MODEL_NOT_FOUND
    gated = ("huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: y)\n"
             "Access to model meta-llama/Llama-3.1-8B is restricted. You must have access to "
             "it and be authenticated to access it. Please log in.\n"
             "ValueError: Invalid repository ID or local directory specified: "
             "'meta-llama/Llama-3.1-8B'.\n")
    found = diagnose(gated)
    assert found.cause == Cause.GATED_MODEL and "meta-llama/Llama-3.1-8B" in found.message
