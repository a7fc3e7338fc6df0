import threading
from collections import Counter

from conftest import build_workers
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheroute.policies import RoundRobinPolicy, make_policy


def test_cycles_over_healthy_workers() -> None:
    workers = build_workers([0, 0, 0, 0], healthy=[True, False, True, True])
    p = RoundRobinPolicy()
    assert [p.select_worker(workers) for _ in range(6)] == [0, 2, 3, 0, 2, 3]


def test_ignores_load() -> None:
    workers = build_workers([100, 0])
    p = make_policy("round_robin")
    assert {p.select_worker(workers) for _ in range(4)} == {0, 1}


def test_fair_under_threads() -> None:
    workers = build_workers([0] * 5)
    p = RoundRobinPolicy()
    counts: Counter[int] = Counter()
    lock = threading.Lock()

    def work() -> None:
        local: Counter[int] = Counter()
        for _ in range(2_000):
            i = p.select_worker(workers)
            assert i is not None
            local[i] += 1
        with lock:
            counts.update(local)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {i: 1_600 for i in range(5)}


@settings(max_examples=40, deadline=None)
@given(health=st.lists(st.booleans(), min_size=1, max_size=10), k=st.integers(1, 5))
def test_fair_over_the_healthy_set(health: list[bool], k: int) -> None:
    workers = build_workers([0] * len(health), healthy=health)
    n = sum(health)
    policy = make_policy("round_robin")
    counts = Counter(policy.select_worker(workers) for _ in range(k * max(n, 1)))
    if n == 0:
        assert counts == {None: k}
    else:
        assert counts == {i: k for i, h in enumerate(health) if h}
