import pytest
from conftest import build_workers

from cacheroute import BasicWorker, CacheAwarePolicy, WorkerType
from cacheroute.policies import LoadBalancingPolicy, PairPolicy, RoundRobinPolicy, make_policy
from cacheroute.policies.prefix_hash import PrefixHashPolicy


class Recording(RoundRobinPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.completed: list[tuple[str, bool]] = []
        self.synced: list[list[str]] = []

    def select_worker(self, workers, request_text=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().select_worker(workers, request_text)

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        self.completed.append((worker_url, success))

    def sync_workers(self, workers) -> None:  # type: ignore[no-untyped-def]
        self.synced.append([w.url for w in workers])


def test_default_pair_is_policy_then_least_load() -> None:
    prefill = build_workers([0, 0])
    decode = build_workers([4, 1, 2])
    p = make_policy("round_robin")
    assert p.select_worker_pair(prefill, decode, "x") == (0, 1)
    assert p.select_worker_pair(prefill, decode, "x") == (1, 1)
    assert [w.processed() for w in prefill + decode] == [1, 1, 0, 2, 0]


def test_default_pair_none_and_prefill_not_consulted() -> None:
    rec = Recording()
    assert rec.select_worker_pair(build_workers([0]), [], "x") is None
    assert rec.calls == 0  # no decode worker: prefill policy (and any tree) untouched
    assert rec.select_worker_pair([], build_workers([0]), "x") is None


def test_pair_policy_combines_two() -> None:
    pre, dec = Recording(), make_policy("shortest_queue")
    pair = PairPolicy(pre, dec)
    prefill = build_workers([0, 0, 0])
    decode = build_workers([3, 0])
    assert pair.select_worker_pair(prefill, decode) == (0, 1)
    assert pair.select_worker_pair(prefill, decode) == (1, 1)
    assert pair.select_worker(prefill) == 2
    pair.on_request_complete("http://w0", True)
    assert pre.completed == [("http://w0", True)]
    assert pair.needs_request_text is False


def test_pair_policy_syncs_each_leg_with_its_kind() -> None:
    pre, dec = Recording(), Recording()
    pair = PairPolicy(pre, dec)
    workers = [
        BasicWorker("http://p", worker_type=WorkerType.PREFILL),
        BasicWorker("http://d", worker_type=WorkerType.DECODE),
        BasicWorker("http://r"),
    ]
    pair.sync_workers(workers)
    assert pre.synced == [["http://p", "http://r"]]
    assert dec.synced == [["http://d", "http://r"]]


def test_pair_policy_rejects_non_policies() -> None:
    with pytest.raises(TypeError, match="decode"):
        PairPolicy(make_policy("random"), "shortest_queue")  # type: ignore[arg-type]
    assert isinstance(PairPolicy(make_policy("random"), make_policy("random")), LoadBalancingPolicy)


def test_acquire_pair_asks_the_decode_policy_and_keeps_the_prefill_decision() -> None:
    from cacheroute import CacheAwarePolicy, acquire_pair

    dec = Recording()
    pair = PairPolicy(CacheAwarePolicy(), dec)
    prefill, decode = build_workers([0, 0]), build_workers([0, 0, 0])
    text = [5] * 64
    first = acquire_pair(pair, prefill, decode, text)
    first.release()
    lease = acquire_pair(pair, prefill, decode, text)
    assert dec.calls == 2  # the decode leg is the decode policy's choice...
    assert [lease.decode_index, first.decode_index] == [1, 0]  # ...round robin's
    decision = lease.prefill_lease.decision
    assert decision is not None and decision.cached_tokens == 64  # cache_aware's own decision
    assert lease.prefill_lease.prefill_tokens == 0
    lease.release()


# --------------------------------------------------------------------------- failed legs
# A pair's decode leg is decided (counted as processed, remembered in a prefix tree)
# before its prefill leg: a prefill leg that then raises or finds no worker must have
# been refused before, leaving the decode leg untouched.


def test_pair_policy_decode_leg_untouched_when_the_prefill_leg_raises() -> None:
    pair = PairPolicy(CacheAwarePolicy(), CacheAwarePolicy())
    prefill = [BasicWorker("http://p0", model_id="m1"), BasicWorker("http://p1", model_id="m2")]
    decode = [BasicWorker("http://d0", model_id="m1")]
    with pytest.raises(ValueError, match="one model"):
        pair.decide_pair(prefill, decode, "hello there")
    assert decode[0].processed() == 0
    assert pair.decode.tree_sizes() == {}


def test_pair_policy_decode_leg_untouched_when_no_prefill_worker_is_healthy() -> None:
    pair = PairPolicy(CacheAwarePolicy(), CacheAwarePolicy())
    prefill = [BasicWorker("http://p0", healthy=False)]
    decode = [BasicWorker("http://d0")]
    assert pair.decide_pair(prefill, decode, "hello there") is None
    assert decode[0].processed() == 0
    assert pair.decode.tree_sizes() == {}


def test_pair_policy_decode_leg_untouched_when_every_prefill_worker_is_removed() -> None:
    pair = PairPolicy(CacheAwarePolicy(), CacheAwarePolicy())
    prefill = [BasicWorker("http://p0")]
    decode = [BasicWorker("http://d0")]
    pair.prefill.on_worker_removed(prefill[0])  # healthy, but never chosen again
    assert pair.decide_pair(prefill, decode, "hello there") is None
    assert pair.select_worker_pair(prefill, decode, [1, 2, 3]) is None
    assert decode[0].processed() == 0
    assert pair.decode.tree_sizes() == {}


def test_pair_policy_decode_leg_untouched_when_the_prefill_leg_refuses_the_text() -> None:
    pair = PairPolicy(CacheAwarePolicy(), CacheAwarePolicy())
    prefill, decode = [BasicWorker("http://p0")], [BasicWorker("http://d0")]
    with pytest.raises(ValueError, match=r"request_text\[1\]"):
        pair.decide_pair(prefill, decode, [1, -2])
    with pytest.raises(ValueError, match="request_text"):
        pair.decide_pair(prefill, decode, [1, 2**32])  # beyond a tree's ids
    assert decode[0].processed() == 0
    assert pair.decode.tree_sizes() == {}


def test_pair_policy_decode_leg_untouched_when_prefix_hash_refuses_the_text() -> None:
    pair = PairPolicy(PrefixHashPolicy(), CacheAwarePolicy())
    prefill, decode = [BasicWorker("http://p0")], [BasicWorker("http://d0")]
    with pytest.raises(ValueError, match="2\\*\\*64"):
        pair.decide_pair(prefill, decode, [1, 2**64])
    with pytest.raises(TypeError, match="token ids must be ints"):
        pair.decide_pair(prefill, decode, [1, 2.5])  # type: ignore[list-item]
    assert decode[0].processed() == 0
    assert pair.decode.tree_sizes() == {}


def test_pair_policy_accepts_what_its_prefill_policy_accepts() -> None:
    # prefix_hash routes ids in [0, 2**64); the pair must not refuse them with a tree's rule
    prefill = [BasicWorker(f"http://p{i}") for i in range(3)]
    decode = [BasicWorker("http://d0"), BasicWorker("http://d1")]
    alone = PrefixHashPolicy().select_worker(prefill, [2**40, 2**63])
    pair = PairPolicy(PrefixHashPolicy(), make_policy("shortest_queue"))
    assert pair.select_worker_pair(prefill, decode, [2**40, 2**63]) == (alone, 0)


def test_pair_policy_names_the_prefill_list_in_its_errors() -> None:
    pair = PairPolicy(CacheAwarePolicy(), CacheAwarePolicy())
    decode = [BasicWorker("http://d0")]
    with pytest.raises(TypeError, match=r"prefill_workers\[1\]"):
        pair.decide_pair([BasicWorker("http://p0"), "http://p1"], decode, "x")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="prefill_workers"):
        pair.decide_pair("http://p0", decode, "x")  # type: ignore[arg-type]
    assert decode[0].processed() == 0


def test_pair_policy_prefill_leg_lost_to_a_race_returns_none_and_takes_no_load() -> None:
    # Health read by the pre-check, then lost before the prefill decision: the one window
    # left open (see PairPolicy's docstring). The pair is refused, no load is taken.
    from cacheroute import NoHealthyWorkerError, acquire_pair

    class Flaky(BasicWorker):
        reads = 0

        def is_healthy(self) -> bool:
            Flaky.reads += 1
            return Flaky.reads == 1  # healthy for the check, then gone

    pair = PairPolicy(Recording(), make_policy("shortest_queue"))
    prefill, decode = [Flaky("http://p0")], [BasicWorker("http://d0")]
    with pytest.raises(NoHealthyWorkerError):
        acquire_pair(pair, prefill, decode, "x")
    assert [w.load() for w in prefill + decode] == [0, 0]


@pytest.mark.parametrize(
    "policy",
    [make_policy("round_robin"), CacheAwarePolicy(), PrefixHashPolicy()],
    ids=["base", "prefix", "prefix_hash"],
)
def test_own_pairs_leave_the_decode_leg_untouched_when_the_prefill_leg_fails(
    policy: LoadBalancingPolicy,
) -> None:
    # The default decide_pair and PrefixPolicy's choose the decode worker without counting
    # it, and count it only once the prefill leg is decided.
    m1 = [BasicWorker(f"http://p{i}", model_id="m1") for i in range(2)]
    decode = [BasicWorker("http://d0", model_id="m1")]
    m1[0].set_healthy(False)
    assert policy.decide_pair(m1[:1], decode, "hello there") is None
    if policy.needs_request_text:
        with pytest.raises(ValueError, match="request_text"):
            policy.decide_pair(m1[1:], decode, [-1])
    if isinstance(policy, CacheAwarePolicy):
        two_models = [*m1[1:], BasicWorker("http://p2", model_id="m2")]
        with pytest.raises(ValueError, match="one model"):
            policy.decide_pair(two_models, decode, "hello there")
        assert policy.tree_sizes() == {}
    assert decode[0].processed() == 0
