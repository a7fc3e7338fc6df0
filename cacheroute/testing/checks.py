"""``check_policy``: every shared invariant of a routing policy, in one call.

:func:`check_policy` raises :class:`PolicyInvariantError` (an ``AssertionError``) whose
message starts with the broken invariant in brackets, one of :data:`INVARIANTS`::

    [only healthy workers chosen] policy 'mine' select_worker returned 1, an unhealthy ...
"""

from __future__ import annotations

import functools
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import hypothesis
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from cacheroute._validation import (
    check_callable,
    check_choice,
    check_int,
    check_real,
    describe,
    fail,
)
from cacheroute.lease import NoHealthyWorkerError, acquire
from cacheroute.policies.base import LoadBalancingPolicy, RequestText
from cacheroute.testing._core import (
    BAD_REQUEST_TEXT,
    DECISION_CONSISTENT,
    INDEX_IN_RANGE,
    INVARIANTS,
    LOADS_CONSERVED,
    NONE_IFF_NO_HEALTHY,
    ONLY_HEALTHY,
    THREAD_SAFETY,
    VALID_REQUEST_TEXT,
    WORK_CONSERVED,
    PolicyFactory,
    PolicyInvariantError,
    call_valid,
    check_decision,
    check_index,
    check_loads_unchanged,
    describe_workers,
    loads,
    policy_factory,
    policy_name,
    short,
    work,
)
from cacheroute.testing.machine import PolicyStateMachine
from cacheroute.testing.strategies import (
    SYSTEM_PROMPTS,
    WorkerFactory,
    bad_request_texts,
    clusters,
    make_worker,
    request_streams,
    set_health,
)
from cacheroute.worker import Worker, WorkerType

__all__ = [
    "BAD_REQUEST_TEXT",
    "CHECKS",
    "DECISION_CONSISTENT",
    "INDEX_IN_RANGE",
    "INVARIANTS",
    "LOADS_CONSERVED",
    "NONE_IFF_NO_HEALTHY",
    "ONLY_HEALTHY",
    "THREAD_SAFETY",
    "VALID_REQUEST_TEXT",
    "WORK_CONSERVED",
    "PolicyFactory",
    "PolicyInvariantError",
    "check_policy",
    "policy_factory",
]

CHECKS: tuple[str, ...] = ("select", "pair", "request_text_type", "leases", "threads")
"""The groups of checks :func:`check_policy` runs, in order (its ``checks=`` argument):

* ``select``: ``select_worker`` and ``decide`` over generated clusters and request
  streams, with health flips and load changes between requests;
* ``pair``: ``select_worker_pair`` and ``decide_pair`` over generated prefill and decode
  clusters;
* ``request_text_type``: bad ``request_text`` types raise ``TypeError`` (all four methods);
* ``leases``: :class:`~cacheroute.testing.PolicyStateMachine` (acquire, first token,
  release, exceptions inside ``with``, health flips, workers added and removed, loads and
  token totals against a model of the open leases);
* ``threads``: several threads hammering select + acquire/first token/release on shared
  workers; every load and token total back at 0.
"""

_BIG = 1 << 20


class _Boom(Exception):
    """Raised inside ``with acquire(...)`` by the threaded check."""


def _settings(
    max_examples: int, parent: hypothesis.settings | None, **extra: Any
) -> hypothesis.settings:
    phases = (parent if parent is not None else hypothesis.settings()).phases
    return hypothesis.settings(
        parent,
        max_examples=max_examples,
        # The explain phase can take tens of seconds; the message already names what broke.
        phases=[phase for phase in phases if phase is not hypothesis.Phase.explain],
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[
            hypothesis.HealthCheck.too_slow,
            hypothesis.HealthCheck.data_too_large,
            hypothesis.HealthCheck.filter_too_much,
            hypothesis.HealthCheck.large_base_example,
        ],
        **extra,
    )


def _by_model(cluster: list[Any]) -> list[list[Any]]:
    """One list per model, in order of first appearance (policies take one model's list)."""
    groups: dict[str, list[Any]] = {}
    for w in cluster:
        groups.setdefault(w.model_id, []).append(w)
    return list(groups.values()) or [[]]


def _check_select(
    factory: PolicyFactory,
    settings: hypothesis.settings,
    max_workers: int,
    models: int,
    worker_factory: WorkerFactory | None,
) -> None:
    @settings
    @hypothesis.given(
        cluster=clusters(max_size=max_workers, models=models, worker_factory=worker_factory),
        stream=request_streams(max_size=12, kinds="mixed", include_none=True),
        churn=st.lists(st.tuples(st.integers(0, _BIG), st.booleans()), max_size=12),
        sync=st.booleans(),
    )
    def select(
        cluster: list[Worker],
        stream: list[RequestText],
        churn: list[tuple[int, bool]],
        sync: bool,
    ) -> None:
        policy = factory()
        if sync:
            policy.sync_workers(cluster)  # the whole pool, every model's workers
        lists = _by_model(cluster)
        for step, request_text in enumerate(stream):
            pool = lists[step % len(lists)]
            before = loads(pool)
            method = "decide" if step % 2 else "select_worker"
            call = policy.decide if step % 2 else policy.select_worker
            result = call_valid(
                policy, method, functools.partial(call, pool, request_text), request_text, pool
            )
            check = check_decision if step % 2 else check_index
            check(policy, method, result, pool, request_text)
            check_loads_unchanged(policy, method, pool, before)
            index = getattr(result, "index", result)
            if step < len(churn) and pool:
                pick, hold = churn[step]
                if hold and index is not None:  # the request stays in flight
                    pool[index].increment_load()
                    pool[index].increment_processed()
                else:
                    flipped = pool[pick % len(pool)]
                    set_health(flipped, not flipped.is_healthy())
        policy.close()

    select()


def _check_pair_result(
    policy: LoadBalancingPolicy,
    method: str,
    result: object,
    prefill: list[Worker],
    decode: list[Worker],
    request_text: RequestText,
) -> None:
    ok = any(w.is_healthy() for w in prefill) and any(w.is_healthy() for w in decode)
    where = f"policy {policy_name(policy)} {method} returned {result!r}"
    lists = (
        f"; prefill: {describe_workers(prefill)}; decode: {describe_workers(decode)}; "
        f"request_text={short(request_text)}"
    )
    if result is None:
        if ok:
            raise PolicyInvariantError(
                NONE_IFF_NO_HEALTHY, f"{where} although both lists have a healthy worker{lists}"
            )
        return
    if not ok:
        raise PolicyInvariantError(
            NONE_IFF_NO_HEALTHY, f"{where} but a list has no healthy worker: expected None{lists}"
        )
    if type(result) is not tuple or len(result) != 2:
        raise PolicyInvariantError(INDEX_IN_RANGE, f"{where}, not a (prefill, decode) tuple{lists}")
    check = check_decision if method == "decide_pair" else check_index
    check(policy, method, result[0], prefill, request_text, "[0]")
    check(policy, method, result[1], decode, request_text, "[1]")


def _check_pair(
    factory: PolicyFactory,
    settings: hypothesis.settings,
    max_workers: int,
    worker_factory: WorkerFactory | None,
) -> None:
    size = max(1, max_workers // 2)

    @settings
    @hypothesis.given(
        prefill=clusters(
            max_size=size,
            worker_types=(WorkerType.PREFILL,),
            name="prefill",
            worker_factory=worker_factory,
        ),
        decode=clusters(
            max_size=size,
            worker_types=(WorkerType.DECODE,),
            name="decode",
            worker_factory=worker_factory,
        ),
        stream=request_streams(max_size=6, kinds="mixed", include_none=True),
        flips=st.lists(st.integers(0, _BIG), max_size=6),
    )
    def pair(
        prefill: list[Worker],
        decode: list[Worker],
        stream: list[RequestText],
        flips: list[int],
    ) -> None:
        policy = factory()
        both = prefill + decode
        for step, request_text in enumerate(stream):
            before = loads(both)
            method = "decide_pair" if step % 2 else "select_worker_pair"
            call = policy.decide_pair if step % 2 else policy.select_worker_pair
            result = call_valid(
                policy,
                method,
                functools.partial(call, prefill, decode, request_text),
                request_text,
                both,
            )
            _check_pair_result(policy, method, result, prefill, decode, request_text)
            check_loads_unchanged(policy, method, both, before)
            if step < len(flips) and both:
                flipped = both[flips[step] % len(both)]
                set_health(flipped, not flipped.is_healthy())
        policy.close()

    pair()


def _check_request_text_type(
    factory: PolicyFactory,
    settings: hypothesis.settings,
    max_workers: int,
    worker_factory: WorkerFactory | None,
) -> None:
    @settings
    @hypothesis.given(
        cluster=clusters(max_size=max_workers, worker_factory=worker_factory),
        prefill=clusters(
            max_size=3,
            worker_types=(WorkerType.PREFILL,),
            name="prefill",
            worker_factory=worker_factory,
        ),
        decode=clusters(
            max_size=3,
            worker_types=(WorkerType.DECODE,),
            name="decode",
            worker_factory=worker_factory,
        ),
        bad=bad_request_texts(),
    )
    def request_text_type(
        cluster: list[Worker],
        prefill: list[Worker],
        decode: list[Worker],
        bad: object,
    ) -> None:
        policy = factory()
        calls: list[tuple[str, Callable[[], object], list[Worker]]] = [
            ("select_worker", lambda: policy.select_worker(cluster, bad), cluster),  # type: ignore[arg-type]
            ("decide", lambda: policy.decide(cluster, bad), cluster),  # type: ignore[arg-type]
            (
                "select_worker_pair",
                lambda: policy.select_worker_pair(prefill, decode, bad),  # type: ignore[arg-type]
                prefill + decode,
            ),
            (
                "decide_pair",
                lambda: policy.decide_pair(prefill, decode, bad),  # type: ignore[arg-type]
                prefill + decode,
            ),
        ]
        for method, call, described in calls:
            try:
                result = call()
            except TypeError:
                continue
            except Exception as exc:
                raise PolicyInvariantError(
                    BAD_REQUEST_TEXT,
                    f"policy {policy_name(policy)} {method} raised {type(exc).__name__} "
                    f"instead of TypeError for request_text={short(bad)}",
                ) from exc
            raise PolicyInvariantError(
                BAD_REQUEST_TEXT,
                f"policy {policy_name(policy)} {method} returned {result!r} for "
                f"request_text={short(bad)} ({type(bad).__name__}) instead of raising "
                f"TypeError; workers: {describe_workers(described)}",
            )
        policy.close()

    request_text_type()


def _check_leases(
    factory: PolicyFactory,
    settings: hypothesis.settings,
    steps: int,
    worker_factory: WorkerFactory | None,
) -> None:
    machine = PolicyStateMachine.for_policy(factory, worker_factory=worker_factory)
    run_state_machine_as_test(
        machine, settings=hypothesis.settings(settings, stateful_step_count=steps)
    )


# Stable healthy (H), stable unhealthy (U) and flapping (F) workers for the threaded check.
_THREAD_PATTERN = "HUHFUHFUHU"


def _check_threads(
    factory: PolicyFactory,
    threads: int,
    iterations: int,
    seed: int,
    timeout: float,
    worker_factory: WorkerFactory | None,
) -> None:
    policy = factory()
    name = policy_name(policy)
    rng = random.Random(seed)
    pool = [
        make_worker(
            worker_factory,
            f"http://thread-{i}.local:8000",
            "default",
            WorkerType.REGULAR,
            healthy=kind != "U",
        )
        for i, kind in enumerate(_THREAD_PATTERN)
    ]
    kinds = {w.url: kind for w, kind in zip(pool, _THREAD_PATTERN, strict=True)}
    flapping = [w for w in pool if kinds[w.url] == "F"]
    prompts = [*SYSTEM_PROMPTS[:4], "x" * 300]
    texts: list[RequestText] = [None]
    for _ in range(40):
        prompt = rng.choice(prompts)
        texts.append(prompt + f"\nUser: question {rng.randrange(1000)} ünï 🙂")
        texts.append([rng.randrange(128_000) for _ in range(rng.randrange(1, 40))])
    # Each thread sees its own view of the shared workers: rotated, some truncated, so the
    # same index means different workers in different threads (state shared by mistake
    # across threads then shows up as a wrong index).
    views: list[list[Worker]] = []
    for t in range(threads):
        shift = (3 * t) % len(pool)
        view = pool[shift:] + pool[:shift]
        view = view[: len(view) - (t % 3)]
        if not any(kinds[w.url] == "H" for w in view):
            view = list(pool)
        views.append(view)
    policy.sync_workers(pool)
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1, timeout=timeout)
    stop = threading.Event()

    def validate(t: int, view: list[Worker], index: object, what: str) -> None:
        if type(index) is not int or not 0 <= index < len(view):
            errors.append(f"thread {t}: {what} returned {index!r} for its {len(view)} workers")
        elif kinds[view[index].url] == "U":
            errors.append(
                f"thread {t}: {what} returned {index}, the always-unhealthy {view[index].url}"
            )

    def hammer(t: int) -> None:
        try:
            local = random.Random(seed * 7919 + t)
            view = views[t]
            barrier.wait()
            for k in range(iterations):
                if len(errors) > 20:
                    return
                text = local.choice(texts)
                if k % 2:
                    decision = policy.decide(view, text)
                    validate(t, view, getattr(decision, "index", decision), "decide")
                else:
                    validate(t, view, policy.select_worker(view, text), "select_worker")
                try:
                    with acquire(policy, view, text) as lease:
                        if kinds[lease.worker.url] == "U" or view[lease.index] is not lease.worker:
                            errors.append(f"thread {t}: leased {lease.worker.url}")
                        if local.random() < 0.5:
                            lease.first_token()
                        if k % 7 == 0:
                            raise _Boom
                        if k % 5 == 0:  # two requests in flight from this thread
                            with acquire(policy, view, local.choice(texts)) as inner:
                                if kinds[inner.worker.url] == "U":
                                    errors.append(f"thread {t}: leased {inner.worker.url}")
                                if local.random() < 0.5:
                                    inner.first_token()
                except _Boom:
                    pass
        except NoHealthyWorkerError as exc:
            errors.append(f"thread {t}: {exc} although an always-healthy worker exists")
        except threading.BrokenBarrierError:
            errors.append(f"thread {t}: the threads could not start together")
        except Exception as exc:
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")
            barrier.abort()  # never leave another thread waiting for this one

    def flap() -> None:
        local = random.Random(seed)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        while not stop.is_set():
            worker = local.choice(flapping)
            set_health(worker, not worker.is_healthy())

    workers_threads = [
        threading.Thread(target=hammer, args=(t,), name=f"cacheroute-check-{t}", daemon=True)
        for t in range(threads)
    ]
    flapper = threading.Thread(target=flap, name="cacheroute-check-flap", daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: races show up in fewer iterations
    try:
        for thread in [*workers_threads, flapper]:
            thread.start()
        deadline = time.monotonic() + timeout  # one deadline for all: not threads x timeout
        for thread in workers_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [thread.name for thread in workers_threads if thread.is_alive()]
    finally:
        stop.set()
        barrier.abort()  # a flapper still at the barrier (every worker thread died) leaves
        flapper.join(timeout)
        sys.setswitchinterval(interval)
    if hung:
        raise PolicyInvariantError(
            THREAD_SAFETY,
            f"policy {name}: threads {hung} still running after {timeout:g} s "
            "(deadlock or livelock?)",
        )
    leaked = {w.url: (w.load(), *work(w)) for w in pool if (w.load(), *work(w)) != (0, 0, 0)}
    if errors or leaked:
        shown = "; ".join(errors[:5]) + (f"; ... ({len(errors)} errors)" if len(errors) > 5 else "")
        left = (
            f"; loads or token totals not back at 0 after every lease was released "
            f"(url: (load, prefill tokens, decode tokens)): {leaked}"
            if leaked
            else ""
        )
        raise PolicyInvariantError(
            THREAD_SAFETY,
            f"policy {name} with {threads} threads x {iterations} iterations: {shown}{left}",
        )
    policy.close()


def _check_checks(checks: Iterable[str] | None) -> tuple[str, ...]:
    if checks is None:
        return CHECKS
    if isinstance(checks, (str, bytes, Mapping)) or not isinstance(checks, Iterable):
        what = f"None or a list of check names ({', '.join(CHECKS)})"
        raise fail("checks", what, checks, TypeError)
    selected = tuple(checks)
    if not selected:  # would pass having checked nothing
        raise fail("checks", "None or a non-empty list of check names", checks)
    for i, name in enumerate(selected):
        check_choice(f"checks[{i}]", name, CHECKS)
    return selected


def _check_worker_factory(worker_factory: WorkerFactory | None) -> None:
    check_callable("worker_factory", worker_factory, none_ok=True)
    if worker_factory is None:
        return
    probe = worker_factory("http://probe.local:8000", "default", WorkerType.REGULAR)
    if not isinstance(probe, Worker):
        raise fail("worker_factory", "a callable returning a Worker", probe, TypeError)
    if not callable(getattr(probe, "set_healthy", None)):
        raise TypeError(
            f"worker_factory must build workers with set_healthy(bool): the checks flip "
            f"health; {describe(probe)} has none"
        )


def check_policy(
    policy: LoadBalancingPolicy | PolicyFactory | str,
    *,
    max_examples: int = 100,
    checks: Iterable[str] | None = None,
    max_workers: int = 8,
    models: int = 1,
    stateful_steps: int = 30,
    threads: int = 4,
    thread_iterations: int = 300,
    thread_timeout: float = 60.0,
    seed: int = 0,
    settings: hypothesis.settings | None = None,
    worker_factory: WorkerFactory | None = None,
) -> None:
    """Check that a policy keeps every shared invariant; raise :class:`PolicyInvariantError`.

    Runs the groups in :data:`CHECKS` (all by default) with hypothesis, over generated
    clusters (mixed health, starting loads, unicode URLs), request streams (shared system
    prompts, continued conversations, token ids in lists, tuples and arrays, ``None``) and
    bad ``request_text`` values; then a state machine with real leases; then a threaded
    stress run. The first broken invariant raises, its name in brackets at the start of
    the message (see :data:`INVARIANTS`); hypothesis adds the shrunk falsifying example.

    Args:
        policy: a policy class or zero-argument factory (a fresh policy per example: use
            this for policies with state), a registered name, or an instance (reused by
            every example, as a gateway reuses one policy).
        max_examples: hypothesis examples per check group (an int >= 1).
        checks: the groups to run, a list of names from :data:`CHECKS` (not one ``str``).
        max_workers: most workers in a generated cluster.
        models: models per generated cluster; the cluster is split by model and each call
            gets one model's workers (as a gateway passes them).
        stateful_steps: most steps per state-machine run.
        threads: threads in the threaded check.
        thread_iterations: select + lease iterations per thread.
        thread_timeout: seconds (a finite number > 0) before a thread that has not
            finished counts as hung.
        seed: int seed of the threaded check's inputs (it is not hypothesis-driven, so
            that a race found once is not reported as a flaky example).
        settings: parent hypothesis settings (e.g. a profile's database or verbosity);
            ``max_examples`` and ``deadline=None`` are applied on top.
        worker_factory: ``None`` for :class:`~cacheroute.BasicWorker`, or
            ``(url, model_id, worker_type) -> Worker`` to run every check over your own
            Worker class (its workers need ``set_healthy(bool)``); see
            :data:`~cacheroute.testing.strategies.WorkerFactory`.

    Do not call it from inside a ``@given`` test: it runs hypothesis itself.

    Raises:
        PolicyInvariantError: an invariant is broken (an ``AssertionError``).
        TypeError: an argument of a wrong type (the message names it), or ``policy`` is
            not a policy, factory or name.
        ValueError: an unknown check name, a policy name not registered, or an argument
            out of range (the message names it).

    >>> check_policy("round_robin", max_examples=5, checks=["select", "pair"])
    """
    factory = policy_factory(policy)
    selected = _check_checks(checks)
    check_int("max_examples", max_examples, minimum=1)
    check_int("max_workers", max_workers, minimum=1)
    check_int("models", models, minimum=1)
    check_int("stateful_steps", stateful_steps, minimum=1)
    check_int("threads", threads, minimum=1)
    check_int("thread_iterations", thread_iterations, minimum=1)
    check_real("thread_timeout", thread_timeout, minimum=0.0, min_open=True)
    check_int("seed", seed)
    if settings is not None and not isinstance(settings, hypothesis.settings):
        raise fail("settings", "a hypothesis.settings or None", settings, TypeError)
    _check_worker_factory(worker_factory)
    run_settings = _settings(max_examples, settings)
    wf = worker_factory
    runs: dict[str, Callable[[], None]] = {
        "select": lambda: _check_select(factory, run_settings, max_workers, models, wf),
        "pair": lambda: _check_pair(factory, run_settings, max_workers, wf),
        "request_text_type": lambda: _check_request_text_type(
            factory, run_settings, max_workers, wf
        ),
        "leases": lambda: _check_leases(factory, run_settings, stateful_steps, wf),
        "threads": lambda: _check_threads(
            factory, threads, thread_iterations, seed, float(thread_timeout), wf
        ),
    }
    for name in CHECKS:
        if name in selected:
            _unwrap_flaky(runs[name])


def _unwrap_flaky(run: Callable[[], None]) -> None:
    """Run a check; turn hypothesis's ``Flaky`` into the invariant error it wraps."""
    try:
        run()
    except hypothesis.errors.Flaky as exc:
        inner = _first_invariant_error(exc)
        if inner is None:
            raise
        raise PolicyInvariantError(
            inner.invariant,
            f"{str(inner).split('] ', 1)[1]} (flaky: the failure did not repeat when "
            "hypothesis replayed the example; is the policy non-deterministic, or does it "
            "keep state across examples? pass a factory for a fresh policy per example)",
        ) from exc


def _first_invariant_error(exc: BaseException) -> PolicyInvariantError | None:
    if isinstance(exc, PolicyInvariantError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _first_invariant_error(inner)
        if found is not None:
            return found
    return None
