"""The whole gardenctl loop on a machine with no GPU: validate, plan, apply, status, edit,
apply again, talk to a worker, down.

Workers are real processes: gardenctl's stand-in for `vllm serve` (it loads no model and answers
like vLLM). Everything happens in a temporary directory; nothing is left running.

    python examples/demo/demo.py            # after `pip install -e .`
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def gardenctl(*args: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gardenctl", *args]
    print(f"\n$ gardenctl {' '.join(args)}", flush=True)
    result = subprocess.run(command, cwd=cwd, env=env, text=True, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: `gardenctl {' '.join(args)}` exited {result.returncode}")
    return result


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="gardenctl-demo-"))
    env = {**os.environ, "GARDENCTL_STATE_DIR": str(work / "state")}
    garden = work / "garden.yaml"
    shutil.copy(HERE / "garden.yaml", garden)
    try:
        banner("1. validate: is the file right, and does the garden fit its two (simulated) GPUs?")
        gardenctl("validate", cwd=work, env=env)

        banner("2. plan: where each model goes, its --gpu-memory-utilization, each GPU's ledger")
        gardenctl("plan", cwd=work, env=env)

        banner("3. apply: start the workers (one at a time per GPU, each until /health is 200)")
        gardenctl("apply", "--yes", cwd=work, env=env)

        banner("4. status: what runs where")
        gardenctl("status", cwd=work, env=env)

        banner("5. talk to a worker: it is a real HTTP server")
        port = _port_of(work, env, "qwen-1-5b")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": "qwen-1-5b", "prompt": "Hello", "max_tokens": 8}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            print(json.dumps(json.load(response), indent=2))

        banner("6. edit: a longer context for phi-2, a second replica of qwen3-small")
        text = garden.read_text()
        text = text.replace("model: microsoft/phi-2\n    max_model_len: 2048",
                            "model: microsoft/phi-2\n    max_model_len: 4096")
        text = text.replace("model: Qwen/Qwen3-0.6B\n", "model: Qwen/Qwen3-0.6B\n    replicas: 2\n")
        garden.write_text(text)
        print("phi-2: max_model_len 2048 -> 4096; qwen3-small: replicas 1 -> 2")
        gardenctl("plan", cwd=work, env=env, check=False)

        banner("7. apply again: only phi-2 is replaced, one replica is added, "
               "nothing else restarts")
        gardenctl("apply", "--yes", cwd=work, env=env)
        gardenctl("status", cwd=work, env=env)

        banner("8. down: stop every worker of the garden")
        gardenctl("down", "--yes", cwd=work, env=env)
        gardenctl("status", cwd=work, env=env)
    finally:
        subprocess.run([sys.executable, "-m", "gardenctl", "down", "--yes"], cwd=work, env=env,
                       capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print("\nDemo complete: every worker was started, edited and stopped as the file said.")
    return 0


def _port_of(work: Path, env: dict, model: str) -> int:
    result = subprocess.run([sys.executable, "-m", "gardenctl", "status", "-o", "json"],
                            cwd=work, env=env, capture_output=True, text=True, check=True)
    for worker in json.loads(result.stdout)["workers"]:
        if worker["model"] == model:
            return worker["port"]
    raise SystemExit(f"demo: no worker of {model} is running")


if __name__ == "__main__":
    sys.exit(main())
