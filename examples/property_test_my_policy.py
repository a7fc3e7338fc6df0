"""Property-test your own routing policy with ``cacheroute.testing``.

The policy here, ``StickyPrefixPolicy``, is what a user might write: send every request
whose first characters (or first tokens) match to the same worker, by rendezvous hashing
over the healthy workers, so a shared system prompt stays warm on one engine and losing a
worker moves only the prefixes that lived on it.

Run it either way (needs hypothesis: ``pip install -e '.[test]'`` in a checkout)::

    pytest examples/property_test_my_policy.py
    python examples/property_test_my_policy.py
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis.stateful import run_state_machine_as_test

from cacheroute import BasicWorker
from cacheroute.policies import (
    LoadBalancingPolicy,
    check_request_text,
    healthy_indices,
    least_loaded_index,
)
from cacheroute.policies.base import RequestText
from cacheroute.testing import (
    PolicyStateMachine,
    check_policy,
    clusters,
    request_streams,
    request_texts,
)
from cacheroute.worker import Worker


class StickyPrefixPolicy(LoadBalancingPolicy):
    """Rendezvous-hash the request's prefix over the healthy workers.

    Args:
        prefix_len: characters (or token ids) of the request that decide the worker.

    Requests without text go to the least loaded worker. Stateless, hence thread-safe.
    """

    name = "sticky_prefix"
    description = "same prefix, same worker (rendezvous hashing over healthy workers)"
    needs_request_text = True

    def __init__(self, prefix_len: int = 64) -> None:
        if prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {prefix_len!r}")
        self.prefix_len = prefix_len

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)  # bad types raise TypeError, as the contract says
        healthy = healthy_indices(workers)
        if not healthy:
            return None
        if request_text is None:
            return least_loaded_index(workers)
        head = request_text[: self.prefix_len]
        key = (
            head.encode("utf-8", "surrogatepass")
            if isinstance(head, str)
            else ",".join(map(str, head)).encode()
        )

        def score(i: int) -> bytes:
            return hashlib.blake2b(key + b"\0" + workers[i].url.encode(), digest_size=8).digest()

        return max(healthy, key=score)


# 1. The shared invariants, in one call: only healthy workers, None exactly when none is
#    healthy, index in range, pairs, bad request_text types, loads through leases, threads.
def test_sticky_prefix_keeps_the_shared_invariants() -> None:
    check_policy(StickyPrefixPolicy, max_examples=50)


# 2. Properties of this policy, written with the kit's strategies.
@settings(max_examples=100, deadline=None)
@given(cluster=clusters(health="at_least_one"), text=request_texts())
def test_same_prefix_same_worker(cluster: list[BasicWorker], text: str) -> None:
    policy = StickyPrefixPolicy(prefix_len=16)
    text = text.ljust(16, ".")
    first = policy.select_worker(cluster, text)
    # Same first 16 characters, different tail: same worker, whatever the loads.
    assert policy.select_worker(cluster, text[:16] + " and a different question") == first


@settings(max_examples=100, deadline=None)
@given(
    cluster=clusters(min_size=2, health="healthy"),
    stream=request_streams(min_size=5, max_size=20, kinds="mixed"),
)
def test_losing_a_worker_moves_only_its_own_prefixes(
    cluster: list[BasicWorker], stream: list[RequestText]
) -> None:
    policy = StickyPrefixPolicy()
    before = [policy.select_worker(cluster, text) for text in stream]
    lost = before[0]
    assert lost is not None  # every worker is healthy and every request has text
    cluster[lost].set_healthy(False)
    after = [policy.select_worker(cluster, text) for text in stream]
    for was, now in zip(before, after, strict=True):
        assert now != lost
        if was != lost:
            assert now == was  # untouched prefixes stay where their cache is


# 3. The stateful test: leases, exceptions inside `with`, health flips, workers coming and
#    going, with every load checked after every step.
class StickyPrefixMachine(PolicyStateMachine):
    policy_factory = StickyPrefixPolicy


TestStickyPrefixMachine = StickyPrefixMachine.TestCase
TestStickyPrefixMachine.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)


if __name__ == "__main__":
    # As a script: @given tests are plain callables; the machine runs through hypothesis.
    test_sticky_prefix_keeps_the_shared_invariants()
    print("check_policy(StickyPrefixPolicy): every shared invariant holds")
    test_same_prefix_same_worker()
    print("same prefix, same worker: ok")
    test_losing_a_worker_moves_only_its_own_prefixes()
    print("losing a worker moves only its own prefixes: ok")
    run_state_machine_as_test(
        StickyPrefixMachine, settings=settings(max_examples=30, deadline=None)
    )
    print("state machine (leases, health flips, workers added and removed): ok")
