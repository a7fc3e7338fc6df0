from collections import Counter

from conftest import build_workers

from cacheroute import acquire
from cacheroute.policies import ShortestQueuePolicy


def test_least_loaded_healthy() -> None:
    workers = build_workers([3, 0, 1], healthy=[True, False, True])
    assert ShortestQueuePolicy().select_worker(workers) == 2


def test_ties_by_processed_then_index() -> None:
    workers = build_workers([1, 1, 1])
    workers[0].increment_processed()
    workers[1].increment_processed()
    p = ShortestQueuePolicy()
    assert p.select_worker(workers) == 2  # fewest processed; now counted: processed [1, 1, 1]
    assert p.select_worker(workers) == 0  # all tied: lowest index


def test_equal_loads_spread_with_processed_tiebreak() -> None:
    # A burst with no load tracking at all (stale loads) must not all land on worker 0:
    # the policy counts each worker it chooses as processed, and that count breaks ties.
    workers = build_workers([0] * 4)
    p = ShortestQueuePolicy()
    picks = [p.select_worker(workers) for _ in range(40)]
    assert Counter(picks) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert [w.processed() for w in workers] == [10, 10, 10, 10]


def test_open_leases_balance_load() -> None:
    workers = build_workers([0] * 3)
    leases = [acquire(ShortestQueuePolicy(), workers) for _ in range(9)]
    assert [w.load() for w in workers] == [3, 3, 3]
    for lease in leases:
        lease.release()
    assert [w.load() for w in workers] == [0, 0, 0]


def test_none_when_no_healthy() -> None:
    assert ShortestQueuePolicy().select_worker([]) is None
