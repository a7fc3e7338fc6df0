"""One test per field failure of the peers (``../shared/seeds``), against ``cache_aware``."""

from __future__ import annotations

import random
import string
import threading

from conftest import build_workers

from cacheroute import CacheAwarePolicy, Decision, Lease, acquire, make_policy
from cacheroute.tree import Tree


def _tree(policy: CacheAwarePolicy, model: str = "default") -> Tree:
    tree = policy.tree(model, create=True)
    assert tree is not None
    return tree


def _distinct_misses(n: int, seed: int = 0) -> list[str]:
    """Distinct prompts that share nothing with the warm trees below (digits only)."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choices(string.digits, k=40)))
    return sorted(out)


# --------------------------------------------------------------------------- seed 000
# A cache miss went to the smallest tree, ignoring load: the busy worker with a small tree
# took every new request (the "death spiral").


def test_seed000_miss_goes_to_idle_worker_with_big_tree_not_busy_worker_with_small_tree() -> None:
    for settings in ({}, {"balance_abs_threshold": 1000}):  # imbalanced, then balanced
        seen: list[Decision] = []
        policy = CacheAwarePolicy(on_decision=seen.append, **settings)  # type: ignore[arg-type]
        busy, idle = build_workers([50, 0])
        _tree(policy).insert("a" * 5, busy.url)
        _tree(policy).insert("b" * 1000, idle.url)
        assert policy.select_worker([busy, idle], "zzzz new request") == 1
        assert seen[-1].reason in ("cache_miss", "imbalanced")
        if settings:
            assert seen[-1].reason == "cache_miss"  # the balanced miss branch itself


def test_seed000_stream_of_100_misses_never_lands_on_busy_worker_while_another_is_idler() -> None:
    for settings in ({}, {"balance_abs_threshold": 1000}):
        policy = CacheAwarePolicy(**settings)  # type: ignore[arg-type]
        workers = build_workers([20, 5, 0])
        for w, size in zip(workers, (1, 10, 100), strict=True):
            _tree(policy).insert("x" * size, w.url)
        leases: list[Lease] = []
        for prompt in _distinct_misses(100):
            before = [w.load() for w in workers]
            lease = acquire(policy, workers, prompt)  # held open: load accumulates
            leases.append(lease)
            if lease.index == 0:
                assert before[0] <= min(before[1:]), (settings, before)
            assert before[lease.index] == min(before)  # a miss always goes to least load
        assert sum(w.load() for w in workers) == 25 + 100
        for lease in leases:
            lease.release()
        assert [w.load() for w in workers] == [20, 5, 0]


# --------------------------------------------------------------------------- seed 001
# A proxy path never counted load, so the imbalance check never fired and one engine took
# all 480 requests sharing one prefix.


def _shared_prefix_requests(n: int = 30) -> list[str]:
    prefix = "You are a helpful assistant. " * 8
    return [f"{prefix}question {i}: what is {i} * {i}?" for i in range(n)]


def test_seed001_shared_prefix_spreads_over_workers_when_load_is_tracked() -> None:
    policy = make_policy("cache_aware", balance_abs_threshold=2, balance_rel_threshold=1.5)
    workers = build_workers([0, 0, 0, 0])
    leases = [acquire(policy, workers, r) for r in _shared_prefix_requests()]  # stay open
    used = {lease.index for lease in leases}
    assert len(used) >= 2, [w.load() for w in workers]
    loads = [w.load() for w in workers]
    assert max(loads) - min(loads) <= 2 + 1  # the abs threshold keeps the gap bounded
    for lease in leases:
        lease.release()
    assert all(w.load() == 0 for w in workers)


def test_seed001_contrast_without_load_tracking_everything_collapses_on_one_worker() -> None:
    policy = make_policy("cache_aware", balance_abs_threshold=2, balance_rel_threshold=1.5)
    workers = build_workers([0, 0, 0, 0])
    # The bug of seed 001: select_worker without a lease, so no load is ever counted.
    chosen = {policy.select_worker(workers, r) for r in _shared_prefix_requests()}
    assert len(chosen) == 1
    assert all(w.load() == 0 for w in workers)


# --------------------------------------------------------------------------- design.md §2
# min/max load taken over unhealthy workers made a balanced cluster look imbalanced.


def test_unhealthy_idle_worker_does_not_make_balanced_cluster_imbalanced() -> None:
    for mode in ("locality", "least_load"):
        seen: list[Decision] = []
        policy = CacheAwarePolicy(
            balance_abs_threshold=2, imbalance_mode=mode, on_decision=seen.append
        )
        workers = build_workers([0, 5, 5], healthy=[False, True, True])
        _tree(policy).insert("the shared prefix of this conversation", workers[2].url)
        i = policy.select_worker(workers, "the shared prefix of this conversation, turn 2")
        assert i == 2, mode  # follows its prefix (least load would say worker 1)
        assert seen[-1].reason == "cache_hit"  # with min load 0 (the sick worker): imbalanced


def test_same_request_twice_while_balanced_goes_to_same_worker() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([3, 0, 1, 2])
    first = policy.select_worker(workers, "Summarise this document: lorem ipsum")
    again = policy.select_worker(workers, "Summarise this document: lorem ipsum")
    assert first == again == 1


def test_removed_worker_never_chosen_even_for_a_prefix_only_it_held() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 0, 0])
    prompt = "a long prompt only worker 1 has seen " * 4
    _tree(policy).insert(prompt, workers[1].url)
    assert policy.select_worker(workers, prompt) == 1
    policy.on_worker_removed(workers[1])
    assert workers[1].url not in _tree(policy).tenants()
    for _ in range(20):  # a careless caller still passes it, healthy and idle
        assert policy.select_worker(workers, prompt) != 1
        assert policy.select_worker(workers, None) != 1
    assert workers[1].url not in _tree(policy).tenants()


# --------------------------------------------------------------------------- seed 002
# SGLang: max_tree_size compared per tenant (the real cap was workers x size), enforced
# only by a periodic eviction thread that could never be stopped. (Seed 003, a router trie
# with no eviction at all that grew until the pod was killed, is the same bound.)


def test_seed002_max_tree_size_bounds_the_whole_tree_after_every_request() -> None:
    policy = CacheAwarePolicy(max_tree_size=2_000, balance_abs_threshold=1000)
    workers = build_workers([0] * 16)
    rng = random.Random(2)
    for _ in range(600):
        prompt = "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 300)))
        policy.select_worker(workers, prompt)
        assert _tree(policy).total_size() <= 2_000  # total over all 16 workers
    sizes = _tree(policy).used_size_per_tenant()
    assert len([s for s in sizes.values() if s]) > 1
    assert sum(sizes.values()) <= 2_000


def test_seed002_no_background_thread_is_started_and_close_leaves_none() -> None:
    before = set(threading.enumerate())
    policy = make_policy("cache_aware", max_tree_size=100)
    workers = build_workers([0, 0])
    for i in range(50):
        with acquire(policy, workers, f"prompt {i}"):
            pass
    assert set(threading.enumerate()) == before
    policy.close()
    assert set(threading.enumerate()) == before
