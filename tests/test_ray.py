"""The Ray runtime end to end: a real Ray cluster of several nodes on this machine (Ray's own
multi-node test cluster, tests/ray_helpers.py), gardenctl's real command line, and the stand-in
vLLM started by worker actors on the nodes.

Each garden declares the nodes it may use (they have no NVML: the declaration gives their GPUs),
so gardens of different tests share the cluster without sharing nodes' GPUs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from e2e_helpers import WORKER_ID_ENV, model, wait_until
from ray_helpers import RayGarden, RayTestCluster, wait_for_exit

pytestmark = pytest.mark.e2e

MAIN_NODES = {"n1": 2, "n2": 2, "n3": 2}


@pytest.fixture
def garden(tmp_path: Path, ray_cluster: RayTestCluster):
    """A garden over n1-n3, torn down (and checked to leave nothing behind) afterwards."""
    # 24 GiB GPUs: two of the small test models share one (a claim is about 6 GiB)
    ray_garden = RayGarden(tmp_path / "g", ray_cluster, nodes=MAIN_NODES, gpu_memory="24GiB")
    yield ray_garden
    left = ray_garden.tear_down()
    assert not left, "gardenctl down left workers running:\n" + "\n".join(left)


def environ_of(garden: RayGarden, worker_id: str) -> dict[str, str]:
    leader = garden.leader(worker_id)
    assert leader is not None, f"no process for {worker_id}"
    return leader.environ()


MODELS = [
    model("pinned", placement={"node": "n2", "gpus": [1]}),
    model("wide", tensor_parallel_size=2, placement={"node": "n1"}),
    model("roam", placement={"node": "n3"}, env={"STANDIN_VLLM_SPAWN_CHILD": "1"}),
]


SHARE = model("share", placement={"node": "n2", "gpus": [1]})  # shares pinned's GPU


def test_a_garden_over_three_nodes_runs_where_planned_edits_one_worker_and_goes_down(garden):
    run = garden.applied([*MODELS, SHARE])
    workers = garden.workers()
    where = {w["model"]: (w["node"], w["gpus"], w["phase"]) for w in workers.values()}
    assert where["pinned"] == where["share"] == ("n2", [1], "ready"), run
    assert where["wide"] == ("n1", [0, 1], "ready")
    assert where["roam"][2] == "ready"
    # each process got the plan's GPUs, not Ray's choice; TP runs vLLM's own multiprocessing
    assert environ_of(garden, garden.worker_id("pinned"))["CUDA_VISIBLE_DEVICES"] == "1"
    assert environ_of(garden, garden.worker_id("share"))["CUDA_VISIBLE_DEVICES"] == "1"
    assert environ_of(garden, garden.worker_id("wide"))["CUDA_VISIBLE_DEVICES"] == "0,1"
    wide = garden.leader(garden.worker_id("wide")).cmdline()
    assert wide[wide.index("--distributed-executor-backend") + 1] == "mp"
    # Ray's accounting holds exactly the GPUs the workers use (a shared one once): other Ray
    # work gets the others
    used: dict[str, set[int]] = {node: set() for node in MAIN_NODES}
    for node, gpus, _ in where.values():
        used[node].update(gpus)
    for node, count in MAIN_NODES.items():
        assert garden.cluster.free_gpus(node) == count - len(used[node]), (node, used)
    assert garden.cluster.gpu_ids_given_to_other_work("n2") == [0]
    # status names each worker's node; logs come from the node through the worker's actor
    text = garden.run("status").out
    assert " n2 " in text and " n1 " in text
    logs = garden.run("logs", "pinned", "-n", "50")
    assert logs.code == 0 and "Starting vLLM API server" in logs.out, logs

    # an edit of one model replaces its worker only
    before = garden.pids()
    garden.write([*MODELS[:2], {**MODELS[2], "max_model_len": 1024}, SHARE])
    run, report = garden.apply_json()
    assert run.code == 0, run
    after = garden.pids()
    assert {w for w in before if after.get(w) != before[w]} == {garden.worker_id("roam")}
    assert [r["action"] for r in report["results"]] == ["replace"]

    # down leaves no worker, no actor and no GPU held in Ray's accounting
    run = garden.run("down", "--yes")
    assert run.code == 0, run
    assert garden.cluster.worker_actors(garden.name) == []
    assert not garden.processes()
    assert all(garden.cluster.free_gpus(node) == count for node, count in MAIN_NODES.items())


def test_a_killed_worker_and_a_killed_actor_are_drift_the_next_apply_repairs(garden):
    import ray

    garden.applied(MODELS)
    pinned, roam = garden.worker_id("pinned"), garden.worker_id("roam")
    victim = garden.leader(pinned)
    os.kill(victim.pid, signal.SIGKILL)
    actor = ray.get_actor(roam, namespace=f"gardenctl.{garden.name}")
    group = [p for p in garden.processes() if p.environ()[WORKER_ID_ENV] == roam]
    assert len(group) == 2  # the API server and its EngineCore child
    ray.kill(actor)
    assert all(wait_for_exit(p) for p in group), "the worker's processes outlived its actor"
    plan = garden.run("plan", "-o", "json").json()
    kinds = {s["worker"]: s["kind"] for s in plan["steps"]}
    assert kinds[pinned] == "restart" and kinds[roam] == "restart", plan["steps"]
    garden.apply()
    workers = garden.workers()
    assert workers[pinned]["phase"] == workers[roam]["phase"] == "ready"
    assert workers[pinned]["restarts"] == 1 and workers[pinned]["node"] == "n2"
    assert "its actor" in (workers[roam]["last_error"] or "")


def test_a_fresh_controller_sees_the_garden_from_the_cluster_and_waits_for_its_lock(garden,
                                                                                   tmp_path):
    garden.applied(MODELS)
    before = garden.pids()
    elsewhere = {"GARDENCTL_STATE_DIR": str(tmp_path / "another-machine")}  # no local state
    status = garden.run("status", "-o", "json", env=elsewhere).json()
    assert status["in_sync"] is True
    assert {w["worker"]: w["pid"] for w in status["workers"]} == before
    run = garden.run("apply", "--yes", env=elsewhere)
    assert run.code == 0, run
    assert garden.pids() == before  # nothing restarted

    # the writer lock lives in the cluster: it holds across controllers, dies with its holder
    watcher = garden.start("watch")
    assert wait_until(lambda: "lock" in garden.cluster.worker_actors(garden.name), 60)
    refused = garden.run("apply", "--yes", env=elsewhere)
    assert refused.code != 0
    assert "holds the lock of garden" in refused.err and "Ray cluster" in refused.err
    # watch keeps the garden converged on the cluster: a killed worker is started again
    pinned = garden.worker_id("pinned")
    os.kill(before[pinned], signal.SIGKILL)
    assert wait_until(lambda: garden.pids().get(pinned, before[pinned]) != before[pinned], 60)
    assert wait_until(lambda: garden.workers()[pinned]["phase"] == "ready", 60)
    watcher.send_signal(signal.SIGKILL)  # no clean-up: the lock goes with its holder
    watcher.wait(30)
    assert wait_until(lambda: "lock" not in garden.cluster.worker_actors(garden.name), 60)
    again = garden.pids()
    assert garden.run("apply", "--yes", env=elsewhere).code == 0
    assert garden.pids() == again


def test_a_lost_node_is_drift_the_next_apply_repairs_on_another_node(tmp_path, ray_cluster):
    ray_cluster.add_node("n4")
    ray_cluster.add_node("n5")
    garden = RayGarden(tmp_path / "g", ray_cluster, nodes={"n4": 2, "n5": 2})
    try:
        garden.applied([model("roam")])
        worker_id = garden.worker_id("roam")
        lost = garden.workers()[worker_id]["node"]
        process = garden.leader(worker_id)
        ray_cluster.remove_node(lost)
        assert wait_for_exit(process), "the worker outlived its node"
        plan = garden.run("plan")
        assert f"its node {lost} left the Ray cluster" in plan.out, plan
        garden.apply()
        worker = garden.workers()[worker_id]
        assert worker["phase"] == "ready" and worker["node"] != lost
    finally:
        left = garden.tear_down()
        for node in ("n4", "n5"):
            if node in ray_cluster.nodes:
                ray_cluster.remove_node(node)
    assert not left, left


def test_two_nodes_of_one_name_are_refused_saying_how_to_name_them(ray_cluster):
    from gardenctl.errors import InventoryError

    twins = [ray_cluster.cluster.add_node(num_cpus=0, num_gpus=0,
                                          labels={"gardenctl/node": "twin"}) for _ in range(2)]
    ray_cluster.cluster.wait_for_nodes()
    try:
        with pytest.raises(InventoryError) as refused:
            ray_cluster.handle.nodes()
        assert "both called 'twin'" in str(refused.value)
        assert "ray start --labels gardenctl/node=<name>" in str(refused.value)
    finally:
        for twin in twins:
            ray_cluster.cluster.remove_node(twin)
    assert wait_until(lambda: "twin" not in ray_cluster.handle.nodes(), 60)
