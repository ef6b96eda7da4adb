"""The stand-in's command line: exactly the flags of vLLM 0.32's `vllm serve`, parsed like it.

The flag list comes from ``gardenctl/data/vllm-serve-flags-0.32.txt`` (one option a line,
``#`` comments). Every listed flag is accepted, in ``--flag value`` and ``--flag=value``
form, and anything else is rejected the way argparse does it in vLLM (exit 2,
``vllm serve: error: unrecognized arguments: --foo``). Like vLLM's FlexibleArgumentParser,
underscores in a long flag's name are read as dashes (``--max_model_len``); unlike it,
dotted JSON keys (``--compilation-config.level=3``) and ``--config FILE`` contents are not
expanded (``--config`` is accepted and ignored).

Which flags take a value (vLLM builds its parser from typed config classes; we only have the
names), decided in this order:

1. The flags gardenctl emits are declared explicitly below, with vLLM's types and defaults.
2. A flag listed together with its ``--no-`` twin is a boolean (argparse's
   BooleanOptionalAction, which is how vLLM declares ``bool`` fields).
3. ``STORE_TRUE_FLAGS``: the few booleans vLLM declares with ``action="store_true"``, which
   have no ``--no-`` twin.
4. Everything else takes exactly one value, except ``MULTI_VALUE_FLAGS`` (vLLM's list-typed
   fields, ``nargs="+"``).

Short spellings (``-tp``, ``-q``, ...) are aliases of the long flags in ``SHORT_ALIASES``; a
listed short flag missing from that table is accepted on its own, taking one value.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from gardenctl.argv import SHORT_FLAGS, serve_flags

VLLM_VERSION = "0.32.0"

# vLLM's default model when neither MODEL nor --model is given (ModelConfig.model).
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
# vLLM 0.32's default: 0.92 since 0.20.0, 0.9 before (docs/vllm.md section 1).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92

# Booleans without a --no- twin (action="store_true" in vLLM 0.32).
STORE_TRUE_FLAGS = frozenset({
    "--aggregate-engine-logging",
    "--data-parallel-multi-port-external-lb",
    "--disable-log-stats",
    "--grpc",
    "--headless",
})

# Flags that take one or more values (list-typed fields in vLLM, nargs="+").
MULTI_VALUE_FLAGS = frozenset({
    "--allowed-media-domains",
    "--cudagraph-capture-sizes",
    "--ignore-patterns",
    "--logits-processors",
    "--lora-modules",
})

SHORT_ALIASES = SHORT_FLAGS  # vLLM 0.32's short spellings, kept in gardenctl.argv

# Destinations whose values are secrets: shown as '***' wherever the stand-in prints args.
SECRET_DESTS = frozenset({"api_key", "hf_token"})
MASK = "***"

DESCRIPTION = f"""\
Test stand-in for `vllm serve` (vLLM {VLLM_VERSION}), part of gardenctl's test tools.
It loads no model and uses no GPU: it binds the port, pretends to load for a while, prints
vLLM-like start-up logs and memory lines, then answers vLLM's HTTP API with canned replies.
It accepts every flag of the real `vllm serve` (those not shown below are accepted and
ignored) and rejects any other, like vLLM's parser.
"""


def load_serve_flags() -> tuple[str, ...]:
    """Every option of vLLM 0.32's `vllm serve`, in file order."""
    return serve_flags()


def human_readable_int(value: str) -> int:
    """vLLM's integer syntax for sizes: ``32768``, ``32k`` (x1000) or ``32K`` (x1024)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value.strip())
    if not match:
        return int(value)
    number, suffix = match.groups()
    power = "kmgt".index(suffix.lower()) + 1
    if suffix.islower():
        return int(float(number) * 1000**power)
    return int(number) * 1024**power  # binary suffixes take whole numbers only, as in vLLM


def _declare_parsed_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The flags the stand-in reads (gardenctl emits them), with vLLM's types and defaults.

    Returns the option strings declared.
    """
    boolean = argparse.BooleanOptionalAction
    declared: set[str] = set()

    def add(*names: str, **kwargs: Any) -> None:
        declared.update(parser.add_argument(*names, **kwargs).option_strings)

    add("model_tag", nargs="?", metavar="MODEL", help="model name or path (default: --model)")
    add("--model", default=DEFAULT_MODEL, help="used when MODEL is not given")
    add("--host", default="0.0.0.0", help="address to listen on")
    add("--port", type=int, default=8000, help="port to listen on")
    add("--served-model-name", nargs="+", help="name(s) /v1/models lists (default: MODEL)")
    add("--max-model-len", type=human_readable_int, help="context length, e.g. 32768 or 32k")
    add("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs per instance")
    add("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
        help="fraction of the simulated GPU's total memory this instance may use")
    add("--kv-cache-memory-bytes", type=human_readable_int, help="KV cache size, skips profiling")
    add("--dtype", default="auto")
    add("--quantization", "-q")
    add("--kv-cache-dtype", default="auto", help="fp8* halves the simulated KV bytes per token")
    add("--max-num-seqs", type=int)
    add("--max-num-batched-tokens", type=int)
    add("--enforce-eager", action=boolean, default=False, help="no CUDA-graph memory")
    add("--api-key", nargs="+", help="require `Authorization: Bearer KEY` on /v1 routes")
    add("--hf-token", nargs="?", const=True)
    add("--shutdown-timeout", type=int, default=0,
        help="seconds to let in-flight requests finish after SIGTERM")
    add("--revision")
    add("--trust-remote-code", action=boolean, default=False)
    add("--seed", type=int, default=0)
    add("--enable-sleep-mode", action=boolean, default=False,
        help="with VLLM_SERVER_DEV_MODE=1: /sleep, /wake_up, /is_sleeping")
    add("--enable-log-requests", action=boolean, default=False)
    add("--disable-uvicorn-access-log", action=boolean, default=False)
    return declared


def _declare_accepted_flags(
    parser: argparse.ArgumentParser, listed: Sequence[str], declared: set[str]
) -> None:
    """Every other listed flag: accepted, not shown in --help, its value ignored."""
    listed_set = set(listed)
    shorts_of: dict[str, list[str]] = {}
    for flag in listed:
        alias_of = SHORT_ALIASES.get(flag)
        if alias_of in listed_set:
            shorts_of.setdefault(alias_of, []).append(flag)
    for flag in listed:
        if flag in declared or (flag in SHORT_ALIASES and SHORT_ALIASES[flag] in listed_set):
            continue  # declared already, or added below together with its long flag
        if flag.startswith("--no-") and "--" + flag[len("--no-"):] in listed_set:
            continue  # created by BooleanOptionalAction for its twin
        names = [flag, *shorts_of.get(flag, [])]
        if flag in STORE_TRUE_FLAGS or flag.startswith("--no-"):
            parser.add_argument(*names, action="store_true", help=argparse.SUPPRESS)
        elif flag.startswith("--") and "--no-" + flag[2:] in listed_set:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction,
                                help=argparse.SUPPRESS)
        else:
            nargs = "+" if flag in MULTI_VALUE_FLAGS else None
            parser.add_argument(*names, nargs=nargs, help=argparse.SUPPRESS)


def build_serve_parser(epilog: str = "") -> argparse.ArgumentParser:
    listed = load_serve_flags()
    parser = argparse.ArgumentParser(
        prog="vllm serve",
        description=DESCRIPTION,
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    declared = _declare_parsed_flags(parser) | {"-h", "--help"}  # argparse's own
    _declare_accepted_flags(parser, listed, declared)
    return parser


def declared_flags(parser: argparse.ArgumentParser) -> frozenset[str]:
    """Every option string the parser accepts."""
    return frozenset(option for action in parser._actions for option in action.option_strings)


def boolean_flags(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The option strings that take no value."""
    return frozenset(
        option
        for action in parser._actions
        if action.nargs == 0
        for option in action.option_strings
    )


def normalize_underscores(argv: Sequence[str]) -> list[str]:
    """``--max_model_len=8`` -> ``--max-model-len=8``, as vLLM's FlexibleArgumentParser does."""
    normalized = []
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg.partition("=")
            normalized.append(name.replace("_", "-") + sep + value)
        else:
            normalized.append(arg)
    return normalized


def parse_serve_args(argv: Sequence[str], epilog: str = "") -> argparse.Namespace:
    """Parse the arguments after ``serve``; on a usage error print it and exit 2, like vLLM.

    ``args.model`` is the model served: MODEL if given, else --model.
    """
    parser = build_serve_parser(epilog)
    args = parser.parse_args(normalize_underscores(argv))
    if args.tensor_parallel_size < 1:
        parser.error(f"argument --tensor-parallel-size/-tp: must be at least 1, "
                     f"got {args.tensor_parallel_size}")
    args.model = args.model_tag or args.model
    return args


def served_model_names(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.served_model_name or [args.model])


def api_keys(args: argparse.Namespace, environ_key: str | None) -> tuple[str, ...]:
    """The accepted keys: --api-key values, else $VLLM_API_KEY (as vLLM does); () = open."""
    if args.api_key:
        return tuple(args.api_key)
    return (environ_key,) if environ_key else ()


def non_default_args(args: argparse.Namespace) -> dict[str, Any]:
    """The model and every argument that differs from its default, secrets masked.

    vLLM logs the same dict at start-up (``non-default args: {...}``).
    """
    defaults = vars(build_serve_parser().parse_args([]))
    shown: dict[str, Any] = {"model": args.model}
    for dest, value in vars(args).items():
        if dest in ("model", "model_tag") or value == defaults.get(dest):
            continue
        shown[dest] = MASK if dest in SECRET_DESTS else value
    return shown
