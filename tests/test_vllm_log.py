"""The start-up log reader: each fixture of tests/data/vllm-logs parses to the numbers it states.

The fixtures and their provenance are listed in tests/data/vllm-logs/README.md. Expected values
are the log's own figures (x 2**30 for GiB), so a regex that stops matching a release's format
fails here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gardenctl.measure.vllm_log import (
    GiB,
    StartupReport,
    read_startup,
    read_startup_file,
)

LOGS = Path(__file__).parent / "data" / "vllm-logs"


def gib(value: float) -> int:
    return round(value * GiB)


# file -> the fields it must report (None where the log does not state it)
EXPECTED: dict[str, dict[str, Any]] = {
    "v0.7.2-v0-qwen2.5-1.5b.log": {
        "vllm_version": None, "engine": "V0", "gpu_memory_utilization": 0.5,
        "gpu_total_bytes": gib(14.56),
        "weights_bytes": gib(2.8884), "kv_cache_bytes": gib(2.36), "gpu_blocks": 5517,
        "kv_cache_tokens": 5517 * 16, "max_model_len": 32768, "max_concurrency": 2.69,
        "non_kv_bytes": gib(2.89) + gib(0.01) + gib(2.02), "activation_bytes": gib(2.02),
        "non_torch_bytes": gib(0.01), "ready": False, "failed": False},
    "v0.8.2-v1-llama-3.1-8b.log": {
        "vllm_version": "0.8.2", "engine": "V1", "model": "meta-llama/Llama-3.1-8B-Instruct",
        "tensor_parallel_size": 1, "weights_bytes": gib(15.1749), "kv_cache_bytes": None,
        "kv_cache_tokens": 148_096, "max_model_len": 131_072, "max_concurrency": 1.13,
        "cuda_graph_bytes": gib(0.74), "init_engine_seconds": 167.44, "ready": True},
    "v0.8.5-v1-qwen2.5-7b.log": {
        "vllm_version": "0.8.5", "engine": "V1", "weights_bytes": gib(14.2474),
        "kv_cache_tokens": 1_036_768, "max_model_len": 32_768, "max_concurrency": 31.64,
        "cuda_graph_bytes": gib(0.53), "ready": True},
    "v0.9.1-v1-dotsocr.log": {
        "vllm_version": "0.9.1", "engine": "V1", "model": "/workspace/weights/DotsOCR",
        "gpu_memory_utilization": 0.8, "weights_bytes": gib(5.7174), "kv_cache_bytes": gib(3.65),
        "kv_cache_tokens": 136_592, "max_model_len": 131_072, "max_concurrency": 1.04,
        "cuda_graph_bytes": gib(0.31), "ready": True},
    "v0.10.2-v0-llama-3.1-8b.log": {
        "vllm_version": "0.10.2", "engine": "V0", "gpu_memory_utilization": 0.9,
        "gpu_total_bytes": gib(79.19), "weights_bytes": gib(14.9888), "kv_cache_bytes": gib(54.69),
        "gpu_blocks": 28_001, "kv_cache_tokens": 448_016, "max_model_len": 32_768,
        "max_concurrency": 13.67, "cuda_graph_bytes": gib(0.51),
        "non_kv_bytes": gib(14.99) + gib(0.35) + gib(1.24), "ready": True},
    "v0.10.2-v1-llama-3.1-8b.log": {
        "vllm_version": "0.10.2", "engine": "V1", "gpu_memory_utilization": 0.85,
        "gpu_total_bytes": gib(79.19), "weights_bytes": gib(14.9888), "kv_cache_bytes": gib(50.73),
        "kv_cache_tokens": 415_568, "max_model_len": 16_384, "max_concurrency": 25.36,
        "cuda_graph_bytes": gib(0.52), "non_kv_bytes": None, "ready": True},
    "v0.11.0-v1-mistral-small-3.2-24b.log": {
        "vllm_version": "0.11.0", "engine": "V1", "gpu_memory_utilization": 0.95,
        "weights_bytes": gib(44.76), "kv_cache_bytes": gib(28.2), "kv_cache_tokens": 184_832,
        "max_model_len": 16_000, "max_concurrency": 11.55, "cuda_graph_bytes": gib(-0.76),
        "ready": True},
    "v0.13.0-v1-qwen3-8b.log": {
        "vllm_version": "0.13.0", "engine": "V1", "gpu_memory_utilization": 0.5,
        "weights_bytes": gib(15.2683), "kv_cache_bytes": gib(23.02), "kv_cache_tokens": 167_616,
        "max_model_len": 40_960, "max_concurrency": 4.09, "cuda_graph_bytes": gib(0.61),
        "ready": True},
    "v0.19.0-v1-codellama-7b-debug.log": {
        "vllm_version": "0.19.0", "engine": "V1", "model": "codellama/CodeLlama-7b-hf",
        "gpu_memory_utilization": 0.95, "gpu_total_bytes": gib(79.19), "tensor_parallel_size": 1,
        "weights_bytes": gib(12.56), "kv_cache_bytes": gib(61.66), "kv_cache_tokens": 126_256,
        "max_model_len": 8192, "max_concurrency": 15.41, "cuda_graph_bytes": gib(0.89),
        "cuda_graph_estimated_bytes": gib(0.84), "non_kv_bytes": gib(13.57),
        "activation_bytes": gib(0.77), "non_torch_bytes": gib(0.25), "ready": True, "starts": 1},
    "v0.19.0-v1-llama-3.3-70b-fp8-tp2.log": {
        "vllm_version": "0.19.0", "model": "RedHatAI/Llama-3.3-70B-Instruct-fp8-dynamic",
        "tensor_parallel_size": 2, "gpu_memory_utilization": 0.95, "weights_bytes": gib(33.88),
        "kv_cache_bytes": gib(37.28), "kv_cache_tokens": 244_304, "max_concurrency": 29.82,
        "cuda_graph_bytes": gib(1.79), "cuda_graph_estimated_bytes": gib(1.82), "ready": True},
    "v0.19.0-failed-free-memory-tp2.log": {
        "vllm_version": "0.19.0", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.95,
        "weights_bytes": None, "kv_cache_bytes": None, "ready": False, "failed": True},
    "v0.28.0-v1-llama-3.1-8b.log": {
        "vllm_version": "0.28.0", "model": "meta-llama/Llama-3.1-8B-Instruct",
        "gpu_memory_utilization": 0.6, "gpu_total_bytes": gib(79.19), "weights_bytes": gib(14.99),
        "kv_cache_bytes": gib(30.41), "kv_cache_tokens": 249_104, "max_model_len": 8192,
        "max_concurrency": 30.41, "cuda_graph_bytes": gib(0.64),
        "cuda_graph_estimated_bytes": gib(0.62), "init_engine_seconds": 31.70, "ready": True},
    "v0.32.0-v1-qwen3-0.6b-debug.log": {
        "vllm_version": "0.32.0", "engine": "V1", "model": "Qwen/Qwen3-0.6B",
        "gpu_memory_utilization": 0.3, "gpu_total_bytes": gib(139.8), "weights_bytes": gib(1.12),
        "kv_cache_bytes": gib(38.96), "kv_cache_tokens": 364_752, "max_model_len": 40_960,
        "max_concurrency": 8.91, "cuda_graph_bytes": gib(0.83),
        "cuda_graph_estimated_bytes": gib(0.84),
        "non_kv_bytes": gib(2.14), "activation_bytes": gib(0.77),
        "non_torch_bytes": gib(1.37) - gib(1.12), "init_engine_seconds": 19.21, "ready": True},
    "v0.32.0-two-starts.log": {
        "vllm_version": "0.32.0", "starts": 2, "max_model_len": 65_536, "kv_cache_tokens": 82_896,
        "max_concurrency": 1.26, "cuda_graph_bytes": gib(0.51), "ready": True, "failed": False},
}


def test_every_fixture_is_checked():
    assert sorted(p.name for p in LOGS.glob("*.log")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parses_to_the_numbers_it_states(name: str):
    report = read_startup_file(LOGS / name)

    got = {field: getattr(report, field) for field in EXPECTED[name]}
    assert got == EXPECTED[name]


def test_tensor_parallel_takes_rank_0_not_the_first_line():
    # Worker_TP1 logs every figure first, with different values: they must not win.
    report = read_startup_file(LOGS / "v0.19.0-v1-llama-3.3-70b-fp8-tp2.log")

    assert report.weights_bytes == gib(33.88) != gib(33.91)
    assert report.kv_cache_bytes == gib(37.28)


def test_info_only_log_derives_non_kv_from_its_own_utilization_and_a_given_total():
    report = read_startup_file(LOGS / "v0.19.0-v1-llama-3.3-70b-fp8-tp2.log")

    assert report.non_kv_bytes is None and report.gpu_total_bytes is None
    assert report.derived_non_kv_bytes() is None  # no total: nothing to derive from
    derived = report.derived_non_kv_bytes(utilization=0.5, gpu_total_bytes=gib(79.19))
    # the log's own 0.95 wins over the argument; the total comes from the argument
    assert derived == math.ceil(gib(79.19) * 0.95) - gib(37.28)
    # weights + activation + non-torch of calibration row 4, to the log's rounding
    assert abs(derived - gib(33.88 + 1.96 + 2.1)) < gib(0.02)


def test_derived_non_kv_prefers_the_stated_profile_figure():
    report = read_startup_file(LOGS / "v0.19.0-v1-codellama-7b-debug.log")

    assert report.derived_non_kv_bytes(0.5, gib(10)) == gib(13.57)


def test_derived_non_kv_uses_the_logs_total_before_the_argument():
    report = read_startup_file(LOGS / "v0.10.2-v1-llama-3.1-8b.log")

    assert report.derived_non_kv_bytes(0.1, gib(1)) == math.ceil(gib(79.19) * 0.85) - gib(50.73)


def test_info_only_log_without_utilization_uses_both_arguments():
    report = read_startup_file(LOGS / "v0.8.5-v1-qwen2.5-7b.log")

    assert report.kv_cache_bytes is None
    assert report.derived_non_kv_bytes(0.9, gib(80)) is None  # no KV cache figure at all
    report = read_startup_file(LOGS / "v0.13.0-v1-qwen3-8b.log")
    assert report.derived_non_kv_bytes(0.9, gib(79.19)) == (
        math.ceil(gib(79.19) * 0.5) - gib(23.02))


V32 = (
    "{p}INFO 11-20 09:00:14 [v1/worker/gpu_model_runner.py:4988] Model loading took 1.5 GiB "
    "memory and 4.5 seconds\n"
    "{p}INFO 11-20 09:00:25 [v1/worker/gpu_worker.py:759] Available KV cache memory: 7.25 GiB\n"
    "{p}INFO 11-20 09:00:25 [v1/core/kv_cache_utils.py:2316] GPU KV cache size: 1,234,560 "
    "tokens, Maximum concurrency for 32,768 tokens per request: 37.68x\n"
)


@pytest.mark.parametrize("prefix", [
    "",
    "(EngineCore_DP0 pid=57) ",
    "(EngineCore_DP0 pid=57) (Worker_TP0 pid=58) ",
    "(Worker pid=58) ",
    "(VllmWorker rank=0 pid=58) ",
    "(EngineCore_0 pid=57) ",
    "(EngineCore_0 pid=57) (VllmWorker TP0 pid=58) ",
    "\x1b[1;36m(EngineCore_DP0 pid=57)\x1b[0;0m \x1b[32m",
    "2025-11-24 14:00:30.181 | ",
    "Capturing CUDA graphs: 100%|██████████| 51/51 [00:01<00:00, 40.70it/s]",
])
def test_prefixes_and_colours_do_not_change_the_values(prefix: str):
    report = read_startup(V32.format(p=prefix))

    assert (report.weights_bytes, report.kv_cache_bytes, report.kv_cache_tokens,
            report.max_model_len, report.max_concurrency) == (
        gib(1.5), gib(7.25), 1_234_560, 32_768, 37.68)


@pytest.mark.parametrize("prefix", [
    "(EngineCore_DP0 pid=57) (Worker_TP1 pid=59) ",
    "(Worker_TP3 pid=59) ",
    "(Worker_PP0_TP1 pid=59) ",
    "(EngineCore_DP1 pid=60) ",
    "(VllmWorker rank=1 pid=58) ",
    "(VllmWorker TP1 pid=58) ",
    "(EngineCore_1 pid=58) ",
    "(RayWorkerWrapper pid=58) ",
])
def test_other_ranks_are_ignored(prefix: str):
    report = read_startup(V32.format(p=prefix))

    assert report.weights_bytes is None and report.kv_cache_bytes is None


def test_old_gb_is_read_as_gib():
    text = ("INFO 03-28 12:57:37 [gpu_model_runner.py:1186] Model loading took 13.1665 GB and "
            "5.3 seconds")
    assert read_startup(text).weights_bytes == gib(13.1665)


def test_a_restart_without_banner_after_a_failure_starts_afresh():
    first = V32.format(p="(EngineCore_DP0 pid=5) ")
    failure = "RuntimeError: Engine core initialization failed. See root cause above.\n"
    second = ("(EngineCore_DP0 pid=9) INFO 11-20 10:00:00 [gpu_worker.py:759] "
              "Available KV cache memory: 3.00 GiB\n")
    report = read_startup(first + failure + second)

    assert report.starts == 2
    assert report.kv_cache_bytes == gib(3.0)
    assert report.weights_bytes is None  # the first start's weights are not carried over
    assert not report.ready and not report.failed


def test_failed_last_start_is_not_ready_even_after_an_earlier_ready_one():
    ok = read_startup_file(LOGS / "v0.32.0-v1-qwen3-0.6b-debug.log")
    text = ((LOGS / "v0.32.0-v1-qwen3-0.6b-debug.log").read_text()
            + (LOGS / "v0.19.0-failed-free-memory-tp2.log").read_text())
    report = read_startup(text)

    assert ok.ready
    assert report.starts == 2 and report.failed and not report.ready
    assert report.weights_bytes is None


def test_ready_needs_the_memory_lines_first():
    assert not read_startup("INFO:     Application startup complete.\n").ready


def test_unknown_and_empty_text_give_an_empty_report():
    assert read_startup("") == StartupReport()
    assert read_startup("hello\nworld\n\x00\n").kv_cache_bytes is None


def test_file_reader_reads_only_the_tail(tmp_path: Path):
    log = tmp_path / "worker.log"
    noise = "x" * 1000 + "\n"
    log.write_text(V32.format(p="") + noise * 200 + "INFO Available KV cache memory: 2.00 GiB\n")

    tail = read_startup_file(log, max_bytes=10_000)
    whole = read_startup_file(log)

    assert tail.weights_bytes is None and tail.kv_cache_bytes == gib(2.0)
    assert whole.weights_bytes == gib(1.5) and whole.kv_cache_bytes == gib(7.25)


def test_v0_profile_logged_as_one_multiline_message_without_prefixes():
    text = ("INFO 03-14 09:13:07 [gpu_worker.py:227] Memory profiling takes 11.85 seconds\n"
            "the current vLLM instance can use total_gpu_memory (79.11GiB) x "
            "gpu_memory_utilization (0.90) = 71.20GiB\n"
            "model weights take 14.99GiB; non_torch_memory takes 0.35GiB; PyTorch activation "
            "peak memory takes 1.24GiB;\n"
            "the rest of the memory reserved for KV Cache is 54.62GiB.\n")
    report = read_startup(text)

    assert (report.gpu_total_bytes, report.gpu_memory_utilization, report.weights_bytes,
            report.non_kv_bytes, report.kv_cache_bytes) == (
        gib(79.11), 0.9, gib(14.99), gib(14.99) + gib(0.35) + gib(1.24), gib(54.62))


def test_block_size_from_the_arguments_scales_v0_blocks():
    text = ("INFO 09-20 [utils.py:328] non-default args: {'model': 'm', 'block_size': 32}\n"
            "INFO 09-20 [executor_base.py:114] # cuda blocks: 100, # CPU blocks: 0\n")
    assert read_startup(text).kv_cache_tokens == 3200


def test_non_default_args_are_kept_as_a_dict():
    report = read_startup_file(LOGS / "v0.9.1-v1-dotsocr.log")

    assert report.args == {"chat_template_content_format": "string",
                           "model": "/workspace/weights/DotsOCR", "trust_remote_code": True,
                           "served_model_name": ["dotsocr-model"], "gpu_memory_utilization": 0.8}


def test_non_default_args_with_a_non_literal_keep_the_literal_entries():
    text = ("INFO [utils.py:1] non-default args: {'model': 'm', 'revision': 'abc', "
            "'compilation_config': {'mode': <CompilationMode.VLLM_COMPILE: 3>}, "
            "'max_model_len': 4096, 'api_key': '***'}\n")
    args = read_startup(text).args

    assert args["model"] == "m" and args["revision"] == "abc"
    assert args["max_model_len"] == 4096 and args["api_key"] == "***"


def test_a_standby_workers_first_sleep_is_measured_and_opens_no_start():
    """vLLM 0.32's Worker.sleep line, as the stand-in writes it after `Application startup
    complete` (its first figure is what the sleep freed on this GPU; the second is the whole
    device's use, other processes included)."""
    start = "\n".join([
        "(EngineCore_DP0 pid=7) INFO 12-02 05:31:27 [gpu_model_runner.py] Model loading took "
        "1.0 GiB memory and 0.500000 seconds",
        "(EngineCore_DP0 pid=7) INFO 12-02 05:31:27 [gpu_worker.py] Available KV cache memory: "
        "16.1 GiB",
        "INFO:     Application startup complete.",
    ])
    sleep = ("(EngineCore_DP0 pid=7) INFO 12-02 05:31:28 [gpu_worker.py] Sleep mode freed "
             "{freed} GiB memory, 1.6 GiB memory is still in use.")
    report = read_startup("\n".join([start, sleep.format(freed="17.1"),
                                     sleep.format(freed="9.5")]))
    assert report.starts == 1 and report.ready
    assert report.kv_cache_bytes == gib(16.1)
    assert report.sleep_freed_bytes == gib(17.1)  # the first sleep: nothing was woken before
    assert read_startup(start).sleep_freed_bytes is None
