"""Shared semantics, checked over every registered policy."""

from __future__ import annotations

import array
from collections import Counter

import pytest
from conftest import build_workers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cacheroute import available_policies, make_policy
from cacheroute.policies import LoadBalancingPolicy

POLICIES = available_policies()
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

loads_health = st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=9)
texts = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.lists(st.integers(0, 2**31), max_size=30),
    st.lists(st.integers(0, 50), max_size=30).map(tuple),
    st.lists(st.integers(0, 2**32 - 1), max_size=30).map(lambda x: array.array("I", x)),
)


def _build(spec: list[tuple[int, bool]]):  # type: ignore[no-untyped-def]
    return build_workers([load for load, _ in spec], healthy=[h for _, h in spec])


@pytest.mark.parametrize("name", POLICIES)
@SETTINGS
@given(cluster=st.lists(loads_health, min_size=1, max_size=6), text=texts)
def test_only_healthy_none_iff_none_healthy(
    name: str, cluster: list[list[tuple[int, bool]]], text: object
) -> None:
    policy = make_policy(name)
    for spec in cluster:  # several calls on one policy object: state carries over
        workers = _build(spec)
        i = policy.select_worker(workers, text)  # type: ignore[arg-type]
        if not any(h for _, h in spec):
            assert i is None
        else:
            assert isinstance(i, int) and 0 <= i < len(workers)
            assert workers[i].is_healthy()


@pytest.mark.parametrize("name", POLICIES)
@SETTINGS
@given(prefill=loads_health, decode=loads_health, text=texts)
def test_pair_only_healthy(
    name: str, prefill: list[tuple[int, bool]], decode: list[tuple[int, bool]], text: object
) -> None:
    pw, dw = _build(prefill), _build(decode)
    pair = make_policy(name).select_worker_pair(pw, dw, text)  # type: ignore[arg-type]
    if not any(h for _, h in prefill) or not any(h for _, h in decode):
        assert pair is None
    else:
        assert pair is not None
        i, j = pair
        assert 0 <= i < len(pw) and pw[i].is_healthy()
        assert 0 <= j < len(dw) and dw[j].is_healthy()


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bad", [b"bytes", 3, 2.5, {"a": 1}, object(), bytearray(b"x")])
def test_bad_request_text_type_raises(name: str, bad: object) -> None:
    policy: LoadBalancingPolicy = make_policy(name)
    workers = build_workers([0, 0])
    with pytest.raises(TypeError, match="request_text"):
        policy.select_worker(workers, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="request_text"):
        policy.select_worker_pair(workers, workers, bad)  # type: ignore[arg-type]


@SETTINGS
@given(health=st.lists(st.booleans(), min_size=1, max_size=10), k=st.integers(1, 5))
def test_round_robin_fair(health: list[bool], k: int) -> None:
    workers = build_workers([0] * len(health), healthy=health)
    n = sum(health)
    policy = make_policy("round_robin")
    counts = Counter(policy.select_worker(workers) for _ in range(k * max(n, 1)))
    if n == 0:
        assert counts == {None: k}
    else:
        assert counts == {i: k for i, h in enumerate(health) if h}


@SETTINGS
@given(spec=loads_health, seed=st.integers(0, 2**32), calls=st.integers(1, 20))
def test_power_of_two_never_unique_most_loaded(
    spec: list[tuple[int, bool]], seed: int, calls: int
) -> None:
    workers = _build(spec)
    healthy = [i for i, (_, h) in enumerate(spec) if h]
    policy = make_policy("power_of_two", seed=seed)
    top = max((spec[i][0] for i in healthy), default=None)
    unique_max = [i for i in healthy if spec[i][0] == top]
    for _ in range(calls):
        i = policy.select_worker(workers)
        if len(healthy) >= 2 and len(unique_max) == 1:
            assert i != unique_max[0]


@SETTINGS
@given(spec=loads_health)
def test_shortest_queue_is_minimum(spec: list[tuple[int, bool]]) -> None:
    workers = _build(spec)
    i = make_policy("shortest_queue").select_worker(workers)
    healthy_loads = [load for load, h in spec if h]
    if i is not None:
        assert workers[i].load() == min(healthy_loads)
        # lowest index among the tied (processed counts are all 0 here)
        assert i == min(j for j, (load, h) in enumerate(spec) if h and load == min(healthy_loads))
