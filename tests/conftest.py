"""Fixtures for the command-line tests: run gardenctl in a fresh folder, cut off from the world.

`gardenctl(*argv)` runs the real entry point in-process (`gardenctl.cli.main`, the same error
boundary and exit codes as the installed command); `gardenctl_process(*argv)` runs
`python -m gardenctl` as a child process, for what only a real process shows (exit status and
stderr as the shell sees them, hash randomisation). Both run in the `workdir` folder with an
empty Hugging Face cache and a state directory that read-only commands must never create.
None of these fixtures is autouse: other test files are unaffected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Ray reads this when it is first imported: its test clusters (tests/ray_helpers.py) then bind
# every node to 127.0.0.1, not the machine's outward address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder for the command: empty, no garden.yaml, isolated caches and state."""
    work = tmp_path / "work"
    work.mkdir()
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GARDENCTL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def state_dir(workdir: Path) -> Path:
    """Where $GARDENCTL_STATE_DIR points for these commands (not created in advance)."""
    return Path(os.environ["GARDENCTL_STATE_DIR"])


@pytest.fixture
def gardenctl(workdir: Path, capsys: pytest.CaptureFixture):
    """Run `gardenctl ARGV...` in-process through its real entry point; returns CliResult."""
    from gardenctl.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before the command
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        out, err = capsys.readouterr()
        return CliResult(exited.value.code, out, err)

    return run


@pytest.fixture
def gardenctl_process(workdir: Path):
    """Run `python -m gardenctl ARGV...` as a child process in `workdir`; returns CliResult."""

    def run(*argv: str, env: dict[str, str] | None = None) -> CliResult:
        completed = subprocess.run(
            [sys.executable, "-m", "gardenctl", *argv],
            check=False,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return CliResult(completed.returncode, completed.stdout, completed.stderr)

    return run


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster of several nodes on this machine (tests/ray_helpers.py): `node-a`
    for the runtime contract tests, n1-n3 for the end-to-end gardens."""
    pytest.importorskip("ray", reason="the Ray extra is not installed (pip install -e '.[ray]')")
    from ray_helpers import RayTestCluster

    cluster = RayTestCluster({"node-a": 2, "n1": 2, "n2": 2, "n3": 2})
    yield cluster
    cluster.shutdown()
