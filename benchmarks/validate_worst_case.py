"""Worst-case validation: how long `gardenctl validate` takes on hostile garden files near 1 MiB.

    .venv/bin/python benchmarks/validate_worst_case.py [--runs N] [--cli-runs N] [--only NAME]

Any file up to the loader's size limit (gardenctl.spec.yamlsource.MAX_FILE_BYTES, 1 MiB) must be
answered in well under a second: `validate` runs in CI, in editors' save hooks and on every save
that `watch` sees, so a file that takes minutes (or gigabytes) is a denial of service. Each shape
below is generated to just under the limit, written to a temporary folder, and timed twice:

- `parse_garden` in this process (read, YAML, schema, cross-field checks), median of --runs;
- `python -m gardenctl validate FILE` as a separate process (interpreter start-up included),
  median of --cli-runs, after one untimed warm-up run.

Shapes are "legal" (the file validates, perhaps with warnings) or "illegal" (it must be refused
with located issues): many models, a model with ~50k args (known, unknown or refused flags), huge
env maps, very long strings and keys, alias fan-outs (legal merges and the string bomb), nesting
at the depth limit, tens of thousands of errors of several kinds, and the whole garden on one
line. The table gives the file size, the outcome (valid / refused, the issues reported, the exit
status) and the times; then the machine and the date. Exit status 1 if any `parse_garden`
median reaches --limit seconds (default 0.5).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gardenctl.errors import SpecError
from gardenctl.spec.checks import MAX_ERRORS, MAX_WARNINGS
from gardenctl.spec.loader import parse_garden
from gardenctl.spec.yamlsource import MAX_EXPANDED_CHARS, MAX_FILE_BYTES, MAX_VALUES

TARGET = MAX_FILE_BYTES - 4096  # leave room for the last item and the tail

HEAD = "name: worst\nmodels:\n"


@dataclass(frozen=True)
class Shape:
    name: str
    legal: bool
    make: Callable[[], str]
    what: str


def _fill(head: str, item: Callable[[int], str], tail: str = "", items: int = 10**9) -> str:
    """head + item(0) + item(1) + ... until the text is near the size limit (or `items`)."""
    parts = [head]
    size = len(head.encode()) + len(tail.encode())
    i = 0
    while i < items:
        chunk = item(i)
        size += len(chunk.encode())
        if size > TARGET:
            break
        parts.append(chunk)
        i += 1
    parts.append(tail)
    return "".join(parts)


def _per(values: int) -> int:
    """How many items of ``values`` values and keys each fit the loader's value budget."""
    return (MAX_VALUES - 100) // values


def _model(i: int) -> str:
    return f"  - {{name: m{i}, model: org/model-{i}, max_model_len: 4096}}\n"


def many_models() -> str:
    """As many models as the value budget allows (7 values and keys each)."""
    return _fill(HEAD, _model, items=_per(7))


def models_with_inventory() -> str:
    """Many models and a declared inventory: `validate` then estimates and places them all."""
    head = ("name: worst\ninventory:\n  nodes:\n"
            "    - {name: n, gpus: [{name: NVIDIA H100, memory: 80GiB, count: 64}]}\nmodels:\n")
    return _fill(head, lambda i: f"  - {{name: m{i}, model: Qwen/Qwen2.5-0.5B-Instruct, "
                                 "max_model_len: 2048}\n", items=_per(7))


def too_many_models() -> str:
    return _fill(HEAD, _model)


def merged_models() -> str:
    """Every model merges the first one's settings (`<<: *common`), as the budget allows."""
    head = ("name: worst\ndefaults: {max_model_len: 4096}\nmodels:\n"
            "  - &common {name: m, model: org/m, max_model_len: 8192, min_concurrency: 2,"
            " enforce_eager: true, args: [--enable-prefix-caching, --seed, '7']}\n")
    return _fill(head, lambda i: f"  - {{<<: *common, name: m{i}, model: org/m{i}}}\n",
                 items=_per(30))


def _one_model(extra: str) -> str:
    return HEAD + "  - name: a\n    model: org/a\n" + extra


def args_known() -> str:
    flags = ["--enable-prefix-caching", "--seed", "'7'", "--block-size", "'16'", "-ep"]
    return _fill(_one_model("    args:\n"), lambda i: f"      - {flags[i % len(flags)]}\n",
                 items=_per(1))


def args_unknown() -> str:
    """Many args, most of them unknown flags close to real ones (each one a warning)."""
    def item(i: int) -> str:
        return f"    - --enable-prefix-cachin{i}\n" if i % 5 else "    - --seed\n    - '1'\n"
    return _fill(_one_model("    args:\n"), item, items=_per(6) * 5)  # 5 items: 6 values


def args_refused() -> str:
    """Many args that are all errors: secrets, managed flags, GPU and memory overrides."""
    flags = ["--api-key=x", "--port=9", "-pp=2", "--kv-cache-memory-bytes=1G", "--config=x"]
    return _fill(_one_model("    args:\n"), lambda i: f"    - {flags[i % len(flags)]}\n",
                 items=_per(1))


def env_huge() -> str:
    return _fill(_one_model("    env:\n"), lambda i: f"      V{i}: v\n", items=MAX_VALUES // 2 - 20)


def env_merge() -> str:
    """A big `defaults.env` merged into many models that set an env of their own."""
    head = "name: worst\ndefaults:\n  env:\n" + "".join(f"    V{i}: v\n" for i in range(10_000))
    return _fill(head + "models:\n", lambda i: f"  - {{name: m{i}, model: org/m, env: {{A: b}}}}\n",
                 items=_per(9) - 2_300)


def env_secrets() -> str:
    return _fill(_one_model("    env:\n"), lambda i: f"      TOKEN_{i}: literal\n",
                 items=MAX_VALUES // 2 - 20)


def env_gpu_overrides() -> str:
    names = ["CUDA_VISIBLE_DEVICES", "VLLM_PORT", "GARDENCTL_STATE", "HIP_VISIBLE_DEVICES"]
    return _fill(HEAD, lambda i: f"  - {{name: m{i}, model: org/m, env: "
                                 f"{{{names[i % len(names)]}: '0'}}}}\n", items=_per(9))


def long_string() -> str:
    return _one_model("    revision: '" + "r" * (TARGET - 100) + "'\n")


def long_flag() -> str:
    return _one_model("    args: ['--" + "x" * (TARGET - 100) + "']\n")


def long_key() -> str:
    return _one_model("    " + "k" * (TARGET - 100) + ": 1\n")


def long_name() -> str:
    return HEAD + "  - name: " + "n" * (TARGET - 100) + "\n    model: org/a\n"


def alias_string_bomb() -> str:
    """990 aliases of one ~900 KB string: ~900 MB once expanded."""
    text = _one_model("    args: [&a '--" + "x" * 900_000 + "'")
    return text + ", *a" * 990 + "]\n"


def alias_list_fanout() -> str:
    """Legal fan-out: the first model's 60 args shared by as many models as the budget allows."""
    flags = ", ".join(["--enable-prefix-caching", "--seed", "'1'"] * 20)
    head = f"name: worst\nmodels:\n  - {{name: m, model: org/m, args: &args [{flags}]}}\n"
    return _fill(head, lambda i: f"  - {{name: m{i}, model: org/m, args: *args}}\n",
                 items=_per(67))


def deep_nesting() -> str:
    """Lists at the depth limit where strings belong: an error each, with a deep location."""
    deep = "[" * 28 + "x" + "]" * 28
    return _fill(_one_model("    args:\n"), lambda i: f"      - {deep}\n",
                 items=MAX_VALUES // 30)


def wrong_types() -> str:
    return _fill(HEAD, lambda i: f"  - {{name: m{i}, model: org/m{i}, replicas: many}}\n",
                 items=_per(7))


def unknown_keys() -> str:
    return _fill(HEAD, lambda i: f"  - {{name: m{i}, model: org/m{i}, max_model_lenn: {i}}}\n",
                 items=_per(7))


def duplicate_names() -> str:
    return _fill(HEAD, lambda i: "  - {name: same, model: org/m}\n", items=_per(5))


def port_clash() -> str:
    return _fill(HEAD, lambda i: f"  - {{name: m{i}, model: org/m, port: 9000, host: 0.0.0.0, "
                                 "env: {VLLM_API_KEY: '${K}'}}\n", items=_per(13))


def one_line() -> str:
    """The whole garden as one flow line (a 1 MiB line), every model with an error."""
    return _fill("{name: worst, models: [",
                 lambda i: f"{{name: m{i}, model: org/m, replicas: x}}, ", "]}\n",
                 items=_per(7))


def control_chars() -> str:
    """Escaped control characters in values that error messages quote."""
    return _fill(HEAD, lambda i: f'  - {{name: m{i}, model: "-org\\n\\x1b[2J{i}", '
                                 f'args: ["--bad\\e[31m{i}"]}}\n', items=_per(8))


def many_values() -> str:
    return "name: worst\nmodels: []\nx: [" + "0," * ((TARGET - 40) // 2) + "0]\n"


SHAPES = [
    # legal: valid, perhaps with warnings (sized to the value budget where it would bind)
    Shape("many-models", True, many_models, "as many models as the value budget allows"),
    Shape("models-inventory", True, models_with_inventory,
          "the same and an inventory they overflow: validate estimates and places them"),
    Shape("merged-models", True, merged_models, "models that each merge the first (`<<:`)"),
    Shape("args-known", True, args_known, "one model with ~50k known args"),
    Shape("args-unknown", True, args_unknown, "one model, ~40k args unknown (warnings)"),
    Shape("alias-list-fanout", True, alias_list_fanout, "models sharing a 60-arg alias"),
    Shape("env-huge", True, env_huge, "one model with ~25k env entries"),
    Shape("env-merge", True, env_merge, "10k defaults.env entries merged into ~3k models"),
    Shape("long-string", True, long_string, "a 1 MiB revision string"),
    Shape("long-flag", True, long_flag, "a 1 MiB unknown flag (a warning)"),
    # illegal: refused with located issues
    Shape("args-refused", False, args_refused, "~50k refused args (secrets, GPU, memory)"),
    Shape("env-secrets", False, env_secrets, "~25k literal secrets in env"),
    Shape("env-gpu-overrides", False, env_gpu_overrides, "models overriding GPUs/ports in env"),
    Shape("long-key", False, long_key, "a 1 MiB unknown key"),
    Shape("long-name", False, long_name, "a 1 MiB model name"),
    Shape("alias-string-bomb", False, alias_string_bomb, "990 aliases of a 900 KB string"),
    Shape("too-many-models", False, too_many_models, "1 MiB of models, over the value budget"),
    Shape("deep-nesting", False, deep_nesting, "args nested 29 deep, an error each"),
    Shape("wrong-types", False, wrong_types, "models with `replicas: many`"),
    Shape("unknown-keys", False, unknown_keys, "models with an unknown key"),
    Shape("duplicate-names", False, duplicate_names, "models that share one name"),
    Shape("port-clash", False, port_clash, "models on one port"),
    Shape("one-line", False, one_line, "the garden on one line, an error per model"),
    Shape("control-chars", False, control_chars, "values with ESC and newlines"),
    Shape("many-values", False, many_values, "a list of 500k numbers (value budget)"),
]


@dataclass(frozen=True)
class Outcome:
    valid: bool
    errors: int
    warnings: int


def run_parse(raw: bytes, file: str) -> Outcome:
    try:
        loaded = parse_garden(raw, file)
    except SpecError as exc:
        errors = sum(1 for i in exc.issues if i.severity == "error")
        return Outcome(False, errors, len(exc.issues) - errors)
    return Outcome(True, 0, len(loaded.warnings))


def time_parse(raw: bytes, file: str, runs: int) -> tuple[float, Outcome]:
    times = []
    outcome = Outcome(True, 0, 0)
    for _ in range(runs):
        start = time.perf_counter()
        outcome = run_parse(raw, file)
        times.append(time.perf_counter() - start)
    return statistics.median(times), outcome


def time_cli(path: Path, runs: int, env: dict[str, str]) -> tuple[float, int, int]:
    """Median seconds, exit status and output bytes of `python -m gardenctl validate FILE`."""
    argv = [sys.executable, "-m", "gardenctl", "validate", str(path)]
    times = []
    code, size = 0, 0
    for i in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, cwd=path.parent, check=False)
        elapsed = time.perf_counter() - start
        code, size = done.returncode, len(done.stdout) + len(done.stderr)
        if i:
            times.append(elapsed)
    return statistics.median(times), code, size


def describe_machine() -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"python {platform.python_version()} ({platform.python_implementation()}), "
            f"{os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or '?'}; {now}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="parse_garden runs per shape")
    parser.add_argument("--cli-runs", type=int, default=3, help="validate processes per shape")
    parser.add_argument("--only", action="append", help="run only this shape (repeatable)")
    parser.add_argument("--limit", type=float, default=0.5,
                        help="exit 1 if a parse_garden median reaches this many seconds")
    args = parser.parse_args()

    shapes = [s for s in SHAPES if not args.only or s.name in args.only]
    header = (f"{'shape':<19} {'bytes':>9} {'expect':>7} {'outcome':>8} {'errors':>6} "
              f"{'warns':>6} {'parse ms':>9} {'validate ms':>11} {'exit':>4} {'out KB':>7}  what")
    print(header)
    print("-" * len(header))
    slow = []
    with tempfile.TemporaryDirectory(prefix="gardenctl-worst-") as tmp:
        folder = Path(tmp)
        (folder / "hf-empty").mkdir()
        env = {**os.environ, "HF_HUB_CACHE": str(folder / "hf-empty"), "HF_HUB_OFFLINE": "1",
               "GARDENCTL_STATE_DIR": str(folder / "state")}
        for shape in shapes:
            text = shape.make()
            raw = text.encode()
            assert len(raw) <= MAX_FILE_BYTES, (shape.name, len(raw))
            path = folder / f"{shape.name}.yaml"
            path.write_bytes(raw)
            parse_s, outcome = time_parse(raw, path.name, args.runs)
            cli_s, code, out = time_cli(path, args.cli_runs, env)
            if parse_s >= args.limit:
                slow.append(shape.name)
            verdict = "valid" if outcome.valid else "refused"
            print(f"{shape.name:<19} {len(raw):>9,} {'legal' if shape.legal else 'illegal':>7} "
                  f"{verdict:>8} {outcome.errors:>6} {outcome.warnings:>6} "
                  f"{parse_s * 1000:>9.0f} {cli_s * 1000:>11.0f} {code:>4} {out / 1024:>7.1f}  "
                  f"{shape.what}")
    print(f"\nparse ms: median of {args.runs} parse_garden calls in-process; validate ms: median "
          f"of {args.cli_runs} `python -m gardenctl validate FILE` processes (start-up included).")
    print(f"budgets: {MAX_VALUES:,} values and keys, {MAX_EXPANDED_CHARS:,} characters of "
          f"text, {MAX_ERRORS} errors and {MAX_WARNINGS} warnings reported one by one")
    print(f"machine: {describe_machine()}")
    if slow:
        print(f"SLOW (parse_garden >= {args.limit} s): {', '.join(slow)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
