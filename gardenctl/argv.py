"""The one reader of `vllm serve` command lines in gardenctl: what a worker's argv says.

`vllm serve MODEL --flag value --switch --flag=value ...`: the words before the first flag are
the command (the vllm_command prefix, `serve` and the model); a flag takes the next word as its
value unless that word is itself a flag (``--``-prefixed) or the flag is a known switch.
Underscores in a long flag's name read as dashes, as vLLM's parser reads them
(`--max_model_len` is `--max-model-len`). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

# Flags gardenctl itself emits without a value (vLLM 0.32's store_true / boolean flags).
SWITCHES = frozenset({"--enforce-eager", "--trust-remote-code", "--enable-sleep-mode"})


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


__all__ = ["SWITCHES", "flag_name", "flag_value", "is_number", "served_model", "split_argv"]
