"""`memory_cap: true`: the planned environment, the plan's display, validation, and the hook
itself in real processes (spawned, forkserver'd and forked children of a worker process).

The torch half runs against a real PyTorch when the test's Python can import one (or finds one
under $GARDENCTL_TEST_TORCH_PATH), and otherwise against `FAKE_TORCH` below: a stand-in for the
few `torch.cuda` names the hook uses, whose semantics are PyTorch's (cited there), with an
allocator that enforces the fraction so that an overrun really fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from builders import garden_text, observed_from, plan_for

from gardenctl.plan.document import plan_to_json
from gardenctl.plan.render import render_plan
from gardenctl.runtime import memcap
from gardenctl.runtime.environment import worker_environment
from gardenctl.units import GiB
from gardenctl.workers import (
    MEMORY_CAP_ENV,
    MEMORY_CAP_HOOK_DIR,
    MEMORY_CAP_PATH_ENV,
    memory_cap_of,
)

CAPPED = ("  - {name: qwen, model: Qwen/Qwen2.5-7B-Instruct, max_model_len: 8192, "
          "memory_cap: true}\n")
PLAIN = "  - {name: qwen, model: Qwen/Qwen2.5-7B-Instruct, max_model_len: 8192}\n"
TIMEOUT = 120  # a bound for a hung child, not a wait: every test waits for the process to exit


def only_worker(plan):
    (step,) = [s for s in plan.steps if s.worker is not None]
    return step


# -- the plan -------------------------------------------------------------------------------

def test_a_capped_worker_gets_the_hook_first_on_pythonpath_and_its_claim_less_the_context():
    step = only_worker(plan_for(garden_text(CAPPED), budgets={"qwen": 9}))
    env = dict(step.worker.env)

    # builders.estimate: context 0.5 GiB outside the budget; the claim is ceil(F x T) + context
    assert int(env[MEMORY_CAP_ENV]) == step.claim_bytes - int(0.5 * GiB)
    assert int(env[MEMORY_CAP_ENV]) >= 9 * GiB  # never below what vLLM's own budget holds
    assert env["PYTHONPATH"] == MEMORY_CAP_HOOK_DIR
    assert Path(MEMORY_CAP_HOOK_DIR, "sitecustomize.py").is_file()
    assert MEMORY_CAP_HOOK_DIR == memcap.HOOK_DIR and MEMORY_CAP_ENV == memcap.CAP_ENV
    assert memory_cap_of(step.worker) == int(env[MEMORY_CAP_ENV])


def test_an_uncapped_worker_has_neither_variable():
    step = only_worker(plan_for(garden_text(PLAIN), budgets={"qwen": 9}))

    assert MEMORY_CAP_ENV not in dict(step.worker.env)
    assert "PYTHONPATH" not in dict(step.worker.env)
    assert memory_cap_of(step.worker) is None


def test_the_models_own_pythonpath_comes_after_the_hook():
    literal = CAPPED.replace("memory_cap: true}", "memory_cap: true, env: {PYTHONPATH: /opt/x}}")
    reference = CAPPED.replace("memory_cap: true}",
                               "memory_cap: true, env: {PYTHONPATH: '${MY_PATH}'}}")

    env = dict(only_worker(plan_for(garden_text(literal))).worker.env)
    assert env["PYTHONPATH"] == f"{MEMORY_CAP_HOOK_DIR}{os.pathsep}/opt/x"
    assert MEMORY_CAP_PATH_ENV not in env

    # a reference is resolved only at start-up: the hook puts it on sys.path after itself
    env = dict(only_worker(plan_for(garden_text(reference))).worker.env)
    assert env["PYTHONPATH"] == MEMORY_CAP_HOOK_DIR
    assert env[MEMORY_CAP_PATH_ENV] == "${MY_PATH}"


def test_turning_the_cap_on_replaces_the_running_worker():
    running = plan_for(garden_text(PLAIN), budgets={"qwen": 9})

    plan = plan_for(garden_text(CAPPED), observed_from(running), budgets={"qwen": 9})

    (step,) = [s for s in plan.steps if s.kind.value == "replace"]
    assert step.worker.spec_hash != only_worker(running).worker.spec_hash
    assert memory_cap_of(step.worker) is not None and memory_cap_of(step.previous) is None


def test_the_plan_shows_the_cap_in_text_and_json():
    plan = plan_for(garden_text(CAPPED), budgets={"qwen": 9})
    cap = memory_cap_of(only_worker(plan).worker)

    (action,) = plan_to_json(plan)["actions"]
    assert action["memory_cap_bytes"] == cap
    assert action["spec"]["env"][MEMORY_CAP_ENV] == str(cap)
    assert "  cap 9." in render_plan(plan)  # "claims 9.x GiB  cap 9.y GiB"

    (plain,) = plan_to_json(plan_for(garden_text(PLAIN), budgets={"qwen": 9}))["actions"]
    assert plain["memory_cap_bytes"] is None
    assert " cap " not in render_plan(plan_for(garden_text(PLAIN), budgets={"qwen": 9}))


def test_validate_refuses_a_cap_set_by_hand_with_file_and_line(gardenctl, workdir):
    text = garden_text(PLAIN.replace("8192}",
                                     "8192,\n      env: {GARDENCTL_MEMORY_CAP_BYTES: '1'}}"))
    (workdir / "garden.yaml").write_bytes(text)

    result = gardenctl("validate")

    assert result.code == 1
    assert result.err.startswith(
        "garden.yaml:8:13: error: models[0].env.GARDENCTL_MEMORY_CAP_BYTES: "
        "GARDENCTL_MEMORY_CAP_BYTES is the hard memory limit gardenctl derives from the worker's "
        "claim")
    assert "memory_cap: true" in result.err  # the hint


def test_the_planned_variables_reach_the_worker_but_the_controllers_do_not():
    step = only_worker(plan_for(garden_text(CAPPED), budgets={"qwen": 9}))
    controller = {"PATH": "/usr/bin", "PYTHONPATH": "/controller/only",
                  MEMORY_CAP_ENV: "1", MEMORY_CAP_PATH_ENV: "/controller/only"}

    uncapped = worker_environment(controller, {}, {})
    capped = worker_environment(controller, dict(step.worker.env), {})

    assert "PYTHONPATH" not in uncapped and MEMORY_CAP_ENV not in uncapped
    assert capped["PYTHONPATH"] == MEMORY_CAP_HOOK_DIR
    assert capped[MEMORY_CAP_ENV] == dict(step.worker.env)[MEMORY_CAP_ENV]
    assert MEMORY_CAP_PATH_ENV not in capped


# -- the hook in real processes ---------------------------------------------------------------

# A worker process that starts one child with each multiprocessing start method (vLLM starts
# its EngineCore and TP workers with fork, spawn or forkserver depending on release, Python
# version and VLLM_WORKER_MULTIPROC_METHOD) and reports what each one found.
TREE = textwrap.dedent("""\
    import json, multiprocessing as mp, os, sys

    def report():
        hook = sys.modules.get("gardenctl_memcap")
        finder = any(type(f).__name__ == "TorchCudaFinder" for f in sys.meta_path)
        return {"pid": os.getpid(), "hook": hook is not None,
                "cap": getattr(hook, "cap_bytes", None), "armed": finder,
                "site": getattr(sys.modules.get("sitecustomize"), "__file__", None),
                "chained": os.environ.get("CHAINED_MARK")}

    def child(queue):
        queue.put(report())

    if __name__ == "__main__":
        found = {"worker": report()}
        for method in ("spawn", "forkserver", "fork"):
            ctx = mp.get_context(method)
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(queue,))
            proc.start()
            found[method] = queue.get(timeout=TIMEOUT)
            proc.join()
        print(json.dumps(found))
""").replace("TIMEOUT", str(TIMEOUT))


def run_worker(tmp_path: Path, env: dict[str, str],
               script: str = TREE) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "worker_tree.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path)], env=env, cwd=tmp_path, text=True,
                          capture_output=True, timeout=TIMEOUT, check=False)


def planned_env(cap_bytes: int | None = 3 * GiB, **extra: str) -> dict[str, str]:
    """The environment a capped worker really starts with (runtime.environment on the plan)."""
    step = only_worker(plan_for(garden_text(CAPPED), budgets={"qwen": 9}))
    env = worker_environment(os.environ, dict(step.worker.env), {})
    if cap_bytes is None:
        env.pop(MEMORY_CAP_ENV)
    else:
        env[MEMORY_CAP_ENV] = str(cap_bytes)
    env.update(extra)
    return env


def test_the_hook_is_armed_in_the_worker_and_in_spawned_forkserved_and_forked_children(tmp_path):
    done = run_worker(tmp_path, planned_env(3 * GiB, GARDENCTL_MEMORY_CAP_DEBUG="1"))

    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert set(found) == {"worker", "spawn", "forkserver", "fork"}
    for name, seen in found.items():
        assert seen == {**seen, "hook": True, "cap": 3 * GiB, "armed": True}, name
    pids = {seen["pid"] for seen in found.values()}
    assert len(pids) == 4
    # every interpreter that started (not the forked copy) says so once on stderr
    started = [line for line in done.stderr.splitlines() if "hook installed in pid" in line]
    assert len(started) >= 3  # worker, spawn child, forkserver (its server and/or the child)
    assert f"hook installed in pid {found['worker']['pid']} " in done.stderr
    assert f"hook installed in pid {found['spawn']['pid']} " in done.stderr


def test_without_the_variable_the_hook_does_nothing(tmp_path):
    done = run_worker(tmp_path, planned_env(None))

    assert done.returncode == 0, done.stderr
    for seen in json.loads(done.stdout).values():
        assert seen["cap"] is None and seen["armed"] is False
    assert "gardenctl memory cap" not in done.stderr


def test_a_bad_value_is_one_line_on_stderr_and_the_worker_runs(tmp_path):
    done = run_worker(tmp_path, planned_env(None, GARDENCTL_MEMORY_CAP_BYTES="12GiB"))

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["worker"]["cap"] is None
    assert "ignoring GARDENCTL_MEMORY_CAP_BYTES='12GiB'" in done.stderr


def test_the_next_sitecustomize_on_the_path_still_runs(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['CHAINED_MARK'] = 'yes'\n")
    env = planned_env(2 * GiB)
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{theirs}"

    done = run_worker(tmp_path, env)

    assert done.returncode == 0, done.stderr
    for seen in json.loads(done.stdout).values():
        assert seen["cap"] == 2 * GiB
        assert seen["chained"] == "yes"
        assert seen["site"] == str(theirs / "sitecustomize.py")


def test_a_pythonpath_given_by_reference_is_put_after_the_hook(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "their_module.py").write_text("VALUE = 42\n")
    script = ("import sys, their_module\n"
              f"print(sys.path.index({MEMORY_CAP_HOOK_DIR!r}) < sys.path.index({str(theirs)!r}),"
              " their_module.VALUE)\n")

    done = run_worker(tmp_path, planned_env(2 * GiB, **{MEMORY_CAP_PATH_ENV: str(theirs)}),
                      script)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "42"]


# -- the torch half ---------------------------------------------------------------------------

# A stand-in for the part of torch.cuda the hook touches; each name behaves as PyTorch's
# (torch/cuda/__init__.py and torch/cuda/memory.py, 2.13/2.14):
# - `_queued_calls` holds (callable, traceback) pairs until `_lazy_init()` runs them right after
#   initialising, with `_tls.is_initializing` set (re-entrant calls to `_lazy_init` return);
# - `_lazy_call(fn)` calls fn at once when initialised, else queues it;
# - `set_per_process_memory_fraction(f, device)` calls `_lazy_init()` and requires a float in
#   [0, 1]; the caching allocator then refuses a segment that would bring its reserved bytes on
#   that device past f x total (OutOfMemoryError, "CUDA out of memory");
# - `set_device` initialises CUDA first; `device_count()` is the visible devices;
#   `get_device_properties(d).total_memory` is the device's total.
# Here the "GPU" is a counter per process: allocating is adding to it.
FAKE_TORCH = {
    "torch/__init__.py": "from torch import cuda\n",
    "torch/cuda/__init__.py": textwrap.dedent("""\
        import os, threading, traceback
        from types import SimpleNamespace

        class OutOfMemoryError(RuntimeError):
            pass

        TOTAL = 80 * 1024 ** 3
        _initialized = False
        _tls = threading.local()
        _queued_calls = []
        _fraction = {}
        _reserved = {}
        _device = 0

        def is_initialized():
            return _initialized

        def _lazy_call(fn, **kwargs):
            if _initialized:
                fn()
            else:
                _queued_calls.append((fn, traceback.format_stack()))

        def _lazy_init():
            global _initialized
            if _initialized or hasattr(_tls, "is_initializing"):
                return
            _tls.is_initializing = True
            try:
                for fn, _ in _queued_calls:
                    fn()
            finally:
                del _tls.is_initializing
            _initialized = True

        def device_count():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
            return len([d for d in visible.split(",") if d])

        def get_device_properties(device):
            _lazy_init()
            return SimpleNamespace(total_memory=TOTAL)

        def current_device():
            _lazy_init()
            return _device

        def set_device(device):
            global _device
            _lazy_init()
            _device = int(device)

        def set_per_process_memory_fraction(fraction, device=None):
            _lazy_init()
            if not isinstance(fraction, float) or not 0 <= fraction <= 1:
                raise ValueError(fraction)
            _fraction[_device if device is None else device] = fraction

        def allocate(nbytes, device=0):
            _lazy_init()
            limit = _fraction.get(device, 1.0) * TOTAL
            if _reserved.get(device, 0) + nbytes > limit:
                raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")
            _reserved[device] = _reserved.get(device, 0) + nbytes
        """),
}


def real_torch_path() -> str:
    """Where a real torch is for the test's Python ($GARDENCTL_TEST_TORCH_PATH or installed);
    skips the test when there is none (a CPU build is enough)."""
    extra = os.environ.get("GARDENCTL_TEST_TORCH_PATH", "")
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": extra}, timeout=TIMEOUT, check=False)
    if probe.returncode != 0:
        pytest.skip("no PyTorch for this Python (set GARDENCTL_TEST_TORCH_PATH or install a "
                    "CPU build)")
    return extra


def test_with_real_torch_the_cap_is_queued_for_cuda_init_without_initialising_it(tmp_path):
    """In a spawned child (vLLM's EngineCore), importing the real torch queues our call in
    torch.cuda._queued_calls and leaves CUDA uninitialised; set_device is wrapped. This is the
    contract with PyTorch's private names the hook relies on."""
    where = real_torch_path()
    script = textwrap.dedent("""\
        import json, multiprocessing as mp

        def child(queue):
            import torch
            names = [getattr(fn, "func", fn).__name__ for fn, _ in torch.cuda._queued_calls]
            queue.put({"queued": names, "initialized": torch.cuda.is_initialized(),
                       "wrapped": getattr(torch.cuda.set_device, "_gardenctl_memcap", False)})

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(queue,))
            proc.start()
            print(json.dumps(queue.get(timeout=TIMEOUT)))
            proc.join()
        """).replace("TIMEOUT", str(TIMEOUT))
    env = planned_env(3 * GiB)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env["PYTHONPATH"], where) if p)

    done = run_worker(tmp_path, env, script)

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert "at_cuda_init" in seen["queued"], seen
    assert seen["initialized"] is False
    assert seen["wrapped"] is True


OVERRUN = textwrap.dedent("""\
    import multiprocessing as mp, sys

    def engine(nbytes):  # the EngineCore child: allocates, then more
        import torch
        torch.cuda.allocate(nbytes)
        print("allocated", nbytes, flush=True)

    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[1])
        proc = ctx.Process(target=engine, args=(int(sys.argv[2]),))
        proc.start()
        proc.join()
        sys.exit(proc.exitcode)
    """)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_capped_worker_that_overruns_fails_alone(tmp_path, method):
    """Two workers on one (simulated) GPU, each allocating in its engine child: the capped one
    that asks for more than its cap dies with OutOfMemoryError; the uncapped neighbour, asking
    for the same, is not affected. Runs on the fake torch (a real one needs a GPU: see
    scripts/gpu-check)."""
    fake = torch_path_fake(tmp_path)
    cap, ask = 2 * GiB, 3 * GiB
    capped = planned_env(cap)
    capped["PYTHONPATH"] += os.pathsep + fake
    neighbour = planned_env(None)
    neighbour["PYTHONPATH"] = os.pathsep.join((neighbour["PYTHONPATH"], fake))

    over = run_worker(tmp_path, capped, OVERRUN.replace("sys.argv[1]", repr(method))
                      .replace("int(sys.argv[2])", str(ask)))
    fine = run_worker(tmp_path, neighbour, OVERRUN.replace("sys.argv[1]", repr(method))
                      .replace("int(sys.argv[2])", str(ask)))
    within = run_worker(tmp_path, capped, OVERRUN.replace("sys.argv[1]", repr(method))
                        .replace("int(sys.argv[2])", str(cap)))

    assert over.returncode != 0
    assert "OutOfMemoryError: CUDA out of memory" in over.stderr
    assert "gardenctl memory cap: 2.00 GiB per GPU (fraction 0.0250 of 80.00 GiB on cuda:0)" \
        in over.stderr
    assert fine.returncode == 0, fine.stderr
    assert f"allocated {ask}" in fine.stdout
    assert within.returncode == 0, within.stderr  # exactly the cap still fits
    assert f"allocated {cap}" in within.stdout


def test_with_several_gpus_only_the_device_the_process_selects_is_capped(tmp_path):
    """A TP rank sees every GPU of the worker; capping a GPU it never uses would create a CUDA
    context there on older PyTorch releases, so the cap waits for set_device."""
    fake = torch_path_fake(tmp_path)
    env = planned_env(2 * GiB, CUDA_VISIBLE_DEVICES="3,5")
    env["PYTHONPATH"] += os.pathsep + fake
    script = textwrap.dedent("""\
        import torch
        torch.cuda.allocate(1)  # initialises CUDA: nothing capped yet (two devices)
        print(sorted(torch.cuda._fraction))
        torch.cuda.set_device(1)  # rank 1
        print(sorted(torch.cuda._fraction))
        """)

    done = run_worker(tmp_path, env, script)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "[1]"]
    assert "on cuda:1) in pid" in done.stderr


def torch_path_fake(tmp_path: Path) -> str:
    fake = tmp_path / "fake_torch"
    for name, text in FAKE_TORCH.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    return str(fake)
