import pytest
from conftest import build_workers

from cacheroute import BasicWorker, WorkerType
from cacheroute.policies import LoadBalancingPolicy, PairPolicy, RoundRobinPolicy, make_policy


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
