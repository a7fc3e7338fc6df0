"""Precise mode: prefix policies matching token-id requests on the engines' KV events.

The index here is the real :class:`cacheroute.events.KVEventIndex`, fed vLLM-format
messages through ``apply`` (the ZMQ transport is tested in ``test_events_zmq.py``); the
gateway end to end in ``test_gateway_events.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import build_workers

from cacheroute import CacheAwarePolicy, Decision
from cacheroute.events import BlockRemoved, BlockStored, KVEventIndex, encode_batch
from cacheroute.policies.precise import PreciseMatcher
from cacheroute.tree import Tree

BS = 4  # tokens per block


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Feed:
    """One engine's event stream into an index, with its own sequence numbers."""

    def __init__(self, index: KVEventIndex, url: str) -> None:
        self.index, self.url, self.seq = index, url, 0

    def send(self, *events: Any) -> None:
        assert self.index.apply(self.url, self.seq, encode_batch(list(events)))
        self.seq += 1

    def stored(self, tokens: list[int], first_hash: int, parent: int | None = None) -> None:
        n = len(tokens) // BS
        self.send(BlockStored(list(range(first_hash, first_hash + n)), parent, tokens, BS))


def _setup(**kw: Any) -> tuple[list[Any], KVEventIndex, list[_Feed], CacheAwarePolicy, _Clock]:
    clock = _Clock()
    index = KVEventIndex(block_size=BS, stale_after=30.0, clock=clock)
    workers = build_workers([0, 0, 0])
    feeds = [_Feed(index, w.url) for w in workers]
    for f in feeds:
        f.send()  # an empty batch: the feed exists and is fresh
    seen: list[Decision] = []
    policy = CacheAwarePolicy(index=index, on_decision=seen.append, **kw)
    return workers, index, feeds, policy, clock


PROMPT = list(range(100, 124))  # 24 tokens = 6 blocks


def test_requests_follow_what_the_engines_report() -> None:
    workers, _, feeds, policy, _ = _setup(index_mode="precise")
    feeds[2].stored(PROMPT, 1)
    assert policy.select_worker(workers, [*PROMPT, 7, 8]) == 2
    # The routed history would now say 2 as well; the report for 1 beats it.
    feeds[2].send(BlockRemoved([1, 2, 3, 4, 5, 6]))
    feeds[1].stored(PROMPT, 11)
    assert policy.select_worker(workers, [*PROMPT, 9, 9]) == 1


def test_an_engine_that_evicted_the_prefix_is_no_longer_preferred() -> None:
    workers, _, feeds, policy, _ = _setup(index_mode="precise")
    feeds[0].stored(PROMPT, 1)
    for _ in range(3):
        assert policy.select_worker(workers, [*PROMPT, 5]) == 0
    feeds[0].send(BlockRemoved([1]))  # the whole chain goes with its first block
    workers[0].increment_load()
    # The routed history still says worker 0; precise mode trusts the engine: a miss.
    assert policy.select_worker(workers, [*PROMPT, 5]) != 0


def test_a_stale_feed_falls_back_to_the_routed_history() -> None:
    workers, index, feeds, policy, clock = _setup(index_mode="precise")
    feeds[1].stored(PROMPT, 1)
    assert policy.select_worker(workers, PROMPT) == 1
    assert policy.select_worker(workers, [*PROMPT, 3]) == 1
    clock.t += 31.0  # every feed silent for longer than stale_after
    feeds[0].send()
    feeds[2].send()  # 0 and 2 are fresh again, 1 stays silent
    assert index.stale_urls() == [workers[1].url]
    feeds[1].send(BlockRemoved([1]))  # ... is not seen: the feed is stale
    clock.t += 31.0
    feeds[0].send()
    feeds[2].send()
    # worker 1 is stale: its routed history (it got both requests) still counts
    assert policy.select_worker(workers, [*PROMPT, 3, 4]) == 1


def test_a_worker_without_a_feed_uses_the_routed_history() -> None:
    index = KVEventIndex(block_size=BS)
    workers = build_workers([0, 0])
    policy = CacheAwarePolicy(index=index, index_mode="precise")
    first = policy.select_worker(workers, PROMPT)
    assert policy.select_worker(workers, [*PROMPT, 1]) == first


def test_hybrid_claims_keep_a_burst_together_until_the_events_arrive() -> None:
    workers, _, _, hybrid, _ = _setup()  # hybrid is the default with an index
    first = hybrid.select_worker(workers, PROMPT)
    assert first is not None
    workers[first].increment_load()  # in flight, no event yet
    assert hybrid.select_worker(workers, [*PROMPT, 1]) == first
    workers2, _, _, precise, _ = _setup(index_mode="precise")
    first2 = precise.select_worker(workers2, PROMPT)
    assert first2 is not None
    workers2[first2].increment_load()
    assert precise.select_worker(workers2, [*PROMPT, 1]) != first2  # no report: a miss


def test_claims_expire_and_removed_workers_lose_theirs() -> None:
    clock = _Clock()
    index = KVEventIndex(block_size=BS, clock=clock)
    for url in ("a", "b"):
        index.apply(url, 0, encode_batch([]))
    m = PreciseMatcher(index, "hybrid", 10.0, Tree, clock=clock)
    m.claim(PROMPT, "a")
    assert m.lengths(PROMPT, {}) == {"a": 24}
    clock.t += 4.0
    m.claim([*PROMPT, 1], "b")
    assert m.lengths([*PROMPT, 1], {}) == {"a": 24, "b": 25}
    clock.t += 5.5  # a's claim is 9.5 s old: between half and all of the TTL, it counts
    assert m.lengths(PROMPT, {}) == {"a": 24, "b": 24}
    clock.t += 5.0  # a's: 14.5 s (gone); b's: 10.5 s, in the previous generation
    assert m.lengths(PROMPT, {}).get("a", 0) == 0
    clock.t += 30.0
    assert m.lengths(PROMPT, {}) == {}
    m.claim(PROMPT, "a")
    m.forget("a")
    assert m.lengths(PROMPT, {}) == {}


def _matcher(ttl: float = 10.0) -> tuple[PreciseMatcher, dict[str, _Feed], _Clock]:
    clock = _Clock()
    index = KVEventIndex(block_size=BS, clock=clock)
    feeds = {url: _Feed(index, url) for url in ("a", "b")}
    for f in feeds.values():
        f.send()
    return PreciseMatcher(index, "hybrid", ttl, Tree, clock=clock), feeds, clock


def test_a_confirmed_claim_goes_with_the_blocks_the_engine_evicts() -> None:
    m, feeds, _ = _matcher()
    m.claim(PROMPT, "a")
    assert m.lengths(PROMPT, {}) == {"a": 24}  # routed, not reported yet: the claim counts
    feeds["a"].stored(PROMPT, 1)
    assert m.lengths(PROMPT, {}) == {"a": 24}  # reported: confirmed
    feeds["a"].send(BlockRemoved([3]))  # evicts blocks 3-6
    # The claim was confirmed: the report is the truth, the claim does not bring it back.
    assert m.lengths(PROMPT, {}) == {"a": 8}
    assert m.lengths([*PROMPT, 1], {}) == {"a": 8}


def test_an_unconfirmed_claim_outlives_the_eviction_of_an_older_prefix() -> None:
    m, feeds, _ = _matcher()
    feeds["a"].stored(PROMPT[:8], 1)
    m.claim(PROMPT, "a")  # the request that will compute blocks 3-6 is still queued
    assert m.lengths(PROMPT, {}) == {"a": 24}
    feeds["a"].send(BlockRemoved([1]))
    assert m.lengths(PROMPT, {}) == {"a": 24}  # its prefill will store all of it
    m.claim([*PROMPT, *range(7, 11)], "a")  # the next turn, routed before the last is done
    feeds["a"].stored(PROMPT, 11)
    assert m.lengths([*PROMPT, *range(7, 11)], {}) == {"a": 28}  # the next turn still claims


def test_a_claim_confirmed_in_part_keeps_its_unconfirmed_part() -> None:
    m, feeds, _ = _matcher()
    m.claim(PROMPT, "a")
    feeds["a"].stored(PROMPT[:8], 1)  # two of six blocks computed (chunked prefill)
    assert m.lengths(PROMPT, {}) == {"a": 24}
    feeds["a"].send(BlockRemoved([1]))
    assert m.lengths(PROMPT, {}) == {"a": 24}


def test_text_requests_ignore_the_index() -> None:
    workers, _, feeds, policy, _ = _setup(index_mode="precise")
    feeds[2].stored(PROMPT, 1)
    first = policy.select_worker(workers, "a text prompt")
    assert policy.select_worker(workers, "a text prompt, again") == first


def test_the_namespace_is_passed_to_the_index() -> None:
    calls: list[dict[str, Any]] = []

    class Index:
        def match(self, token_ids: Any, **namespace: Any) -> dict[str, int]:
            calls.append(namespace)
            return {}

        def urls(self) -> list[str]:
            return []

        def stale_urls(self) -> list[str]:
            return []

    policy = CacheAwarePolicy(index=Index(), index_namespace={"lora_name": "sql-adapter"})
    policy.select_worker(build_workers([0]), [1, 2, 3])
    assert calls == [{"lora_name": "sql-adapter"}]


def test_remove_worker_drops_its_claims() -> None:
    workers, _, _, policy, _ = _setup()
    first = policy.select_worker(workers, PROMPT)
    assert first is not None
    policy.remove_worker(workers[first])
    policy.add_worker(workers[first])
    workers[first].increment_load()  # not the least loaded any more
    assert policy.select_worker(workers, [*PROMPT, 1]) != first


@pytest.mark.parametrize(
    ("kw", "exc", "word"),
    [
        ({"index": 3}, TypeError, "index"),
        ({"index": object()}, TypeError, "index"),
        ({"index_mode": "exact"}, ValueError, "index_mode"),
        ({"claim_ttl_s": 0}, ValueError, "claim_ttl_s"),
        ({"claim_ttl_s": "1"}, TypeError, "claim_ttl_s"),
    ],
)
def test_bad_precise_settings_name_the_setting(kw: dict[str, Any], exc: type, word: str) -> None:
    with pytest.raises(exc, match=word):
        CacheAwarePolicy(**kw)


def test_a_claim_of_part_of_a_block_is_confirmed_by_its_whole_blocks() -> None:
    m, feeds, _ = _matcher()
    prompt = [*PROMPT, 200, 201]  # 6 blocks and 2 tokens, which no engine caches
    m.claim(prompt, "a")
    assert m.lengths(prompt, {}) == {"a": 26}  # routed, not reported yet: the claim counts
    feeds["a"].stored(PROMPT, 1)  # every whole block of it: all the engine can report
    assert m.lengths(prompt, {}) == {"a": 24}  # confirmed: the report (whole blocks) speaks
    feeds["a"].send(BlockRemoved([3]))  # evicts blocks 3-6
    assert m.lengths(prompt, {}) == {"a": 8}  # the report is the truth now
