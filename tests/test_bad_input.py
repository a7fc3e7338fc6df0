"""Every public callable refuses wrong arguments, naming the parameter, and changes nothing.

The matrix: every callable reachable from the ``__all__`` of every public module (functions,
classes, and the public methods of those classes) x every parameter x the wrong values for
that parameter's kind (``None``, a number, ``bytes``, a ``str``, a generator, ``[[1]]``,
``{}``, NaN, a ``bool`` where a number is expected...). A valid call is built from the
table below (:data:`TABLE`); each wrong value replaces one argument of it, and the call
must raise ``TypeError`` or ``ValueError`` whose message names the parameter, leaving the
state (workers' loads, a policy's trees, the registry...) as it was.

A parameter's kind is read from its annotation (``int``, ``Sequence[Worker]``...) unless
the entry says otherwise. A public callable with neither an entry nor an exemption in
:data:`EXEMPT` fails :func:`test_every_public_callable_has_an_entry`, so nothing new can
skip validation unnoticed.

Cases that still fail in files owned elsewhere are marked ``xfail(strict=True)`` with the
owner's name: they turn into failures the moment they are fixed, so the mark is removed.
"""

from __future__ import annotations

import importlib
import inspect
import io
import math
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import CLAUDE, MOONCAKE

import cacheroute
from cacheroute import (
    BasicWorker,
    CacheAwareConfig,
    CacheAwarePolicy,
    PairPolicy,
    Tree,
    WorkerType,
    acquire,
    acquire_pair,
    make_policy,
)
from cacheroute.policies import registry
from cacheroute.policies.base import LoadBalancingPolicy
from cacheroute.policies.prefix_hash import PrefixHashConfig, PrefixHashPolicy
from cacheroute.policies.work_aware import WorkAwareConfig, WorkAwarePolicy

# --------------------------------------------------------------------------- wrong values


def _gen() -> Iterator[int]:
    return (x for x in [1])


# name -> factory (a fresh value per call: a generator is consumed once)
VALUES: dict[str, Callable[[], object]] = {
    "None": lambda: None,
    "int": lambda: 3,
    "fd_int": lambda: 10**9,  # an int path is a file descriptor to open(): never a real one
    "float": lambda: 2.5,
    "nan": lambda: math.nan,
    "bool": lambda: True,
    "str": lambda: "abc",
    "empty_str": lambda: "",
    "url_str": lambda: "http://w0",
    "bytes": lambda: b"x",
    "generator": _gen,
    "nested": lambda: [[1]],
    "dict": lambda: {},
    "object": lambda: object(),
}

_NOT_NUMBER = ["str", "bytes", "generator", "nested", "dict", "object"]
# kind -> the values that must be refused
KINDS: dict[str, list[str]] = {
    "int": ["None", "float", "nan", "bool", *_NOT_NUMBER],
    "int|None": ["float", "nan", "bool", *_NOT_NUMBER],
    "real": ["None", "nan", "bool", *_NOT_NUMBER],
    "real|None": ["nan", "bool", *_NOT_NUMBER],
    "bool": ["None", "int", "float", "str", "bytes", "nested", "dict"],
    "bool|None": ["int", "float", "str", "bytes", "nested", "dict"],
    "str": ["None", "int", "bool", "bytes", "generator", "nested", "dict", "object"],
    "str|None": ["int", "bool", "bytes", "generator", "nested", "dict", "object"],
    "choice": ["None", "int", "bool", "str", "bytes", "nested", "dict"],
    # not True: open(True) is open(1), the test process's own stdout, which a path callable
    # that lost its check would close (tests/test_sim_faults.py checks True without opening)
    "path": ["None", "fd_int", "nested", "dict", "object"],
    "workers": ["None", "int", "bool", "str", "empty_str", "bytes", "generator", "nested", "dict"],
    # a function that answers a question about the list ("all BasicWorkers?") answers
    # False for [[1]]: only the container must be right
    "workers_container": ["None", "int", "bool", "str", "empty_str", "bytes", "generator", "dict"],
    "worker": ["None", "int", "url_str", "bytes", "nested", "dict", "object"],
    "policy": ["None", "int", "str", "bytes", "nested", "dict", "object"],
    "policy|None": ["int", "str", "bytes", "nested", "dict", "object"],
    "callable": ["None", "int", "str", "bytes", "nested", "dict"],
    "callable|None": ["int", "str", "bytes", "nested", "dict"],
    # request_text: policies that ignore it check the container only (O(1), by design)
    "request_text": ["int", "nan", "bool", "bytes", "generator", "dict", "object"],
    # ...policies that read token ids also refuse ids that are not ints
    "request_text_ids": ["int", "nan", "bool", "bytes", "generator", "dict", "object", "nested"],
    "units": ["None", "int", "nan", "bool", "bytes", "generator", "dict", "object", "nested"],
    "sequence": ["None", "int", "bool", "str", "bytes", "generator", "dict", "object"],
    "sequence|None": ["int", "bool", "str", "bytes", "generator", "dict", "object"],
    "instance": ["None", "int", "str", "bytes", "nested", "dict", "object"],
    "instance|None": ["int", "str", "bytes", "nested", "dict", "object"],
    "mapping": ["None", "int", "str", "bytes", "nested", "object"],
    "mapping|None": ["int", "str", "bytes", "nested", "object"],
    "bytes": ["None", "int", "bool", "str", "generator", "nested", "dict", "object"],
}

_ANNOTATIONS: dict[str, str] = {
    "int": "int",
    "int | None": "int|None",
    "float": "real",
    "float | None": "real|None",
    "bool": "bool",
    "bool | None": "bool|None",
    "str": "str",
    "str | None": "str|None",
    "Sequence[Worker]": "workers",
    "Worker": "worker",
    "LoadBalancingPolicy": "policy",
    "RequestText": "request_text",
    "Units": "units",
    "TreeKind": "choice",
    "ImbalanceMode": "choice",
    "IndexMode": "choice",
    "Mapping[str, Any] | None": "mapping|None",
    "str | os.PathLike[str]": "path",
    "DecisionObserver | None": "callable|None",
    "Callable[[int], None] | None": "callable|None",
}


def _kind(annotation: str) -> str | None:
    if annotation in _ANNOTATIONS:
        return _ANNOTATIONS[annotation]
    if annotation.startswith(("Sequence[", "list[", "tuple[")):
        return "sequence"
    if annotation.startswith("dict["):
        return "mapping"
    if annotation.endswith("| None") and annotation[:1].isupper():
        return "instance|None"
    if annotation[:1].isupper():
        return "instance"
    return None


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One valid call: ``call(**good)``; ``state()`` snapshots what must not change."""

    call: Callable[..., Any]
    good: dict[str, Any]
    state: Callable[[], object] = lambda: None
    cleanup: Callable[[], None] = lambda: None


@dataclass
class Entry:
    setup: Callable[[], Case]
    kinds: dict[str, str | None] = field(default_factory=dict)  # None: not tested here
    xfail: dict[str, str] = field(default_factory=dict)  # param -> "owner: what"


def _ws(n: int = 2, **kw: Any) -> list[BasicWorker]:
    return [BasicWorker(f"http://w{i}", **kw) for i in range(n)]


def _snapshot(workers: list[BasicWorker], policy: LoadBalancingPolicy | None = None) -> object:
    state: list[object] = [
        (w.load(), w.processed(), w.pending_prefill_tokens(), w.decode_tokens(), w.is_healthy())
        for w in workers
    ]
    for p in (policy, getattr(policy, "prefill", None), getattr(policy, "decode", None)):
        if isinstance(p, CacheAwarePolicy):
            trees = {k: sorted(t.used_size_per_tenant().items()) for k, t in p._trees.items()}
            state.append((trees, sorted(p.removed_urls()), sorted(p._known)))
    return state


POLICY_FACTORIES: dict[str, Callable[[], LoadBalancingPolicy]] = {
    "cacheroute.policies.round_robin.RoundRobinPolicy": lambda: make_policy("round_robin"),
    "cacheroute.policies.random.RandomPolicy": lambda: make_policy("random", seed=1),
    "cacheroute.policies.power_of_two.PowerOfTwoPolicy": lambda: make_policy("power_of_two"),
    "cacheroute.policies.shortest_queue.ShortestQueuePolicy": lambda: make_policy("shortest_queue"),
    "cacheroute.policies.cache_aware.CacheAwarePolicy": CacheAwarePolicy,
    "cacheroute.policies.pair.PairPolicy": lambda: PairPolicy(
        CacheAwarePolicy(), make_policy("shortest_queue")
    ),
    # the base classes' own methods, on a subclass that does not override them
    "cacheroute.policies.base.LoadBalancingPolicy": lambda: make_policy("shortest_queue"),
    "cacheroute.policies.prefix.PrefixPolicy": CacheAwarePolicy,
    "cacheroute.policies.work_aware.WorkAwarePolicy": WorkAwarePolicy,
    "cacheroute.policies.prefix_hash.PrefixHashPolicy": PrefixHashPolicy,
}


def _policy_method(cls_key: str, method: str) -> Entry:
    def setup() -> Case:
        policy = POLICY_FACTORIES[cls_key]()
        ws = _ws(2)
        prefill = _ws(1, worker_type=WorkerType.PREFILL)
        decode = _ws(1, worker_type=WorkerType.DECODE)
        policy.select_worker(ws, "warm the trees: hello")  # some state to keep intact
        goods: dict[str, dict[str, Any]] = {
            "select_worker": {"workers": ws, "request_text": "hello"},
            "decide": {"workers": ws, "request_text": "hello"},
            "can_decide": {"workers": ws, "request_text": "hello"},
            "select_worker_pair": {
                "prefill_workers": prefill,
                "decode_workers": decode,
                "request_text": "hello",
            },
            "decide_pair": {
                "prefill_workers": prefill,
                "decode_workers": decode,
                "request_text": "hello",
            },
            "on_request_complete": {"worker_url": "http://w0", "success": True},
            "on_worker_added": {"worker": ws[0]},
            "on_worker_removed": {"worker": ws[0]},
            "add_worker": {"worker": ws[0]},
            "remove_worker": {"worker": ws[0]},
            "sync_workers": {"workers": ws},
            "tree": {"model_id": "default", "kind": "text", "create": False},
            "tokens_per_unit": {"kind": "text"},
            "worker_tree_limit": {"kind": "text"},
        }
        everything = ws + prefill + decode
        return Case(getattr(policy, method), goods[method], lambda: _snapshot(everything, policy))

    reads_ids = cls_key.endswith(("CacheAwarePolicy", "PrefixPolicy", "PairPolicy"))
    kinds: dict[str, str | None] = {"request_text": "request_text_ids"} if reads_ids else {}
    return Entry(setup, kinds)


POLICY_METHODS = (
    "select_worker",
    "decide",
    "can_decide",
    "select_worker_pair",
    "decide_pair",
    "on_request_complete",
    "on_worker_added",
    "on_worker_removed",
    "add_worker",
    "remove_worker",
    "sync_workers",
    "tree",
    "tokens_per_unit",
    "worker_tree_limit",
)


def _fn(call: Callable[..., Any], **good: Any) -> Entry:
    return Entry(lambda: Case(call, dict(good)))


def _with_workers(call: Callable[..., Any], **kinds: str | None) -> Entry:
    def setup() -> Case:
        ws = _ws(2)
        return Case(call, {"workers": ws}, lambda: _snapshot(ws))

    return Entry(setup, dict(kinds))


def _lease_release() -> Case:
    ws = _ws(1)
    lease = acquire(make_policy("round_robin"), ws, [1] * 10)
    return Case(lease.release, {"success": True}, lambda: (lease.released, _snapshot(ws)))


def _pair_release() -> Case:
    ws = _ws(2)
    lease = acquire_pair(make_policy("round_robin"), ws[:1], ws[1:], [1] * 10)
    return Case(lease.release, {"success": True}, lambda: (lease.released, _snapshot(ws)))


def _acquire(policy: str) -> Entry:
    def setup() -> Case:
        ws = _ws(2)
        p = make_policy(policy)
        return Case(
            lambda **kw: acquire(**kw),
            {"policy": p, "workers": ws, "request_text": "hello", "prompt_tokens": None},
            lambda: _snapshot(ws, p),
        )

    kinds: dict[str, str | None] = {"request_text": "request_text_ids"}
    if policy != "cache_aware":
        kinds["request_text"] = "request_text"
    return Entry(setup, kinds)


def _acquire_pair() -> Case:
    ws = _ws(2)
    p = make_policy("round_robin")
    return Case(
        lambda **kw: acquire_pair(**kw),
        {
            "policy": p,
            "prefill_workers": ws[:1],
            "decode_workers": ws[1:],
            "request_text": "hi",
            "prompt_tokens": None,
        },
        lambda: _snapshot(ws),
    )


def _tree_method(method: str, **good: Any) -> Entry:
    def setup() -> Case:
        tree = Tree()
        tree.insert("hello world", "a")
        tree.insert("help", "b")

        def state() -> object:
            return (tree.total_size(), sorted(tree.used_size_per_tenant().items()))

        return Case(getattr(tree, method), dict(good), state)

    return Entry(setup)


def _tree_insert_match() -> Case:
    case = _tree_method("insert_match").setup()
    tree = case.call.__self__
    return Case(case.call, {"match": tree.match("hello you"), "tenant": "c"}, case.state)


def _tree_shared_length() -> Case:
    case = _tree_method("shared_length").setup()
    tree = case.call.__self__
    return Case(case.call, {"match": tree.match("hello you")}, case.state)


def _registry(call: Callable[..., Any], **good: Any) -> Entry:
    def setup() -> Case:
        saved = dict(registry._registry)

        def cleanup() -> None:
            registry._registry.clear()
            registry._registry.update(saved)

        return Case(call, dict(good), lambda: sorted(registry._registry.items()), cleanup)

    return Entry(setup, {"cls": "instance"})


class _Custom(LoadBalancingPolicy):
    name = "bad_input_custom"

    def select_worker(self, workers: Any, request_text: Any = None) -> int | None:
        return None


def _sim() -> Any:
    from cacheroute import sim

    return sim


def _tiny_workload() -> Any:
    return _sim().chat(users=2, rounds=2, system_tokens=32, question_tokens=16, answer_tokens=8)


def _run_result() -> Any:
    return _sim().simulate(_tiny_workload(), "round_robin", workers=2)


def _summary() -> Any:
    return _sim().summarize(_run_result())


def _engine() -> Any:
    from cacheroute.sim.engine import Engine, EngineConfig

    wl = _tiny_workload()
    n = len(wl.requests)
    return Engine(0, EngineConfig(), list(wl.requests), [0.0] * n, [0] * n)


def _request() -> Any:
    return _tiny_workload().requests[0]


def _worker_case(method: str, **good: Any) -> Case:
    w = BasicWorker("http://w0")
    w.add_work(5, 5)
    return Case(getattr(w, method), good, lambda: _snapshot([w]))


_TMP: list[str] = []


def _tmpdir() -> str:
    if not _TMP:
        import tempfile

        _TMP.append(tempfile.mkdtemp(prefix="cacheroute-bad-input-"))
    return _TMP[0]


def _kit() -> Any:
    import cacheroute.testing as kit

    return kit


def _case(call: Callable[..., Any], **good: Any) -> Entry:
    return Entry(lambda: Case(call(), dict(good)))


def _ray_serve() -> Any:
    return importlib.import_module("cacheroute.integrations.ray_serve")


def _ray_state() -> Any:
    return importlib.import_module("cacheroute.integrations.ray_serve_state")


def _router_core() -> Case:
    state = _ray_state()
    return Case(
        state.RouterCore,
        {"policy": make_policy("round_robin"), "model_id": "m", "name": "n", "on_decision": None},
        lambda: state._created[0],  # how many cores registered themselves
    )


class _StatsIndex:
    def stats(self) -> dict[str, int]:
        return {"events_applied_total": 1}


def _metrics_state(metrics: Any) -> object:
    import prometheus_client

    s = metrics._state
    return (
        prometheus_client.generate_latest(metrics.registry),
        sorted(metrics._observers),
        (len(s._workers), s.policy_labels(), [name for name, _ in s._indexes]),
    )


def _router_metrics() -> Case:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    return Case(
        importlib.import_module("cacheroute.metrics").RouterMetrics,
        {"registry": registry, "namespace": "t", "policy": "p"},
        lambda: sorted(registry._names_to_collectors),
    )


def _metrics_method(method: str, **kinds: str | None) -> Entry:
    def setup() -> Case:
        import prometheus_client

        from cacheroute.policies.base import Decision

        metrics = importlib.import_module("cacheroute.metrics").RouterMetrics(
            prometheus_client.CollectorRegistry(), namespace="t"
        )
        ws = _ws(2)
        decision = Decision(0, "http://w0", "cache_hit", request_units=4, matched_units=2)
        metrics.observe(decision)  # some state to keep intact
        metrics.record_engine_usage("http://w0", 10, 5)
        goods: dict[str, dict[str, Any]] = {
            "forget_worker": {"worker_url": "http://w0"},
            "observe": {"decision": decision},
            "observer": {"policy": "prefill"},
            "record_engine_usage": {
                "worker_url": "http://w0",
                "prompt_tokens": 8,
                "cached_tokens": 4,
            },
            "track_index": {"index": _StatsIndex(), "name": "kv"},
            "track_policy": {"policy": make_policy("round_robin"), "name": "rr"},
            "track_workers": {"workers": ws},
        }
        return Case(getattr(metrics, method), goods[method], lambda: _metrics_state(metrics))

    return Entry(setup, dict(kinds))


# ---- cacheroute.events (the events extra: pyzmq + msgpack)


def _events() -> Any:
    return importlib.import_module("cacheroute.events")


def _index_state(index: Any) -> object:
    stats = {k: v.__dict__ for k, v in index.stats().items()}  # a constant clock
    probe = [index.match(list(range(8))), index.match(list(range(8)), lora_name="a")]
    return index.urls(), stats, probe, sorted(index._subs), repr(index)


def _index_method(method: str, **kinds: str | None) -> Entry:
    def setup() -> Case:
        ev = _events()
        index = ev.KVEventIndex(block_size=4, clock=lambda: 100.0)
        stored = ev.BlockStored([1, 2], None, list(range(8)), 4)
        index.apply("http://w0", 0, ev.encode_batch([stored]))  # some state to keep intact
        goods: dict[str, dict[str, Any]] = {
            "apply": {"url": "http://w0", "seq": 1, "payload": ev.encode_batch([])},
            "block_size": {"url": "http://w0"},
            "forget": {"url": "http://w0"},
            "is_stale": {"url": "http://w0"},
            "match": {"token_ids": list(range(8))},
            "subscribe": {"url": "http://w1", "endpoint": "tcp://127.0.0.1:1"},
            "sync_subscriptions": {"feeds": {"http://w1": {"endpoint": "tcp://127.0.0.1:1"}}},
            "touch": {"url": "http://w0"},
            "unsubscribe": {"url": "http://w0"},
        }
        return Case(getattr(index, method), goods[method], lambda: _index_state(index), index.close)

    return Entry(setup, dict(kinds))


def _index_new() -> Case:
    made: list[Any] = []

    def call(**kw: Any) -> None:
        made.append(_events().KVEventIndex(**kw))

    return Case(call, {"block_size": 16}, lambda: len(made))


def _publisher_new() -> Case:
    made: list[Any] = []

    def call(**kw: Any) -> None:
        made.append(_events().KVEventPublisher(**kw))

    def cleanup() -> None:
        for p in made:
            p.close()

    return Case(call, {"endpoint": "tcp://127.0.0.1:*"}, lambda: len(made), cleanup)


def _publisher_method(method: str, **kinds: str | None) -> Entry:
    def setup() -> Case:
        ev = _events()
        pub = ev.KVEventPublisher("tcp://127.0.0.1:*")
        pub.publish([ev.AllBlocksCleared()])  # some state to keep intact
        goods: dict[str, dict[str, Any]] = {
            "publish": {"events": [ev.BlockRemoved([1])]},
            "publish_raw": {"payload": ev.encode_batch([])},
        }
        state = lambda: (pub.next_seq, list(pub._buffer))  # noqa: E731
        return Case(getattr(pub, method), goods[method], state, pub.close)

    return Entry(setup, dict(kinds))


def _events_fn(name: str, **good: Any) -> Entry:
    return Entry(lambda: Case(getattr(_events(), name), dict(good)))


_EVENTS_TABLE: dict[str, Entry] = {
    "cacheroute.events.index.KVEventIndex": Entry(_index_new, {"clock": "callable"}),
    "cacheroute.events.index.KVEventIndex.apply": _index_method("apply"),
    "cacheroute.events.index.KVEventIndex.block_size": _index_method("block_size"),
    "cacheroute.events.index.KVEventIndex.forget": _index_method("forget"),
    "cacheroute.events.index.KVEventIndex.is_stale": _index_method("is_stale"),
    # token ids: a sequence of ints, refused like a Tree's units
    "cacheroute.events.index.KVEventIndex.match": _index_method(
        "match", token_ids="units", extra_keys="sequence|None"
    ),
    "cacheroute.events.index.KVEventIndex.subscribe": _index_method("subscribe"),
    "cacheroute.events.index.KVEventIndex.sync_subscriptions": _index_method(
        "sync_subscriptions", feeds="mapping"
    ),
    "cacheroute.events.index.KVEventIndex.touch": _index_method("touch"),
    "cacheroute.events.index.KVEventIndex.unsubscribe": _index_method("unsubscribe"),
    "cacheroute.events.publisher.KVEventPublisher": Entry(_publisher_new),
    "cacheroute.events.publisher.KVEventPublisher.publish": _publisher_method(
        "publish", shape="choice"
    ),
    "cacheroute.events.publisher.KVEventPublisher.publish_raw": _publisher_method(
        "publish_raw", payload="bytes"
    ),
    "cacheroute.events.subscriber.dp_endpoint": _events_fn(
        "dp_endpoint", endpoint="tcp://h:5557", dp_rank=1
    ),
    "cacheroute.events.wire.decode_batch": Entry(
        lambda: Case(_events().decode_batch, {"payload": _events().encode_batch([])}),
        {"payload": "bytes"},
    ),
    "cacheroute.events.wire.encode_batch": Entry(
        lambda: Case(_events().encode_batch, {"events": [_events().AllBlocksCleared()]}),
        {"shape": "choice"},
    ),
}


TABLE: dict[str, Entry] = {
    # ---- cacheroute.worker
    "cacheroute.worker.BasicWorker": Entry(
        lambda: Case(
            BasicWorker,
            {"url": "http://w0", "worker_type": WorkerType.PREFILL, "bootstrap_port": 9000},
        ),
        {"url": "str", "worker_type": "instance", "bootstrap_port": "int|None"},
    ),
    "cacheroute.worker.BasicWorker.set_healthy": Entry(
        lambda: _worker_case("set_healthy", healthy=False)
    ),
    "cacheroute.worker.BasicWorker.add_work": Entry(
        lambda: _worker_case("add_work", prefill_tokens=1, decode_tokens=1)
    ),
    "cacheroute.worker.all_basic": _with_workers(
        cacheroute.worker.all_basic, workers="workers_container"
    ),
    "cacheroute.worker.read_loads": _with_workers(cacheroute.worker.read_loads),
    "cacheroute.worker.read_work": _with_workers(cacheroute.worker.read_work),
    # ---- cacheroute.lease
    "cacheroute.lease.Lease.release": Entry(_lease_release),
    "cacheroute.lease.PairLease.release": Entry(_pair_release),
    "cacheroute.lease.acquire": _acquire("round_robin"),
    "cacheroute.lease.acquire[cache_aware]": _acquire("cache_aware"),
    "cacheroute.lease.acquire_pair": Entry(_acquire_pair),
    # ---- cacheroute.policies.base and registry
    "cacheroute.policies.base.check_request_text": _fn(
        cacheroute.policies.check_request_text, request_text="x"
    ),
    "cacheroute.policies.base.check_token_ids": Entry(
        lambda: Case(cacheroute.policies.base.check_token_ids, {"request_text": [1, 2]}),
        {"request_text": "request_text_ids"},
    ),
    "cacheroute.policies.base.check_workers": _with_workers(
        cacheroute.policies.check_workers,
        param=None,  # param: the name used in messages
    ),
    "cacheroute.policies.base.estimate_tokens": _fn(
        cacheroute.policies.estimate_tokens, request_text="x"
    ),
    "cacheroute.policies.base.healthy_indices": _with_workers(cacheroute.policies.healthy_indices),
    "cacheroute.policies.base.least_loaded_index": _with_workers(
        cacheroute.policies.least_loaded_index
    ),
    "cacheroute.policies.registry.make_policy": _fn(make_policy, name="round_robin"),
    "cacheroute.policies.registry.policy_class": _fn(
        cacheroute.policies.policy_class, name="round_robin"
    ),
    "cacheroute.policies.registry.register_policy": _registry(
        cacheroute.register_policy, name="bad_input_custom", cls=_Custom, replace=False
    ),
    # ---- policy constructors
    "cacheroute.policies.cache_aware.CacheAwareConfig": Entry(
        lambda: Case(CacheAwareConfig, {}),
        {"balance_rel_threshold": "real", "imbalance_mode": "choice"},
    ),
    "cacheroute.policies.cache_aware.CacheAwarePolicy": Entry(
        lambda: Case(CacheAwarePolicy, {}),
        {"config": "instance|None"},
    ),
    "cacheroute.policies.work_aware.WorkAwareConfig": Entry(
        lambda: Case(WorkAwareConfig, {}), {"index_mode": "choice"}
    ),
    "cacheroute.policies.work_aware.WorkAwarePolicy": Entry(
        lambda: Case(WorkAwarePolicy, {}),
        {"config": "instance|None"},
    ),
    "cacheroute.policies.prefix_hash.PrefixHashConfig": Entry(lambda: Case(PrefixHashConfig, {})),
    "cacheroute.policies.prefix_hash.PrefixHashPolicy": Entry(
        lambda: Case(PrefixHashPolicy, {}),
        {"config": "instance|None"},
    ),
    "cacheroute.policies.pair.PairPolicy": _fn(
        PairPolicy, prefill=make_policy("random"), decode=make_policy("random")
    ),
    "cacheroute.policies.power_of_two.PowerOfTwoPolicy": _fn(
        cacheroute.policies.PowerOfTwoPolicy, seed=None
    ),
    "cacheroute.policies.random.RandomPolicy": _fn(cacheroute.policies.RandomPolicy, seed=None),
    # ---- cacheroute.tree
    "cacheroute.tree.Tree": Entry(
        lambda: Case(
            Tree,
            {"max_size": None, "max_size_per_tenant": None, "max_nodes": None, "token_bytes": 4},
        ),
        {"token_bytes": "int"},
    ),
    "cacheroute.tree.Tree.match": _tree_method("match", units="hello"),
    "cacheroute.tree.Tree.insert_match": Entry(_tree_insert_match),
    "cacheroute.tree.Tree.shared_length": Entry(_tree_shared_length),
    "cacheroute.tree.Tree.match_and_insert": Entry(
        _tree_method("match_and_insert", units="hello you", choose=lambda lengths: "c").setup,
        {"choose": "callable"},
    ),
    "cacheroute.tree.Tree.remove": _tree_method("remove", units="hello", tenant="a"),
    "cacheroute.tree.Tree.set_tenant_limit": _tree_method(
        "set_tenant_limit", tenant="a", max_units=5
    ),
    "cacheroute.tree.Tree.tenant_limit": _tree_method("tenant_limit", tenant="a"),
    "cacheroute.tree.Tree.max_nodes_for": _fn(
        Tree.max_nodes_for, memory_bytes=2**28, max_size=2**24, unit_bytes=4
    ),
    "cacheroute.tree.Tree.add_tenant": _tree_method("add_tenant", tenant="c"),
    "cacheroute.tree.Tree.evict_tenant_by_size": _tree_method("evict_tenant_by_size", max_units=99),
    "cacheroute.tree.Tree.insert": _tree_method("insert", units="hello there", tenant="a"),
    "cacheroute.tree.Tree.match_lengths": _tree_method("match_lengths", units="hello"),
    "cacheroute.tree.Tree.prefix_match": _tree_method("prefix_match", units="hello"),
    "cacheroute.tree.Tree.prefix_match_tenant": _tree_method(
        "prefix_match_tenant", units="hello", tenant="a"
    ),
    "cacheroute.tree.Tree.remove_tenant": _tree_method("remove_tenant", tenant="a"),
    "cacheroute.tree.Tree.size": _tree_method("size", tenant="a"),
    # ---- cacheroute.cli
    "cacheroute.cli.main": Entry(
        lambda: Case(cacheroute.cli.main, {"argv": ["policies"]}), {"argv": "sequence|None"}
    ),
    # ---- cacheroute.testing
    "cacheroute.testing.checks.check_policy": Entry(
        lambda: Case(_kit().check_policy, {"policy": "round_robin", "max_examples": 1}),
        {
            "policy": "policy",
            "checks": "sequence|None",  # and [] (would check nothing): below
            "settings": "instance|None",
            "worker_factory": "callable|None",
            "models": "int",
        },
    ),
    "cacheroute.testing._core.policy_factory": Entry(
        lambda: Case(_kit().policy_factory, {"policy": "round_robin"}), {"policy": "policy"}
    ),
    "cacheroute.testing.machine.PolicyStateMachine.for_policy": Entry(
        lambda: Case(_kit().PolicyStateMachine.for_policy, {"policy": "round_robin"}),
        {"policy": "policy", "worker_factory": "callable|None"},
    ),
    "cacheroute.testing.strategies.workers": Entry(
        lambda: Case(_kit().workers, {}),
        {
            "urls": "instance|None",
            "model_ids": "sequence",
            "worker_types": "sequence",
            "worker_factory": "callable|None",
        },
    ),
    "cacheroute.testing.strategies.clusters": Entry(
        lambda: Case(_kit().clusters, {}),
        {
            "models": "int",
            "worker_types": "sequence",
            "health": "choice",
            "worker_factory": "callable|None",
        },
    ),
    "cacheroute.testing.strategies.request_texts": Entry(
        lambda: Case(_kit().request_texts, {}), {"prompts": "sequence|None"}
    ),
    "cacheroute.testing.strategies.token_ids": Entry(
        lambda: Case(_kit().token_ids, {}), {"containers": "sequence"}
    ),
    "cacheroute.testing.strategies.request_streams": Entry(
        lambda: Case(_kit().request_streams, {}), {"kinds": "choice"}
    ),
    # ---- cacheroute.sim
    "cacheroute.sim.engine.EngineConfig": Entry(lambda: Case(_sim().EngineConfig, {})),
    "cacheroute.sim.engine.EngineConfig.prefill_time": _case(
        lambda: _sim().EngineConfig().prefill_time, new_tokens=10, attention_units=1.0
    ),
    "cacheroute.sim.engine.EngineConfig.decode_step_time": _case(
        lambda: _sim().EngineConfig().decode_step_time, batch=2, context_tokens=10
    ),
    "cacheroute.sim.engine.Engine.enqueue": _case(lambda: _engine().enqueue, rid=0, now=0.0),
    "cacheroute.sim.engine.Engine.boundary": _case(lambda: _engine().boundary, now=0.0),
    "cacheroute.sim.request.Request": Entry(
        lambda: Case(
            _sim().Request,
            {
                "arrival": 0.0,
                "blocks": (1, 2),
                "block_size": 16,
                "span_tokens": 32,
                "input_tokens": 40,
                "output_tokens": 4,
            },
        ),
        {"blocks": "sequence"},
    ),
    "cacheroute.sim.request.Request.hit_tokens": _case(lambda: _request().hit_tokens, matched=1),
    "cacheroute.sim.request.Workload": Entry(
        lambda: Case(_sim().Workload, {"name": "w", "requests": [_request()], "params": {}})
    ),
    "cacheroute.sim.request.Workload.limited": _case(lambda: _tiny_workload().limited, limit=2),
    "cacheroute.sim.request.Workload.scaled": _case(lambda: _tiny_workload().scaled, speed=2.0),
    "cacheroute.sim.request.ideal_hit_tokens": Entry(
        lambda: Case(_sim().ideal_hit_tokens, {"requests": list(_tiny_workload().requests)})
    ),
    "cacheroute.sim.request.matched_blocks": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.request").matched_blocks,
            {"blocks": [1, 2], "present": {1}},
        ),
        {"present": "mapping"},  # a dict or a set of block ids
    ),
    "cacheroute.sim.simulator.simulate": Entry(
        lambda: Case(
            _sim().simulate, {"workload": _tiny_workload(), "policy": "round_robin", "workers": 2}
        ),
        {"policy": "instance"},
    ),
    "cacheroute.sim.simulator.compare": Entry(
        lambda: Case(
            _sim().compare,
            {
                "workload": _tiny_workload(),
                "policies": [_sim().PolicySpec("round_robin")],
                "workers": 2,
            },
        ),
    ),
    "cacheroute.sim.metrics.summarize": Entry(
        lambda: Case(_sim().summarize, {"result": _run_result(), "ideal_hits": None})
    ),
    "cacheroute.sim.metrics.percentile": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.metrics").percentile,
            {"values": [1.0, 2.0], "q": 50.0},
        )
    ),
    "cacheroute.sim.progress.ProgressBar": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.progress").ProgressBar,
            {"total": 3, "stream": io.StringIO(), "enabled": False},
        ),
        {"stream": "instance|None"},
    ),
    "cacheroute.sim.progress.ProgressBar.update": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.progress")
            .ProgressBar(3, stream=io.StringIO(), enabled=False)
            .update,
            {"done": 1},
        )
    ),
    "cacheroute.sim.report.format_table": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.report").format_table,
            {"summaries": [_summary()], "title": "t"},
        )
    ),
    "cacheroute.sim.report.plot_results": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.report").plot_results,
            {"path": str(Path(_tmpdir()) / "p.png"), "results": [_run_result()], "title": "t"},
        )
    ),
    "cacheroute.sim.report.to_json": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.report").to_json,
            {"summaries": [_summary()], "config": {}},
        )
    ),
    "cacheroute.sim.report.write_json": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.report").write_json,
            {"path": str(Path(_tmpdir()) / "out.json"), "doc": {}},
        )
    ),
    "cacheroute.sim.specs.PolicySpec": Entry(
        lambda: Case(_sim().PolicySpec, {"name": "round_robin", "config": (), "label": ""}),
        {"config": "sequence"},
    ),
    "cacheroute.sim.specs.PolicySpec.build": _case(
        lambda: _sim().PolicySpec("random").build, seed=None
    ),
    "cacheroute.sim.specs.PolicySpec.parse": _fn(
        lambda **kw: _sim().PolicySpec.parse(**kw), text="round_robin"
    ),
    "cacheroute.sim.specs.parse_policy_list": _fn(
        lambda **kw: _sim().parse_policy_list(**kw), text="round_robin,random"
    ),
    "cacheroute.sim.specs.load_plugin": Entry(
        lambda: Case(
            importlib.import_module("cacheroute.sim.specs").load_plugin,
            {"plugin": "cacheroute.policies.round_robin"},  # imported already: registers nothing
            lambda: sorted(registry._registry.items()),
        )
    ),
    "cacheroute.sim.traces.detect_format": _fn(
        lambda **kw: importlib.import_module("cacheroute.sim.traces").detect_format(**kw),
        path=str(MOONCAKE),
    ),
    "cacheroute.sim.traces.load_claude_code": _fn(
        lambda **kw: _sim().load_claude_code(**kw), path=str(CLAUDE), limit=3
    ),
    "cacheroute.sim.traces.load_mooncake": _fn(
        lambda **kw: _sim().load_mooncake(**kw), path=str(MOONCAKE), limit=3
    ),
    "cacheroute.sim.traces.load_trace": _fn(
        lambda **kw: _sim().load_trace(**kw), path=str(MOONCAKE), fmt="mooncake", limit=3
    ),
    "cacheroute.sim.traces.open_trace": Entry(
        lambda: Case(
            lambda **kw: importlib.import_module("cacheroute.sim.traces").open_trace(**kw).close(),
            {"path": str(MOONCAKE)},
        )
    ),
    "cacheroute.sim.workloads.bursty": _fn(
        lambda **kw: _sim().bursty(**kw), bursts=1, burst_size=2
    ),
    "cacheroute.sim.workloads.chat": _fn(lambda **kw: _sim().chat(**kw), users=1, rounds=1),
    "cacheroute.sim.workloads.default_workload": _fn(
        lambda **kw: _sim().default_workload(**kw), seed=0
    ),
    "cacheroute.sim.workloads.shared_prefix": _fn(
        lambda **kw: _sim().shared_prefix(**kw), groups=1, prompts_per_group=2
    ),
    # ---- cacheroute.integrations (the ray extra)
    "cacheroute.integrations.ray_serve.request_router_config": _fn(
        lambda **kw: _ray_serve().request_router_config(**kw),
        policy="round_robin",
        model_id="m",
        prompt_kwarg="prompt",
        prompt_arg=0,
        metrics=False,
    ),
    "cacheroute.integrations.ray_serve_state.RouterCore": Entry(
        _router_core, {"on_decision": "callable|None"}
    ),
    "cacheroute.integrations.ray_serve_state.prompt_from_body": Entry(
        lambda: Case(_ray_state().prompt_from_body, {"body": {"prompt": "hi"}}), {"body": "mapping"}
    ),
    "cacheroute.integrations.ray_serve_state.prompt_from_call": Entry(
        lambda: Case(
            _ray_state().prompt_from_call,
            {"args": ["hi"], "kwargs": {}, "key": "prompt", "index": 0},
        ),
        {"kwargs": "mapping"},
    ),
    "cacheroute.integrations.ray_serve_state.kv_events_routing_stats": _fn(
        lambda **kw: _ray_state().kv_events_routing_stats(**kw),
        endpoint="tcp://10.0.0.5:5557",
        replay=None,
        topic="",
    ),
    "cacheroute.integrations.ray_serve_state.routers": _fn(
        lambda **kw: _ray_state().routers(**kw), name="n"
    ),
    "cacheroute.integrations.ray_serve_state.snapshot": _fn(
        lambda **kw: _ray_state().snapshot(**kw), name="n"
    ),
    # ---- cacheroute.metrics (the metrics extra)
    "cacheroute.metrics.RouterMetrics": Entry(_router_metrics),
    "cacheroute.metrics.RouterMetrics.forget_worker": _metrics_method("forget_worker"),
    "cacheroute.metrics.RouterMetrics.observe": _metrics_method("observe"),
    "cacheroute.metrics.RouterMetrics.observer": _metrics_method("observer"),
    "cacheroute.metrics.RouterMetrics.record_engine_usage": _metrics_method("record_engine_usage"),
    "cacheroute.metrics.RouterMetrics.track_index": _metrics_method("track_index"),
    "cacheroute.metrics.RouterMetrics.track_policy": _metrics_method("track_policy"),
    # a list is read at scrape time, but its elements must be workers now already
    "cacheroute.metrics.RouterMetrics.track_workers": _metrics_method(
        "track_workers", workers="workers"
    ),
}

TABLE.update(_EVENTS_TABLE)


# --------------------------------------------------------------------------- known failures

# Cases that still fail in files owned elsewhere: xfail(strict=True), owner first. Each
# turns into a failure (XPASS) the moment it is fixed; then delete its line here.
KNOWN: dict[str, dict[str, str]] = {}


# --------------------------------------------------------------------------- exemptions

_RECORD = "a plain record built by cacheroute on the hot path: unvalidated by design"
_PROTOCOL = "a typing.Protocol: not called, only implemented"
_ENUM = "an Enum: the value lookup is Python's own (ValueError naming the value)"
_EXC = "an exception class: takes any message"
_RULE = "a state-machine rule: hypothesis calls it with drawn arguments"
_BUILT = "built by cacheroute itself (acquire, the policy, the simulator), not by users"
_RAY_HOOK = "a Ray Serve RequestRouter hook: Ray calls it with its own request/replica objects"
_CORE_HOOK = (
    "called by CacheRouteRequestRouter's Ray hooks with Ray's request ids and replica keys, "
    "not by users"
)

EXEMPT: dict[str, str] = {
    "cacheroute.events.index.WorkerStats": _BUILT + " (KVEventIndex.stats() returns it)",
    "cacheroute.events.subscriber.Subscription": _BUILT + " (KVEventIndex.subscribe builds it)",
    "cacheroute.events.wire.BlockStored": _RECORD + " (decode_batch builds it; encode_batch"
    " writes its fields as given, as the engines' own structs do)",
    "cacheroute.events.wire.BlockRemoved": _RECORD + " (as BlockStored)",
    "cacheroute.events.wire.KVEventBatch": _BUILT + " (decode_batch returns it)",
    "cacheroute.policies.base.Decision": _RECORD,
    "cacheroute.policies.base.DecisionReason": _ENUM,
    "cacheroute.worker.WorkerType": _ENUM,
    "cacheroute.worker.Worker": _PROTOCOL,
    "cacheroute.worker.WorkAccounting": _PROTOCOL,
    "cacheroute.policies.precise.KVIndex": _PROTOCOL,
    "cacheroute.policies.precise.KVIndex.match": _PROTOCOL,
    "cacheroute.worker.WorkAccounting.add_work": _PROTOCOL,
    "cacheroute.worker.LoadUnderflowError": _EXC,
    "cacheroute.lease.NoHealthyWorkerError": _EXC,
    "cacheroute.sim.traces.TraceFormatError": _EXC,
    "cacheroute.testing._core.PolicyInvariantError": _EXC,
    "cacheroute.lease.Lease": _BUILT + " (acquire() builds and takes it)",
    "cacheroute.lease.PairLease": _BUILT + " (acquire_pair() builds it)",
    "cacheroute.policies.prefix.PoolView": _BUILT + " (PrefixPolicy.decide's view)",
    "cacheroute.policies.prefix.PoolView.holders": _BUILT + " (called by choose() on its view)",
    "cacheroute.policies.prefix.PoolView.pick": _BUILT + " (called by choose() on its view)",
    "cacheroute.policies.prefix.PrefixPolicy.choose": "the rule hook decide() calls with its view",
    "cacheroute.policies.cache_aware.CacheAwarePolicy.choose": "the rule hook decide() calls",
    "cacheroute.policies.work_aware.WorkAwarePolicy.choose": "the rule hook decide() calls",
    "cacheroute.sim.engine.Engine": _BUILT + " (simulate() builds one per worker)",
    "cacheroute.sim.precise.EventFeed": _BUILT + " (simulate() builds it for --index)",
    "cacheroute.sim.precise.EventFeed.deliver": _BUILT + " (simulate() calls it)",
    "cacheroute.sim.cli.add_engine_options": "argparse plumbing: the options' own types "
    "refuse bad values (tests/test_compare_policies.py)",
    "cacheroute.sim.cli.add_simulate_parser": "argparse plumbing of `cacheroute simulate`",
    "cacheroute.sim.cli.run_simulate": "argparse plumbing: takes the parsed Namespace",
    "cacheroute.sim.engine.KVEvent": _BUILT + " (the engines emit it, simulate() delivers it)",
    "cacheroute.sim.simulator.RunResult": _BUILT + " (simulate() returns it)",
    "cacheroute.sim.metrics.Summary": _BUILT + " (summarize() returns it)",
    # ---- the Ray Serve router: Ray builds it and calls its hooks; users configure it with
    # request_router_config (in TABLE), which checks what the router is then given
    "cacheroute.integrations.ray_serve.CacheRouteRequestRouter": _BUILT
    + " (Ray Serve builds it from request_router_config's RequestRouterConfig)",
    "cacheroute.integrations.ray_serve.CacheRouteRequestRouter.choose_replicas": _RAY_HOOK,
    "cacheroute.integrations.ray_serve.CacheRouteRequestRouter.on_replica_actor_died": _RAY_HOOK,
    "cacheroute.integrations.ray_serve.CacheRouteRequestRouter.on_request_completed": _RAY_HOOK,
    "cacheroute.integrations.ray_serve.CacheRouteRequestRouter.on_request_routed": _RAY_HOOK,
    "cacheroute.integrations.ray_serve.CacheRouteRequestRouter.update_replicas": _RAY_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.cancelled": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.choose": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.completed": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.has": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.remove": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.routed": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.sync": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.worker": _CORE_HOOK,
    "cacheroute.integrations.ray_serve_state.RouterCore.from_config": (
        "called by the router's initialize_state with its request_router_kwargs, checked by "
        "request_router_config and again by the router"
    ),
    "cacheroute.integrations.ray_serve_state.RouterCore.enable_metrics": (
        "called by from_config(metrics=True) with process_metrics()"
    ),
}
for _name in dir(_kit().PolicyStateMachine):
    _member = getattr(_kit().PolicyStateMachine, _name)
    if (
        getattr(_member, "hypothesis_stateful_rule", None)
        or getattr(_member, "hypothesis_stateful_initialize_rule", None)
        or getattr(_member, "hypothesis_stateful_invariant", None)
    ):
        EXEMPT[f"cacheroute.testing.machine.PolicyStateMachine.{_name}"] = _RULE

for _cls, _factory in POLICY_FACTORIES.items():
    for _method in POLICY_METHODS:
        if hasattr(_factory(), _method):
            TABLE.setdefault(f"{_cls}.{_method}", _policy_method(_cls, _method))


# --------------------------------------------------------------------------- the callables


def _public_modules() -> list[str]:
    found = ["cacheroute"]
    for info in pkgutil.walk_packages(cacheroute.__path__, "cacheroute."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            found.append(info.name)
    return found


def _callables() -> dict[str, Any]:
    """``{module.qualname[.method]: object}`` of every public callable taking parameters."""
    found: dict[str, Any] = {}
    for name in _public_modules():
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # constants and type aliases
            key = f"{obj.__module__}.{obj.__qualname__}"
            found[key] = obj
            if not inspect.isclass(obj):
                continue
            for member in dir(obj):
                if member.startswith("_"):
                    continue
                owner = next(k for k in inspect.getmro(obj) if member in vars(k))
                raw = vars(owner)[member]
                if not owner.__module__.startswith("cacheroute"):
                    continue
                if inspect.isfunction(raw) or isinstance(raw, (staticmethod, classmethod)):
                    found[f"{key}.{member}"] = getattr(obj, member)
    return found


def _params(obj: Any) -> list[inspect.Parameter]:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [
        p
        for p in sig.parameters.values()
        if p.name != "self"
        and not p.name.startswith("_")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


PUBLIC = _callables()
CALLABLES = {k: v for k, v in PUBLIC.items() if _params(v)}  # taking parameters


def test_every_public_callable_has_an_entry() -> None:
    missing = sorted(set(CALLABLES) - set(TABLE) - set(EXEMPT))
    assert not missing, (
        f"public callables with no entry in tests/test_bad_input.py TABLE (or EXEMPT, with a "
        f"reason): {missing}"
    )
    stale = sorted(k for k in set(TABLE) | set(EXEMPT) if k.split("[")[0] not in PUBLIC)
    assert not stale, f"entries for callables that no longer exist: {stale}"
    # a KNOWN line whose case is no longer generated would never XPASS: it must go too
    dead = sorted(
        f"{key}({param})"
        for key, params in KNOWN.items()
        for param in params
        if key not in TABLE
        or param not in {p.name for p in _params(CALLABLES.get(key.split("[")[0]))}
    )
    assert not dead, f"KNOWN lines for cases the TABLE no longer generates: {dead}"


def _cases() -> Iterator[Any]:
    for key, entry in sorted(TABLE.items()):
        target = CALLABLES.get(key.split("[")[0])
        if target is None:
            continue  # reported by test_every_public_callable_has_an_entry
        for param in _params(target):
            kind = entry.kinds.get(param.name, _kind(str(param.annotation)))
            if kind is None:
                continue
            marks = []
            reason = entry.xfail.get(param.name) or KNOWN.get(key, {}).get(param.name)
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            yield pytest.param(key, param.name, kind, id=f"{key}-{param.name}", marks=marks)


@pytest.mark.parametrize(("key", "param", "kind"), list(_cases()))
def test_wrong_values_are_refused_naming_the_parameter_and_change_nothing(
    key: str, param: str, kind: str
) -> None:
    entry = TABLE[key]
    wrong: list[str] = []
    for value_name in KINDS[kind]:
        case = entry.setup()
        try:
            before = case.state()
            kwargs = dict(case.good)
            kwargs[param] = VALUES[value_name]()
            try:
                case.call(**kwargs)
            except (TypeError, ValueError) as exc:
                if param not in str(exc):
                    wrong.append(f"{value_name}: {type(exc).__name__} not naming {param}: {exc}")
                elif case.state() != before:
                    wrong.append(f"{value_name}: raised but changed the state")
            except (Exception, SystemExit) as exc:  # argparse exits on bad input
                wrong.append(f"{value_name}: {type(exc).__name__}: {exc}")
            else:
                wrong.append(f"{value_name}: accepted")
        finally:
            case.cleanup()
    assert not wrong, f"{key}({param}=...):\n  " + "\n  ".join(wrong)


def test_every_good_call_in_the_table_succeeds() -> None:
    # The matrix means something only if the unchanged call is valid.
    failed = []
    for key, entry in sorted(TABLE.items()):
        case = entry.setup()
        try:
            case.call(**case.good)
        except Exception as exc:
            failed.append(f"{key}: {type(exc).__name__}: {exc}")
        finally:
            case.cleanup()
    assert not failed, "\n".join(failed)
