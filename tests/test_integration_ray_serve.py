"""The Ray Serve router: its core (no Ray needed), then a real local Ray Serve.

The first part drives :class:`RouterCore` through every order in which Ray 2.60 calls the
router's hooks (read from ``ray/serve/_private/router.py``): ``choose_replicas`` (again on a
retry), ``on_request_routed`` (only for an accepted attempt, possibly after the completion)
and ``on_request_completed`` (once per attempt, rejected ones included).

The second part (skipped without the ``ray`` extra) starts a local Ray with 2 CPUs and a
200 MB object store, runs ``examples/ray_serve_app.py`` (an ingress and 3 engine replicas
with a fake prefix cache) behind Ray's HTTP proxy, and checks that prefix groups stick to
one replica, that the loads return to 0, that the metrics are served, and that a killed
replica is routed around while Ray replaces it. Every HTTP call has a timeout and every
wait a deadline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from cacheroute import Decision, make_policy
from cacheroute.integrations.ray_serve_state import (
    KV_EVENTS_STAT,
    RouterCore,
    default_policy,
    kv_events_routing_stats,
    prompt_from_body,
    prompt_from_call,
    routers,
    snapshot,
)
from cacheroute.policies import LoadBalancingPolicy
from cacheroute.worker import Worker

A, B, C, D = (f"SERVE_REPLICA::app#Engine#{x}" for x in "abcd")
SYSTEM = "You are a helpful assistant. " * 10


class Recorder:
    """Wraps a policy to record on_request_complete calls."""

    def __init__(self, policy: LoadBalancingPolicy) -> None:
        self.calls: list[tuple[str, bool]] = []
        policy.on_request_complete = lambda url, ok: self.calls.append((url, ok))  # type: ignore[method-assign]


def core_of(*keys: str, policy: str = "cache_aware") -> tuple[RouterCore, Recorder]:
    core = RouterCore(make_policy(policy), name="test")
    core.sync(list(keys))
    return core, Recorder(core.policy)


def loads(core: RouterCore) -> dict[str, int]:
    return {w.url.rsplit("#", 1)[1]: w.load() for w in core.workers()}


def test_choose_routed_completed_takes_load_at_the_decision_and_gives_it_back_once() -> None:
    core, rec = core_of(A, B, C)
    ranks = core.choose("r1", [A, B, C], SYSTEM + "q1")
    assert ranks[0] == [A] and sorted(ranks[1]) == [B, C]  # the choice first, the rest next
    assert loads(core) == {"a": 1, "b": 0, "c": 0}  # held from the decision on
    assert core.worker(A).pending_prefill_tokens() > 0  # type: ignore[union-attr]
    # a second request decided before the first is reported routed sees that load
    assert core.choose("r2", [A, B, C], "unrelated prompt")[0] == [B]
    core.routed("r1", A)
    core.routed("r2", B)
    assert loads(core) == {"a": 1, "b": 1, "c": 0}
    core.completed("r1", A)
    core.completed("r1", A)  # a duplicate: nothing more
    core.completed("r2", B)
    assert loads(core) == {"a": 0, "b": 0, "c": 0}
    assert core.worker(A).pending_prefill_tokens() == 0  # type: ignore[union-attr]
    assert rec.calls == [(A, True), (B, True)] and core.in_flight() == 0


def test_a_completion_before_routed_releases_and_the_late_routed_takes_nothing() -> None:
    core, rec = core_of(A, B)
    core.choose("r1", [A, B], SYSTEM, pending=lambda: False)  # Ray fulfilled the future
    core.completed("r1", A)  # the fast request finished before Ray reported it routed
    assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0
    core.routed("r1", A)
    assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0
    assert rec.calls == [(A, True)]


def test_no_rejection_protocol_routed_never_comes() -> None:
    core, _ = core_of(A, B)
    core.choose("r1", [A, B], SYSTEM)  # pending defaults to "not waiting"
    assert loads(core)["a"] == 1
    core.completed("r1", A)
    assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0


def test_a_rejected_attempt_is_retried_and_ray_falls_back_to_another_replica() -> None:
    core, rec = core_of(A, B, C)
    waiting = [True]
    core.choose("r1", [A, B, C], SYSTEM + "q", pending=lambda: waiting[0])
    assert loads(core)["a"] == 1
    core.completed("r1", A)  # A was full: rejected; Ray retries (the request still waits)
    assert loads(core)["a"] == 0 and core.in_flight() == 1 and rec.calls == []
    assert core.choose("r1", [A, B, C], SYSTEM + "q")[0] == [A]  # the same decision
    assert loads(core)["a"] == 1
    processed = core.worker(A).processed()  # type: ignore[union-attr]
    core.routed("r1", B)  # Ray's queue-length check passed A over for B (second rank)
    assert loads(core) == {"a": 0, "b": 1, "c": 0}
    core.completed("r1", A)  # a late completion of the rejected attempt: ignored
    assert loads(core)["b"] == 1
    core.completed("r1", B)
    assert loads(core) == {"a": 0, "b": 0, "c": 0} and core.in_flight() == 0
    assert rec.calls == [(B, True)]  # the moved lease is not reported as a request
    assert core.worker(A).processed() == processed  # type: ignore[union-attr]
    tree = core.policy.tree("default")  # type: ignore[attr-defined]
    assert tree.prefix_match_tenant(SYSTEM + "q", B) == len(SYSTEM + "q")  # B caches it now


def test_the_retry_decided_before_the_rejection_completes() -> None:
    core, _ = core_of(A, B)
    waiting = [True]
    core.choose("r1", [A, B], SYSTEM, pending=lambda: waiting[0])
    core.choose("r1", [A, B], SYSTEM)  # Ray's retry asks again before the rejection lands
    assert loads(core)["a"] == 1  # one lease, not two
    core.completed("r1", A)  # the rejected attempt: its lease goes back
    core.routed("r1", A)  # the retry was accepted by A: held again
    assert loads(core)["a"] == 1
    waiting[0] = False
    core.completed("r1", A)
    assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0


def test_a_request_cancelled_while_waiting_gives_its_lease_back() -> None:
    core, rec = core_of(A, B)
    core.choose("r1", [A, B], SYSTEM, pending=lambda: True)
    core.cancelled("r1")
    assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0
    assert rec.calls == [(A, False)]
    core.completed("r1", A)  # nothing left to give back
    assert rec.calls == [(A, False)]


def test_replica_churn_syncs_the_policy_and_a_dead_replica_is_never_chosen() -> None:
    core, _ = core_of(A, B, C)
    prompts = {k: f"{k} system prompt " * 8 for k in "abc"}
    chosen = {}
    for k, prompt in prompts.items():
        key = core.choose(f"seed-{k}", [A, B, C], prompt)[0][0]
        chosen[k] = key
        core.completed(f"seed-{k}", key)
    assert sorted(chosen.values()) == [A, B, C]  # misses spread over the idle replicas
    policy = core.policy
    tree = policy.tree("default")  # type: ignore[attr-defined]
    dead = chosen["a"]
    core.remove(dead)  # Ray: the actor died
    assert dead not in {w.url for w in core.workers()}
    assert dead in policy.removed_urls()  # type: ignore[attr-defined]
    assert tree.prefix_match_tenant(prompts["a"], dead) == 0
    live = [k for k in (A, B, C) if k != dead]
    core.sync([*live, D])  # the replacement replica
    assert [w.url for w in core.workers()] == [*live, D]
    for i in range(6):
        key = core.choose(f"r{i}", [*live, D], prompts["a"])[0][0]
        assert key != dead
        core.completed(f"r{i}", key)
    core.sync([D])
    assert set(policy.removed_urls()) >= set(live)  # type: ignore[attr-defined]
    assert core.choose("last", [D], prompts["b"]) == [[D]]
    core.completed("last", D)
    assert loads(core) == {"d": 0}


def test_the_chosen_replica_leaving_between_retries_means_a_new_decision() -> None:
    core, _ = core_of(A, B)
    core.choose("r1", [A, B], SYSTEM, pending=lambda: True)
    core.completed("r1", A)  # rejected
    core.remove(A)
    core.sync([B])
    assert core.choose("r1", [B], SYSTEM) == [[B]]
    assert loads(core) == {"b": 1}
    core.routed("r1", B)
    core.completed("r1", B)
    assert loads(core) == {"b": 0}


def test_a_burst_decided_before_any_routed_report_is_spread_by_the_held_load() -> None:
    core, _ = core_of(A, B, C)
    for i in range(30):  # Ray decides queued requests before any routed report arrives
        core.choose(f"r{i}", [A, B, C], SYSTEM + f"question {i}")
    # Without the load held from the decision all 30 would see an idle, balanced cluster and
    # go to the prefix holder; with it, cache_aware's imbalance rule spreads them (11/9/10).
    assert max(loads(core).values()) <= 12, loads(core)
    assert sum(loads(core).values()) == 30
    for i in range(30):
        core.completed(f"r{i}", core._requests[f"r{i}"].key)  # type: ignore[attr-defined]
    assert set(loads(core).values()) == {0}


def test_bad_prompts_are_routed_without_text_and_none_means_rank_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core, _ = core_of(A, B)
    with caplog.at_level("ERROR", logger="cacheroute.integrations.ray_serve"):
        ranks = core.choose("r1", [A, B], [1, -2, 3])  # a negative token id: ValueError
    assert ranks[0] == [A] and "routing without it" in caplog.text
    assert core.choose(None, [A, B], "x") == [[B], [A]]  # rank only: nothing held
    assert loads(core) == {"a": 1, "b": 0}
    assert core.choose("r2", [], "x") == []  # no candidates: Ray backs off
    core.completed("r1", A)
    assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0


def test_stats_snapshot_and_routers() -> None:
    core, _ = core_of(A, B)
    core.name = "named"
    core.choose("r1", [A, B], SYSTEM)
    (stats,) = snapshot("named")
    assert stats["policy"] == "cache_aware" and stats["in_flight"] == 1
    assert [(w["url"], w["load"]) for w in stats["workers"]] == [(A, 1), (B, 0)]
    assert json.loads(json.dumps(stats)) == stats
    assert core in routers() and routers("nobody") == []
    core.completed("r1", A)


def test_from_config_and_the_default_policy() -> None:
    core = RouterCore.from_config(
        name="x", policy="cache_aware", policy_config={"cache_threshold": 0.5}
    )
    assert core.policy.name == "cache_aware"
    assert RouterCore.from_config().policy.name == default_policy()
    with pytest.raises(ValueError, match="unknown policy"):
        RouterCore.from_config(policy="nope")
    with pytest.raises(TypeError, match="unknown config key"):
        RouterCore.from_config(policy="cache_aware", policy_config={"bogus": 1})
    shortest = RouterCore.from_config(policy="shortest_queue")
    shortest.sync([A, B])
    assert shortest.choose("r", [A, B], "x")[0] == [A]  # any policy, prompt or not
    shortest.completed("r", A)


def test_precise_mode_follows_the_feeds_the_replicas_advertise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("zmq")
    from cacheroute.events import BlockStored, KVEventPublisher

    pubs = {k: KVEventPublisher("tcp://127.0.0.1:*") for k in (A, B)}
    feeds = {k: kv_events_routing_stats(p.endpoint)[KV_EVENTS_STAT] for k, p in pubs.items()}
    core = RouterCore.from_config(
        name="precise", policy="work_aware", kv_events={"block_size": 4, "heartbeat": 0.1}
    )
    try:
        assert core.index is not None and core.policy.config.index is core.index  # type: ignore[attr-defined]
        core.sync([A, B], feeds)
        wait_for(
            lambda: (
                all(f["connected"] for f in core.stats()["kv_events"].values())
                and len(core.stats()["kv_events"]) == 2
            ),
            5,
            "both feeds connected",
        )
        time.sleep(0.05)  # the subscription reaches the PUB side just after the handshake
        # B's engine holds a prefix this router never routed anywhere
        prefix = list(range(1000, 1064))
        pubs[B].publish([BlockStored(list(range(16)), None, prefix, 4)])
        wait_for(lambda: core.index.match(prefix) == {B: 64}, 5, "B's report")  # type: ignore[union-attr]
        for q in range(3):
            assert core.choose(f"q{q}", [A, B], [*prefix, 7, q])[0] == [B]
            core.completed(f"q{q}", B)
        # B leaves while C advertises a feed the index refuses (an unknown key): B's
        # feed and view still go, A is kept, C is routed on the routed history
        with caplog.at_level("WARNING", logger="cacheroute.integrations.ray_serve"):
            core.sync([A, C], {A: feeds[A], C: {**feeds[A], "port": 5557}})
        assert "bad KV-event feed" in caplog.text
        assert core.index.urls() == [A]  # type: ignore[union-attr]
        caplog.clear()
        core.sync([A, C], {A: feeds[A]})  # a replica without a feed is fine
        assert core.index.urls() == [A]  # type: ignore[union-attr]
        # a malformed feed is logged and not followed, never raised
        with caplog.at_level("WARNING", logger="cacheroute.integrations.ray_serve"):
            core.sync([A, C], {A: feeds[A], C: {"endpoint": 5557}})
        assert "bad KV-event feed" in caplog.text and core.index.urls() == [A]  # type: ignore[union-attr]
        with caplog.at_level("WARNING", logger="cacheroute.integrations.ray_serve"):
            core.sync([A, C], {A: feeds[A], C: {"endpoint": "nope"}})
        assert "could not subscribe to" in caplog.text
        assert sorted(core.stats()["kv_events"]) == [A]
    finally:
        core.close()
        for p in pubs.values():
            p.close()
    assert core not in routers()
    with pytest.raises(TypeError, match="kv_events must be None or a mapping"):
        RouterCore.from_config(kv_events=[16])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"unknown config key.*index"):
        RouterCore.from_config(policy="shortest_queue", kv_events={"block_size": 16})


def test_without_kv_events_the_advertised_feeds_are_ignored() -> None:
    core = RouterCore.from_config(policy="work_aware")
    core.sync([A], {A: {"endpoint": "tcp://127.0.0.1:1"}})
    assert core.index is None and core.stats()["kv_events"] == {}
    core.close()


def test_metrics_wiring() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from cacheroute.metrics import RouterMetrics

    registry = prometheus_client.CollectorRegistry()
    metrics = RouterMetrics(registry)
    core, _ = core_of(A, B)
    core.enable_metrics(metrics)
    other, _ = core_of(C)
    other.enable_metrics(metrics)
    assert metrics.tracked_policy_labels() == ["cache_aware", "cache_aware#2"]
    core.choose("r1", [A, B], SYSTEM)
    text = prometheus_client.generate_latest(registry).decode()
    assert (
        f'cacheroute_decisions_total{{policy="cache_aware",reason="cache_miss",worker="{A}"}} 1.0'
        in text
    )
    assert f'cacheroute_worker_load{{model="default",worker="{A}"}} 1.0' in text
    core.completed("r1", A)
    core.sync([B])
    text = prometheus_client.generate_latest(registry).decode()
    assert f'worker="{A}"' not in text  # forgotten when it left
    assert f'cacheroute_worker_load{{model="default",worker="{C}"}} 0.0' in text


def test_prompt_extraction() -> None:
    chat = SimpleNamespace(  # like Ray Serve LLM's ChatCompletionRequest
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    parts = SimpleNamespace(
        prompt=None, messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, "!"]}]
    )

    assert prompt_from_call((), {"prompt": "p"}) == "p"
    assert prompt_from_call(("positional",), {}) == "positional"
    assert prompt_from_call(("positional",), {}, index=None) is None
    assert prompt_from_call((), {"text": "t"}, key="text") == "t"
    assert prompt_from_call(([1, 2, 3],), {}) == [1, 2, 3]
    assert prompt_from_call(((1, 2),), {}) == [1, 2]
    assert prompt_from_call((["a", 1],), {}) is None
    assert prompt_from_call((b"bytes",), {}) is None
    assert prompt_from_call((chat,), {}) == "system: Be brief.\nuser: Hi\n"
    assert prompt_from_call((parts,), {}) == "user: look!\n"
    assert prompt_from_call((), {}) is None
    assert prompt_from_body({"prompt": ["first", "second"]}) == "first"
    assert prompt_from_body({"prompt_token_ids": [5, 6], "prompt": "ignored"}) == [5, 6]
    assert prompt_from_body({"input_ids": [7]}) == [7]
    assert prompt_from_body({"messages": []}) is None
    assert prompt_from_body({"model": "m"}) is None


# =========================================================================== a real Ray Serve

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_serve_app.py"
APP = "cr"
GROUPS = 6
PER_GROUP = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], deadline_s: float, what: str) -> Any:
    end = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.2)


class Serve:
    """The running application: HTTP helpers against Ray's proxy."""

    def __init__(self, port: int, example: ModuleType) -> None:
        self.port = port
        self.example = example

    def post(self, prompt: str | list[int]) -> dict[str, Any]:
        answer: dict[str, Any] = self.example.post(self.port, {"prompt": prompt}, timeout=30)
        return answer

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            body: bytes = r.read()
            return body

    def stats(self) -> dict[str, Any]:
        (router,) = json.loads(self.get("/cacheroute/stats"))  # the ingress's one router
        return dict(router)


def group_prompt(g: int, q: int) -> str:
    return f"You are the assistant of application {g}. " * 12 + f"\nUser: question {q}?"


@pytest.fixture(scope="module")
def serve_app() -> Iterator[Serve]:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    pytest.importorskip("prometheus_client")
    from ray import serve

    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no telemetry from a test
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback test cluster: no token file
    spec = importlib.util.spec_from_file_location("ray_serve_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["ray_serve_app"] = example
    spec.loader.exec_module(example)
    # The example is not importable in Ray's workers: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(example)
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = example.build_app(
            3,
            "cache_aware",
            kv_events=True,  # precise mode for token-id prompts; text is routed as before
            engine_options={"health_check_period_s": 1, "graceful_shutdown_timeout_s": 1},
        )
        serve.run(app, name=APP, route_prefix="/")
        yield Serve(port, example)
    finally:
        serve.shutdown()
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(example)
        sys.modules.pop("ray_serve_app", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def send_groups(
    app: Serve, rounds: range, threads: int = GROUPS
) -> dict[int, list[dict[str, Any]]]:
    """One request per group per round, ``threads`` at a time; answers by group."""
    jobs = [(g, q) for q in rounds for g in range(GROUPS)]
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(lambda job: (job[0], app.post(group_prompt(*job))), jobs))
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for g, answer in answers:
        out[g].append(answer)
    return out


def all_idle(app: Serve) -> bool:
    stats = app.stats()
    return stats["in_flight"] == 0 and all(
        w["load"] == 0 and w["pending_prefill_tokens"] == 0 for w in stats["workers"]
    )


def test_ray_prefix_groups_stick_and_loads_return_to_zero(serve_app: Serve) -> None:
    first = send_groups(serve_app, range(1), threads=1)  # one miss per group, in turn
    rest = send_groups(serve_app, range(1, PER_GROUP))  # then 6 at a time
    home = {}
    for g in range(GROUPS):
        replicas = {a["replica"] for a in first[g] + rest[g]}
        assert len(replicas) == 1, f"group {g} was split over {replicas}"
        home[g] = replicas.pop()
        cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in rest[g]]
        assert min(cached) > 0, f"group {g} missed the cache after its first request"
    assert len(set(home.values())) == 3, f"6 groups on 3 idle replicas: {home}"
    wait_for(lambda: all_idle(serve_app), 10, "every load back to 0")
    stats = serve_app.stats()
    assert stats["policy"] == "cache_aware"
    assert sum(w["processed"] for w in stats["workers"]) == GROUPS * PER_GROUP
    assert {w["url"] for w in stats["workers"]} == set(home.values())


def test_ray_metrics_are_served_by_the_ingress(serve_app: Serve) -> None:
    text = serve_app.get("/metrics").decode()
    decided = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('cacheroute_decisions_total{policy="cache_aware"')
    )
    assert decided == GROUPS * PER_GROUP
    assert 'reason="cache_hit"' in text
    for name in (
        "cacheroute_predicted_cached_tokens_total",
        "cacheroute_engine_cached_tokens_total",
        "cacheroute_worker_load",
        "cacheroute_tree_size",
    ):
        assert f"\n{name}{{" in text, name

    def total(name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{")
        )

    # the prediction tracks what the engines report (text prompts: 4 characters a token)
    predicted, actual = (
        total("cacheroute_predicted_cached_tokens_total"),
        total("cacheroute_engine_cached_tokens_total"),
    )
    assert actual > 0 and 0.5 < predicted / actual < 2, (predicted, actual)


def test_ray_precise_mode_finds_what_another_router_placed(serve_app: Serve) -> None:
    # Two routers of one deployment: the ingress replica's (HTTP) and this test process's
    # (its own handle). A prefix the test's router places is found by the ingress's
    # router, which never routed it, through the engine's KV events.
    from ray import serve

    def feeds() -> dict[str, dict[str, Any]]:
        return dict(serve_app.stats()["kv_events"])

    serve_app.post("hello")  # the ingress's router is made by its first request
    wait_for(
        lambda: len(feeds()) == 3 and all(f["connected"] for f in feeds().values()),
        60,
        "the ingress's router following the 3 engines' feeds",
    )
    handle = serve.get_deployment_handle("Engine", app_name=APP)
    placed: set[str] = set()
    for g in range(4):
        prefix = [100_000 * (g + 1) + i for i in range(160)]  # 10 blocks of 16
        before = sum(f["batches"] for f in feeds().values())
        replica = handle.generate.remote(prompt=prefix).result(timeout_s=30)["replica"]
        placed.add(replica)
        wait_for(
            lambda before=before: sum(f["batches"] for f in feeds().values()) > before,
            10,
            "the engine's report of the placed prefix",
        )
        answer = serve_app.post([*prefix, 7, g])
        assert answer["replica"] == replica, f"prefix {g} placed on {replica}"
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 160
    assert len(placed) >= 2  # the test's router spread the new prefixes


def test_ray_a_killed_replica_is_routed_around_and_the_pool_follows(serve_app: Serve) -> None:
    import ray

    before = {w["url"] for w in serve_app.stats()["workers"]}
    victim = serve_app.post(group_prompt(0, 100))["replica"]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    served_after: dict[int, set[str]] = defaultdict(set)
    failures: list[str] = []
    deadline = time.monotonic() + 90

    def replaced() -> bool:
        stats = serve_app.stats()
        urls = {w["url"] for w in stats["workers"]}
        return len(urls) == 3 and victim not in urls and victim in stats["removed"]

    q = 200
    while True:  # keep the traffic going while Ray notices and replaces the replica
        for g in range(GROUPS):
            try:
                served_after[g].add(serve_app.post(group_prompt(g, q))["replica"])
            except (urllib.error.URLError, TimeoutError) as exc:
                failures.append(f"group {g}: {exc}")
        q += 1
        if replaced():
            break
        assert time.monotonic() < deadline, "Ray did not replace the killed replica in 90 s"
    assert not failures, failures
    assert victim not in set().union(*served_after.values())
    urls = {w["url"] for w in serve_app.stats()["workers"]}
    assert len(urls - before) == 1  # the replacement

    # after the churn the groups stick again, the victim's group included
    again = send_groups(serve_app, range(300, 303))
    for g in range(GROUPS):
        assert len({a["replica"] for a in again[g]}) == 1, g
    wait_for(lambda: all_idle(serve_app), 10, "every load back to 0 after the churn")


class _Garbage(LoadBalancingPolicy):
    """A user policy whose decide() returns a fixed, possibly garbage, Decision."""

    name = "garbage"

    def __init__(self, **fields: object) -> None:
        self.fields = fields

    def select_worker(self, workers: Sequence[Worker], request_text: object = None) -> int:
        return 0

    def decide(self, workers: Sequence[Worker], request_text: object = None) -> Decision:
        fields = {"index": 0, "url": workers[0].url, "reason": "policy", **self.fields}
        return Decision(**fields)  # type: ignore[arg-type]


def test_a_policy_returning_a_bad_index_is_refused_not_obeyed() -> None:
    # acquire() refuses an index that is not one of the workers ("must fail loudly, before
    # any load is taken"); the core must too, not route to candidates[-1] or raise IndexError.
    for index in (-1, 2, True):
        core = RouterCore(_Garbage(index=index), name="garbage")
        core.sync([A, B])
        with pytest.raises(ValueError, match="garbage"):
            core.choose("r1", [A, B], "x")
        assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0, index


def test_a_refused_decision_is_not_counted_in_the_metrics() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from cacheroute.metrics import RouterMetrics

    registry = prometheus_client.CollectorRegistry()
    metrics = RouterMetrics(registry)
    core = RouterCore(_Garbage(prompt_tokens=-5), name="garbage")
    core.sync([A, B])
    core.enable_metrics(metrics)
    with pytest.raises(ValueError, match="prompt_tokens"):  # refused when the lease is taken
        core.choose("r1", [A, B], "x")
    assert loads(core) == {"a": 0, "b": 0} and core.in_flight() == 0
    text = prometheus_client.generate_latest(registry).decode()
    assert "cacheroute_decisions_total{" not in text  # nothing was routed
    assert "cacheroute_prompt_tokens_total{" not in text  # and no counter went to -5


def test_enable_metrics_keeps_the_on_decision_observer_given_to_the_core() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from cacheroute.metrics import RouterMetrics

    seen: list[Decision] = []
    core = RouterCore(make_policy("cache_aware"), name="test", on_decision=seen.append)
    core.sync([A, B])
    core.enable_metrics(RouterMetrics(prometheus_client.CollectorRegistry()))
    core.choose("r1", [A, B], SYSTEM)
    assert len(seen) == 1  # the caller's observer still receives each decision
    core.completed("r1", A)


def test_routers_enabling_metrics_on_several_threads_each_get_a_label() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from cacheroute.metrics import RouterMetrics

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors: list[BaseException] = []
    try:
        for _ in range(100):
            metrics = RouterMetrics(prometheus_client.CollectorRegistry())
            cores = [RouterCore(make_policy("cache_aware")) for _ in range(4)]
            barrier = threading.Barrier(len(cores))

            def enable(
                core: RouterCore, metrics: Any = metrics, barrier: threading.Barrier = barrier
            ) -> None:
                barrier.wait()
                try:
                    core.enable_metrics(metrics)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=enable, args=(c,)) for c in cores]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                break
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]


def test_a_closed_router_leaves_the_metrics() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from cacheroute.metrics import RouterMetrics

    registry = prometheus_client.CollectorRegistry()
    metrics = RouterMetrics(registry)
    core, _ = core_of(A, B)
    core.enable_metrics(metrics)
    core.choose("r1", [A, B], SYSTEM)
    core.completed("r1", A)
    core.close()
    text = prometheus_client.generate_latest(registry).decode()
    assert "cacheroute_tree_size{" not in text, "a closed router's tree is still exported"
    assert "cacheroute_worker_load{" not in text, "a closed router's replicas are still exported"
    assert metrics.tracked_policy_labels() == []
    again, _ = core_of(A, B)  # the router rebuilt: it gets its label back
    again.enable_metrics(metrics)
    assert metrics.tracked_policy_labels() == ["cache_aware"]


def test_policy_config_must_be_a_mapping() -> None:
    for bad in ([("cache_threshold", 0.9)], "abc", 0, False, []):
        with pytest.raises(TypeError, match="policy_config"):
            RouterCore.from_config(policy="cache_aware", policy_config=bad)  # type: ignore[arg-type]


def test_a_negative_prompt_arg_is_refused() -> None:
    pytest.importorskip("ray.serve")
    from cacheroute.integrations.ray_serve import request_router_config

    with pytest.raises(ValueError, match="prompt_arg"):
        request_router_config("cache_aware", prompt_arg=-1)
    with pytest.raises(ValueError, match="index"):
        prompt_from_call(("the prompt",), {}, index=-1)
