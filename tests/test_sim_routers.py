"""``--routers R``: R gateway replicas, each its own policy object, round-robin in front of
the same engines (as behind a load balancer); they share the workers' loads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cacheroute.cli import main
from cacheroute.policies import LoadBalancingPolicy, registry
from cacheroute.policies.base import RequestText, least_loaded_index
from cacheroute.sim import (
    EngineConfig,
    bursty,
    chat,
    compare,
    parse_policy_list,
    shared_prefix,
    simulate,
    summarize,
)
from cacheroute.worker import Worker

SMALL = {
    "chat": chat(users=24, rounds=4, request_rate=40.0, seed=1),
    "shared_prefix": shared_prefix(groups=8, prompts_per_group=6, seed=1),
    "bursty": bursty(bursts=4, burst_size=24, interval_s=0.5, seed=1),
}
TIGHT = EngineConfig(cache_tokens=20_000, max_batch=8)


def _fingerprint(r: Any) -> str:
    key = (r.worker, r.hit, r.first_token, r.done, r.decisions, r.imbalanced)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


@pytest.mark.parametrize("workload", sorted(SMALL))
def test_replicas_of_a_stateless_policy_decide_as_one(workload: str) -> None:
    # shortest_queue reads only the shared workers (loads, processed): R replicas of it are
    # one router, so the whole run is identical; the replica plumbing must not show.
    w = SMALL[workload]
    one = simulate(w, "shortest_queue", workers=4, engine=TIGHT, seed=3)
    four = simulate(w, "shortest_queue", workers=4, engine=TIGHT, seed=3, routers=4)
    assert _fingerprint(four) == _fingerprint(one) and four.routers == 4


class _Probe(LoadBalancingPolicy):
    """Least load; at every decision checks the shared books against its own counts."""

    name = "router_probe_test"
    acquired: ClassVar[int] = 0
    completed: ClassVar[int] = 0
    instances: ClassVar[list[_Probe]] = []

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.seen: list[tuple[int, ...]] = []
        self.done = 0
        _Probe.instances.append(self)

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        loads = [w.load() for w in workers]
        # Every replica sees the same engines: the sum of loads is every request in flight,
        # whichever replica routed it.
        assert sum(loads) == _Probe.acquired - _Probe.completed
        assert min(loads) >= 0
        for w in workers:
            assert w.pending_prefill_tokens() >= 0 and w.decode_tokens() >= 0  # type: ignore[attr-defined]
        assert isinstance(request_text, tuple)
        self.seen.append(request_text)
        _Probe.acquired += 1
        return least_loaded_index(workers)

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        assert success
        self.done += 1
        _Probe.completed += 1


@pytest.fixture
def probe() -> Iterator[type[_Probe]]:
    saved = dict(registry._registry)
    registry.register_policy(_Probe.name, _Probe)
    _Probe.acquired = _Probe.completed = 0
    _Probe.instances = []
    yield _Probe
    registry._registry.clear()
    registry._registry.update(saved)


@pytest.mark.parametrize("routers", [2, 3, 7])
def test_routers_share_the_loads_and_each_sees_only_its_own_requests(
    probe: type[_Probe], routers: int
) -> None:
    w = SMALL["chat"]
    res = simulate(w, probe.name, workers=4, engine=TIGHT, seed=3, routers=routers)
    replicas = probe.instances[-routers:]
    assert len(probe.instances) == routers  # one policy object per replica
    assert [p.seed for p in replicas] == [3 + k for k in range(routers)]
    for k, p in enumerate(replicas):
        assert p.seen == [r.blocks for r in w.requests[k::routers]]  # round robin
        assert p.done == len(p.seen)  # each release reached the replica that routed it
    assert probe.acquired == probe.completed == len(w)
    assert res.final_loads == [0, 0, 0, 0] and res.routers == routers


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("policy", ["cache_aware:locality", "cache_aware:least_load", "random"])
def test_routers_keep_every_request_and_load_invariant(name: str, policy: str) -> None:
    w = SMALL[name]
    res = simulate(w, policy, workers=4, engine=TIGHT, seed=3, routers=4)
    assert res.final_loads == [0, 0, 0, 0]
    assert all(d >= 0 for d in res.done)
    for r, h, a, f, d in zip(
        w.requests, res.hit, res.admitted, res.first_token, res.done, strict=True
    ):
        assert 0 <= h <= r.input_tokens and r.arrival <= a <= f <= d
    s = summarize(res)
    assert s.requests == len(w) and s.hit_rate <= s.ideal_hit_rate + 1e-12
    again = simulate(w, policy, workers=4, engine=TIGHT, seed=3, routers=4)
    assert _fingerprint(again) == _fingerprint(res)  # deterministic


def test_replicas_with_their_own_trees_lose_prefix_affinity() -> None:
    """Four cache_aware replicas each learn a quarter of the traffic: fewer hits."""
    w = shared_prefix(groups=16, prompts_per_group=8, seed=0)
    one = summarize(simulate(w, "cache_aware", workers=4))
    four = summarize(simulate(w, "cache_aware", workers=4, routers=4))
    assert four.hit_rate < one.hit_rate


def test_routers_argument_is_checked() -> None:
    w = SMALL["bursty"]
    with pytest.raises(ValueError, match=r"^routers must be an int in \[1, \d+\], got 0"):
        simulate(w, "round_robin", routers=0)
    with pytest.raises(TypeError, match=r"^routers must be an int, got True \(bool\)"):
        simulate(w, "round_robin", routers=True)
    specs = parse_policy_list("round_robin,random")
    assert [r.routers for r in compare(w, specs, workers=2, routers=3)] == [3, 3]


def test_cli_routers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.json"
    argv = ["--workload", "chat", "--limit", "64", "--policies", "cache_aware", "--progress", "off"]
    assert main(["simulate", *argv, "--routers", "3", "--json", str(out)]) == 0
    assert ", 3 routers" in capsys.readouterr().out.splitlines()[0]
    assert json.loads(out.read_text())["config"]["routers"] == 3
    with pytest.raises(SystemExit) as info:
        main(["simulate", *argv, "--routers", "0"])
    assert info.value.code == 2
    assert "argument --routers: must be >= 1" in capsys.readouterr().err
