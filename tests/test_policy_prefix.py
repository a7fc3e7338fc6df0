"""``PrefixPolicy``: the machinery prefix-aware policies share (through ``cache_aware``).

Views of the pool, membership (remove, add, sync) and its races, the observer, the decode
leg of pairs, custom workers, one model per list, and bad input.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator
from dataclasses import dataclass

import pytest
from conftest import build_workers

from cacheroute import (
    BasicWorker,
    CacheAwarePolicy,
    Decision,
    WorkerType,
    acquire,
    make_policy,
)
from cacheroute.policies import PrefixPolicy
from cacheroute.tree import Tree, TreeMatch


def _tree(policy: CacheAwarePolicy, kind: str = "text") -> Tree:
    tree = policy.tree("default", kind, create=True)  # type: ignore[arg-type]
    assert tree is not None
    return tree


def test_cache_aware_is_a_prefix_policy() -> None:
    assert isinstance(CacheAwarePolicy(), PrefixPolicy)


# ----------------------------------------------------------------------------- one model


def test_mixed_models_in_one_list_are_refused_naming_them() -> None:
    policy = CacheAwarePolicy()
    a = BasicWorker("http://a", model_id="llama")
    b = BasicWorker("http://b", model_id="qwen")
    with pytest.raises(ValueError, match=r"one model.*'llama', 'qwen'"):
        policy.select_worker([a, b], "hello")
    assert policy.tree_sizes() == {} and a.processed() == b.processed() == 0


def test_each_model_has_its_own_tree() -> None:
    policy = CacheAwarePolicy()
    llama = [BasicWorker(f"http://l{i}", model_id="llama") for i in range(2)]
    qwen = [BasicWorker(f"http://q{i}", model_id="qwen") for i in range(2)]
    policy.select_worker(llama, "shared system prompt")
    policy.select_worker(qwen, "shared system prompt")
    assert set(policy.tree_sizes()) == {("llama", "text"), ("qwen", "text")}


def test_alternating_worker_lists_each_keep_their_affinity() -> None:
    policy = CacheAwarePolicy()
    lists = {m: [BasicWorker(f"http://{m}{i}", model_id=m) for i in range(3)] for m in "abcdefghij"}
    first: dict[tuple[str, int], str] = {}
    for round_ in range(12):  # more lists than the cache keeps, interleaved
        for name, ws in lists.items():
            i = policy.select_worker(list(ws), f"{name} system prompt, round {round_ % 2}")
            assert i is not None
            first.setdefault((name, round_ % 2), ws[i].url)
            assert ws[i].url == first[(name, round_ % 2)]


# ----------------------------------------------------------------------------- membership


def test_removed_then_added_back_and_health_flips() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 0])
    _tree(policy).insert("prefix!", workers[0].url)
    policy.remove_worker(workers[0])
    assert workers[0].url in policy.removed_urls()
    assert workers[0].url not in _tree(policy).tenants()
    assert policy.select_worker(workers, "prefix!") == 1
    policy.add_worker(workers[0])
    assert policy.removed_urls() == frozenset()
    assert policy.select_worker(workers, "zzz") == 0  # least processed again
    workers[0].set_healthy(False)
    assert policy.select_worker(workers, "zzz") == 1
    workers[0].set_healthy(True)
    assert policy.select_worker(workers, "zzz") == 0


def test_removed_worker_never_chosen_even_for_a_prefix_only_it_held() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 5])
    for _ in range(3):
        policy.select_worker(workers, "prompt only worker 0 has")
    policy.remove_worker(workers[0])
    for _ in range(5):
        assert policy.select_worker(workers, "prompt only worker 0 has") == 1


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
    assert policy.removed_urls() == frozenset({new.url})


def test_sync_workers_makes_the_pool_exact_for_workers_seen_without_text() -> None:
    # Fault: a worker only ever seen in a list (never inserted in a tree) survived a sync.
    policy = CacheAwarePolicy()
    a, b = build_workers([1, 0])
    policy.select_worker([a, b], None)
    policy.sync_workers([a])
    assert b.url in policy.removed_urls()
    for _ in range(4):
        assert policy.select_worker([a, b], None) == 0
        assert policy.select_worker([a, b], "text") == 0


def test_membership_calls_refuse_what_is_not_a_worker() -> None:
    policy = CacheAwarePolicy()
    for call in (policy.add_worker, policy.remove_worker, policy.on_worker_added):
        with pytest.raises(TypeError, match=r"worker must be a Worker, got 'http://w0:1' \(str\)"):
            call("http://w0:1")  # type: ignore[arg-type]
    for bad in ("", "http://a", {}, None, 3):
        with pytest.raises(TypeError, match="workers"):
            policy.sync_workers(bad)  # type: ignore[arg-type]
    policy.select_worker(build_workers([0]), "abc")
    with pytest.raises(TypeError, match=r"workers\[1\]"):
        policy.sync_workers([BasicWorker("http://w0"), "http://x"])  # type: ignore[list-item]
    assert policy.removed_urls() == frozenset()
    assert _tree(policy).tenants() == ["http://w0"]


@pytest.mark.parametrize(
    "bad",
    [None, 3, b"ab", "ab", (w for w in ()), [[1]], {}, {"http://a"}],
    ids=lambda x: "generator" if isinstance(x, Generator) else repr(x),  # no address in ids
)
def test_bad_workers_argument_raises_naming_workers_and_changes_nothing(bad: object) -> None:
    policy = CacheAwarePolicy()
    with pytest.raises(TypeError, match="workers"):
        policy.select_worker(bad, "abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="workers"):
        acquire(policy, bad, "abc")  # type: ignore[arg-type]
    assert policy.tree_sizes() == {}


def test_tree_accessor_validates() -> None:
    policy = CacheAwarePolicy()
    with pytest.raises(TypeError, match="model_id"):
        policy.tree(None, create=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="create"):
        policy.tree("m", create=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        policy.tree("m", "chars")  # type: ignore[arg-type]
    assert policy.tree_sizes() == {}
    assert policy.tree("m") is None and policy.tree("m", create=True) is not None


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


# ----------------------------------------------------------------------------- races


class _Hooked(BasicWorker):
    """A worker whose health read runs a hook once: a membership change mid-select."""

    hook = None

    def is_healthy(self) -> bool:
        if _Hooked.hook is not None:
            h, _Hooked.hook = _Hooked.hook, None
            h()
        return super().is_healthy()


def test_worker_re_added_during_select_never_raises() -> None:
    # Fault: a removed worker re-added by another thread during select made a KeyError.
    policy = CacheAwarePolicy()
    a, b = _Hooked("http://a:1"), _Hooked("http://b:1")
    policy.remove_worker(b)
    _Hooked.hook = lambda: policy.add_worker(b)
    i = policy.select_worker([a, b], "hello")
    assert i in (0, 1)


def test_worker_removed_during_select_is_not_chosen_nor_left_in_the_tree() -> None:
    policy = CacheAwarePolicy()
    a, b = _Hooked("http://a:1"), _Hooked("http://b:1")
    for _ in range(3):
        policy.select_worker([a], "prefix held by a")
    a.increment_processed()
    _Hooked.hook = lambda: policy.remove_worker(a)
    assert policy.select_worker([a, b], "prefix held by a") == 1
    tree = _tree(policy)
    assert a.url not in tree.tenants()


def test_removal_racing_the_insert_leaves_no_tenant_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0])
    tree = _tree(policy)
    real_insert = Tree.insert_match

    def insert_then_removed(self: Tree, match: TreeMatch, tenant: str) -> int:
        policy.remove_worker(workers[0])  # lands between the decision and the insert
        return real_insert(self, match, tenant)

    monkeypatch.setattr(Tree, "insert_match", insert_then_removed)
    policy.select_worker(workers, "abc")
    assert workers[0].url not in tree.tenants()


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
    assert all(w.load() == 0 and w.pending_prefill_tokens() == 0 for w in workers)
    assert all(w.decode_tokens() == 0 for w in workers)
    assert len(after_removal) == 4 * 50 and 3 not in after_removal
    assert gone.url not in _tree(policy).tenants()


# ----------------------------------------------------------------------------- custom workers


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


def test_pair_prefill_cache_aware_decode_least_load_counted_as_processed() -> None:
    policy = CacheAwarePolicy()
    prefill = [BasicWorker(f"http://p{i}", worker_type=WorkerType.PREFILL) for i in range(3)]
    decode = [BasicWorker(f"http://d{i}", worker_type=WorkerType.DECODE) for i in range(3)]
    _tree(policy).insert("long shared prompt", prefill[2].url)
    decode[0].increment_load()
    decode[2].increment_load()
    assert policy.select_worker_pair(prefill, decode, "long shared prompt!") == (2, 1)
    assert [d.processed() for d in decode] == [0, 1, 0]
    assert [p.processed() for p in prefill] == [0, 0, 1]
    decode[1].increment_load()
    decode[1].increment_load()
    assert policy.select_worker_pair(prefill, decode, "long shared prompt!")[1] == 0  # type: ignore[index]
    policy.on_worker_removed(decode[0])
    assert policy.select_worker_pair(prefill, decode, "long shared prompt!") == (2, 2)
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


def test_observer_prometheus_style_counters() -> None:
    counts: dict[tuple[str, str], int] = {}

    def observe(d: Decision) -> None:
        key = (str(d.reason.value) if hasattr(d.reason, "value") else d.reason, d.url)
        counts[key] = counts.get(key, 0) + 1

    policy = make_policy("cache_aware", on_decision=observe)
    workers = build_workers([0, 0])
    for _ in range(3):
        with acquire(policy, workers, "same prompt"):
            pass
    assert counts == {("cache_miss", "http://w0"): 1, ("cache_hit", "http://w0"): 2}


def test_an_observer_may_route_from_inside_its_callback() -> None:
    # The observer runs after the decision is committed, outside the policy's lock.
    inner: list[int | None] = []
    seen: list[Decision] = []

    def observe(d: Decision) -> None:
        seen.append(d)
        if len(seen) == 1:
            inner.append(policy.select_worker(workers, "routed from the observer"))

    policy = make_policy("work_aware", on_decision=observe)
    workers = build_workers([0, 0])
    assert policy.select_worker(workers, "abc") is not None
    assert inner and inner[0] is not None
    assert sum(w.processed() for w in workers) == 2


@pytest.mark.parametrize("name", ["cache_aware", "work_aware"])
def test_decisions_are_serialized_so_threads_wait_once_per_decision(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread deciding while another is inside a decision waits for the whole decision:
    # it never enters the tree (or any inner lock) in between, where a preempted holder
    # would make every inner lock a context-switch handoff (a lock convoy).
    policy = make_policy(name)
    workers = build_workers([0, 0])
    policy.select_worker(workers, "warm up the pool and the tree")
    inside, release = threading.Event(), threading.Event()
    matches: list[str] = []
    real_match = Tree.match

    def match(self: Tree, units: object) -> TreeMatch:
        matches.append(threading.current_thread().name)
        if threading.current_thread().name == "first":
            inside.set()
            assert release.wait(10)
        return real_match(self, units)  # type: ignore[arg-type]

    monkeypatch.setattr(Tree, "match", match)
    first = threading.Thread(target=policy.select_worker, args=(workers, "a"), name="first")
    second = threading.Thread(target=policy.select_worker, args=(workers, "b"), name="second")
    first.start()
    try:
        assert inside.wait(10)
        second.start()
        second.join(0.2)
        assert second.is_alive() and matches == ["first"]  # waiting outside the tree
    finally:
        release.set()
    first.join(10)
    second.join(10)
    assert matches == ["first", "second"]
    assert sum(w.processed() for w in workers) == 3


def test_decision_carries_tokens_and_the_lease_takes_uncached_work() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 0])
    with acquire(policy, workers, list(range(100))):
        pass
    with acquire(policy, workers, [*range(100), *range(500, 520)]) as lease:
        d = lease.decision
        assert d is not None and (d.prompt_tokens, d.cached_tokens) == (120, 100)
        assert lease.worker.pending_prefill_tokens() == 20  # type: ignore[attr-defined]
        lease.first_token()
        assert lease.worker.decode_tokens() == 120  # type: ignore[attr-defined]
    assert all(w.decode_tokens() == 0 for w in workers)


def test_sync_knows_workers_seen_while_none_was_eligible() -> None:
    policy = CacheAwarePolicy()
    a, b = build_workers([0, 0], healthy=[False, False])
    assert policy.select_worker([a, b], "x") is None
    policy.sync_workers([a])
    a.set_healthy(True)
    b.set_healthy(True)
    b.increment_processed()
    a.increment_load()  # b would win on load if it were still in the pool
    for _ in range(3):
        assert policy.select_worker([a, b], "x") == 0


def test_a_call_that_raises_leaves_no_trace() -> None:
    policy = CacheAwarePolicy()
    workers = build_workers([0, 0])
    with pytest.raises(TypeError, match=r"request_text\[0\]"):
        policy.select_worker(workers, [[1]])  # type: ignore[list-item]
    assert policy.tree_sizes() == {} and policy._known == frozenset()


# ------------------------------------------------------------------ memory bound


def test_default_trees_are_bounded_in_nodes_so_that_memory_stays_within_256_mib() -> None:
    from cacheroute.policies import DEFAULT_MAX_TREE_NODES

    assert DEFAULT_MAX_TREE_NODES * Tree.NODE_BYTES + 4 * 2**24 <= 256 * 2**20
    for name in ("work_aware", "cache_aware"):
        policy = make_policy(name)
        assert policy.select_worker(build_workers([0, 0]), "hello") is not None
        (tree,) = policy._trees.values()  # type: ignore[attr-defined]
        assert (tree._max_nodes, tree._max_size) == (DEFAULT_MAX_TREE_NODES, 2**24)


@pytest.mark.parametrize("name", ["work_aware", "cache_aware"])
def test_max_tree_nodes_bounds_the_tree_of_short_distinct_prompts(name: str) -> None:
    policy = make_policy(name, max_tree_nodes=20)
    workers = build_workers([0, 0, 0, 0])
    for i in range(300):  # distinct 2-character prompts: a node per unit, the worst case
        with acquire(policy, workers, chr(0x4E00 + i) + chr(0x4E00 + i // 7)) as lease:
            lease.first_token()
        (tree,) = policy._trees.values()  # type: ignore[attr-defined]
        assert tree._holdings <= 20
    assert all(w.load() == 0 for w in workers)
    assert make_policy(name, max_tree_nodes=None).config.max_tree_nodes is None


@pytest.mark.parametrize("name", ["work_aware", "cache_aware"])
def test_max_tree_nodes_refuses_bad_values_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=r"^max_tree_nodes must be .*, got 0 \(int\)"):
        make_policy(name, max_tree_nodes=0)
    with pytest.raises(TypeError, match=r"^max_tree_nodes must be .*, got '9' \(str\)"):
        make_policy(name, max_tree_nodes="9")


class _UrlWorker(BasicWorker):
    """A gateway's worker type that compares (and hashes) by URL, e.g. to keep them in a set."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UrlWorker) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


@pytest.mark.parametrize("kind", [_UrlWorker, BasicWorker])
@pytest.mark.parametrize("name", ["cache_aware", "work_aware"])
def test_a_policy_reads_the_workers_passed_not_equal_ones_seen_before(
    name: str, kind: type[BasicWorker]
) -> None:
    policy = make_policy(name)
    assert policy.select_worker([kind("http://a"), kind("http://b")], "hi") == 0
    # The gateway rebuilt its worker objects (equal by URL or not): a is now unhealthy.
    fresh = [kind("http://a", healthy=False), kind("http://b")]
    assert policy.select_worker(fresh, "hi") == 1
