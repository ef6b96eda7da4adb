"""Security through the real CLI: a garden's strings never reach a shell, a secret reaches the
worker's environment and nothing else, the state directory is private, and two state
directories never touch each other's workers."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

import pytest
from e2e_helpers import alive, garden_at, model, served_names

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
HOSTILE_MODEL = "org/x; touch PWNED1 $(touch PWNED2) `touch PWNED3`"
HOSTILE_SERVED_NAME = "x'; touch PWNED4; echo \"$(touch PWNED5)\""
HOSTILE_REVISION = "main$(touch PWNED6)"
HOSTILE_VALUE = "$(touch PWNED7)`touch PWNED8`'\"; touch PWNED9 && echo"
SECRET = f"hf_e2e_{uuid.uuid4().hex}"


@pytest.fixture
def garden(tmp_path):
    with garden_at(tmp_path / "garden") as created:
        yield created


def pwned_files(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("PWNED*")]


def test_hostile_model_name_and_args_never_reach_a_shell(garden):
    evil = {"name": "evil", "model": HOSTILE_MODEL, "revision": HOSTILE_REVISION,
            "served_model_name": HOSTILE_SERVED_NAME, "gpu_memory_utilization": 0.5,
            "args": ["--tokenizer", HOSTILE_VALUE]}
    rejected = model("rejected", args=[f"--no-such-flag={HOSTILE_VALUE}"])
    garden.write([evil, rejected])

    run, report = garden.apply_json()

    assert run.code == 1, str(run)  # the unknown flag is refused, as `vllm serve` refuses it
    results = {r["worker"]: r for r in report["results"]}
    assert results[garden.worker_id("evil")]["ok"] is True
    refused = results[garden.worker_id("rejected")]
    assert (refused["outcome"], refused["cause"]) == ("exited_before_ready", "unrecognised_flag")
    assert pwned_files(garden.root, REPO) == [] and not list(Path.cwd().glob("PWNED*"))
    (server,) = [p for p in garden.processes() if "serve" in p.cmdline()]
    argv = server.cmdline()
    assert argv[argv.index("serve") + 1] == HOSTILE_MODEL  # one argument, exactly as written
    assert argv[argv.index("--tokenizer") + 1] == HOSTILE_VALUE
    assert argv[argv.index("--revision") + 1] == HOSTILE_REVISION
    port = garden.record(garden.worker_id("evil"))["spec"]["port"]
    assert served_names(port) == {HOSTILE_SERVED_NAME}


@pytest.fixture(scope="module")
def secret_garden(tmp_path_factory):
    """A garden whose worker gets HF_TOKEN=${MY_SECRET}, applied, with every read command run
    once (their outputs are kept in garden.runs)."""
    root = tmp_path_factory.mktemp("secret")
    with garden_at(root, extra_env={"MY_SECRET": SECRET}) as garden:
        garden.write([model("a", env={"HF_TOKEN": "${MY_SECRET}",
                                      "STANDIN_VLLM_SPAWN_CHILD": "1"})])
        for args in (["validate"], ["plan"], ["plan", "-o", "json", "--out", "p.json"],
                     ["apply", "--yes", "-o", "json", "p.json"], ["apply", "--yes"],
                     ["status"], ["status", "-o", "json"], ["logs", "a"]):
            run = garden.run(*args)
            assert run.code == 0, str(run)
        yield garden


def test_secret_reaches_the_worker_environment(secret_garden):
    processes = secret_garden.processes()
    assert len(processes) == 2  # the server and its EngineCore child
    for process in processes:
        assert process.environ()["HF_TOKEN"] == SECRET


def test_secret_appears_in_no_output_state_file_log_or_command_line(secret_garden):
    plan = next(r for r in secret_garden.runs if r.argv[:3] == ("plan", "-o", "json"))
    (action,) = plan.json()["actions"]
    assert action["spec"]["env"]["HF_TOKEN"] == "${MY_SECRET}"  # the reference is written
    for run in secret_garden.runs:
        assert SECRET not in run.text, f"secret printed by gardenctl {' '.join(run.argv)}"
    files = [p for p in secret_garden.root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"a.0.json", "a.0.log", "lock", "p.json", "garden.yaml"}
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), f"secret written to {path}"
    processes = secret_garden.processes()
    assert processes
    for process in processes:
        assert SECRET not in "\0".join(process.cmdline())
        assert SECRET.encode() not in Path(f"/proc/{process.pid}/cmdline").read_bytes()


def test_state_directory_and_its_files_are_private(secret_garden):
    state = secret_garden.state
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for folder in (secret_garden.records_dir, secret_garden.logs_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files = [path for path in state.rglob("*") if path.is_file()]
    assert {p.name for p in files} >= {"a.0.json", "a.0.log", "lock"}
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path} has mode {oct(mode)}"


def test_every_folder_of_the_state_directory_is_private(secret_garden):
    folders = [secret_garden.state, *(p for p in secret_garden.state.rglob("*") if p.is_dir())]
    modes = {str(p.relative_to(secret_garden.state)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in folders}
    assert set(modes.values()) == {oct(0o700)}, modes


def test_state_directories_never_see_each_others_workers(tmp_path):
    with garden_at(tmp_path / "one") as one, garden_at(tmp_path / "two", name=one.name) as two:
        one.applied([model("a")])
        two.file.write_text(one.file.read_text())  # the very same garden, another state dir
        worker_id = one.worker_id("a")
        pid = one.pids()[worker_id]

        status = two.status()
        plan = two.run("plan")
        down = two.run("down", "--yes")

        assert [(w["phase"], w["pid"]) for w in status["workers"]] == [("pending", None)]
        assert "1 to start" in plan.out and "adopting" not in plan.out, plan.out
        assert down.code == 0 and "no workers to stop" in down.out, str(down)
        assert alive(pid) and one.pids() == {worker_id: pid}


def test_down_refuses_a_garden_name_that_is_a_path(garden):
    run = garden.run("down", "--garden", "../outside", "--yes")
    assert run.code != 0 and "is not a garden name" in run.err, str(run)
    assert not (garden.state.parent / "outside").exists()
    assert not garden.state.exists() or "outside" not in {p.name for p in garden.state.rglob("*")}
