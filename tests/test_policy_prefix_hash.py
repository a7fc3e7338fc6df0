"""``prefix_hash``: consistent hashing with bounded loads on the prompt's prefix."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheroute import BasicWorker, Decision, acquire, make_policy
from cacheroute.policies import PrefixHashConfig, PrefixHashPolicy


def _workers(n: int) -> list[BasicWorker]:
    return [BasicWorker(f"http://w{i}:8000") for i in range(n)]


def test_registered_with_documented_defaults() -> None:
    p = make_policy("prefix_hash")
    assert isinstance(p, PrefixHashPolicy) and p.needs_request_text and p.description
    c = p.config
    assert (c.prefix_chars, c.prefix_tokens) == (100, 256)
    assert (c.virtual_nodes, c.load_factor) == (256, 1.25)


def test_same_prefix_same_worker_different_prefixes_spread() -> None:
    ws = _workers(8)
    p = PrefixHashPolicy()
    system = "You are a helpful assistant. " * 4  # > 100 characters
    first = p.select_worker(ws, system + "Hi")
    assert all(p.select_worker(ws, system + f"question {k}") == first for k in range(20))
    spread = {p.select_worker(ws, f"{k:04d} " + "x" * 200) for k in range(200)}
    assert len(spread) == 8  # 256 virtual nodes per worker: every worker owns some arc


def test_only_the_prefix_is_hashed_for_tokens_and_units() -> None:
    ws = _workers(8)
    p = PrefixHashPolicy()
    base = list(range(256))
    a = p.select_worker(ws, [*base, 1, 2, 3])
    assert p.select_worker(ws, [*base, 9, 9]) == a  # same first 256 tokens
    # with 16 tokens per unit (the simulator's blocks), the first 16 units are hashed
    q = PrefixHashPolicy(tokens_per_unit=16.0)
    b = q.select_worker(ws, [*range(16), 100])
    assert q.select_worker(ws, [*range(16), 200, 300]) == b


def test_bounded_load_spills_to_the_next_worker_on_the_ring() -> None:
    ws = _workers(4)
    p = PrefixHashPolicy()
    prompt = "shared system prompt " * 10
    home = p.select_worker(ws, prompt)
    assert home is not None
    # the home worker far above the bound (total + 1) / n * 1.25: spill, always to the same
    for _ in range(12):
        ws[home].increment_load()
    for w in ws:
        if w is not ws[home]:
            w.increment_load()
    spill = p.select_worker(ws, prompt)
    assert spill is not None and spill != home
    assert p.select_worker(ws, prompt) == spill
    # within the bound again: back home (consistent hashing)
    for _ in range(12):
        ws[home].decrement_load()
    assert p.select_worker(ws, prompt) == home


def test_kubeai_bound_exactly() -> None:
    """in_flight + 1 <= (total + 1) / n * load_factor; every worker qualifies at total 0."""
    ws = _workers(2)
    p = PrefixHashPolicy(load_factor=1.25)
    prompt = "p" * 100
    home = p.select_worker(ws, prompt)
    assert home is not None
    other = 1 - home
    ws[home].increment_load()  # total 1: bound (1+1)/2*1.25 = 1.25; home: 1+1 = 2 > 1.25
    assert p.select_worker(ws, prompt) == other
    ws[other].increment_load()  # total 2: bound 1.875; both 1+1 = 2 > 1.875: first met
    assert p.select_worker(ws, prompt) == home
    assert PrefixHashPolicy(load_factor=math.inf).select_worker(ws, prompt) == home


def test_unhealthy_worker_skipped_and_none_when_none_healthy() -> None:
    ws = _workers(3)
    p = PrefixHashPolicy()
    prompt = "a" * 120
    home = p.select_worker(ws, prompt)
    assert home is not None
    ws[home].set_healthy(False)
    nxt = p.select_worker(ws, prompt)
    assert nxt is not None and nxt != home and ws[nxt].is_healthy()
    for w in ws:
        w.set_healthy(False)
    assert p.select_worker(ws, prompt) is None
    assert p.select_worker([], prompt) is None


def test_no_text_goes_to_least_load() -> None:
    ws = _workers(3)
    ws[0].increment_load()
    ws[2].increment_load()
    assert PrefixHashPolicy().select_worker(ws, None) == 1


def test_decision_and_observer() -> None:
    seen: list[Decision] = []
    ws = _workers(2)
    p = PrefixHashPolicy(on_decision=seen.append)
    d = p.decide(ws, "x" * 40)
    assert d is not None and seen == [d]
    assert d.reason == "hash" and d.request_units == 40 and d.prompt_tokens == 10
    assert d.cached_tokens == 0 and d.cost is None
    with acquire(p, ws, [1, 2, 3]) as lease:
        assert lease.worker.pending_prefill_tokens() == 3


def test_observer_exception_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def boom(d: Decision) -> None:
        raise RuntimeError("observer broke")

    p = PrefixHashPolicy(on_decision=boom)
    assert p.select_worker(_workers(2), "hello") is not None
    assert "observer raised" in caplog.text


@pytest.mark.parametrize(
    ("key", "value", "exc"),
    [
        ("prefix_chars", 0, ValueError),
        ("prefix_tokens", 1.5, TypeError),
        ("virtual_nodes", 0, ValueError),
        ("load_factor", 0.9, ValueError),
        ("load_factor", True, TypeError),
        ("tokens_per_unit", 0, ValueError),
    ],
)
def test_config_validated(key: str, value: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=key):
        PrefixHashPolicy(**{key: value})  # type: ignore[arg-type]


def test_config_object_and_clash() -> None:
    cfg = PrefixHashConfig(prefix_chars=50)
    assert PrefixHashPolicy(config=cfg).config.prefix_chars == 50
    with pytest.raises(TypeError, match="either config= or keyword"):
        PrefixHashPolicy(prefix_tokens=3, config=cfg)
    with pytest.raises(TypeError, match="config"):
        PrefixHashPolicy(config="nope")  # type: ignore[arg-type]


def test_bad_token_ids_raise() -> None:
    p = PrefixHashPolicy()
    with pytest.raises(ValueError, match="token ids"):
        p.select_worker(_workers(2), [1, -2, 3])
    with pytest.raises(TypeError, match="token ids"):
        p.select_worker(_workers(2), [1, "x", 3])  # type: ignore[list-item]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.text(max_size=300))
def test_deterministic_and_eligible(n: int, prompt: str) -> None:
    ws = _workers(n)
    a = PrefixHashPolicy().select_worker(ws, prompt)
    b = PrefixHashPolicy().select_worker(ws, prompt)  # a fresh policy: same ring
    assert a == b and a is not None and 0 <= a < n
