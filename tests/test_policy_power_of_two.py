from collections import Counter

from conftest import build_workers
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(
    spec=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=9),
    seed=st.integers(0, 2**32),
    calls=st.integers(1, 20),
)
def test_never_the_unique_most_loaded_of_two_or_more_healthy(
    spec: list[tuple[int, bool]], seed: int, calls: int
) -> None:
    workers = build_workers([load for load, _ in spec], healthy=[h for _, h in spec])
    healthy = [i for i, (_, h) in enumerate(spec) if h]
    policy = make_policy("power_of_two", seed=seed)
    top = max((spec[i][0] for i in healthy), default=None)
    unique_max = [i for i in healthy if spec[i][0] == top]
    for _ in range(calls):
        i = policy.select_worker(workers)
        if len(healthy) >= 2 and len(unique_max) == 1:
            assert i != unique_max[0]
