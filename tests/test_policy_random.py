from collections import Counter

import pytest
from conftest import build_workers

from cacheroute.policies import RandomPolicy, make_policy


def test_seed_is_reproducible() -> None:
    workers = build_workers([0] * 7)
    p, q = make_policy("random", seed=42), make_policy("random", seed=42)
    assert [p.select_worker(workers) for _ in range(50)] == [
        q.select_worker(workers) for _ in range(50)
    ]


def test_only_healthy_and_roughly_uniform() -> None:
    workers = build_workers([0] * 4, healthy=[True, False, True, True])
    p = RandomPolicy(seed=0)
    counts = Counter(p.select_worker(workers) for _ in range(3_000))
    assert set(counts) == {0, 2, 3}
    assert all(800 < c < 1_200 for c in counts.values())


def test_bad_seed() -> None:
    with pytest.raises(TypeError, match="seed"):
        make_policy("random", seed="x")
