"""The one reader of `vllm serve` command lines in gardenctl: which flags vLLM knows, what a
spelling means to its parser, and what a worker's argv says.

`vllm serve MODEL --flag value --switch --flag=value ...`: the words before the first flag are
the command (the vllm_command prefix, `serve` and the model); a flag takes the next word as its
value unless that word is itself a flag (``--``-prefixed) or the flag is a known switch.
vLLM's parser (argparse with its FlexibleArgumentParser) reads underscores in a long flag's
name as dashes (`--max_model_len`), accepts short spellings (`-tp`), a short flag with its value
attached (`-qawq`) and unique abbreviations of long flags (`--kv-cache-mem`).

Which flags exist is read from gardenctl/data/vllm-serve-flags-0.32.txt: every option vLLM
0.32's `vllm serve` parser accepts (docs/vllm.md section 8). Validation, the planner's
description of changes, the local runtime (orphans' command lines) and the stand-in server all
use this module. Pure, apart from reading that packaged file once.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

FLAGS_PACKAGE = "gardenctl.data"
FLAGS_FILE = "vllm-serve-flags-0.32.txt"

# Flags gardenctl itself emits without a value (vLLM 0.32's store_true / boolean flags).
SWITCHES = frozenset({"--enforce-eager", "--trust-remote-code", "--enable-sleep-mode"})

# vLLM 0.32's short spellings (engine/arg_utils.py).
SHORT_FLAGS = {
    "-ac": "--attention-config",
    "-asc": "--api-server-count",
    "-cc": "--compilation-config",
    "-dc": "--diffusion-config",
    "-dcp": "--decode-context-parallel-size",
    "-dp": "--data-parallel-size",
    "-dpa": "--data-parallel-address",
    "-dpb": "--data-parallel-backend",
    "-dpe": "--data-parallel-external-lb",
    "-dph": "--data-parallel-hybrid-lb",
    "-dpl": "--data-parallel-size-local",
    "-dpm": "--data-parallel-multi-port-external-lb",
    "-dpn": "--data-parallel-rank",
    "-dpp": "--data-parallel-rpc-port",
    "-dpr": "--data-parallel-start-rank",
    "-ep": "--enable-expert-parallel",
    "-n": "--nnodes",
    "-pcp": "--prefill-context-parallel-size",
    "-pp": "--pipeline-parallel-size",
    "-q": "--quantization",
    "-r": "--node-rank",
    "-sc": "--speculative-config",
    "-tp": "--tensor-parallel-size",
}


@lru_cache(maxsize=1)
def serve_flags() -> tuple[str, ...]:
    """Every option of vLLM 0.32's `vllm serve`, in the file's order."""
    text = resources.files(FLAGS_PACKAGE).joinpath(FLAGS_FILE).read_text(encoding="utf-8")
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


@lru_cache(maxsize=1)
def known_flags() -> frozenset[str]:
    return frozenset(serve_flags())


@lru_cache(maxsize=1)
def long_flags() -> tuple[str, ...]:
    """vLLM's long flags, sorted (for abbreviations and suggestions)."""
    return tuple(sorted(f for f in known_flags() if f.startswith("--")))


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def flag_name(word: str) -> str | None:
    """`--foo_bar=1` -> `--foo-bar`; a value (not starting with '-', or a number) -> None."""
    if not word.startswith("-") or word == "-" or is_number(word):
        return None
    name = word.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def canonical_flag(name: str) -> str | None:
    """The `vllm serve` flag that ``name`` (as `flag_name` gives it) means to vLLM's parser, or
    None if it names none: a short spelling (`-pp`), a short one with its value attached
    (`-qawq`, as argparse reads it) or a unique abbreviation of a long flag (`--kv-cache-mem`:
    argparse accepts those unless told not to)."""
    if name in SHORT_FLAGS:
        return SHORT_FLAGS[name]
    if name in known_flags():
        return name
    if not name.startswith("--"):
        return SHORT_FLAGS.get(name[:2])  # -qawq: a two-letter short flag and its value
    flags = long_flags()
    at = bisect.bisect_left(flags, name)
    if at < len(flags) and flags[at].startswith(name):
        unique = at + 1 == len(flags) or not flags[at + 1].startswith(name)
        return flags[at] if unique else None
    return None


def split_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(the command words before the first flag, {flag name: value, '' for a switch})."""
    head: list[str] = []
    i = 0
    while i < len(argv) and flag_name(argv[i]) is None:
        head.append(argv[i])
        i += 1
    flags: dict[str, str] = {}
    while i < len(argv):
        word = argv[i]
        name = flag_name(word)
        if name is None:  # a stray value: keep it visible rather than lose it
            flags[word] = ""
            i += 1
        elif "=" in word:
            flags[name] = word.split("=", 1)[1]
            i += 1
        elif name not in SWITCHES and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[name] = argv[i + 1]
            i += 2
        else:
            flags[name] = ""
            i += 1
    return head, flags


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of flag ``name`` in ``argv`` (None when absent or a switch)."""
    value = split_argv(argv)[1].get(name)
    return value or None


def served_model(argv: Sequence[str]) -> str:
    """The model a `vllm serve` argv serves (the word after `serve`), or ''."""
    head = split_argv(argv)[0]
    return head[head.index("serve") + 1] if "serve" in head[:-1] else ""


__all__ = ["SHORT_FLAGS", "SWITCHES", "canonical_flag", "flag_name", "flag_value",
           "is_number", "known_flags", "long_flags", "serve_flags", "served_model", "split_argv"]
