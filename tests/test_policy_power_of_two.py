from collections import Counter

from conftest import build_workers

from cacheroute.policies import PowerOfTwoPolicy, make_policy


def test_single_healthy_chosen_directly() -> None:
    workers = build_workers([9, 0, 5], healthy=[True, False, False])
    assert PowerOfTwoPolicy(seed=1).select_worker(workers) == 0
    assert [w.processed() for w in workers] == [1, 0, 0]


def test_picks_less_loaded_of_two() -> None:
    workers = build_workers([10, 0])
    p = PowerOfTwoPolicy(seed=0)
    assert all(p.select_worker(workers) == 1 for _ in range(50))


def test_never_unique_max_and_prefers_light() -> None:
    workers = build_workers([50, 10, 5, 0])
    p = make_policy("power_of_two", seed=7)
    counts = Counter(p.select_worker(workers) for _ in range(2_000))
    assert 0 not in counts
    # The least loaded wins whenever it is sampled (half the pairs): about 50%.
    assert counts[3] > counts[2] > counts[1]
    assert 900 < counts[3] < 1_100


def test_reproducible_with_seed() -> None:
    workers = build_workers([1, 2, 3, 4, 5])
    a, b = PowerOfTwoPolicy(seed=5), PowerOfTwoPolicy(seed=5)
    assert [a.select_worker(workers) for _ in range(30)] == [
        b.select_worker(workers) for _ in range(30)
    ]
