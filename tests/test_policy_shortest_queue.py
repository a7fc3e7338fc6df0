from collections import Counter

from conftest import build_workers
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(spec=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=9))
def test_is_the_least_loaded_healthy_lowest_index_first(spec: list[tuple[int, bool]]) -> None:
    workers = build_workers([load for load, _ in spec], healthy=[h for _, h in spec])
    i = ShortestQueuePolicy().select_worker(workers)
    healthy_loads = [load for load, h in spec if h]
    if i is None:
        assert not healthy_loads
    else:
        assert workers[i].load() == min(healthy_loads)
        # lowest index among the tied (processed counts are all 0 here)
        assert i == min(j for j, (load, h) in enumerate(spec) if h and load == min(healthy_loads))
