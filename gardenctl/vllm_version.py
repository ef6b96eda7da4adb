"""Which vLLM release a `vllm_command` runs, asked of the command itself (runs a subprocess).

vLLM's CLI answers `vllm --version` with the installed version alone (argparse's version
action with `importlib.metadata.version("vllm")`, `vllm/entrypoints/cli/main.py`), e.g.
`0.32.0`. gardenctl never imports vLLM: it runs `[*vllm_command, "--version"]` (an argv
list, no shell) with the environment it is given, bounded in time and output, and takes the
last line of its output that is a version alone (vLLM may log warnings to stdout first).

Only the commands that start workers (`apply`, `watch`) run it: they run what the garden file
names anyway. `validate`, `plan` and `status` read the cache and never run anything from the
file (a CI job validating a pull request must not execute the pull request's `vllm_command`).

The answer is cached in a small JSON file (`vllm-versions.json` under the state directory),
keyed by the resolved executable (for `python -m ...` that is the interpreter), its mtime and
size, the argv and a hash of the environment: reinstalling or upgrading vLLM in place changes
the executable's mtime, so the cache does not outlive it. Failures are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gardenctl.spec.models import ModelSpec

CACHE_FILE = "vllm-versions.json"
CACHE_FORMAT = 1
TIMEOUT_S = 20.0
MAX_OUTPUT = 64 * 1024  # bytes read from the command's output
MAX_ENTRIES = 64  # cache entries kept (the most recent)
# Variables of gardenctl's own environment the command may need to start (find its
# interpreter, its virtual environment, a locale); the model's non-secret env is added.
# Not PYTHONPATH or LD_LIBRARY_PATH: workers do not inherit them either (runtime/environment.py),
# so the command must answer for the vLLM the workers will run.
PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV")
_FAILED: set[str] = set()  # cache keys that gave no version in this process (not on disk)
_VERSION_LINE = re.compile(
    r"^\s*(?:vllm\s+)?v?(\d+\.\d+(?:\.\d+)?(?:[.+-]?[A-Za-z0-9.+-]*)?)\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class DetectedVersion:
    version: str  # e.g. "0.32.0"
    executable: str  # the resolved path the answer is keyed by
    cached: bool  # True: read from the cache file, the command was not run


def detect_vllm_version(
    command: Sequence[str],
    env: Mapping[str, str],
    cache_dir: Path | None,
    timeout: float = TIMEOUT_S,
    probe: bool = True,
) -> DetectedVersion | None:
    """The version `[*command, "--version"]` prints, or None when the command cannot be run,
    fails, times out or prints no version. ``env`` is the whole environment of the child
    (nothing else is inherited); ``cache_dir`` None: no cache."""
    if not command:
        return None
    executable = _resolve(command[0], env)
    if executable is None:
        return None
    key = _cache_key(executable, command, env)
    if key is None:
        return None
    cache_path = cache_dir / CACHE_FILE if cache_dir is not None else None
    entries = _read_cache(cache_path) if cache_path is not None else {}
    if key in entries:
        return DetectedVersion(entries[key], executable, cached=True)
    if key in _FAILED or not probe:
        return None
    version = _ask(executable, command, env, timeout)
    if version is None:
        _FAILED.add(key)
        return None
    if cache_path is not None:
        entries.pop(key, None)
        entries[key] = version
        _write_cache(cache_path, entries)
    return DetectedVersion(version, executable, cached=False)


def detection_env(model: ModelSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment `--version` runs with: PASSED_THROUGH of ``environ`` plus the model's
    env without secrets (names that look secret, values that reference ${...})."""
    from gardenctl.spec.models import looks_secret

    env = {name: environ[name] for name in PASSED_THROUGH if name in environ}
    for name, value in model.env.items():
        if not looks_secret(name) and "${" not in value:
            env[name] = value
    return env


def declared_or_detected(
    cache_dir: Path | None, environ: Mapping[str, str] | None = None, *, probe: bool = False
) -> Callable[[ModelSpec], tuple[str | None, str]]:
    """A `version_of` for planner.gather_estimates: a model's declared vllm_version, else the
    version its vllm_command printed (cached in ``cache_dir``), else (None, why). Only with
    ``probe`` (apply, watch) is the command run and the cache written."""
    environ = os.environ if environ is None else environ
    answers: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], str | None] = {}

    def version_of(model: ModelSpec) -> tuple[str | None, str]:
        if model.vllm_version:
            return model.vllm_version, ""
        env = detection_env(model, environ)
        key = (tuple(model.vllm_command), tuple(sorted(env.items())))
        if key not in answers:
            detected = detect_vllm_version(model.vllm_command, env, cache_dir, probe=probe)
            answers[key] = detected.version if detected else None
        version = answers[key]
        if version is None:
            shown = " ".join(model.vllm_command)
            if not probe:
                return None, (f"the vLLM release is not declared and `{shown} --version` has "
                              "not answered yet (apply and watch ask it; plan, status and "
                              "validate never run it)")
            return None, (
                f"the vLLM release could not be detected: `{shown} --version` did not run or "
                "printed no version"
            )
        return version, ""

    return version_of


def parse_version_output(text: str) -> str | None:
    """The last line of a command's output that is a version alone (X.Y[.Z][suffix]): vLLM
    may print log lines (with versions of other things in them) before its own."""
    found = None
    for line in text.splitlines():
        match = _VERSION_LINE.match(line)
        if match:
            found = match.group(1).rstrip(".")
    return found


def _resolve(program: str, env: Mapping[str, str]) -> str | None:
    """The program the workers will run: resolved by the local runtime's own rule (a path as
    given, else beside gardenctl's Python, else on PATH), NOT through symlinks: a virtual
    environment's python is a symlink to the base interpreter, and run by its real path it
    would not see the environment's packages (vLLM among them). os.stat (the cache key)
    follows links."""
    from gardenctl.runtime.base import SpawnError
    from gardenctl.runtime.local import resolve_command

    found: str | None
    try:
        found = resolve_command(program)
    except SpawnError:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
    return os.path.abspath(found) if found else None


def _cache_key(executable: str, command: Sequence[str], env: Mapping[str, str]) -> str | None:
    try:
        stat = os.stat(executable)
    except OSError:
        return None
    env_hash = hashlib.sha256(
        json.dumps(sorted(env.items()), ensure_ascii=True).encode()
    ).hexdigest()[:16]
    identity = [executable, stat.st_mtime_ns, stat.st_size, list(command), env_hash]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def _ask(executable: str, command: Sequence[str], env: Mapping[str, str],
         timeout: float) -> str | None:
    """Run the command with --version; read at most MAX_OUTPUT bytes for at most ``timeout``
    seconds, then make sure it (and its process group) is gone."""
    argv = [executable, *command[1:], "--version"]
    try:
        process = subprocess.Popen(  # an argv list from the garden file, no shell
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except (OSError, ValueError):
        return None
    assert process.stdout is not None
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    with process.stdout, selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while size < MAX_OUTPUT:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not selector.select(min(left, 0.1)):
                # Nothing to read: done once the command itself has exited, even if a child
                # it left behind still holds the pipe open.
                if process.poll() is not None:
                    break
                continue
            chunk = os.read(process.stdout.fileno(), MAX_OUTPUT - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    try:
        code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        code = None
    _kill_group(process)  # whatever it left behind (a wrapper's children) goes too
    if code is None or size >= MAX_OUTPUT or code != 0:
        return None
    return parse_version_output(b"".join(chunks).decode("utf-8", "replace"))


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass  # the group is gone already
    process.wait()


def _read_cache(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
        return {}
    entries = document.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)}


def _write_cache(path: Path, entries: dict[str, str]) -> None:
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    document = {"format": CACHE_FORMAT, "entries": kept}
    from gardenctl.files import write_json_atomic

    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json_atomic(path, document)  # 0600, like everything in the state directory
    except OSError:
        pass  # a cache that cannot be written only costs the next run a subprocess


__all__ = ["CACHE_FILE", "DetectedVersion", "declared_or_detected", "detect_vllm_version",
           "detection_env", "parse_version_output"]
