"""The whole loop through the real CLI: apply, a no-op apply, edits that restart only what they
change, logs, saved plans, confirmation, down. Workers are real stand-in vLLM processes."""

from __future__ import annotations

import psutil
import pytest
from e2e_helpers import Garden, alive, garden_at, http_get, model, served_names

pytestmark = pytest.mark.e2e

BASE = [model("a"), model("b"), model("c")]


def edited(models: list[dict], name: str, **changes) -> list[dict]:
    return [{**m, **changes} if m["name"] == name else m for m in models]


@pytest.fixture
def garden(tmp_path):
    with garden_at(tmp_path / "garden") as created:
        yield created


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """One garden of three workers, applied once for the module; tests that edit it start by
    applying BASE again (a no-op unless an earlier test left an edit)."""
    with garden_at(tmp_path_factory.mktemp("steady")) as created:
        created.applied(BASE)
        yield created


def short_ids(garden: Garden, worker_ids) -> set[str]:
    return {w.removeprefix(garden.name + "/") for w in worker_ids}


def test_apply_starts_every_worker_and_each_serves_its_name(steady):
    first = next(r for r in steady.runs if r.argv[0] == "apply")
    assert "Apply complete." in first.out
    assert first.out.count("ok   start") == 3
    steady.applied(BASE)
    status = steady.status()
    assert status["in_sync"] is True and status["out_of_sync_reasons"] == []
    rows = {w["worker"]: w for w in status["workers"]}
    assert short_ids(steady, rows) == {"a/0", "b/0", "c/0"}
    assert {w["phase"] for w in rows.values()} == {"ready"}
    for row in rows.values():
        assert served_names(row["port"]) == {row["model"]}
        assert http_get(row["port"], "/health")[0] == 200
        assert row["pid"] == steady.record(row["worker"])["pid"]


def test_second_apply_changes_nothing_and_restarts_nothing(steady):
    steady.applied(BASE)
    before = {w: (pid, psutil.Process(pid).create_time()) for w, pid in steady.pids().items()}
    run = steady.apply()
    assert run.code == 0, str(run)
    assert "No changes" in run.out
    after = {w: (pid, psutil.Process(pid).create_time()) for w, pid in steady.pids().items()}
    assert after == before and len(after) == 3


def comment_and_priority(models):
    return edited(models, "a", priority=7), "a comment that changes nothing"


# edit -> (new models and a comment for the file, {worker: action} the apply must report)
EDITS = {
    "max_model_len": (lambda ms: (edited(ms, "a", max_model_len=4096), ""), {"a/0": "replace"}),
    "add_model": (lambda ms: (ms + [model("d")], ""), {"d/0": "start"}),
    "remove_model": (lambda ms: ([m for m in ms if m["name"] != "c"], ""), {"c/0": "stop"}),
    "replicas": (lambda ms: (edited(ms, "b", replicas=2), ""), {"b/1": "start"}),
    "comment_and_priority": (comment_and_priority, {}),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edit_restarts_only_the_workers_it_changes(steady, edit):
    steady.applied(BASE)
    before = steady.pids()
    make, expected = EDITS[edit]
    models, comment = make(BASE)
    steady.write(models, comment=comment)

    run, report = steady.apply_json()

    assert run.code == 0, str(run)
    assert {short: r["action"] for r in report["results"]
            for short in short_ids(steady, [r["worker"]])} == expected
    assert all(r["ok"] for r in report["results"]), report["results"]
    after = steady.pids()
    kept = {w for w in before if w.removeprefix(steady.name + "/") not in expected}
    assert {w: after.get(w) for w in kept} == {w: before[w] for w in kept}
    status = steady.status()
    assert status["in_sync"] is True
    phases = {w["worker"]: w["phase"] for w in status["workers"]}
    for short, action in expected.items():
        worker_id = f"{steady.name}/{short}"
        if action == "stop":
            assert worker_id not in after and not alive(before[worker_id])
            assert steady.record(worker_id) is None and worker_id not in phases
        else:
            assert worker_id in after and after[worker_id] != before.get(worker_id)
            assert phases[worker_id] == "ready"
    if edit == "max_model_len":
        port = steady.record(f"{steady.name}/a/0")["spec"]["port"]
        assert http_get(port, "/v1/models")[1]["data"][0]["max_model_len"] == 4096


def test_logs_show_the_worker_output_and_the_run_before_a_restart(steady):
    steady.applied(BASE)
    current = steady.run("logs", "a")
    assert current.code == 0, str(current)
    assert "version 0.32.0" in current.out  # the banner of the release the stand-in plays
    assert "Application startup complete." in current.out
    assert "'max_model_len': 2048" in current.out

    steady.applied(edited(BASE, "a", max_model_len=4096))
    previous = steady.run("logs", "a", "--previous")
    current = steady.run("logs", f"{steady.name}/a/0")
    assert previous.code == 0 and current.code == 0, f"{previous}\n{current}"
    assert "'max_model_len': 2048" in previous.out and "'max_model_len': 4096" not in previous.out
    assert "'max_model_len': 4096" in current.out
    assert "Application startup complete." in current.out


def test_down_stops_every_worker_and_removes_their_records(garden):
    garden.applied([model("a"), model("b", replicas=2)])
    pids = garden.pids()
    assert len(pids) == 3

    run = garden.run("down", "--yes")

    assert run.code == 0, str(run)
    assert run.out.count("ok   ") == 3
    assert not any(alive(pid) for pid in pids.values())
    assert garden.processes() == []
    assert list(garden.records_dir.glob("*.json")) == []
    status = garden.status()  # still wanted by the file: shown as not running, and why
    assert status["in_sync"] is False
    assert {w["phase"] for w in status["workers"]} == {"pending"}
    assert all("gardenctl down" in w["next_cause"] for w in status["workers"])


def test_apply_refuses_without_yes_when_stdin_is_not_a_terminal(garden):
    garden.write([model("a")])

    run = garden.run("apply")

    assert run.code == 1, str(run)
    assert "--yes" in run.err
    assert garden.processes() == []
    assert not garden.records_dir.exists() or list(garden.records_dir.glob("*.json")) == []


def test_saved_plan_is_executed_as_it_was_shown(garden):
    garden.write([model("a"), model("b")])
    saved = garden.run("plan", "--out", "p.json")
    assert saved.code == 0, str(saved)

    run = garden.run("apply", "--yes", "p.json")

    assert run.code == 0, str(run)
    assert "Apply complete." in run.out
    assert set(garden.pids()) == {garden.worker_id("a"), garden.worker_id("b")}
    assert garden.status()["in_sync"] is True


def test_saved_plan_is_refused_when_the_garden_file_changed(garden):
    garden.write([model("a")])
    assert garden.run("plan", "--out", "p.json").code == 0
    garden.write([model("a", max_model_len=4096)])

    run = garden.run("apply", "--yes", "p.json")

    assert run.code == 1, str(run)
    assert "stale" in run.err and "garden file" in run.err
    assert "running workers" not in run.err
    assert garden.processes() == []


def test_saved_plan_is_refused_when_the_running_workers_changed(garden):
    garden.write([model("a")])
    assert garden.run("plan", "--out", "p.json").code == 0
    garden.applied([model("a")])  # someone else applied meanwhile
    pids = garden.pids()

    run = garden.run("apply", "--yes", "p.json")

    assert run.code == 1, str(run)
    assert "stale" in run.err and "running workers" in run.err
    assert "garden file" not in run.err
    assert garden.pids() == pids
