"""The peer re-implementations in ``benchmarks/peers/``: a few decisive cases each.

Each peer module registers its policy when imported; these tests import them from the
repository checkout (they are benchmarks, not part of the installed package).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from cacheroute import BasicWorker, acquire, make_policy
from cacheroute.policies import available_policies

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402

NAMES = peers.register_all()


def _workers(n: int) -> list[BasicWorker]:
    return [BasicWorker(f"http://w{i}:8000") for i in range(n)]


def _tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


class Clock:
    """A settable clock for the peers that keep time."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_every_peer_registers_and_routes_within_the_list() -> None:
    assert set(NAMES) <= set(available_policies())
    for name in NAMES:
        p = make_policy(name, tokens_per_unit=1.0)
        ws = _workers(3)
        ws[1].set_healthy(False)
        for k in range(20):
            i = p.select_worker(ws, _tokens(100 * (k % 4), 50))
            assert i in (0, 2), name
        for w in ws:
            w.set_healthy(False)
        assert p.select_worker(ws, [1, 2]) is None, name


def test_a_peer_module_loads_by_file_path() -> None:
    """What ``cacheroute simulate --plugin benchmarks/peers/dynamo.py`` does."""
    path = BENCH / "peers" / "dynamo.py"
    spec = importlib.util.spec_from_file_location("plugin_dynamo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "dynamo" in available_policies()


# ----------------------------------------------------------------------------- Dynamo


def test_dynamo_cost_is_weight_times_prefill_blocks_plus_decode_blocks() -> None:
    from peers.dynamo import DynamoPolicy

    ws = _workers(3)
    ws[0].add_work(300, 0)  # 300 prefill tokens in flight
    p = DynamoPolicy(tokens_per_unit=1.0, seed=0)
    # a cold 100-token request: logits (in blocks of 16) 400/16 + 100/16, 100/16 + 100/16
    d = p.decide(ws, _tokens(0, 100))
    assert d is not None and d.index in (1, 2) and d.cost == pytest.approx(200 / 16)
    # the overlap makes the holder cheaper: same prompt again goes where it was routed
    assert p.select_worker(ws, _tokens(0, 100)) == d.index


def test_dynamo_active_blocks_dedup_shared_prefixes_and_free_fifo() -> None:
    from peers.dynamo import DynamoPolicy

    ws = _workers(2)
    p = DynamoPolicy(tokens_per_unit=16.0, seed=1)
    shared = _tokens(0, 32)
    first = p.select_worker(ws, [*shared, 100])
    assert first is not None
    url = ws[first].url
    p.select_worker(ws, [*shared, 101])  # goes home (overlap), shares 32 blocks
    assert len(p._refs[url]) in (33, 34)  # shared blocks counted once
    p.on_request_complete(url, True)
    p.on_request_complete(url, True)
    assert not p._refs[url]


def test_dynamo_index_entries_expire_after_the_ttl() -> None:
    from peers.dynamo import DynamoPolicy

    clock = Clock()
    ws = _workers(2)
    p = DynamoPolicy(tokens_per_unit=16.0, clock=clock, seed=0)
    home = p.select_worker(ws, _tokens(0, 64))
    assert home is not None
    ws[home].add_work(16, 0)  # a little load on the holder
    clock.t = 60.0
    assert p.select_worker(ws, _tokens(0, 64)) == home  # overlap still fresh
    d = p.decide(ws, _tokens(0, 64))
    assert d is not None and d.matched_units == 64
    clock.t = 200.0  # > 120 s since the last routing: the overlap is gone
    d = p.decide(ws, _tokens(0, 64))
    assert d is not None and d.matched_units == 0


def test_dynamo_prunes_the_index_to_the_target() -> None:
    from peers.dynamo import DynamoPolicy

    p = DynamoPolicy(tokens_per_unit=16.0, max_index_blocks=100, prune_target=0.5, seed=0)
    ws = _workers(2)
    for k in range(20):
        p.select_worker(ws, _tokens(1000 * k, 10))
    assert len(p._order) <= 100


# ----------------------------------------------------------------------------- llm-d


def test_llmd_affinity_gate_sticks_until_the_ttft_penalty() -> None:
    from peers.llmd import LLMDOptimizedBaselinePolicy

    ws = _workers(2)
    p = LLMDOptimizedBaselinePolicy(tokens_per_unit=1.0, seed=0)
    home = p.select_worker(ws, _tokens(0, 1000))
    assert home is not None
    other = 1 - home
    ws[home].add_work(100_000, 0)  # 3.7 s of backlog at 26.7k tokens/s: still sticky
    assert p.select_worker(ws, [*_tokens(0, 1000), 5]) == home
    ws[home].add_work(500_000, 0)  # 22 s > 18 s: the gate breaks, token load decides
    assert p.select_worker(ws, [*_tokens(0, 1000), 6]) == other


def test_llmd_scorers_weight_prefix_three_to_one() -> None:
    from peers.llmd import LLMDScorersPolicy

    ws = _workers(2)
    p = LLMDScorersPolicy(tokens_per_unit=1.0, kv_capacity_tokens=10_000, seed=0)
    home = p.select_worker(ws, _tokens(0, 100))
    assert home is not None
    for _ in range(5):
        ws[home].increment_load()
    # prefix 3 * 1.0 + queue 0 + kv 1 = 4 > prefix 0 + queue 1 + kv 1 = 2
    assert p.select_worker(ws, _tokens(0, 100)) == home


# ----------------------------------------------------------------------------- Ray


def test_ray_matches_above_ten_percent_else_smallest_tree() -> None:
    from peers.ray_serve import RayPrefixAffinityPolicy

    ws = _workers(3)
    p = RayPrefixAffinityPolicy(tokens_per_unit=1.0, seed=0)
    a = p.select_worker(ws, _tokens(0, 100))
    b = p.select_worker(ws, _tokens(1000, 100))
    c = p.select_worker(ws, _tokens(2000, 100))
    assert {a, b, c} == {0, 1, 2}  # misses: smallest trees
    for _ in range(6):
        ws[a].increment_load()  # load ignored while balanced (threshold inf)
    assert p.select_worker(ws, [*_tokens(0, 100), 1]) == a
    # with Ray's older threshold of 10, an imbalance of 11 falls back to power of two
    q = RayPrefixAffinityPolicy(imbalanced_threshold=10, tokens_per_unit=1.0, seed=0)
    ws2 = _workers(2)
    home = q.select_worker(ws2, _tokens(0, 100))
    assert home is not None
    for _ in range(11):
        ws2[home].increment_load()
    assert q.select_worker(ws2, _tokens(0, 100)) == 1 - home


# ----------------------------------------------------------------------------- vLLM router


def test_vllm_router_is_random_among_longest_match_holders_and_blind_to_load() -> None:
    from peers.vllm_router import VLLMPrefixAwarePolicy

    ws = _workers(4)
    p = VLLMPrefixAwarePolicy(tokens_per_unit=1.0, seed=3)
    home = p.select_worker(ws, _tokens(0, 200))
    assert home is not None
    for _ in range(50):
        ws[home].increment_load()
    assert all(p.select_worker(ws, [*_tokens(0, 200), k]) == home for k in range(10))


# ----------------------------------------------------------------------------- SGLang, KubeAI


def test_sglang_uses_its_own_defaults_and_no_capacity_cap() -> None:
    from peers.sglang import SGLangCacheAwarePolicy

    p = SGLangCacheAwarePolicy()
    c = p.config
    assert (c.cache_threshold, c.balance_abs_threshold, c.balance_rel_threshold) == (0.3, 64, 1.5)
    assert c.imbalance_mode == "least_load" and c.kv_capacity_tokens is None


def test_kubeai_hashes_the_first_100_characters() -> None:
    from peers.kubeai import KubeAIPrefixHashPolicy

    ws = _workers(8)
    p = KubeAIPrefixHashPolicy()
    prefix = "k" * 100
    home = p.select_worker(ws, prefix + "a")
    assert all(p.select_worker(ws, prefix + f"tail {k}") == home for k in range(10))


# ----------------------------------------------------------------------------- Preble


def test_preble_exploits_long_matches_and_explores_short_ones() -> None:
    from peers.preble import PreblePolicy

    clock = Clock()
    ws = _workers(3)
    p = PreblePolicy(tokens_per_unit=1.0, clock=clock, seed=0)
    home = p.select_worker(ws, _tokens(0, 1000))
    assert home is not None
    # one request of the same size on each other GPU: equal windowed loads
    others = {p.select_worker(ws, _tokens(100_000 * k, 1000)) for k in (1, 2)}
    assert others == {0, 1, 2} - {home}
    clock.t = 1.0
    # cached 1000 > missed 10: exploit (the holder)
    assert p.select_worker(ws, [*_tokens(0, 1000), *_tokens(5000, 10)]) == home
    clock.t = 2.0
    # cached 1000 < missed 2000: explore, the least windowed load (not the holder)
    explore = p.select_worker(ws, [*_tokens(0, 1000), *_tokens(9000, 2000)])
    assert explore is not None and explore != home


def test_preble_window_forgets_old_load_and_rebalances_hot_prefixes() -> None:
    from peers.preble import PreblePolicy

    clock = Clock()
    ws = _workers(2)
    p = PreblePolicy(tokens_per_unit=1.0, clock=clock, seed=0)
    system = _tokens(0, 4000)
    chosen = []
    for k in range(12):
        clock.t = 0.1 * k
        chosen.append(p.select_worker(ws, [*system, *_tokens(10_000 + 100 * k, 50)]))
    assert len(set(chosen)) == 2  # the hot prefix got a second holder
    clock.t = 1000.0  # the 3-minute window is empty again
    loads = p._loads(p._view(p._pool(tuple(ws)), 1), clock.t)  # type: ignore[arg-type]
    assert loads == [0.0, 0.0]


def test_every_peer_survives_leases_end_to_end() -> None:
    for name in NAMES:
        kwargs: dict[str, Any] = {"tokens_per_unit": 1.0}
        p = make_policy(name, **kwargs)
        ws = _workers(3)
        leases = [acquire(p, ws, _tokens(50 * (k % 5), 40)) for k in range(15)]
        for lease in leases:
            lease.first_token()
            lease.release()
        assert all(w.load() == 0 for w in ws), name
