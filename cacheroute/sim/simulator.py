"""The discrete-event loop: a real policy routing a workload over modelled engines.

Every request goes through the policy exactly as in a gateway:
:func:`cacheroute.acquire` at its arrival (load +1 on the chosen worker) and
``lease.release(success=True)`` when its last token is out (load -1). Workers are
:class:`cacheroute.BasicWorker` objects, so policies read real loads.

**What the router sees.** The request text is the tuple of the request's chained block
ids, used as token ids: one unit per block. Equal ids mean equal prefixes, so a tree of
these units matches exactly the prefixes a tree of the real tokens would (at block
granularity), and it is 64-512 times smaller and faster than synthesized per-token ids.
The match rate a policy computes (matched units / request units) is then the fraction
of *blocks* matched, which differs from the token fraction only by the partial last
block.

Time comes only from the event heap (no wall clock), and every random choice comes from
seeded generators, so a run is a pure function of (workload, policy spec, workers,
engine constants, seed).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cacheroute._validation import check_callable, check_choice, check_int, check_real, fail
from cacheroute.lease import Lease, acquire
from cacheroute.sim.engine import Engine, EngineConfig, KVEvent
from cacheroute.sim.precise import INDEX_MODES, EventFeed
from cacheroute.sim.request import Workload
from cacheroute.sim.specs import PolicySpec
from cacheroute.worker import BasicWorker

__all__ = ["MAX_ROUTERS", "MAX_WORKERS", "RunResult", "compare", "simulate"]

MAX_WORKERS = 65_536
"""The most engines one simulation may have (each is built before the first request, and
every routing decision reads every worker)."""

MAX_ROUTERS = 4_096
"""The most gateway replicas one simulation may have (each is a policy object)."""


@dataclass
class RunResult:
    """Everything one simulation run measured, per request and per worker.

    Per-request lists are indexed by request position in ``workload.requests``.

    Attributes:
        policy: the spec label.
        workload: the workload that was run.
        workers: number of workers.
        engine: the engine constants.
        seed: the seed given to the policy.
        worker: the worker index each request was routed to.
        hit: hit tokens of each request.
        first_token: time of each request's first token.
        done: time each request finished.
        admitted: time each request left its engine's queue for a prefill batch
            (``admitted - arrival`` is its queueing delay at dispatch).
        decisions: routing decisions reported by the policy's observer, ``0`` when the
            policy has no observer.
        imbalanced: decisions taken in the policy's load-balancing branch.
        final_loads: every worker's load at the end (all 0 when every lease was released).
        oversized: requests larger than a whole engine cache (prompt plus output above
            ``engine.cache_tokens``); each ran alone on an otherwise empty engine.
        timeline: ``(time, loads per worker)`` samples at arrivals and completions, in
            time order, when recorded.
        wall_s: wall-clock seconds the run took (not part of the results proper).
        routers: gateway replicas that routed the workload (see :func:`simulate`).
        kv_events: ``{"stored": n, "removed": m}`` KV events the engines emitted, when
            ``kv_event_delay_s`` was given (empty otherwise).
    """

    policy: str
    workload: Workload
    workers: int
    engine: EngineConfig
    seed: int
    worker: list[int]
    hit: list[int]
    first_token: list[float]
    done: list[float]
    decisions: int = 0
    imbalanced: int = 0
    final_loads: list[int] = field(default_factory=list)
    oversized: int = 0
    timeline: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    wall_s: float = 0.0
    admitted: list[float] = field(default_factory=list)
    routers: int = 1
    kv_events: dict[str, int] = field(default_factory=dict)


def _check_args(
    workload: object,
    workers: object,
    engine: object,
    seed: object,
    timeline_points: object,
    routers: object,
) -> None:
    """Shared argument checks of :func:`simulate` and :func:`compare`."""
    if not isinstance(workload, Workload):
        raise fail("workload", "a Workload", workload, TypeError)
    check_int("workers", workers, minimum=1, maximum=MAX_WORKERS)
    check_int("timeline_points", timeline_points, minimum=0)
    if engine is not None and not isinstance(engine, EngineConfig):
        raise fail("engine", "an EngineConfig or None", engine, TypeError)
    check_int("seed", seed)
    check_int("routers", routers, minimum=1, maximum=MAX_ROUTERS)


def _check_delay(delay: object) -> float | None:
    if delay is None:
        return None
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise fail("kv_event_delay_s", "a real number or None", delay, TypeError)
    value: float = check_real("kv_event_delay_s", delay, minimum=0.0)
    return value


def _check_policy(policy: object) -> None:
    if not isinstance(policy, (PolicySpec, str)):
        raise fail("policy", "a PolicySpec or a spec str", policy, TypeError)


def simulate(
    workload: Workload,
    policy: PolicySpec | str,
    *,
    workers: int = 8,
    engine: EngineConfig | None = None,
    seed: int = 0,
    timeline_points: int = 0,
    progress: Callable[[int], None] | None = None,
    routers: int = 1,
    kv_event_delay_s: float | None = None,
    index: str = "approximate",
) -> RunResult:
    """Run ``workload`` through a fresh ``policy`` over ``workers`` modelled engines.

    Args:
        workload: the requests.
        policy: a :class:`PolicySpec` or spec text (``"cache_aware:least_load"``). The
            policy is built with what it accepts (and its spec does not set) of
            ``tokens_per_unit`` (the workload's block size), ``kv_capacity_tokens`` and
            ``max_batch`` (the engine's) and ``clock``: simulated time, the arrival of
            the request being routed, for policies that keep time (a TTL index, a load
            window, hybrid claims).
        workers: number of engines (>= 1).
        engine: engine constants (default :class:`EngineConfig`).
        seed: passed to the policy when it takes one (``random``, ``power_of_two``).
        timeline_points: about how many per-worker load samples to record (0: none).
        progress: called now and then with the number of requests dispatched so far.
        routers: gateway replicas in front of the engines, as behind a load balancer:
            each is its own policy object (replica ``k`` gets ``seed + k``), requests go
            to them round robin in arrival order, and a request's lease is released to
            the replica that routed it. A replica learns only its own requests' routing
            (a prefix tree of a quarter of the traffic with 4 replicas), but every
            replica reads the same workers, so all see every request's load and work.
            ``routers=1`` is a single gateway (exactly the results without it).
        kv_event_delay_s: when not ``None``, engines emit :class:`KVEvent` records
            (blocks stored when their prefill finishes, blocks evicted) and every
            replica with an ``on_kv_event(event)`` method receives every event
            ``kv_event_delay_s`` seconds after it was emitted (before it decides on a
            request arriving then), as gateway replicas subscribed to the engines' event
            streams would. Policies without that method are unaffected; the counts are
            in ``RunResult.kv_events``. ``None`` (the default): no events, no cost.
        index: ``"approximate"`` (default: policies match on their routed history),
            ``"precise"`` or ``"hybrid"``: the engines' events (delayed by
            ``kv_event_delay_s``, 0 when ``None``) feed one real
            :class:`cacheroute.events.KVEventIndex` that every replica's policy reads
            (policies accepting ``index=``; see :mod:`cacheroute.sim.precise`). Needs the
            ``events`` extra.

    Raises:
        TypeError: an argument of the wrong type (the message names it).
        ValueError: ``workers`` outside [1, ``MAX_WORKERS``], ``routers`` outside
            [1, ``MAX_ROUTERS``], ``timeline_points < 0`` or a bad policy spec.
        RuntimeError: a request completed twice or never (a simulator bug).
    """
    _check_args(workload, workers, engine, seed, timeline_points, routers)
    _check_policy(policy)
    check_callable("progress", progress, none_ok=True)
    delay = _check_delay(kv_event_delay_s)
    check_choice("index", index, INDEX_MODES)
    if index != "approximate" and delay is None:
        delay = 0.0
    spec = PolicySpec.parse(policy) if isinstance(policy, str) else policy
    cfg = engine if engine is not None else EngineConfig()
    reqs = workload.requests
    n = len(reqs)

    imbalanced = 0
    decisions = 0

    def observe(decision: Any) -> None:
        nonlocal imbalanced, decisions
        decisions += 1
        if decision.reason == "imbalanced":
            imbalanced += 1

    pool = [BasicWorker(f"http://sim-worker-{i}:8000") for i in range(workers)]
    clock = [0.0]  # simulated time: the arrival of the request being routed
    feed: EventFeed | None = None
    precise: dict[str, Any] = {}
    if index != "approximate":
        feed = EventFeed([w.url for w in pool])
        feed.open_feeds()
        precise = {"index": feed.index, "index_mode": index}
    # Prefix policies see one unit per block: tell them what a unit and an engine hold,
    # and how many requests an engine runs at once. Policies that keep time (hybrid
    # claims, a TTL index, a load window) get the simulated clock, not the wall clock.
    block = reqs[0].block_size if reqs else 1
    replicas = [
        spec.build(
            seed=seed + k,
            on_decision=observe,
            tokens_per_unit=float(block),
            kv_capacity_tokens=cfg.cache_tokens,
            max_batch=cfg.max_batch,
            clock=lambda: clock[0],
            **precise,
        )
        for k in range(routers)
    ]
    first_token = [0.0] * n
    hit = [0] * n
    done = [-1.0] * n
    routed = [-1] * n
    admitted = [0.0] * n
    events: list[KVEvent] | None = None if delay is None else []
    engines = [
        Engine(i, cfg, reqs, first_token, hit, admitted, events=events) for i in range(workers)
    ]
    hook = "on_kv_event"  # a replica that has it receives every KV event
    listeners: list[Callable[[KVEvent], None]] = [
        getattr(p, hook) for p in replicas if callable(getattr(p, hook, None))
    ]
    sent = 0  # events delivered to the listeners so far
    leases: list[Lease | None] = [None] * n
    timeline: list[tuple[float, tuple[int, ...]]] = []
    every = max(1, 2 * n // timeline_points) if timeline_points > 0 else 0

    started = time.perf_counter()
    heap: list[tuple[float, int, int, int]] = []  # (time, seq, engine, version)
    push = heapq.heappush
    pop = heapq.heappop
    seq = 0
    i = 0
    finished = 0
    while i < n or heap:
        if heap and (i >= n or heap[0][0] <= reqs[i].arrival):
            now, _, e, version = pop(heap)
            eng = engines[e]
            if version != eng.version:
                continue
            finished_now = eng.boundary(now)
            for rid in eng.prefilled:  # first tokens out: their work moves to decode
                lease = leases[rid]
                if lease is not None:
                    lease.first_token()
            for rid in finished_now:
                lease = leases[rid]
                if lease is None or done[rid] >= 0:
                    raise RuntimeError(f"request {rid} completed twice")
                leases[rid] = None
                done[rid] = now
                finished += 1
                lease.release(success=True)
                if every and finished % every == 0:
                    timeline.append((now, tuple(w.load() for w in pool)))
            if eng.next_time is not None:
                seq += 1
                push(heap, (eng.next_time, seq, e, eng.version))
        else:
            r = reqs[i]
            clock[0] = r.arrival
            if (listeners or feed is not None) and events is not None and delay is not None:
                arrival = r.arrival
                due = sent
                while due < len(events) and events[due].time + delay <= arrival:
                    due += 1
                if due > sent:
                    for event in events[sent:due]:
                        for deliver in listeners:
                            deliver(event)
                    if feed is not None:
                        feed.deliver(events[sent:due])
                    sent = due
            lease = acquire(replicas[i % routers], pool, r.blocks, prompt_tokens=r.input_tokens)
            leases[i] = lease
            routed[i] = lease.index
            eng = engines[lease.index]
            if eng.enqueue(i, r.arrival) and eng.next_time is not None:
                seq += 1
                push(heap, (eng.next_time, seq, lease.index, eng.version))
            if every and i % every == 0:
                timeline.append((r.arrival, tuple(w.load() for w in pool)))
            i += 1
            if progress is not None and i & 255 == 0:
                progress(i)
    if finished != n:
        raise RuntimeError(f"{n - finished} of {n} requests never completed")
    kv_events: dict[str, int] = {}
    if events is not None:
        for deliver in listeners:  # what is still in flight at the end
            for event in events[sent:]:
                deliver(event)
        stored = sum(1 for e in events if e.kind == "stored")
        kv_events = {"stored": stored, "removed": len(events) - stored}
    if progress is not None:
        progress(n)
    for pol in replicas:
        pol.close()
    if feed is not None:
        feed.close()
    return RunResult(
        policy=str(spec),
        workload=workload,
        workers=workers,
        engine=cfg,
        seed=seed,
        worker=routed,
        hit=hit,
        first_token=first_token,
        done=done,
        decisions=decisions,
        imbalanced=imbalanced,
        final_loads=[w.load() for w in pool],
        oversized=sum(e.oversized for e in engines),
        timeline=timeline,
        wall_s=time.perf_counter() - started,
        admitted=admitted,
        routers=routers,
        kv_events=kv_events,
    )


def compare(
    workload: Workload,
    policies: list[PolicySpec],
    *,
    workers: int = 8,
    engine: EngineConfig | None = None,
    seed: int = 0,
    timeline_points: int = 0,
    show_progress: bool | None = None,
    routers: int = 1,
    kv_event_delay_s: float | None = None,
    index: str = "approximate",
) -> list[RunResult]:
    """:func:`simulate` ``workload`` once per policy (each with a fresh policy object).

    ``show_progress``: draw a progress bar on stderr for runs longer than two seconds
    (``None``: only when stderr is a terminal).

    Raises:
        TypeError, ValueError: as :func:`simulate`, for any policy, before any run.
    """
    from cacheroute.sim.progress import ProgressBar

    if not isinstance(policies, (list, tuple)):
        raise fail("policies", "a list of PolicySpec", policies, TypeError)
    _check_args(workload, workers, engine, seed, timeline_points, routers)
    _check_delay(kv_event_delay_s)
    check_choice("index", index, INDEX_MODES)
    for spec in policies:
        _check_policy(spec)
    if show_progress is not None and not isinstance(show_progress, bool):
        raise fail("show_progress", "a bool or None", show_progress, TypeError)
    results = []
    for k, spec in enumerate(policies, 1):
        bar = ProgressBar(len(workload), f"[{k}/{len(policies)}] {spec}", enabled=show_progress)
        try:
            results.append(
                simulate(
                    workload,
                    spec,
                    workers=workers,
                    engine=engine,
                    seed=seed,
                    timeline_points=timeline_points,
                    progress=bar.update,
                    routers=routers,
                    kv_event_delay_s=kv_event_delay_s,
                    index=index,
                )
            )
        finally:
            bar.close()
    return results
