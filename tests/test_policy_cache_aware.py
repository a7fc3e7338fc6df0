"""The ``cache_aware`` rule: config, every branch, and a reference model of the algorithm.

The shared machinery (views, membership, observer, pairs, races) is tested in
``test_policy_prefix.py``; the invariants every policy shares in ``test_invariants.py``.
"""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import pytest
from conftest import build_workers
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cacheroute
from cacheroute import (
    BasicWorker,
    CacheAwareConfig,
    CacheAwarePolicy,
    Decision,
    available_policies,
    make_policy,
)
from cacheroute.tree import Tree


def _tree(policy: CacheAwarePolicy, kind: str = "text") -> Tree:
    tree = policy.tree("default", kind, create=True)  # type: ignore[arg-type]
    assert tree is not None
    return tree


def _recorder(**settings: object) -> tuple[list[Decision], CacheAwarePolicy]:
    seen: list[Decision] = []
    return seen, CacheAwarePolicy(on_decision=seen.append, **settings)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- config


def test_registered_and_exported() -> None:
    assert "cache_aware" in available_policies()
    assert isinstance(make_policy("cache_aware"), CacheAwarePolicy)
    assert cacheroute.CacheAwarePolicy is CacheAwarePolicy
    assert cacheroute.policies.CacheAwareConfig is CacheAwareConfig
    p = CacheAwarePolicy()
    assert p.name == "cache_aware" and p.needs_request_text and p.description


def test_defaults() -> None:
    c = CacheAwarePolicy().config
    assert c == CacheAwareConfig()
    assert (c.cache_threshold, c.balance_abs_threshold, c.balance_rel_threshold) == (0.3, 8, 1.5)
    assert c.max_tree_size_per_worker is None
    assert c.imbalance_mode == "locality" and c.on_decision is None


def test_config_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        CacheAwareConfig().cache_threshold = 0.9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value", "exc"),
    [
        ("cache_threshold", -0.01, ValueError),
        ("cache_threshold", 1.01, ValueError),
        ("cache_threshold", math.nan, ValueError),
        ("cache_threshold", "0.5", TypeError),
        ("cache_threshold", True, TypeError),
        ("balance_abs_threshold", -1, ValueError),
        ("balance_abs_threshold", 2.5, TypeError),
        ("balance_abs_threshold", True, TypeError),
        ("balance_rel_threshold", 0.99, ValueError),
        ("balance_rel_threshold", math.nan, ValueError),
        ("balance_rel_threshold", None, TypeError),
        ("max_tree_size", 0, ValueError),
        ("max_tree_size", 1.5, TypeError),
        ("max_tree_size_per_worker", 0, ValueError),
        ("max_tree_size_per_worker", "10", TypeError),
        ("imbalance_mode", "random", ValueError),
        ("imbalance_mode", None, TypeError),
        ("on_decision", 42, TypeError),
    ],
)
def test_bad_config_names_field_and_value_everywhere(key: str, value: object, exc: type) -> None:
    for build in (
        lambda: CacheAwareConfig(**{key: value}),  # type: ignore[arg-type]
        lambda: CacheAwarePolicy(**{key: value}),  # type: ignore[arg-type]
        lambda: make_policy("cache_aware", **{key: value}),
    ):
        with pytest.raises(exc, match=key) as info:
            build()
        assert repr(value)[:8] in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("cache_threshold", 0.0), ("cache_threshold", 1), ("balance_rel_threshold", math.inf)],
)
def test_edge_values_kept_exactly_no_clamping(key: str, value: object) -> None:
    assert getattr(CacheAwareConfig(**{key: value}), key) == value  # type: ignore[arg-type]


def test_make_policy_rejects_unknown_key_and_lists_accepted() -> None:
    with pytest.raises(TypeError, match=r"cache_treshold.*accepted keys.*cache_threshold"):
        make_policy("cache_aware", cache_treshold=0.5)


def test_config_argument_and_conflicts() -> None:
    cfg = CacheAwareConfig(cache_threshold=0.7)
    assert CacheAwarePolicy(config=cfg).config is cfg
    with pytest.raises(TypeError, match="either config= or keyword"):
        CacheAwarePolicy(balance_abs_threshold=3, config=cfg)
    seen: list[Decision] = []
    p = CacheAwarePolicy(config=cfg, on_decision=seen.append)
    assert p.config.cache_threshold == 0.7 and p.config.on_decision is not None
    p.select_worker(build_workers([0]), "x")
    assert len(seen) == 1
    with pytest.raises(TypeError, match="config"):
        CacheAwarePolicy(config={"cache_threshold": 0.5})  # type: ignore[arg-type]


def test_sglang_recipe_from_the_docs() -> None:
    sglang = CacheAwareConfig(
        cache_threshold=0.3,
        balance_abs_threshold=64,
        balance_rel_threshold=1.5,
        imbalance_mode="least_load",
    )
    assert CacheAwarePolicy(config=sglang).config.balance_abs_threshold == 64


# ----------------------------------------------------------------------------- balanced


def test_hit_goes_to_longest_match_holder_ties_by_load_then_processed() -> None:
    seen, policy = _recorder()
    workers = build_workers([2, 1, 3, 1])
    t = _tree(policy)
    t.insert("abcdefgh", workers[0].url)
    t.insert("abcdefgh", workers[2].url)
    t.insert("abcd", workers[1].url)
    assert policy.select_worker(workers, "abcdefghij") == 0  # longest holders 0 and 2: load
    d = seen[-1]
    assert d.reason == "cache_hit" and d.matched_units == 8 and d.request_units == 10
    assert (d.prompt_tokens, d.cached_tokens) == (3, 2)  # 10 and 8 chars at 4 chars/token
    for _ in range(3):
        workers[2].decrement_load()
    workers[2].increment_load()
    workers[2].increment_load()  # now 2 == worker 0's load; worker 0 processed 1 more
    assert policy.select_worker(workers, "abcdefghXY") == 2  # both hold 8 units of it


def test_equal_matches_keep_every_holder_not_only_the_first() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([5, 5, 5, 0])
    t = _tree(policy)
    for w in workers:  # every worker holds it; the idle one was inserted first
        t.insert("shared prompt", w.url)
    t.insert("shared prompt", workers[0].url)  # most recent holder: worker 0
    assert policy.select_worker(workers, "shared prompt!") == 3


def test_threshold_is_strict_equal_rate_is_a_miss() -> None:
    seen, policy = _recorder(cache_threshold=0.5)
    workers = build_workers([1, 0])
    _tree(policy).insert("abcd", workers[0].url)
    assert policy.select_worker(workers, "abcdwxyz") == 1  # 4 / 8 == 0.5: miss
    assert seen[-1].reason == "cache_miss"
    seen, policy = _recorder(cache_threshold=0.5)
    _tree(policy).insert("abcd", workers[0].url)
    assert policy.select_worker(workers, "abcdw") == 0  # 4 / 5 > 0.5: hit
    assert seen[-1].reason == "cache_hit"


def test_miss_least_load_then_smallest_tree_then_processed_then_index() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([1, 0, 0, 0])
    t = _tree(policy)
    t.insert("q" * 30, workers[1].url)
    t.insert("r" * 10, workers[2].url)
    t.insert("s" * 10, workers[3].url)
    workers[2].increment_processed()
    assert policy.select_worker(workers, "zzz") == 3  # 2 and 3 tie on tree; 3 fewer processed
    # now 3 has processed 1 and a bigger tree: 2 wins on tree size
    assert policy.select_worker(workers, "yyy") == 2


def test_many_way_miss_tie_uses_tree_size() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0] * 8)
    t = _tree(policy)
    for i, w in enumerate(workers):
        t.insert(chr(65 + i) * (20 - i), w.url)  # worker 7 holds the least
        for _ in range(8 - i):
            w.increment_processed()
    workers[7].increment_processed()
    workers[7].increment_processed()  # 3 processed: more than worker 6's 2, smallest tree
    assert policy.select_worker(workers, "zzz") == 7


def test_miss_never_smallest_tree_alone() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([7, 6])
    _tree(policy).insert("x" * 500, workers[1].url)
    assert policy.select_worker(workers, "a totally new prompt") == 1


def test_no_text_or_empty_routes_by_load_and_inserts_nothing() -> None:
    import array

    seen, policy = _recorder()
    workers = build_workers([2, 1, 1])
    for text in (None, "", [], (), array.array("I")):
        before = [w.processed() for w in workers]
        i = policy.select_worker(workers, text)  # type: ignore[arg-type]
        assert i in (1, 2)
        assert [w.processed() for w in workers] == [p + (k == i) for k, p in enumerate(before)]
        assert seen[-1].reason == "cache_miss" and seen[-1].request_units == 0
    assert policy.tree_sizes() == {}


# ----------------------------------------------------------------------------- imbalanced


def test_imbalanced_locality_keeps_prefix_within_load_window() -> None:
    seen, policy = _recorder(balance_abs_threshold=10)
    workers = build_workers([40, 6, 0])
    t = _tree(policy)
    t.insert("system prompt for tenant one", workers[0].url)
    t.insert("system prompt for tenant one", workers[1].url)
    assert policy.select_worker(workers, "system prompt for tenant one: hi") == 1
    assert seen[-1].reason == "imbalanced" and seen[-1].matched_units == 28
    assert policy.select_worker(workers, "something else entirely") == 2  # no match: least load
    for _ in range(5):
        workers[1].increment_load()  # 11 > 0 + 10: the holder is outside the window
    assert policy.select_worker(workers, "system prompt for tenant one: yo") == 2


def test_imbalanced_window_bound_is_inclusive() -> None:
    policy = CacheAwarePolicy(balance_abs_threshold=10)
    workers = build_workers([40, 10, 0])
    _tree(policy).insert("system prompt", workers[1].url)
    assert policy.select_worker(workers, "system prompt!") == 1  # 10 <= 0 + 10


def test_imbalanced_locality_ignores_matches_at_or_below_threshold() -> None:
    policy = CacheAwarePolicy(balance_abs_threshold=10, cache_threshold=0.5)
    workers = build_workers([40, 5, 0])
    _tree(policy).insert("ab", workers[1].url)
    assert policy.select_worker(workers, "abcd") == 2  # 2/4 is not above 0.5


def test_imbalanced_least_load_mode_is_pure_least_load() -> None:
    policy = CacheAwarePolicy(balance_abs_threshold=10, imbalance_mode="least_load")
    workers = build_workers([40, 6, 0])
    _tree(policy).insert("system prompt", workers[1].url)
    assert policy.select_worker(workers, "system prompt") == 2
    assert _tree(policy).prefix_match_tenant("system prompt", workers[2].url) == 13


def test_imbalance_needs_both_thresholds() -> None:
    seen, policy = _recorder(balance_abs_threshold=5, balance_rel_threshold=2.0)
    workers = build_workers([20, 12])  # gap 8 > 5 but 20 <= 2 * 12: balanced
    policy.select_worker(workers, "p")
    assert seen[-1].reason != "imbalanced"
    for _ in range(3):
        workers[1].decrement_load()  # 20 > 2 * 9
    policy.select_worker(workers, "p")
    assert seen[-1].reason == "imbalanced"
    workers[1].increment_load()  # gap 10 > 5, 20 == 2 * 10: not strictly above: balanced
    policy.select_worker(workers, "p")
    assert seen[-1].reason != "imbalanced"
    never = CacheAwarePolicy(balance_rel_threshold=math.inf, on_decision=seen.append)
    never.select_worker(build_workers([1000, 0]), "p")
    assert seen[-1].reason != "imbalanced"


def test_abs_gap_equal_to_threshold_is_balanced() -> None:
    seen, policy = _recorder(balance_abs_threshold=5, balance_rel_threshold=1.0)
    policy.select_worker(build_workers([5, 0]), "p")
    assert seen[-1].reason == "cache_miss"
    policy.select_worker(build_workers([6, 0]), "p")
    assert seen[-1].reason == "imbalanced"


# ----------------------------------------------------------------------------- every branch


@pytest.mark.parametrize("mode", ["locality", "least_load"])
@pytest.mark.parametrize(
    "loads", [[0, 0, 0], [50, 0, 3], [1, 1, 0]], ids=["idle", "imbalanced", "balanced"]
)
@pytest.mark.parametrize("text", ["hello world", [5, 6, 7, 2**20], (1, 2)], ids=repr)
def test_every_branch_inserts_for_chosen_and_counts_processed_never_load(
    mode: str, loads: list[int], text: object
) -> None:
    policy = CacheAwarePolicy(imbalance_mode=mode, balance_abs_threshold=4)  # type: ignore[arg-type]
    workers = build_workers(loads)
    for _ in range(3):
        before = [(w.load(), w.processed()) for w in workers]
        i = policy.select_worker(workers, text)  # type: ignore[arg-type]
        assert i is not None
        tree = policy.tree("default", "text" if isinstance(text, str) else "tokens")
        assert tree is not None
        assert tree.prefix_match_tenant(text, workers[i].url) == len(text)  # type: ignore[arg-type]
        after = [(w.load(), w.processed()) for w in workers]
        assert after == [(ld, p + (k == i)) for k, (ld, p) in enumerate(before)]


def test_text_and_tokens_get_separate_trees() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 0])
    policy.select_worker(workers, "abc")
    policy.select_worker(workers, [97, 98, 99])
    assert set(policy.tree_sizes()) == {("default", "text"), ("default", "tokens")}
    assert policy.tree_sizes()[("default", "tokens")] == 3


def test_per_worker_cap_and_total_cap_hold() -> None:
    policy = CacheAwarePolicy(max_tree_size=300, max_tree_size_per_worker=50)
    workers = build_workers([0, 0, 0])
    for i in range(200):
        policy.select_worker(workers, f"{i:05d}" + "x" * (i % 70))
        sizes = _tree(policy).used_size_per_tenant()
        assert max(sizes.values()) <= 50 and sum(sizes.values()) <= 300


# ----------------------------------------------------------------------------- reference


def _lcp(a: str | tuple[int, ...], b: str | tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Model:
    """The algorithm written plainly over its own record of what was routed where.

    It never reads the policy's trees: ``held[kind][url]`` is the set of prompts routed
    to ``url``; matches and tree sizes are computed from it by brute force.
    """

    def __init__(self, config: CacheAwareConfig, workers: list[BasicWorker]) -> None:
        self.c = config
        self.workers = workers
        self.held: dict[str, dict[str, set[str | tuple[int, ...]]]] = {"text": {}, "tokens": {}}
        self.removed: set[str] = set()

    def size(self, kind: str, url: str) -> int:
        return len({h[:k] for h in self.held[kind].get(url, ()) for k in range(1, len(h) + 1)})

    def matched(self, kind: str, url: str, text: str | tuple[int, ...]) -> int:
        return max((_lcp(h, text) for h in self.held[kind].get(url, ())), default=0)

    def select(self, text: str | tuple[int, ...] | None) -> tuple[int | None, str | None]:
        c, ws = self.c, self.workers
        elig = [i for i, w in enumerate(ws) if w.is_healthy() and w.url not in self.removed]
        if not elig:
            return None, None
        load = {i: ws[i].load() for i in elig}
        lo, hi = min(load.values()), max(load.values())
        n = len(text) if text else 0
        kind = "text" if isinstance(text, str) else "tokens"
        m = {i: self.matched(kind, ws[i].url, text) if n else 0 for i in elig}  # type: ignore[arg-type]

        def by_load(cands: list[int]) -> int:
            return min(cands, key=lambda i: (load[i], ws[i].processed(), i))

        if hi - lo > c.balance_abs_threshold and hi > c.balance_rel_threshold * lo:
            if c.imbalance_mode == "locality":
                window = [i for i in elig if load[i] <= lo + c.balance_abs_threshold]
                best = max(m[i] for i in window)
                if n and best / n > c.cache_threshold:
                    return by_load([i for i in window if m[i] == best]), "imbalanced"
            return by_load(elig), "imbalanced"
        best = max(m[i] for i in elig)
        if n and best / n > c.cache_threshold:
            return by_load([i for i in elig if m[i] == best]), "cache_hit"
        if not n:
            return by_load(elig), "cache_miss"
        return min(
            elig, key=lambda i: (load[i], self.size(kind, ws[i].url), ws[i].processed(), i)
        ), "cache_miss"

    def routed(self, i: int, text: str | tuple[int, ...] | None) -> None:
        if text:
            kind = "text" if isinstance(text, str) else "tokens"
            self.held[kind].setdefault(self.workers[i].url, set()).add(text)


_texts = st.one_of(
    st.none(),
    st.sampled_from(["", "sys-A: ", "sys-B: ", "sys-A: hello", "sys-A: hello there"]),
    st.builds(
        lambda p, s: p + s, st.sampled_from(["sys-A: ", "sys-B: ", ""]), st.text("ab", max_size=10)
    ),
    st.lists(st.integers(0, 3), max_size=8).map(tuple),
)
# processed counts and loads move independently of what is routed, so every tie-break
# level (load, tree size, processed, index) decides some cases
_action = st.one_of(
    st.tuples(st.just("select"), _texts),
    st.tuples(st.just("select"), _texts),
    st.tuples(st.just("load"), st.integers(0, 7), st.integers(-3, 12)),
    st.tuples(st.just("processed"), st.integers(0, 7), st.integers(1, 3)),
    st.tuples(st.just("health"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 7)),
    st.tuples(st.just("add"), st.integers(0, 7)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_workers=st.integers(1, 6),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    abs_t=st.sampled_from([0, 1, 3]),
    rel_t=st.sampled_from([1.0, 1.5]),
    mode=st.sampled_from(["locality", "least_load"]),
    actions=st.lists(_action, max_size=30),
)
def test_decisions_match_an_independent_model(
    n_workers: int,
    threshold: float,
    abs_t: int,
    rel_t: float,
    mode: str,
    actions: list[tuple[object, ...]],
) -> None:
    seen: list[Decision] = []
    config = CacheAwareConfig(
        cache_threshold=threshold,
        balance_abs_threshold=abs_t,
        balance_rel_threshold=rel_t,
        imbalance_mode=mode,  # type: ignore[arg-type]
        on_decision=seen.append,
    )
    policy = CacheAwarePolicy(config=config)
    workers = [BasicWorker(f"http://w{i}") for i in range(n_workers)]
    model = _Model(config, workers)
    for kind, *args in actions:
        w = workers[int(args[0]) % n_workers] if kind != "select" else None  # type: ignore[call-overload]
        if kind == "select":
            text = args[0]
            expected, reason = model.select(text)  # type: ignore[arg-type]
            before = [(x.load(), x.processed()) for x in workers]
            got = policy.select_worker(workers, text)  # type: ignore[arg-type]
            event(f"reason={reason}")
            assert got == expected
            after = [(x.load(), x.processed()) for x in workers]
            if got is None:
                assert after == before
                continue
            model.routed(got, text)  # type: ignore[arg-type]
            assert after == [(ld, p + (k == got)) for k, (ld, p) in enumerate(before)]
            assert seen[-1].index == got and seen[-1].reason == reason
        elif kind == "load":
            assert w is not None
            delta = int(args[1])  # type: ignore[call-overload]
            for _ in range(max(delta, -w.load()), 0):
                w.decrement_load()
            for _ in range(max(delta, 0)):
                w.increment_load()
        elif kind == "processed":
            assert w is not None
            for _ in range(int(args[1])):  # type: ignore[call-overload]
                w.increment_processed()
        elif kind == "health":
            assert w is not None
            w.set_healthy(bool(args[1]))
        elif kind == "remove":
            assert w is not None
            policy.remove_worker(w)
            model.removed.add(w.url)
            for held in model.held.values():
                held.pop(w.url, None)
        else:
            assert w is not None
            policy.add_worker(w)
            model.removed.discard(w.url)
