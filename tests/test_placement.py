"""Placement: fractional packing on a byte ledger, never over-committing a GPU."""

from __future__ import annotations

from builders import GiB, inventory, policy, request

from gardenctl.placement import Holding, accepts_new_worker, place
from gardenctl.placement.model import BELOW_MIN_AVAILABLE, INSUFFICIENT_MEMORY, NOT_ENOUGH_GPUS


def gpus_of(placement, worker_id):
    a = placement.assignment(worker_id)
    return None if a is None else (a.node, a.gpus)


def test_small_models_share_one_gpu_with_fractional_utilization():
    result = place([request("g/a/0", 6), request("g/b/0", 6)], inventory(("n", 2, 24)), policy())
    a, b = result.assignment("g/a/0"), result.assignment("g/b/0")
    assert (a.node, a.gpus) == (b.node, b.gpus) == ("n", (0,))
    assert a.utilization == 0.25  # 6 GiB of 24 GiB
    assert a.claim_bytes == 6 * GiB + GiB // 2  # budget + CUDA context outside it
    assert result.unplaced == ()


def test_best_fit_takes_the_gpu_that_leaves_least_free():
    holdings = [Holding("g/big/0", "big", "n", (1,), 0.5, 12 * GiB + GiB // 2, "s")]
    reqs = [request("g/big/0", 12), request("g/small/0", 6)]
    result = place(reqs, inventory(("n", 2, 24)), policy(), holdings)
    assert gpus_of(result, "g/small/0") == ("n", (1,))  # fuller GPU 1 rather than empty GPU 0


def test_gpu_below_min_available_fraction_takes_no_new_worker():
    # 16 of 24 GiB claimed: 33% unclaimed passes 0.3, 25% (18 of 24) would not.
    inv = inventory(("n", 1, 24))
    assert accepts_new_worker(24 * GiB, 0, 16 * GiB, 0.3)
    assert not accepts_new_worker(24 * GiB, 0, 18 * GiB, 0.3)
    holdings = [Holding("g/big/0", "big", "n", (0,), 0.75, 18 * GiB, "s")]
    result = place([request("g/big/0", 17.5), request("g/tiny/0", 1)], inv, policy(), holdings)
    (unplaced,) = result.unplaced
    assert unplaced.worker_id == "g/tiny/0"
    assert unplaced.reasons[0].code == BELOW_MIN_AVAILABLE
    assert "25%" in unplaced.reasons[0].message


def test_never_overcommits_and_says_why_with_numbers():
    result = place([request("g/a/0", 20), request("g/b/0", 20)], inventory(("n", 1, 24)),
                   policy(min_available_gpu_fraction=0.0))
    assert [a.worker_id for a in result.assignments] == ["g/a/0"]
    reason = result.unplaced[0].reasons[0]
    assert reason.code == INSUFFICIENT_MEMORY
    assert reason.requested_bytes > reason.free_bytes
    row = result.ledgers[0]
    assert row.claimed_after_bytes <= row.total_bytes - row.used_by_others_bytes


def test_memory_used_by_others_and_the_reserve_are_never_claimed():
    inv = inventory(("n", 1, 24), used_gib=4)
    result = place([request("g/a/0", 19)], inv, policy(reserve=GiB, min_available_gpu_fraction=0))
    assert result.unplaced and result.assignments == ()  # 19 + 0.5 + 4 + 1 > 24
    result = place([request("g/a/0", 18)], inv, policy(reserve=GiB, min_available_gpu_fraction=0))
    assert result.unplaced == ()


def test_tensor_parallel_worker_takes_gpus_on_one_node():
    inv = inventory(("a", 1, 80), ("b", 2, 80))
    result = place([request("g/big/0", 60, tp=2)], inv, policy())
    assert gpus_of(result, "g/big/0") == ("b", (0, 1))


def test_tensor_parallel_worker_that_no_node_can_hold_is_unplaced_with_reason():
    result = place([request("g/big/0", 60, tp=4)], inventory(("a", 2, 80), ("b", 2, 80)), policy())
    assert result.unplaced[0].reasons[0].code == NOT_ENOUGH_GPUS


def test_higher_priority_is_placed_first_when_the_garden_does_not_fit():
    reqs = [request("g/low/0", 14, priority=0), request("g/high/0", 14, priority=10)]
    result = place(reqs, inventory(("n", 1, 24)), policy(min_available_gpu_fraction=0))
    assert [a.worker_id for a in result.assignments] == ["g/high/0"]
    assert [u.worker_id for u in result.unplaced] == ["g/low/0"]


def test_pinning_to_gpu_is_respected_even_when_another_fits_better():
    holdings = [Holding("g/x/0", "x", "n", (0,), 0.25, 6 * GiB, "s")]
    reqs = [request("g/x/0", 5.5), request("g/pinned/0", 4, pin_gpus=(1,))]
    result = place(reqs, inventory(("n", 2, 24)), policy(), holdings)
    assert gpus_of(result, "g/pinned/0") == ("n", (1,))


def test_running_worker_stays_where_it_is_while_its_sizing_is_unchanged():
    holdings = [Holding("g/a/0", "a", "n", (1,), 0.3, 8 * GiB, "s")]
    result = place([request("g/a/0", 6, sizing="s")], inventory(("n", 2, 24)), policy(), holdings)
    a = result.assignment("g/a/0")
    assert (a.gpus, a.utilization, a.kept) == ((1,), 0.3, True)


def test_changed_worker_that_no_longer_fits_keeps_its_running_place():
    holdings = [Holding("g/a/0", "a", "n", (0,), 0.5, 12 * GiB, "old")]
    result = place([request("g/a/0", 40, sizing="new")], inventory(("n", 1, 24)), policy(),
                   holdings)
    (unplaced,) = result.unplaced
    assert unplaced.kept_previous
    assert result.ledgers[0].claimed_after_bytes == 12 * GiB


def test_a_worker_whose_node_is_gone_is_placed_elsewhere_or_unplaced_never_kept():
    # its node left the cluster (Ray): the inventory has no GPU of it any more
    lost = [Holding("g/a/0", "a", "gone", (0,), 0.5, 12 * GiB, "s"),
            Holding("g/b/0", "b", "gone", (1,), 0.5, 12 * GiB, "s")]
    result = place([request("g/a/0", 6, sizing="s"),
                    request("g/b/0", 6, sizing="s", pin_node="gone")],
                   inventory(("n", 1, 24)), policy(), lost)
    assert gpus_of(result, "g/a/0") == ("n", (0,))
    (unplaced,) = result.unplaced
    assert unplaced.worker_id == "g/b/0" and not unplaced.kept_previous


def test_replicas_spread_over_the_gpus_the_garden_already_uses():
    reqs = [request("g/big/0", 12), request("g/other/0", 12), request("g/m/0", 4),
            request("g/m/1", 4)]
    result = place(reqs, inventory(("n", 3, 24)), policy())
    assert {gpus_of(result, "g/m/0"), gpus_of(result, "g/m/1")} == {("n", (0,)), ("n", (1,))}


def test_no_gpu_is_opened_only_to_separate_replicas():
    result = place([request("g/m/0", 4), request("g/m/1", 4)], inventory(("n", 2, 24)), policy())
    assert gpus_of(result, "g/m/0") == gpus_of(result, "g/m/1") == ("n", (0,))


def test_a_new_gpu_is_the_roomiest_one():
    inv = inventory(("small", 1, 24), ("large", 1, 80))
    result = place([request("g/a/0", 4)], inv, policy())
    assert gpus_of(result, "g/a/0") == ("large", (0,))


def test_gpus_already_in_use_are_filled_before_another_is_opened():
    holdings = [Holding("g/x/0", "x", "large", (0,), 0.2, 16 * GiB, "s")]
    inv = inventory(("small", 1, 24), ("large", 1, 80))
    result = place([request("g/x/0", 15.5), request("g/a/0", 20)], inv, policy(), holdings)
    assert gpus_of(result, "g/a/0") == ("large", (0,))  # not the empty 24 GiB GPU it fits best


def test_new_workers_of_one_plan_are_admitted_smallest_first():
    # 60 + 15 GiB on an 80 GiB GPU: admitted in that order the 15 would find 25% unclaimed,
    # below 30%; started smallest first both pass the threshold.
    result = place([request("g/big/0", 59.5), request("g/small/0", 14.5)],
                   inventory(("n", 1, 80)), policy())
    assert result.unplaced == ()
    assert gpus_of(result, "g/big/0") == gpus_of(result, "g/small/0")


def test_fill_policy_shares_spare_memory_among_new_workers():
    result = place([request("g/a/0", 4), request("g/b/0", 4)], inventory(("n", 1, 24)),
                   policy(utilization_policy="fill"))
    a, b = result.assignment("g/a/0"), result.assignment("g/b/0")
    assert a.utilization > 0.4 and b.utilization > 0.4
    row = result.ledgers[0]
    assert 0 <= row.free_after_bytes < 2 * GiB


def test_tiered_policy_uses_model_garden_bands():
    result = place([request("g/a/0", 2)], inventory(("n", 1, 24)),
                   policy(utilization_policy="tiered"))
    assert result.assignment("g/a/0").utilization == 0.5


def test_same_input_same_placement():
    reqs = [request(f"g/m{i}/0", 1 + (i * 7) % 11) for i in range(30)]
    inv = inventory(("a", 4, 24), ("b", 4, 48))
    first = place(reqs, inv, policy())
    second = place(list(reversed(reqs)), inv, policy())
    assert first == second


def test_spread_replicas_gives_each_replica_a_gpu_of_its_own():
    reqs = [request("g/m/0", 4), request("g/m/1", 4)]
    reqs = [r.__class__(**{**r.__dict__, "spread": True}) for r in reqs]
    result = place(reqs, inventory(("n", 2, 24)), policy())
    assert {gpus_of(result, "g/m/0"), gpus_of(result, "g/m/1")} == {("n", (0,)), ("n", (1,))}
    crowded = place(reqs, inventory(("n", 1, 24)), policy())
    assert crowded.unplaced[0].reasons[0].code == "replicas_apart"


def test_admit_limit_is_exactly_the_admission_rule():
    """The saturated-GPU index answers `admits` without asking it: over many random ledgers
    the two agree for every claim around the limit."""
    import random

    from gardenctl.inventory.model import Gpu
    from gardenctl.placement.ledger import Pool

    rng = random.Random(7)
    total = 1000
    for trial in range(300):
        gpu = Gpu(node="n", index=0, name="GPU", total_bytes=total, used_bytes=0)
        others = rng.randrange(0, 500)
        pool = Pool([gpu], {("n", 0): others}, 0, rng.choice([0.0, 0.1, 0.3, 0.55]))
        for number in range(rng.randrange(0, 5)):
            pool.add_claim(("n", 0), f"g/m/{number}", "m", rng.randrange(1, 200),
                           new=rng.random() < 0.7)
        limit = pool.admit_limit(("n", 0))
        for claim in range(1, 400):
            expected = pool.admits(("n", 0), claim)
            assert expected == (limit is None or claim <= limit), (trial, claim, limit)
