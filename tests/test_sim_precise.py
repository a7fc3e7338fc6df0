"""The simulator's precise mode: engines' KV events feeding a real KVEventIndex."""

from __future__ import annotations

import pytest

from cacheroute.sim import EngineConfig, chat, simulate
from cacheroute.sim.engine import KVEvent
from cacheroute.sim.precise import EventFeed

CHAT = chat(users=48, rounds=4, request_rate=40.0, seed=2)
TIGHT = EngineConfig(cache_tokens=30_000, max_batch=16)


def _hits(r: object) -> int:
    return sum(r.hit)  # type: ignore[attr-defined]


def test_the_feed_translates_engine_events_into_the_wire_format() -> None:
    feed = EventFeed(["http://a", "http://b"])
    feed.open_feeds()
    feed.deliver(
        [
            KVEvent(0.0, 0, "stored", (1, 2, 3)),
            KVEvent(0.0, 0, "stored", (4, 5), parent=3),  # extends the chain above
            KVEvent(0.0, 1, "stored", (1, 2)),
        ]
    )
    assert feed.index.match([1, 2, 3, 4, 5, 9]) == {"http://a": 5, "http://b": 2}
    feed.deliver([KVEvent(1.0, 0, "removed", (5,))])
    assert feed.index.match([1, 2, 3, 4, 5]) == {"http://a": 4, "http://b": 2}
    feed.deliver([KVEvent(2.0, 0, "removed", (2,))])  # the rest of the chain goes with it
    assert feed.index.match([1, 2, 3, 4]) == {"http://a": 1, "http://b": 2}
    assert feed.batches == 4  # one batch per engine per delivery
    feed.close()


def test_precise_and_hybrid_make_router_replicas_agree() -> None:
    approx = {
        r: _hits(simulate(CHAT, "cache_aware", workers=4, engine=TIGHT, routers=r)) for r in (1, 4)
    }
    precise = {
        r: _hits(simulate(CHAT, "cache_aware", workers=4, engine=TIGHT, routers=r, index="precise"))
        for r in (1, 4)
    }
    # Four replicas each see a quarter of the routing: their histories lose hits...
    assert approx[4] < 0.8 * approx[1]
    # ... but with the engines' reports every replica knows the truth.
    assert precise[4] >= 0.95 * precise[1]
    assert precise[4] > approx[4]


def test_hybrid_runs_deterministically_with_a_delay() -> None:
    a = simulate(CHAT, "cache_aware", workers=4, engine=TIGHT, index="hybrid", kv_event_delay_s=0.5)
    b = simulate(CHAT, "cache_aware", workers=4, engine=TIGHT, index="hybrid", kv_event_delay_s=0.5)
    assert a.worker == b.worker and a.first_token == b.first_token
    assert all(x == 0 for x in a.final_loads)


def test_policies_without_an_index_are_unaffected() -> None:
    plain = simulate(CHAT, "round_robin", workers=4, engine=TIGHT)
    precise = simulate(CHAT, "round_robin", workers=4, engine=TIGHT, index="precise")
    assert plain.worker == precise.worker and plain.first_token == precise.first_token


def test_bad_index_mode_names_it() -> None:
    with pytest.raises(ValueError, match="index"):
        simulate(CHAT, "cache_aware", index="exact")
