"""KV events (precise-mode prep): engines report blocks stored and removed; the simulator
delivers each event to every router replica after a configurable delay."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from cacheroute.cli import main
from cacheroute.policies import LoadBalancingPolicy, registry
from cacheroute.policies.base import RequestText, least_loaded_index
from cacheroute.sim import EngineConfig, KVEvent, Request, chat, shared_prefix, simulate
from cacheroute.sim.engine import Engine
from cacheroute.worker import Worker

TIGHT = EngineConfig(cache_tokens=6_000, max_batch=8)


def _fingerprint(r: object) -> tuple[object, ...]:
    return (r.worker, r.hit, r.first_token, r.done, r.admitted)  # type: ignore[attr-defined]


def test_an_engines_events_replay_to_exactly_its_cache() -> None:
    """After every boundary, the blocks stored minus the blocks removed, in event order,
    are the engine's resident blocks, and a block is stored only once its prefill is done."""
    w = chat(users=12, rounds=4, request_rate=50.0, seed=3)
    reqs = w.requests
    n = len(reqs)
    events: list[KVEvent] = []
    eng = Engine(0, TIGHT, reqs, [0.0] * n, [0] * n, [0.0] * n, events=events)
    mirror: set[int] = set()
    seen = 0
    i = 0
    while i < n or eng.next_time is not None:
        if eng.next_time is not None and (i >= n or eng.next_time <= reqs[i].arrival):
            now = eng.next_time
            eng.boundary(now)
        else:
            now = reqs[i].arrival
            eng.enqueue(i, now)
            i += 1
        for ev in events[seen:]:
            assert ev.time == now and ev.worker == 0
            if ev.kind == "stored":
                assert not mirror & set(ev.blocks)
                mirror.update(ev.blocks)
            else:
                assert ev.kind == "removed" and set(ev.blocks) <= mirror
                mirror.difference_update(ev.blocks)
        seen = len(events)
        # Stored events lag the cache only by the prefill in progress.
        in_prefill = {b for rid in eng._admitted for b in reqs[rid].blocks}
        assert mirror <= set(eng._tok) and set(eng._tok) - mirror <= in_prefill
    assert mirror == set(eng._tok)
    assert any(e.kind == "removed" for e in events)  # the tight cache did evict


class _Listener(LoadBalancingPolicy):
    """Least load; records the KV events it receives and when it decides."""

    name = "kv_listener_test"
    instances: ClassVar[list[_Listener]] = []

    def __init__(self, seed: int | None = None) -> None:
        self.events: list[tuple[float, KVEvent]] = []  # (time of the next decision, event)
        self.decisions: list[tuple[float, int]] = []  # (now, events seen so far)
        self.now = 0.0
        _Listener.instances.append(self)

    def on_kv_event(self, event: KVEvent) -> None:
        self.events.append((self.now, event))

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        self.decisions.append((self.now, len(self.events)))
        return least_loaded_index(workers)


@pytest.fixture
def listener() -> Iterator[type[_Listener]]:
    saved = dict(registry._registry)
    registry.register_policy(_Listener.name, _Listener)
    _Listener.instances = []
    yield _Listener
    registry._registry.clear()
    registry._registry.update(saved)


@pytest.mark.parametrize("delay", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("routers", [1, 3])
def test_every_replica_gets_every_event_after_the_delay(
    listener: type[_Listener], delay: float, routers: int
) -> None:
    w = chat(users=12, rounds=4, request_rate=50.0, seed=3)
    res = simulate(
        w, listener.name, workers=3, engine=TIGHT, routers=routers, kv_event_delay_s=delay
    )
    replicas = listener.instances
    assert len(replicas) == routers
    streams = [[e for _, e in p.events] for p in replicas]
    assert all(s == streams[0] for s in streams)  # every replica, the same stream
    events = streams[0]
    assert len(events) == res.kv_events["stored"] + res.kv_events["removed"]
    assert res.kv_events["stored"] > 0 and res.kv_events["removed"] > 0
    assert [e.time for e in events] == sorted(e.time for e in events)
    arrivals = [r.arrival for r in w.requests]
    for k, p in enumerate(replicas):
        for index, (_, seen) in zip(range(k, len(w), routers), p.decisions, strict=True):
            t = arrivals[index]
            # Before deciding at t, a replica has every event emitted by t - delay, and none
            # later (an event due at t exactly may come from the engine's reaction to
            # this very request, emitted after the decision).
            assert all(e.time + delay <= t for e in events[:seen])
            assert all(e.time + delay >= t for e in events[seen:])


def test_events_change_nothing_for_policies_that_do_not_listen() -> None:
    w = shared_prefix(groups=6, prompts_per_group=6, seed=2)
    for policy in ("cache_aware:locality", "round_robin", "random"):
        off = simulate(w, policy, workers=3, engine=TIGHT, seed=1)
        on = simulate(w, policy, workers=3, engine=TIGHT, seed=1, kv_event_delay_s=0.01)
        assert _fingerprint(on) == _fingerprint(off)
        assert off.kv_events == {} and on.kv_events["stored"] > 0


def test_kv_event_delay_is_checked_and_on_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = shared_prefix(groups=2, prompts_per_group=2)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^kv_event_delay_s must be a"):
            simulate(w, "round_robin", kv_event_delay_s=bad)
    with pytest.raises(TypeError, match=r"^kv_event_delay_s must be a real number or None"):
        simulate(w, "round_robin", kv_event_delay_s="soon")  # type: ignore[arg-type]
    out = tmp_path / "o.json"
    argv = ["--workload", "chat", "--limit", "64", "--policies", "round_robin", "--progress", "off"]
    assert main(["simulate", *argv, "--kv-event-delay", "0.05", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["kv_event_delay_s"] == 0.05
    assert doc["results"][0]["kv_events_stored"] > 0
    with pytest.raises(SystemExit):
        main(["simulate", *argv, "--kv-event-delay", "-1"])
    assert "argument --kv-event-delay" in capsys.readouterr().err


def test_request_blocks_are_stored_once_per_engine() -> None:
    """A prefix shared by two requests on one engine is stored once (chained ids)."""
    reqs = [Request(0.0, (1, 2, 3), 10, 30, 30, 1), Request(0.0, (1, 2, 4), 10, 30, 30, 1)]
    events: list[KVEvent] = []
    eng = Engine(0, EngineConfig(), reqs, [0.0, 0.0], [0, 0], [0.0, 0.0], events=events)
    eng.enqueue(0, 0.0)
    eng.enqueue(1, 0.0)
    while eng.next_time is not None:
        eng.boundary(eng.next_time)
    stored = [b for e in events if e.kind == "stored" for b in e.blocks]
    assert sorted(stored) == [1, 2, 3, 4]
