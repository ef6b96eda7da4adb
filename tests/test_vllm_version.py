"""Detecting the vLLM release a vllm_command runs: real processes, a real cache file."""

from __future__ import annotations

import json
import os
import stat
import sys

import psutil
import pytest

from gardenctl.spec.models import ModelSpec
from gardenctl.vllm_version import (
    CACHE_FILE,
    declared_or_detected,
    detect_vllm_version,
    detection_env,
    parse_version_output,
)

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def fake_vllm(folder, body, name="vllm"):
    """An executable that records each call (argv, one line) in calls.txt and runs ``body``."""
    path = folder / name
    calls = folder / "calls.txt"
    path.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"{body}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def calls(folder):
    path = folder / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_the_version_is_asked_once_and_then_read_from_the_cache(tmp_path):
    script = fake_vllm(tmp_path, "print('0.19.1')")
    cache = tmp_path / "state"

    first = detect_vllm_version([str(script)], ENV, cache)
    second = detect_vllm_version([str(script)], ENV, cache)

    assert first is not None and second is not None
    assert (first.version, first.cached) == ("0.19.1", False)
    assert (second.version, second.cached) == ("0.19.1", True)
    assert calls(tmp_path) == ["--version"]
    assert json.loads((cache / CACHE_FILE).read_text())["entries"]


def test_a_changed_executable_is_asked_again(tmp_path):
    script = fake_vllm(tmp_path, "print('0.19.1')")
    cache = tmp_path / "state"
    detect_vllm_version([str(script)], ENV, cache)

    fake_vllm(tmp_path, "print('0.32.0')")  # an upgrade in place
    later = script.stat().st_mtime_ns + 5_000_000_000
    os.utime(script, ns=(later, later))
    again = detect_vllm_version([str(script)], ENV, cache)

    assert again is not None and (again.version, again.cached) == ("0.32.0", False)
    assert calls(tmp_path) == ["--version", "--version"]


def test_a_different_environment_or_argv_is_a_different_entry(tmp_path):
    script = fake_vllm(tmp_path, "print(os.environ.get('WHICH', '0.19.0'))")
    cache = tmp_path / "state"

    plain = detect_vllm_version([str(script)], ENV, cache)
    other = detect_vllm_version([str(script)], {**ENV, "WHICH": "0.11.0"}, cache)
    with_arg = detect_vllm_version([str(script), "--flag"], ENV, cache)

    assert plain is not None and other is not None and with_arg is not None
    assert (plain.version, other.version, with_arg.version) == ("0.19.0", "0.11.0", "0.19.0")
    assert calls(tmp_path) == ["--version", "--version", "--flag --version"]


def test_the_child_sees_only_the_environment_it_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("GARDENCTL_TEST_SECRET", "s3cret")
    script = fake_vllm(
        tmp_path, "print('0.20.0' if 'GARDENCTL_TEST_SECRET' not in os.environ else '9.9.9')"
    )

    found = detect_vllm_version([str(script)], ENV, None)

    assert found is not None and found.version == "0.20.0"


def test_a_command_found_on_path_is_keyed_by_its_resolved_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_vllm(bin_dir, "print('0.18.0')")

    found = detect_vllm_version(["vllm"], {"PATH": str(bin_dir)}, tmp_path / "state")

    assert found is not None
    assert found.version == "0.18.0"
    assert found.executable == os.path.abspath(bin_dir / "vllm")


def test_python_m_commands_run_through_the_interpreter(tmp_path):
    module = tmp_path / "fake_vllm_cli.py"
    module.write_text("import sys\nprint('0.11.0' if sys.argv[1:] == ['--version'] else 'x')\n")

    found = detect_vllm_version(
        [sys.executable, "-m", "fake_vllm_cli"], {**ENV, "PYTHONPATH": str(tmp_path)}, None
    )

    assert found is not None
    assert found.version == "0.11.0"
    assert found.executable == os.path.abspath(sys.executable)  # not the symlink's target


@pytest.mark.parametrize(
    "body",
    [
        "sys.exit(2)",  # e.g. a command that does not know --version
        "print('no version here')",
        "print('0.19.1'); sys.exit(1)",
    ],
)
def test_failures_give_none_and_are_not_cached_on_disk(tmp_path, body):
    script = fake_vllm(tmp_path, body)
    cache = tmp_path / "state"

    assert detect_vllm_version([str(script)], ENV, cache) is None
    assert not (cache / CACHE_FILE).exists()


def test_missing_commands_give_none_without_running_anything(tmp_path):
    assert detect_vllm_version(["no-such-vllm-here"], {"PATH": str(tmp_path)}, None) is None
    assert detect_vllm_version([str(tmp_path / "nothing")], ENV, None) is None
    assert detect_vllm_version([], ENV, None) is None


def test_a_command_that_hangs_is_stopped_at_the_timeout(tmp_path):
    script = fake_vllm(tmp_path, "import time\ntime.sleep(60)")

    assert detect_vllm_version([str(script)], ENV, None, timeout=0.5) is None


def test_endless_output_is_cut_off(tmp_path):
    script = fake_vllm(tmp_path, "while True:\n    sys.stdout.write('x' * 65536)")

    assert detect_vllm_version([str(script)], ENV, None, timeout=10) is None


def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    script = fake_vllm(tmp_path, "print('0.19.1')")
    cache = tmp_path / "state"
    cache.mkdir()
    (cache / CACHE_FILE).write_text("{not json")

    found = detect_vllm_version([str(script)], ENV, cache)

    assert found is not None and found.version == "0.19.1"
    assert json.loads((cache / CACHE_FILE).read_text())["format"] == 1


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("0.32.0\n", "0.32.0"),
        ("vllm 0.19.1\n", "0.19.1"),
        ("INFO something\n0.7.1.dev12+gabc\n", "0.7.1.dev12+gabc"),
        # vLLM may log to stdout before it answers: other versions in those lines are not it
        ("WARNING 12-01 10:00:00.123 Using CUDA 12.8 with torch 2.9.0\n0.19.1\n", "0.19.1"),
        ("0.19.1\nINFO 12-01 10:00:00 exiting\n", "0.19.1"),
        ("v0.11.0\n", "0.11.0"),
        ("nothing\n", None),
    ],
)
def test_the_last_line_that_is_a_version_is_taken(text, version):
    assert parse_version_output(text) == version


def test_declared_versions_win_and_undetectable_ones_say_why(tmp_path):
    script = fake_vllm(tmp_path, "print('0.17.0')")
    resolve = declared_or_detected(tmp_path / "state", ENV, probe=True)
    declared = ModelSpec(name="a", model="m", vllm_version="0.19.0", vllm_command=[str(script)])
    detected = ModelSpec(name="b", model="m", vllm_command=[str(script)])
    same = ModelSpec(name="c", model="n", vllm_command=[str(script)])
    missing = ModelSpec(name="d", model="m", vllm_command=[str(tmp_path / "absent")])

    assert resolve(declared) == ("0.19.0", "")
    assert resolve(detected) == ("0.17.0", "")
    assert resolve(same) == ("0.17.0", "")
    version, why = resolve(missing)
    assert version is None and "absent --version" in why
    assert calls(tmp_path) == ["--version"]  # once for b and c, never for the declared a


def test_plan_status_and_validate_never_run_the_command_they_only_read_what_apply_learned(
        tmp_path):
    # A CI job validating a pull request must not execute the pull request's vllm_command.
    script = fake_vllm(tmp_path, "print('0.17.0')")
    model = ModelSpec(name="b", model="m", vllm_command=[str(script)])
    (tmp_path / "state").mkdir()

    version, why = declared_or_detected(tmp_path / "state", ENV)(model)
    assert version is None and "never run it" in why
    assert calls(tmp_path) == []
    assert list((tmp_path / "state").iterdir()) == []  # nothing written either

    assert declared_or_detected(tmp_path / "state", ENV, probe=True)(model) == ("0.17.0", "")
    assert declared_or_detected(tmp_path / "state", ENV)(model) == ("0.17.0", "")
    assert calls(tmp_path) == ["--version"]


def test_detection_passes_the_models_env_but_no_secrets():
    model = ModelSpec(
        name="a", model="m",
        env={"VLLM_TARGET": "cuda", "HF_TOKEN": "${HF_TOKEN}", "MY_API_KEY": "plain"},
    )

    env = detection_env(model, {"PATH": "/bin", "HOME": "/h", "OTHER": "x"})

    assert env == {"PATH": "/bin", "HOME": "/h", "VLLM_TARGET": "cuda"}


def test_a_probe_that_answers_leaves_no_process_behind(tmp_path):
    # A wrapper (a container runner, a launcher script) may leave children running after it
    # printed the version: the probe's whole process group goes.
    pid_file = tmp_path / "child.pid"
    script = fake_vllm(tmp_path, (
        "import subprocess\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('0.21.0', flush=True)"))

    found = detect_vllm_version([str(script)], ENV, None)

    assert found is not None and found.version == "0.21.0"
    try:
        child = psutil.Process(int(pid_file.read_text()))
    except psutil.NoSuchProcess:
        return  # gone already
    # SIGKILL was sent to its group: wait for it to die (a zombie reparented to init counts).
    gone, alive = psutil.wait_procs([child], timeout=10)
    assert gone or all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


def test_a_bare_command_name_is_found_where_the_runtime_finds_it():
    # `vllm_command: [standin-vllm]` (or [vllm]) runs the one beside gardenctl's own Python
    # even when that folder is not on PATH: detection asks that same executable.
    beside = os.path.join(os.path.dirname(sys.executable), "standin-vllm")
    if not os.access(beside, os.X_OK):
        pytest.skip("gardenctl is not installed with its console scripts in this environment")
    found = detect_vllm_version(["standin-vllm"], {"PATH": "/nonexistent"}, None)
    assert found is not None
    assert (found.version, found.executable) == ("0.32.0", beside)
