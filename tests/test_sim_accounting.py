"""Exact accounting of the simulator: hits, completions, loads, determinism."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from cacheroute.policies import available_policies
from cacheroute.policies.base import RequestText
from cacheroute.sim import (
    EngineConfig,
    Request,
    Workload,
    bursty,
    chat,
    default_specs,
    ideal_hit_tokens,
    shared_prefix,
    simulate,
    summarize,
)
from cacheroute.sim.engine import Engine
from cacheroute.sim.request import matched_blocks
from cacheroute.worker import Worker

SPECS = [str(s) for s in default_specs()]

SMALL = {
    "chat": chat(users=24, rounds=4, request_rate=40.0, seed=1),
    "shared_prefix": shared_prefix(groups=8, prompts_per_group=6, seed=1),
    "bursty": bursty(bursts=4, burst_size=24, interval_s=0.5, seed=1),
}
TIGHT = EngineConfig(cache_tokens=20_000, max_batch=8)


def test_default_specs_cover_every_policy_and_both_cache_aware_modes() -> None:
    # Built now, not at import: another test module may register policies (the peers).
    specs = [str(s) for s in default_specs()]
    names = {s.split(":")[0] for s in specs}
    assert names == set(available_policies())
    assert {"cache_aware:locality", "cache_aware:least_load"} <= set(specs)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("engine", [EngineConfig(), TIGHT], ids=["default", "tight"])
@pytest.mark.parametrize("policy", SPECS)
def test_every_request_completes_once_hits_bounded_loads_zero(
    name: str, engine: EngineConfig, policy: str
) -> None:
    w = SMALL[name]
    res = simulate(w, policy, workers=4, engine=engine, seed=3)
    assert all(d >= 0 for d in res.done)  # completed (simulate raises on a double completion)
    assert res.final_loads == [0, 0, 0, 0]
    for r, h, first, done in zip(w.requests, res.hit, res.first_token, res.done, strict=True):
        assert 0 <= h <= r.input_tokens
        assert r.arrival <= first <= done
    s = summarize(res)
    assert s.requests == len(w)
    assert sum(s.requests_per_worker) == len(w)
    assert s.hit_rate <= s.ideal_hit_rate + 1e-12


@pytest.mark.parametrize("name", sorted(SMALL))
def test_one_worker_with_unbounded_cache_reproduces_the_ideal_hit_rate(name: str) -> None:
    w = SMALL[name]
    res = simulate(w, "round_robin", workers=1, engine=EngineConfig(cache_tokens=None))
    assert sum(res.hit) == ideal_hit_tokens(w.requests)
    s = summarize(res)
    assert s.hit_rate == s.ideal_hit_rate


@pytest.mark.parametrize("policy", SPECS)
def test_no_prefix_reuse_means_zero_hits_for_every_policy(policy: str) -> None:
    w = SMALL["bursty"]
    assert ideal_hit_tokens(w.requests) == 0
    res = simulate(w, policy, workers=4)
    assert sum(res.hit) == 0
    assert summarize(res).hit_rate == 0.0


@pytest.mark.parametrize("policy", ["random", "power_of_two", "cache_aware:locality"])
def test_same_seed_same_results(policy: str) -> None:
    w1 = chat(users=16, rounds=3, request_rate=30.0, seed=7)
    w2 = chat(users=16, rounds=3, request_rate=30.0, seed=7)
    a = simulate(w1, policy, workers=3, engine=TIGHT, seed=5)
    b = simulate(w2, policy, workers=3, engine=TIGHT, seed=5)
    assert (a.worker, a.hit, a.first_token, a.done) == (b.worker, b.hit, b.first_token, b.done)
    sa, sb = summarize(a), summarize(b)
    assert (sa.hit_rate, sa.ttft_p99, sa.e2e_p99) == (sb.hit_rate, sb.ttft_p99, sb.e2e_p99)


def test_different_seed_changes_random_routing() -> None:
    w = SMALL["chat"]
    a = simulate(w, "random", workers=4, seed=1)
    b = simulate(w, "random", workers=4, seed=2)
    assert a.worker != b.worker


def test_cache_aware_beats_round_robin_on_shared_prefix() -> None:
    w = shared_prefix(groups=16, prompts_per_group=8, seed=0)
    rr = summarize(simulate(w, "round_robin", workers=4))
    ca = summarize(simulate(w, "cache_aware:locality", workers=4))
    assert ca.hit_rate > rr.hit_rate
    assert ca.lb_fraction is not None and rr.lb_fraction is None


# --------------------------------------------------------------------- engine units


def _req(blocks: tuple[int, ...], bs: int = 10, out: int = 1, t: float = 0.0) -> Request:
    return Request(t, blocks, bs, len(blocks) * bs, len(blocks) * bs, out)


def _run_one(engine: Engine, rid: int, now: float) -> float:
    """Enqueue ``rid`` into an idle engine and run it to completion; returns the end time."""
    engine.enqueue(rid, now)
    t = now
    while engine.next_time is not None:
        t = engine.next_time
        engine.boundary(t)
    return t


def test_matched_blocks_binary_search() -> None:
    present = {1, 2, 3}
    assert matched_blocks((), present) == 0
    assert matched_blocks((9, 1), present) == 0
    assert matched_blocks((1, 2, 3), present) == 3
    assert matched_blocks((1, 2, 3, 4, 5, 6, 7), present) == 3
    assert matched_blocks((1, 4), present) == 1


def test_lru_evicts_least_recent_leaf_first_and_respects_capacity() -> None:
    reqs = [_req((1, 2, 3)), _req((1, 4, 5)), _req((1, 2, 6)), _req((7, 8))]
    first = [0.0] * len(reqs)
    hit = [0] * len(reqs)
    eng = Engine(0, EngineConfig(cache_tokens=60), reqs, first, hit)
    t = 0.0
    for rid in range(len(reqs)):
        t = _run_one(eng, rid, t)
        assert eng.used <= 60
        assert eng.resident_tokens() == eng.used  # nothing running: only cached blocks
    assert hit == [0, 10, 20, 0]
    # (1, 2, 6) evicted leaf 3 (its chain was least recent); (7, 8) then evicted 5 and
    # its parent 4, leaf first; the shared root 1 stays.
    assert set(eng._tok) == {1, 2, 6, 7, 8}


def test_running_requests_pin_their_blocks() -> None:
    # Two long requests fill the cache; a third must wait for one to finish.
    reqs = [_req((1, 2), out=100), _req((3, 4), out=100), _req((5, 6), out=2)]
    first = [0.0] * 3
    hit = [0] * 3
    eng = Engine(0, EngineConfig(cache_tokens=250), reqs, first, hit)
    eng.enqueue(0, 0.0)
    eng.enqueue(1, 0.0)
    eng.enqueue(2, 0.0)
    assert eng.next_time is not None
    done = eng.boundary(eng.next_time)  # 0 prefilled; 1 admitted (2 x 120 <= 250), 2 not
    assert eng.running() == 2 and eng.queued() == 1
    while eng.next_time is not None:
        done += eng.boundary(eng.next_time)
        assert eng.used <= 250
    assert sorted(done) == [0, 1, 2]
    assert first[2] > first[0]


def test_oversized_request_runs_alone() -> None:
    reqs = [_req(tuple(range(10)), out=5)]  # 100 + 5 tokens > 50
    eng = Engine(0, EngineConfig(cache_tokens=50), reqs, [0.0], [0])
    _run_one(eng, 0, 0.0)
    assert eng.oversized == 1
    assert eng.used <= 50


def test_decode_is_cut_when_a_request_arrives() -> None:
    cfg = EngineConfig()
    reqs = [_req((1,), out=1000), _req((2,), out=2, t=1.0)]
    first = [0.0, 0.0]
    eng = Engine(0, cfg, reqs, first, [0, 0])
    eng.enqueue(0, 0.0)
    assert eng.next_time is not None
    eng.boundary(eng.next_time)  # prefill of request 0 done; decoding 999 steps
    long_end = eng.next_time
    assert long_end is not None and long_end > 1.0
    assert eng.enqueue(1, 1.0)  # cut at the end of the step in progress
    assert eng.next_time is not None and 1.0 <= eng.next_time < 1.0 + 0.1
    while eng.next_time is not None:
        eng.boundary(eng.next_time)
    assert first[1] < long_end


def test_workload_limit_and_speed() -> None:
    w = chat(users=4, rounds=2, request_rate=1.0)
    assert len(w.limited(3)) == 3
    fast = w.scaled(2.0)
    assert [r.arrival * 2 for r in fast.requests] == pytest.approx([r.arrival for r in w.requests])
    assert isinstance(fast, Workload)


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="span_tokens"):
        Request(0.0, (1, 2), 10, 30, 30, 1)
    with pytest.raises(ValueError, match="input_tokens"):
        Request(0.0, (1, 2), 10, 20, 15, 1)
    with pytest.raises(ValueError, match="output_tokens"):
        Request(0.0, (1,), 10, 10, 10, 0)


@pytest.mark.parametrize("routers", [1, 2])
def test_policies_that_keep_time_are_given_the_simulated_clock(routers: int) -> None:
    """A policy accepting ``clock`` (a TTL index, a load window) reads simulated time: the
    arrival of the request it routes. The wall clock would put a whole trace replayed in
    a second inside every window."""
    from cacheroute.policies import registry
    from cacheroute.policies.shortest_queue import ShortestQueuePolicy

    seen: list[float] = []

    class Timed(ShortestQueuePolicy):
        def __init__(self, clock: Callable[[], float] | None = None) -> None:
            super().__init__()
            self._clock = clock

        def select_worker(
            self, workers: Sequence[Worker], request_text: RequestText = None
        ) -> int | None:
            assert self._clock is not None, "no clock was passed"
            seen.append(self._clock())
            return super().select_worker(workers, request_text)

    saved = dict(registry._registry)
    try:
        registry.register_policy("timed_shortest_queue", Timed)
        w = chat(users=4, rounds=3, request_rate=0.5)
        simulate(w, "timed_shortest_queue", workers=2, routers=routers)
    finally:
        registry._registry.clear()
        registry._registry.update(saved)
    assert seen == [r.arrival for r in w.requests]
    assert w.requests[-1].arrival > 10.0  # far from any wall-clock reading of the run


@pytest.mark.parametrize("engine", [EngineConfig(), TIGHT], ids=["default", "tight"])
def test_policies_are_told_what_a_unit_and_an_engine_cache_hold(engine: EngineConfig) -> None:
    """The simulator builds each policy with what it accepts of tokens per unit (a block),
    the engines' KV capacity and how many requests an engine runs at once: the facts a
    gateway's user would configure."""
    from cacheroute.policies import WorkAwarePolicy, registry

    built: list[WorkAwarePolicy] = []

    class Recorded(WorkAwarePolicy):
        def __init__(
            self,
            *,
            tokens_per_unit: float | None = None,
            kv_capacity_tokens: int | None = None,
            max_batch: int = 256,
        ) -> None:
            super().__init__(
                tokens_per_unit=tokens_per_unit,
                kv_capacity_tokens=kv_capacity_tokens,
                max_batch=max_batch,
            )
            built.append(self)

    saved = dict(registry._registry)
    try:
        registry.register_policy("recorded_work_aware", Recorded)
        w = SMALL["shared_prefix"]
        simulate(w, "recorded_work_aware", workers=2, engine=engine)
    finally:
        registry._registry.clear()
        registry._registry.update(saved)
    (p,) = built
    c = p.config
    assert c.tokens_per_unit == float(w.requests[0].block_size)
    assert c.kv_capacity_tokens == engine.cache_tokens
    assert c.max_batch == engine.max_batch
