"""The ``cache_aware`` policy: config, every branch, membership, observer, properties."""

from __future__ import annotations

import array
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, dataclass

import pytest
from conftest import build_workers
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cacheroute
import cacheroute.policies.cache_aware as ca
from cacheroute import (
    BasicWorker,
    CacheAwareConfig,
    CacheAwarePolicy,
    Decision,
    WorkerType,
    acquire,
    available_policies,
    make_policy,
)
from cacheroute.policies import LoadBalancingPolicy
from cacheroute.tree import Tree


def _tree(policy: CacheAwarePolicy, model: str = "default", kind: str = "text") -> Tree:
    tree = policy.tree(model, kind, create=True)  # type: ignore[arg-type]
    assert tree is not None
    return tree


def _recorder() -> tuple[list[Decision], CacheAwarePolicy]:
    seen: list[Decision] = []
    return seen, CacheAwarePolicy(on_decision=seen.append)


# ----------------------------------------------------------------------------- config


def test_registered_and_exported() -> None:
    assert "cache_aware" in available_policies()
    assert isinstance(make_policy("cache_aware"), CacheAwarePolicy)
    assert cacheroute.CacheAwarePolicy is CacheAwarePolicy
    assert cacheroute.policies.CacheAwareConfig is CacheAwareConfig
    assert cacheroute.Decision is Decision
    p = CacheAwarePolicy()
    assert p.name == "cache_aware" and p.needs_request_text and p.description


def test_defaults() -> None:
    c = CacheAwarePolicy().config
    assert c == CacheAwareConfig()
    assert (c.cache_threshold, c.balance_abs_threshold, c.balance_rel_threshold) == (0.3, 8, 1.5)
    assert c.max_tree_size == 2**24 and c.max_tree_size_per_worker is None
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
        ("max_tree_size", -5, ValueError),
        ("max_tree_size", 10.0, TypeError),
        ("max_tree_size_per_worker", 0, ValueError),
        ("max_tree_size_per_worker", "x", TypeError),
        ("imbalance_mode", "pure", ValueError),
        ("imbalance_mode", None, ValueError),
        ("on_decision", 42, TypeError),
    ],
)
def test_bad_config_names_field_and_value_everywhere(key: str, value: object, exc: type) -> None:
    for build in (
        lambda: CacheAwareConfig(**{key: value}),  # type: ignore[arg-type]
        lambda: CacheAwarePolicy(**{key: value}),  # type: ignore[arg-type]
        lambda: make_policy("cache_aware", **{key: value}),
    ):
        with pytest.raises(exc) as info:
            build()
        assert key in str(info.value)
        if not callable(value):
            assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cache_threshold", 0),
        ("cache_threshold", 1),
        ("balance_abs_threshold", 0),
        ("balance_rel_threshold", 1),
        ("balance_rel_threshold", math.inf),
        ("max_tree_size", 1),
        ("max_tree_size_per_worker", 7),
        ("imbalance_mode", "least_load"),
    ],
)
def test_edge_values_kept_exactly_no_clamping(key: str, value: object) -> None:
    policy = make_policy("cache_aware", **{key: value})
    assert isinstance(policy, CacheAwarePolicy)
    assert getattr(policy.config, key) == value


def test_make_policy_rejects_unknown_key_and_lists_accepted() -> None:
    with pytest.raises(TypeError, match="eviction_interval_secs") as info:
        make_policy("cache_aware", eviction_interval_secs=30)
    assert "cache_threshold" in str(info.value) and "imbalance_mode" in str(info.value)


def test_config_argument_and_conflicts() -> None:
    cfg = CacheAwareConfig(cache_threshold=0.7, imbalance_mode="least_load")
    assert CacheAwarePolicy(config=cfg).config is cfg
    assert make_policy("cache_aware", config=cfg).config is cfg  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"cache_threshold=0\.2"):
        CacheAwarePolicy(cache_threshold=0.2, config=cfg)
    seen: list[Decision] = []
    p = CacheAwarePolicy(config=cfg, on_decision=seen.append)
    assert p.config.cache_threshold == 0.7 and p.config.on_decision is not None
    p.select_worker(build_workers([0]), "x")
    assert len(seen) == 1
    with pytest.raises(TypeError, match="config"):
        CacheAwarePolicy(config={"cache_threshold": 0.5})  # type: ignore[arg-type]


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
    assert d.reason == "cache_hit" and d.matched_units == 8 and d.match_rate == 0.8
    assert (d.min_load, d.max_load, d.request_units) == (1, 3, 10)
    workers[2].decrement_load()
    workers[2].decrement_load()
    workers[2].decrement_load()
    workers[2].increment_load()
    workers[2].increment_load()  # now 2 == worker 0's load; worker 0 processed 1 more
    assert policy.select_worker(workers, "abcdefghXY") == 2  # both hold 8 units of it


def test_threshold_is_strict_equal_rate_is_a_miss() -> None:
    seen: list[Decision] = []
    policy = CacheAwarePolicy(cache_threshold=0.5, on_decision=seen.append)
    workers = build_workers([1, 0])
    _tree(policy).insert("abcd", workers[0].url)
    assert policy.select_worker(workers, "abcdwxyz") == 1  # 4 / 8 == 0.5: miss
    assert seen[-1].reason == "cache_miss" and seen[-1].match_rate == 0.5
    assert policy.select_worker(workers, "abcdw") == 0 or seen[-1].matched_units > 0
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


def test_miss_never_smallest_tree_alone() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([7, 6])
    _tree(policy).insert("x" * 500, workers[1].url)
    assert policy.select_worker(workers, "a totally new prompt") == 1


def test_no_text_or_empty_routes_by_load_and_inserts_nothing() -> None:
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
    seen: list[Decision] = []
    policy = make_policy("cache_aware", balance_abs_threshold=10, on_decision=seen.append)
    workers = build_workers([40, 6, 0])
    t = _tree(policy)  # type: ignore[arg-type]
    t.insert("system prompt for tenant one", workers[0].url)
    t.insert("system prompt for tenant one", workers[1].url)
    assert policy.select_worker(workers, "system prompt for tenant one: hi") == 1
    assert seen[-1].reason == "imbalanced" and seen[-1].matched_units == 28
    # no match in the window: least load
    assert policy.select_worker(workers, "something else entirely") == 2
    # the holder is outside the window: least load
    workers[1].increment_load()
    workers[1].increment_load()
    workers[1].increment_load()
    workers[1].increment_load()
    workers[1].increment_load()  # 11 > 0 + 10
    assert policy.select_worker(workers, "system prompt for tenant one: yo") == 2


def test_imbalanced_locality_ignores_matches_at_or_below_threshold() -> None:
    policy = CacheAwarePolicy(balance_abs_threshold=10, cache_threshold=0.5)
    workers = build_workers([40, 5, 0])
    _tree(policy).insert("ab", workers[1].url)
    assert policy.select_worker(workers, "abcd") == 2  # 2/4 is not above 0.5


def test_imbalanced_least_load_mode_is_pure_least_load() -> None:
    policy = make_policy("cache_aware", balance_abs_threshold=10, imbalance_mode="least_load")
    workers = build_workers([40, 6, 0])
    _tree(policy).insert("system prompt", workers[1].url)  # type: ignore[arg-type]
    assert policy.select_worker(workers, "system prompt") == 2
    assert _tree(policy).prefix_match_tenant("system prompt", workers[2].url) == 13  # type: ignore[arg-type]


def test_imbalance_needs_both_thresholds() -> None:
    seen: list[Decision] = []
    policy = CacheAwarePolicy(
        balance_abs_threshold=5, balance_rel_threshold=2.0, on_decision=seen.append
    )
    workers = build_workers([20, 12])  # gap 8 > 5 but 20 <= 2 * 12: balanced
    policy.select_worker(workers, "p")
    assert seen[-1].reason != "imbalanced"
    workers[1].decrement_load()
    workers[1].decrement_load()
    workers[1].decrement_load()  # 20 > 2 * 9
    policy.select_worker(workers, "p")
    assert seen[-1].reason == "imbalanced"
    never = CacheAwarePolicy(balance_rel_threshold=math.inf, on_decision=seen.append)
    never.select_worker(build_workers([1000, 0]), "p")
    assert seen[-1].reason != "imbalanced"


# ----------------------------------------------------------------------------- every branch


@pytest.mark.parametrize("mode", ["locality", "least_load"])
@pytest.mark.parametrize(
    "loads", [[0, 0, 0], [50, 0, 3], [1, 1, 0]], ids=["idle", "imbalanced", "balanced"]
)
@pytest.mark.parametrize("text", ["hello world", [5, 6, 7, 2**40], (1, 2)], ids=repr)
def test_every_branch_inserts_for_chosen_and_counts_processed_never_load(
    mode: str, loads: list[int], text: object
) -> None:
    policy = make_policy("cache_aware", imbalance_mode=mode, balance_abs_threshold=4)
    workers = build_workers(loads)
    for _ in range(3):
        before = [(w.load(), w.processed()) for w in workers]
        i = policy.select_worker(workers, text)  # type: ignore[arg-type]
        assert i is not None
        kind = "text" if isinstance(text, str) else "tokens"
        tree = policy.tree("default", kind)  # type: ignore[attr-defined]
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


@pytest.mark.parametrize("bad", [[1, -2, 3], [1, 2.5], [1, "a"], (None,), [2**64]], ids=repr)
def test_bad_token_ids_raise_and_change_nothing(bad: list[object]) -> None:
    seen, policy = _recorder()
    workers = build_workers([0, 3])
    policy.select_worker(workers, [1, 2, 3])
    sizes = policy.tree_sizes()
    state = [(w.load(), w.processed()) for w in workers]
    with pytest.raises((TypeError, ValueError)):
        policy.select_worker(workers, bad)  # type: ignore[arg-type]
    assert policy.tree_sizes() == sizes
    assert [(w.load(), w.processed()) for w in workers] == state
    assert len(seen) == 1
    with pytest.raises((TypeError, ValueError)):
        acquire(policy, workers, bad)  # type: ignore[arg-type]
    assert [(w.load(), w.processed()) for w in workers] == state


def test_bad_request_text_type_raises_type_error() -> None:
    policy = CacheAwarePolicy()
    for bad in (b"x", 3, object()):
        with pytest.raises(TypeError, match="request_text"):
            policy.select_worker(build_workers([0]), bad)  # type: ignore[arg-type]


def test_no_healthy_worker_returns_none_and_touches_nothing() -> None:
    seen, policy = _recorder()
    assert policy.select_worker([], "abc") is None
    workers = build_workers([0, 0], healthy=[False, False])
    assert policy.select_worker(workers, "abc") is None
    assert policy.tree_sizes() == {} and seen == []
    assert all(w.processed() == 0 for w in workers)


# ----------------------------------------------------------------------------- models


def test_multi_model_list_matches_per_model_tree_and_inserts_in_chosen_model_tree() -> None:
    seen, policy = _recorder()
    a = BasicWorker("http://a", model_id="llama")
    b = BasicWorker("http://b", model_id="qwen")
    c = BasicWorker("http://c", model_id="qwen")
    _tree(policy, "qwen").insert("shared system prompt", c.url)
    _tree(policy, "llama").insert("shared system", a.url)
    assert policy.select_worker([a, b, c], "shared system prompt + q") == 2
    assert seen[-1].model_id == "qwen" and seen[-1].matched_units == 20
    assert _tree(policy, "qwen").prefix_match_tenant("shared system prompt + q", c.url) == 24
    assert _tree(policy, "llama").prefix_match_tenant("shared system prompt + q", a.url) == 13
    # a prefix held in another model's tree does not count for a worker of this model
    _tree(policy, "llama").insert("only llama knows this", c.url)  # stray tenant name
    i = policy.select_worker([a, b, c], "only llama knows this")
    assert i in (0, 1)
    assert _tree(policy, "qwen").total_size() + _tree(policy, "llama").total_size() > 0


def test_multi_model_miss_inserts_only_into_chosen_workers_tree() -> None:
    policy = CacheAwarePolicy()
    a = BasicWorker("http://a", model_id="m1")
    b = BasicWorker("http://b", model_id="m2")
    a.increment_load()
    assert policy.select_worker([a, b], "fresh") == 1
    assert _tree(policy, "m2").size(b.url) == 5
    assert _tree(policy, "m1").total_size() == 0


# ----------------------------------------------------------------------------- membership


def test_removed_then_added_back_and_health_flips() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 0])
    _tree(policy).insert("prefix!", workers[0].url)
    policy.remove_worker(workers[0])
    assert workers[0].url in policy.removed_urls()
    assert policy.select_worker(workers, "prefix!") == 1
    policy.add_worker(workers[0])
    assert policy.removed_urls() == frozenset()
    assert policy.select_worker(workers, "zzz") == 0  # least processed again
    workers[0].set_healthy(False)
    assert policy.select_worker(workers, "zzz") == 1
    workers[0].set_healthy(True)
    assert policy.select_worker(workers, "zzz") == 0


def test_sync_workers_drops_stale_tenants_everywhere() -> None:
    policy = CacheAwarePolicy()
    old, keep = build_workers([0, 0])
    new = BasicWorker("http://new")
    policy.select_worker([old], "abc")
    policy.select_worker([old], [1, 2])
    policy.select_worker([keep], "abd")
    policy.sync_workers([keep, new])
    for kind in ("text", "tokens"):
        assert old.url not in _tree(policy, kind=kind).tenants()
    assert policy.removed_urls() == {old.url}
    assert policy.select_worker([old, keep, new], "abc") in (1, 2)
    policy.sync_workers([old, keep])
    assert policy.removed_urls() == frozenset()


def test_workers_list_mutated_in_place_is_seen() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 0])
    policy.select_worker(workers, "warm")
    replacement = BasicWorker("http://replacement")
    _tree(policy).insert("only the replacement", replacement.url)
    workers[1] = replacement
    assert policy.select_worker(workers, "only the replacement") == 1
    workers[0].set_healthy(False)
    policy.on_worker_removed(workers[1])
    assert policy.select_worker(workers, "x") is None


def test_alternating_worker_lists_each_keep_their_affinity() -> None:
    policy = CacheAwarePolicy()
    llama = [BasicWorker(f"http://l{i}", model_id="llama") for i in range(3)]
    qwen = [BasicWorker(f"http://q{i}", model_id="qwen") for i in range(3)]
    first: dict[tuple[str, int], str] = {}
    for round_ in range(12):  # more lists than one cache slot, interleaved
        for name, ws in (("llama", llama), ("qwen", qwen), ("mixed", [*llama, *qwen])):
            i = policy.select_worker(list(ws), f"{name} system prompt, round {round_ % 2}")
            assert i is not None
            first.setdefault((name, round_ % 2), ws[i].url)
            assert ws[i].url == first[(name, round_ % 2)]


@dataclass
class _PlainWorker:
    """A user Worker that is not a BasicWorker (the generic read path)."""

    url: str
    model_id: str = "default"
    worker_type: WorkerType = WorkerType.REGULAR
    healthy: bool = True
    _load: int = 0
    _processed: int = 0

    def is_healthy(self) -> bool:
        return self.healthy

    def load(self) -> int:
        return self._load

    def increment_load(self) -> None:
        self._load += 1

    def decrement_load(self) -> None:
        self._load -= 1

    def processed(self) -> int:
        return self._processed

    def increment_processed(self) -> None:
        self._processed += 1


class _SickBasic(BasicWorker):
    def is_healthy(self) -> bool:  # overrides the slot the fast path would read
        return False


def test_custom_workers_use_the_protocol() -> None:
    policy = CacheAwarePolicy()
    plain = [_PlainWorker("http://p0", _load=3), _PlainWorker("http://p1")]
    assert policy.select_worker(plain, "abc") == 1  # type: ignore[arg-type]
    plain[1].healthy = False
    assert policy.select_worker(plain, "abc") == 0  # type: ignore[arg-type]
    mixed = [_SickBasic("http://s"), BasicWorker("http://ok")]
    assert policy.select_worker(mixed, "abc") == 1
    assert policy.select_worker([_SickBasic("http://s")], "abc") is None


# ----------------------------------------------------------------------------- pairs


def test_pair_prefill_cache_aware_decode_least_load() -> None:
    policy = CacheAwarePolicy()
    prefill = [BasicWorker(f"http://p{i}", worker_type=WorkerType.PREFILL) for i in range(3)]
    decode = [BasicWorker(f"http://d{i}", worker_type=WorkerType.DECODE) for i in range(3)]
    _tree(policy).insert("long shared prompt", prefill[2].url)
    decode[0].increment_load()
    decode[2].increment_load()
    assert policy.select_worker_pair(prefill, decode, "long shared prompt!") == (2, 1)
    policy.on_worker_removed(decode[1])
    assert policy.select_worker_pair(prefill, decode, "long shared prompt!") == (2, 0)
    for d in decode:
        d.set_healthy(False)
    sizes = policy.tree_sizes()
    assert policy.select_worker_pair(prefill, decode, "never inserted") is None
    assert policy.tree_sizes() == sizes


# ----------------------------------------------------------------------------- observer


def test_observer_exception_is_logged_and_decision_kept(caplog: pytest.LogCaptureFixture) -> None:
    def boom(d: Decision) -> None:
        raise RuntimeError("metrics backend down")

    policy = CacheAwarePolicy(on_decision=boom)
    workers = build_workers([0])
    with caplog.at_level(logging.ERROR):
        assert policy.select_worker(workers, "abc") == 0
    assert "observer" in caplog.text
    assert workers[0].processed() == 1


def test_no_observer_builds_no_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("Decision built without an observer")

    monkeypatch.setattr(ca, "Decision", forbidden)
    policy = CacheAwarePolicy()
    assert policy.select_worker(build_workers([0, 0]), "abc") is not None


def test_observer_prometheus_style_counters() -> None:
    counts: dict[tuple[str, str], int] = {}

    def observe(d: Decision) -> None:
        key = (d.reason.value, d.url)
        counts[key] = counts.get(key, 0) + 1

    policy = make_policy("cache_aware", on_decision=observe)
    workers = build_workers([0, 0])
    for _ in range(3):
        with acquire(policy, workers, "same prompt"):
            pass
    assert counts == {("cache_miss", "http://w0"): 1, ("cache_hit", "http://w0"): 2}


# ----------------------------------------------------------------------------- memory


def test_per_worker_cap_and_total_cap_hold() -> None:
    policy = CacheAwarePolicy(max_tree_size=300, max_tree_size_per_worker=50)
    workers = build_workers([0, 0, 0])
    for i in range(200):
        policy.select_worker(workers, f"{i:05d}" + "x" * (i % 70))
        sizes = _tree(policy).used_size_per_tenant()
        assert max(sizes.values()) <= 50 and sum(sizes.values()) <= 300


# ----------------------------------------------------------------------------- threads


def test_threads_with_leases_and_a_removal_keep_loads_and_trees_consistent() -> None:
    policy = CacheAwarePolicy(balance_abs_threshold=2)
    workers = build_workers([0] * 6)
    gone = workers[3]
    errors: list[BaseException] = []
    removed = threading.Event()
    after_removal: list[int] = []

    def run(seed: int) -> None:
        try:
            post = 0
            for k in range(100_000):  # until 50 requests ran after the removal
                was_removed = removed.is_set()  # set only once the removal has returned
                with acquire(policy, workers, f"sys{seed % 3} question {k}") as lease:
                    if was_removed:
                        after_removal.append(lease.index)
                        post += 1
                if post >= 50:
                    break
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    while sum(w.processed() for w in workers) < 200 and not errors:  # mid-traffic
        pass
    policy.on_worker_removed(gone)
    removed.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert all(w.load() == 0 for w in workers)
    assert len(after_removal) == 4 * 50 and 3 not in after_removal
    assert gone.url not in _tree(policy).tenants()


# ----------------------------------------------------------------------------- properties


def _reference(
    policy: CacheAwarePolicy,
    workers: Sequence[BasicWorker],
    text: str | list[int] | None,
    removed: set[str],
) -> tuple[int | None, str | None]:
    """The algorithm of the issue, written plainly, from the state before the call."""
    c = policy.config
    elig = [i for i, w in enumerate(workers) if w.is_healthy() and w.url not in removed]
    if not elig:
        return None, None
    load = {i: workers[i].load() for i in elig}
    lo, hi = min(load.values()), max(load.values())
    n = len(text) if text else 0
    kind = "text" if isinstance(text, str) else "tokens"
    m, size = {}, {}
    for i in elig:
        tree = policy.tree(workers[i].model_id, kind)
        m[i] = tree.prefix_match_tenant(text, workers[i].url) if tree and n else 0  # type: ignore[arg-type]
        size[i] = tree.size(workers[i].url) if tree else 0

    def by_load(cands: list[int]) -> int:
        return min(cands, key=lambda i: (load[i], workers[i].processed(), i))

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
    key = (
        (lambda i: (load[i], size[i], workers[i].processed(), i))
        if n
        else (lambda i: (load[i], workers[i].processed(), i))
    )
    return min(elig, key=key), "cache_miss"


_texts = st.one_of(
    st.none(),
    st.sampled_from(["", "sys-A: ", "sys-B: ", "sys-A: hello", "sys-A: hello there"]),
    st.builds(
        lambda p, s: p + s, st.sampled_from(["sys-A: ", "sys-B: ", ""]), st.text("ab", max_size=12)
    ),
    st.lists(st.integers(0, 3), max_size=8),
)
_action = st.one_of(
    st.tuples(st.just("select"), _texts),
    st.tuples(st.just("load"), st.integers(0, 7), st.integers(-3, 12)),
    st.tuples(st.just("health"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 7)),
    st.tuples(st.just("add"), st.integers(0, 7)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_workers=st.integers(1, 6),
    two_models=st.booleans(),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    abs_t=st.sampled_from([0, 1, 3]),
    rel_t=st.sampled_from([1.0, 1.5]),
    mode=st.sampled_from(["locality", "least_load"]),
    max_size=st.sampled_from([4, 25, 10_000]),
    actions=st.lists(_action, max_size=25),
)
def test_property_matches_reference_and_keeps_invariants(
    n_workers: int,
    two_models: bool,
    threshold: float,
    abs_t: int,
    rel_t: float,
    mode: str,
    max_size: int,
    actions: list[tuple[object, ...]],
) -> None:
    seen: list[Decision] = []
    policy = CacheAwarePolicy(
        cache_threshold=threshold,
        balance_abs_threshold=abs_t,
        balance_rel_threshold=rel_t,
        imbalance_mode=mode,  # type: ignore[arg-type]
        max_tree_size=max_size,
        on_decision=seen.append,
    )
    workers = [
        BasicWorker(f"http://w{i}", model_id="m1" if two_models and i % 2 else "m0")
        for i in range(n_workers)
    ]
    removed: set[str] = set()
    for action in actions:
        kind, *args = action
        if kind == "select":
            text = args[0]
            expected, reason = _reference(policy, workers, text, removed)  # type: ignore[arg-type]
            before = [(w.load(), w.processed()) for w in workers]
            got = policy.select_worker(workers, text)  # type: ignore[arg-type]
            event(f"reason={reason}")
            assert got == expected
            after = [(w.load(), w.processed()) for w in workers]
            if got is None:
                assert after == before
                continue
            assert workers[got].is_healthy() and workers[got].url not in removed
            assert after == [(ld, p + (k == got)) for k, (ld, p) in enumerate(before)]
            assert seen[-1].index == got and seen[-1].reason == reason
            if text and max_size > 100:  # (tiny bounds may evict the new, shared node at once)
                kind_ = "text" if isinstance(text, str) else "tokens"
                tree = policy.tree(workers[got].model_id, kind_)  # type: ignore[arg-type]
                assert tree is not None
                held = tree.prefix_match_tenant(text, workers[got].url)  # type: ignore[arg-type]
                assert held == len(text)  # type: ignore[arg-type]
            for total in policy.tree_sizes().values():
                assert total <= max_size
        elif kind == "load":
            w = workers[int(args[0]) % n_workers]  # type: ignore[call-overload]
            delta = int(args[1])  # type: ignore[call-overload]
            for _ in range(max(delta, -w.load()), 0):
                w.decrement_load()
            for _ in range(max(delta, 0)):
                w.increment_load()
        elif kind == "health":
            workers[int(args[0]) % n_workers].set_healthy(bool(args[1]))  # type: ignore[call-overload]
        elif kind == "remove":
            w = workers[int(args[0]) % n_workers]  # type: ignore[call-overload]
            policy.on_worker_removed(w)
            removed.add(w.url)
            for key in policy.tree_sizes():
                tree = policy.tree(*key)  # type: ignore[arg-type]
                assert tree is not None and w.url not in tree.tenants()
        else:
            w = workers[int(args[0]) % n_workers]  # type: ignore[call-overload]
            policy.on_worker_added(w)
            removed.discard(w.url)


def test_shared_policy_invariants_with_the_testing_kit() -> None:
    testing = pytest.importorskip("cacheroute.testing")
    testing.check_policy(
        CacheAwarePolicy, max_examples=25, stateful_steps=15, thread_iterations=100, models=2
    )


def test_is_a_policy() -> None:
    assert isinstance(CacheAwarePolicy(), LoadBalancingPolicy)
