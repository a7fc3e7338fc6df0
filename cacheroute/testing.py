"""Property-test any routing policy: hypothesis strategies, ``check_policy`` and a state machine.

This module needs `hypothesis <https://hypothesis.readthedocs.io>`_, an optional dependency
(``pip install 'cacheroute[test]'``); the rest of cacheroute never imports it.

Check that a policy keeps the shared semantics every policy must keep (see
:mod:`cacheroute.policies.base`)::

    from cacheroute.testing import check_policy

    def test_my_policy():
        check_policy(MyPolicy)            # a class or factory: a fresh policy per example

:func:`check_policy` raises :class:`PolicyInvariantError` (an ``AssertionError``) whose
message starts with the broken invariant in brackets, one of :data:`INVARIANTS`::

    [only healthy workers chosen] policy 'mine' select_worker returned 1, an unhealthy ...

Write your own properties with the strategies (:func:`workers`, :func:`clusters`,
:func:`request_texts`, :func:`token_ids`, :func:`request_streams`), and run stateful tests
by subclassing :class:`PolicyStateMachine`::

    class MyPolicyMachine(PolicyStateMachine):
        policy_factory = MyPolicy

    TestMyPolicyMachine = MyPolicyMachine.TestCase
"""

from __future__ import annotations

try:
    import hypothesis
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        initialize,
        invariant,
        precondition,
        rule,
        run_state_machine_as_test,
    )
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "cacheroute.testing needs hypothesis, an optional dependency: "
        "pip install 'cacheroute[test]'"
    ) from _exc

import array
import functools
import random
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, TypeAlias

from cacheroute.lease import Lease, NoHealthyWorkerError, PairLease, acquire, acquire_pair
from cacheroute.policies.base import LoadBalancingPolicy, RequestText
from cacheroute.policies.registry import make_policy
from cacheroute.worker import BasicWorker, LoadUnderflowError, Worker, WorkerType

__all__ = [
    "BAD_REQUEST_TEXT",
    "CHECKS",
    "INDEX_IN_RANGE",
    "INVARIANTS",
    "LOADS_CONSERVED",
    "NONE_IFF_NO_HEALTHY",
    "ONLY_HEALTHY",
    "SYSTEM_PROMPTS",
    "THREAD_SAFETY",
    "VALID_REQUEST_TEXT",
    "HealthMix",
    "PolicyFactory",
    "PolicyInvariantError",
    "PolicyStateMachine",
    "bad_request_texts",
    "check_policy",
    "clusters",
    "policy_factory",
    "request_streams",
    "request_texts",
    "token_ids",
    "workers",
]

# --------------------------------------------------------------------------- invariants

ONLY_HEALTHY = "only healthy workers chosen"
"""A policy never chooses an unhealthy worker."""
NONE_IFF_NO_HEALTHY = "None exactly when no worker is healthy"
"""``select_worker`` returns ``None`` when, and only when, no worker is healthy (empty list
included); ``select_worker_pair`` when either list has no healthy worker."""
INDEX_IN_RANGE = "index in range"
"""The result is an ``int`` index into the list the caller passed (a pair: two of them)."""
BAD_REQUEST_TEXT = "request_text of a bad type raises TypeError"
"""A ``request_text`` that is not a ``str``, token-id sequence or ``None`` raises TypeError."""
VALID_REQUEST_TEXT = "valid request_text accepted"
"""A ``str``, a token-id sequence (list, tuple, ``array.array``) or ``None`` never raises."""
LOADS_CONSERVED = "loads conserved through leases"
"""Every worker's load equals its starting load plus its open leases; a policy never changes
load itself; when every lease is released, every load is back where it started."""
THREAD_SAFETY = "thread safety"
"""Several threads selecting and leasing at once: no exception, every choice valid, no
hang, and every load back where it started."""

INVARIANTS: tuple[str, ...] = (
    ONLY_HEALTHY,
    NONE_IFF_NO_HEALTHY,
    INDEX_IN_RANGE,
    BAD_REQUEST_TEXT,
    VALID_REQUEST_TEXT,
    LOADS_CONSERVED,
    THREAD_SAFETY,
)
"""Every invariant :func:`check_policy` checks; failure messages start with ``[name]``."""

CHECKS: tuple[str, ...] = ("select", "pair", "request_text_type", "leases", "threads")
"""The groups of checks :func:`check_policy` runs, in order (its ``checks=`` argument):

* ``select``: ``select_worker`` over generated clusters and request streams, with health
  flips and load changes between requests;
* ``pair``: ``select_worker_pair`` over generated prefill and decode clusters;
* ``request_text_type``: bad ``request_text`` types raise ``TypeError``;
* ``leases``: :class:`PolicyStateMachine` (acquire, release, exceptions inside ``with``,
  health flips, workers added and removed);
* ``threads``: several threads hammering select + acquire/release on shared workers.
"""


class PolicyInvariantError(AssertionError):
    """A policy broke one of the shared invariants.

    Attributes:
        invariant: the broken invariant, one of :data:`INVARIANTS`.

    The message starts with ``[invariant]`` and says what the policy did, on which workers.
    """

    def __init__(self, invariant: str, message: str) -> None:
        super().__init__(f"[{invariant}] {message}")
        self.invariant = invariant


PolicyFactory: TypeAlias = Callable[[], LoadBalancingPolicy]
"""A zero-argument callable returning a fresh policy (a policy class works)."""


def policy_factory(policy: LoadBalancingPolicy | PolicyFactory | str) -> PolicyFactory:
    """Normalise what :func:`check_policy` accepts into a factory.

    Args:
        policy: a policy instance (reused by every example, as a gateway reuses it), a
            zero-argument factory or policy class (a fresh policy per example), or a
            registered policy name (``make_policy(name)`` per example).

    Raises:
        TypeError: ``policy`` is none of these, or the factory returns a non-policy.
    """
    if isinstance(policy, LoadBalancingPolicy):
        instance = policy
        return lambda: instance
    if isinstance(policy, str):
        name = policy
        make_policy(name)  # fail now, with the list of known names, on a typo
        return lambda: make_policy(name)
    if not callable(policy):
        raise TypeError(
            "expected a LoadBalancingPolicy, a zero-argument factory or a registered policy "
            f"name, got {policy!r}"
        )
    factory = policy

    def checked() -> LoadBalancingPolicy:
        made = factory()
        if not isinstance(made, LoadBalancingPolicy):
            raise TypeError(f"policy factory {factory!r} returned {made!r}, not a policy")
        return made

    return checked


# --------------------------------------------------------------------------- strategies

HealthMix: TypeAlias = Literal["mixed", "healthy", "unhealthy", "at_least_one"]
"""How :func:`clusters` sets health: each worker at random (``"mixed"``), all healthy, all
unhealthy, or at random with at least one healthy worker (``"at_least_one"``)."""

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a senior Python engineer. Answer with code only.\n\n",
    "Tu es un assistant serviable. Réponds en français, s'il te plaît.",
    "あなたは親切なアシスタントです。日本語で簡潔に答えてください。",
    "Ты — вежливый помощник. Отвечай кратко. 🚀",
    "System: tools = [search, calculator]\u200b\nUser:",
    "",
)
"""Built-in system prompts drawn by :func:`request_texts` (unicode and the empty prompt)."""

_HOSTS = ("w", "gpu-node", "wörker-ünï", "10.0.0")
_PORTS = (8000, 8001, 30000)


def _urls(name: str) -> st.SearchStrategy[str]:
    return st.builds(
        "http://{}-{}{}.{}:{}".format,
        st.just(name),
        st.sampled_from(_HOSTS),
        st.integers(0, 99),
        st.sampled_from(("local", "svc", "cluster.internal")),
        st.sampled_from(_PORTS),
    )


def _check_size(param: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{param} must be an int >= {minimum}, got {value!r}")


@st.composite
def _workers(
    draw: st.DrawFn,
    urls: st.SearchStrategy[str],
    model_ids: tuple[str, ...],
    worker_types: tuple[WorkerType, ...],
    healthy: bool | None,
    max_load: int,
    max_processed: int,
) -> BasicWorker:
    url = draw(urls)
    model_id = draw(st.sampled_from(model_ids))
    worker_type = draw(st.sampled_from(worker_types))
    port = draw(st.none() | st.integers(1, 65535)) if worker_type is WorkerType.PREFILL else None
    is_healthy = draw(st.booleans()) if healthy is None else healthy
    worker = BasicWorker(url, model_id, worker_type, bootstrap_port=port, healthy=is_healthy)
    for _ in range(draw(st.integers(0, max_load))):
        worker.increment_load()
    for _ in range(draw(st.integers(0, max_processed))):
        worker.increment_processed()
    return worker


def workers(
    *,
    urls: st.SearchStrategy[str] | None = None,
    model_ids: Sequence[str] = ("default",),
    worker_types: Sequence[WorkerType] = tuple(WorkerType),
    healthy: bool | None = None,
    max_load: int = 8,
    max_processed: int = 32,
) -> st.SearchStrategy[BasicWorker]:
    """A fresh :class:`~cacheroute.BasicWorker` with generated health, load and processed count.

    Args:
        urls: strategy for the URL; default ``http://w-<host><n>.<domain>:<port>``, some
            hosts non-ASCII (URLs are tenant names in prefix trees).
        model_ids: the models to draw from.
        worker_types: the worker types to draw from (a ``PREFILL`` worker sometimes gets a
            bootstrap port).
        healthy: fixed health, or ``None`` to draw it.
        max_load: the starting load is drawn from ``[0, max_load]``.
        max_processed: the processed count is drawn from ``[0, max_processed]``.

    The starting load is real load on the worker (as if requests were in flight before the
    test started); invariants on loads are relative to it.
    """
    _check_size("max_load", max_load)
    _check_size("max_processed", max_processed)
    if not model_ids or not worker_types:
        raise ValueError("model_ids and worker_types must not be empty")
    return _workers(
        urls if urls is not None else _urls("w"),
        tuple(model_ids),
        tuple(worker_types),
        healthy,
        max_load,
        max_processed,
    )


@st.composite
def _clusters(
    draw: st.DrawFn,
    min_size: int,
    max_size: int,
    model_ids: tuple[str, ...],
    worker_types: tuple[WorkerType, ...],
    health: HealthMix,
    max_load: int,
    max_processed: int,
    name: str,
) -> list[BasicWorker]:
    n = draw(st.integers(min_size, max_size))
    urls = draw(st.lists(_urls(name), min_size=n, max_size=n, unique=True))
    fixed = {"mixed": None, "at_least_one": None, "healthy": True, "unhealthy": False}[health]
    cluster = [
        draw(_workers(st.just(url), model_ids, worker_types, fixed, max_load, max_processed))
        for url in urls
    ]
    if health == "at_least_one" and not any(w.is_healthy() for w in cluster):
        cluster[draw(st.integers(0, n - 1))].set_healthy(True)
    return cluster


def clusters(
    *,
    min_size: int = 0,
    max_size: int = 8,
    models: int | Sequence[str] = 1,
    worker_types: Sequence[WorkerType] = (WorkerType.REGULAR,),
    health: HealthMix = "mixed",
    max_load: int = 8,
    max_processed: int = 32,
    name: str = "w",
) -> st.SearchStrategy[list[BasicWorker]]:
    """A list of fresh workers with unique URLs: what a gateway passes to ``select_worker``.

    Args:
        min_size: fewest workers (``0`` allows the empty list).
        max_size: most workers.
        models: a number of models (``1`` gives ``"default"``, ``k`` gives ``"model-0"`` ...
            ``"model-{k-1}"``) or the model ids themselves; each worker draws one.
        worker_types: the worker types to draw from (``(WorkerType.PREFILL,)`` for a
            prefill list).
        health: the health mix, see :data:`HealthMix`.
        max_load: each starting load is drawn from ``[0, max_load]``.
        max_processed: each processed count is drawn from ``[0, max_processed]``.
        name: first part of every URL's host, so two clusters (prefill and decode) drawn
            with different names never share a URL.
    """
    _check_size("min_size", min_size)
    _check_size("max_size", max_size, max(min_size, 1 if health == "at_least_one" else 0))
    _check_size("max_load", max_load)
    _check_size("max_processed", max_processed)
    if health not in ("mixed", "healthy", "unhealthy", "at_least_one"):
        raise ValueError(f"health must be one of {HealthMix}, got {health!r}")
    if health == "at_least_one":
        min_size = max(min_size, 1)
    if isinstance(models, int):
        _check_size("models", models, 1)
        model_ids = ("default",) if models == 1 else tuple(f"model-{i}" for i in range(models))
    else:
        model_ids = tuple(models)
        if not model_ids:
            raise ValueError("models must not be empty")
    if not worker_types:
        raise ValueError("worker_types must not be empty")
    return _clusters(
        min_size,
        max_size,
        model_ids,
        tuple(worker_types),
        health,
        max_load,
        max_processed,
        name,
    )


_PROMPT_KEY = "cacheroute.testing.system_prompts"
_TOKEN_KEY = "cacheroute.testing.token_prefixes"


def _free_text(max_size: int) -> st.SearchStrategy[str]:
    # Mostly readable words (realistic chat), sometimes any unicode (no surrogates).
    words = st.lists(
        st.sampled_from(
            ("the", "cache", "résumé", "naïve", "🙂", "数据", "Привет", "?", "\n", "def f():")
        ),
        max_size=max(1, max_size // 4),
    ).map(" ".join)
    return st.one_of(words, st.text(max_size=max_size))


@st.composite
def _request_texts(
    draw: st.DrawFn, prompts: tuple[str, ...] | None, max_prompts: int, max_suffix_size: int
) -> str:
    if prompts is None:
        pool = draw(
            st.shared(
                st.lists(
                    st.sampled_from(SYSTEM_PROMPTS) | st.text(min_size=1, max_size=80),
                    min_size=1,
                    max_size=max_prompts,
                    unique=True,
                ),
                key=f"{_PROMPT_KEY}.{max_prompts}",
            )
        )
    else:
        pool = list(prompts)
    shape = draw(st.sampled_from(("prompt+turns", "prompt+turns", "prompt", "free")))
    if shape == "free":
        return draw(_free_text(max_suffix_size))
    text = draw(st.sampled_from(pool))
    if shape == "prompt":
        return text
    turns = draw(st.lists(_free_text(max_suffix_size), min_size=1, max_size=3))
    return text + "".join(f"\nUser: {turn}" for turn in turns)


def request_texts(
    *,
    prompts: Sequence[str] | None = None,
    max_prompts: int = 3,
    max_suffix_size: int = 40,
) -> st.SearchStrategy[str]:
    """Request texts with realistic shared-prefix structure: a few system prompts, varied turns.

    Within one example every draw shares the same small pool of system prompts (drawn from
    :data:`SYSTEM_PROMPTS` and arbitrary unicode text, or ``prompts`` when given), so texts
    share prefixes as real traffic does. A text is a prompt followed by one to three user
    turns, a prompt alone, or (sometimes) free text with no shared prefix. Unicode, the
    empty string and texts that are prefixes of others all occur.

    Args:
        prompts: fixed system prompts to use instead of generated ones.
        max_prompts: size of the generated prompt pool.
        max_suffix_size: longest generated turn, in characters.
    """
    _check_size("max_prompts", max_prompts, 1)
    _check_size("max_suffix_size", max_suffix_size)
    if prompts is not None and not prompts:
        raise ValueError("prompts must not be empty")
    return _request_texts(None if prompts is None else tuple(prompts), max_prompts, max_suffix_size)


_TOKEN_CONTAINERS: dict[str, Callable[[list[int]], Sequence[int]]] = {
    "list": list,
    "tuple": tuple,
    "array": lambda ids: array.array("q", ids),
}


@st.composite
def _token_ids(
    draw: st.DrawFn,
    vocab_size: int,
    max_size: int,
    containers: tuple[str, ...],
    shared_prefixes: bool,
) -> Sequence[int]:
    ids = st.integers(0, vocab_size - 1)
    tokens: list[int] = []
    if shared_prefixes and draw(st.booleans()):
        pool = draw(
            st.shared(
                st.lists(st.lists(ids, min_size=1, max_size=32), min_size=1, max_size=3),
                key=f"{_TOKEN_KEY}.{vocab_size}",
            )
        )
        tokens.extend(draw(st.sampled_from(pool)))
    tokens.extend(draw(st.lists(ids, max_size=max_size)))
    return _TOKEN_CONTAINERS[draw(st.sampled_from(containers))](tokens)


def token_ids(
    *,
    vocab_size: int = 128_256,
    max_size: int = 48,
    containers: Sequence[Literal["list", "tuple", "array"]] = ("list",),
    shared_prefixes: bool = True,
) -> st.SearchStrategy[Sequence[int]]:
    """Token-id sequences: non-negative ints below ``vocab_size``, often with a shared prefix.

    Args:
        vocab_size: ids are drawn from ``[0, vocab_size)`` (default: a Llama-3 vocabulary).
        max_size: most ids after the shared prefix.
        containers: the container types to draw from: ``"list"``, ``"tuple"``,
            ``"array"`` (``array.array("q")``); all are valid ``request_text`` values.
        shared_prefixes: start about half the sequences with one of a few prefixes shared
            by every draw of the example (like a tokenised system prompt).
    """
    _check_size("vocab_size", vocab_size, 1)
    _check_size("max_size", max_size)
    unknown = sorted(set(containers) - set(_TOKEN_CONTAINERS))
    if not containers or unknown:
        raise ValueError(
            f"containers must be a non-empty subset of {sorted(_TOKEN_CONTAINERS)}, "
            f"got {containers!r}"
        )
    return _token_ids(vocab_size, max_size, tuple(containers), shared_prefixes)


@st.composite
def _request_streams(
    draw: st.DrawFn,
    min_size: int,
    max_size: int,
    kinds: Literal["text", "tokens", "mixed"],
    include_none: bool,
) -> list[RequestText]:
    n = draw(st.integers(min_size, max_size))
    choices: list[st.SearchStrategy[RequestText]] = []
    if kinds in ("text", "mixed"):
        choices.append(request_texts())
    if kinds in ("tokens", "mixed"):
        choices.append(token_ids(containers=("list", "tuple", "array")))
    if include_none:
        choices.append(st.none())
    fresh = st.one_of(*choices)
    stream: list[RequestText] = []
    for _ in range(n):
        earlier = [r for r in stream if r is not None]
        how = (
            draw(st.sampled_from(("fresh", "fresh", "continue", "repeat"))) if earlier else "fresh"
        )
        if how == "fresh":
            stream.append(draw(fresh))
            continue
        previous = draw(st.sampled_from(earlier))
        if how == "repeat":
            stream.append(previous)
        elif isinstance(previous, str):  # the next turn of the same conversation
            stream.append(previous + f"\nAssistant: ok\nUser: {draw(_free_text(20))}")
        else:
            more = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=8))
            stream.append([*previous, *more])
    return stream


def request_streams(
    *,
    min_size: int = 1,
    max_size: int = 20,
    kinds: Literal["text", "tokens", "mixed"] = "text",
    include_none: bool = False,
) -> st.SearchStrategy[list[RequestText]]:
    """A sequence of requests as a gateway sees them: shared prompts, continued conversations.

    Each request is fresh (from :func:`request_texts` and/or :func:`token_ids`), the next
    turn of an earlier conversation (the earlier text plus more), or an exact repeat.

    Args:
        min_size: fewest requests.
        max_size: most requests.
        kinds: ``"text"`` (``str`` only), ``"tokens"`` (token-id sequences only) or
            ``"mixed"``.
        include_none: also draw ``None`` (a request routed without text).
    """
    _check_size("min_size", min_size)
    _check_size("max_size", max_size, min_size)
    if kinds not in ("text", "tokens", "mixed"):
        raise ValueError(f"kinds must be 'text', 'tokens' or 'mixed', got {kinds!r}")
    return _request_streams(min_size, max_size, kinds, include_none)


class _NotText:
    def __repr__(self) -> str:
        return "<object that is not text>"


def bad_request_texts() -> st.SearchStrategy[object]:
    """Values that are not a valid ``request_text``: every policy must raise ``TypeError``.

    Bytes, bytearray, memoryview, numbers, booleans, dicts, sets, iterators and plain objects.
    """
    return st.one_of(
        st.binary(max_size=16),
        st.binary(max_size=16).map(bytearray),
        st.binary(max_size=16).map(lambda b: memoryview(b)),
        st.integers(),
        st.floats(allow_nan=False),
        st.booleans(),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
        st.sets(st.integers(0, 100), max_size=4),
        st.frozensets(st.integers(0, 100), max_size=4),
        st.lists(st.integers(0, 100), max_size=4).map(iter),
        st.builds(_NotText),
    )


# --------------------------------------------------------------------------- checking helpers


def _describe(workers: Sequence[Worker]) -> str:
    if not workers:
        return "[] (no workers)"
    parts = [
        f"[{i}] {w.url} {'healthy' if w.is_healthy() else 'UNHEALTHY'} load={w.load()}"
        for i, w in enumerate(workers[:16])
    ]
    more = f", ... ({len(workers)} in all)" if len(workers) > 16 else ""
    return "; ".join(parts) + more


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _policy_name(policy: LoadBalancingPolicy) -> str:
    return f"{policy.name!r} ({type(policy).__name__})"


def _check_index(
    policy: LoadBalancingPolicy,
    method: str,
    result: object,
    workers: Sequence[Worker],
    request_text: object,
    what: str = "",
) -> None:
    """Check one index result of ``method`` against ``workers``; raise on a broken invariant."""
    where = f"policy {_policy_name(policy)} {method}{what} returned {result!r}"
    context = f"; workers: {_describe(workers)}; request_text={_short(request_text)}"
    any_healthy = any(w.is_healthy() for w in workers)
    if result is None:
        if any_healthy:
            raise PolicyInvariantError(
                NONE_IFF_NO_HEALTHY, f"{where} although a worker is healthy{context}"
            )
        return
    if not any_healthy:
        raise PolicyInvariantError(
            NONE_IFF_NO_HEALTHY, f"{where} but no worker is healthy: expected None{context}"
        )
    if type(result) is not int or not 0 <= result < len(workers):
        raise PolicyInvariantError(
            INDEX_IN_RANGE,
            f"{where}, not an int index into the {len(workers)} workers it was given{context}",
        )
    if not workers[result].is_healthy():
        raise PolicyInvariantError(
            ONLY_HEALTHY, f"{where}, an unhealthy worker ({workers[result].url}){context}"
        )


def _call(
    policy: LoadBalancingPolicy,
    method: str,
    call: Callable[[], Any],
    request_text: object,
    workers: Sequence[Worker],
) -> Any:
    """Run a policy call with valid input; an exception from it breaks VALID_REQUEST_TEXT."""
    try:
        return call()
    except PolicyInvariantError:
        raise
    except Exception as exc:
        raise PolicyInvariantError(
            VALID_REQUEST_TEXT,
            f"policy {_policy_name(policy)} {method} raised {type(exc).__name__}: {exc} "
            f"on valid input; request_text={_short(request_text)}; "
            f"workers: {_describe(workers)}",
        ) from exc


def _loads(workers: Sequence[Worker]) -> list[int]:
    return [w.load() for w in workers]


def _check_loads_unchanged(
    policy: LoadBalancingPolicy, method: str, workers: Sequence[Worker], before: list[int]
) -> None:
    after = _loads(workers)
    if after != before:
        raise PolicyInvariantError(
            LOADS_CONSERVED,
            f"policy {_policy_name(policy)} {method} changed worker loads from {before} to "
            f"{after}: a policy must never change load (leases do); workers: "
            f"{_describe(workers)}",
        )


def _any_request_text() -> st.SearchStrategy[RequestText]:
    return st.one_of(st.none(), request_texts(), token_ids(containers=("list", "tuple", "array")))


# --------------------------------------------------------------------------- the state machine

_BIG = 1 << 20


class _Boom(Exception):
    """Raised inside ``with acquire(...)`` by the state machine."""


class PolicyStateMachine(RuleBasedStateMachine):
    """A stateful test of a policy with real leases; subclass it and set :attr:`policy_factory`.

    Rules: acquire a lease, acquire a prefill/decode pair lease, release a lease (with either
    outcome), release one twice, raise inside ``with acquire(...)``, select without a lease,
    flip a worker's health, add a worker, remove a worker (leases on it stay open until
    released), and call ``sync_workers``. Every choice is checked against the shared
    invariants; after every step each worker's load must equal its starting load plus its
    open leases, and at teardown every lease is released and every load must be back where
    it started. Failures raise :class:`PolicyInvariantError`.

    Usage::

        class MyPolicyMachine(PolicyStateMachine):
            policy_factory = MyPolicy              # or a lambda: make_policy("x", k=1)

        TestMyPolicyMachine = MyPolicyMachine.TestCase   # collected by pytest / unittest
        # or: run_state_machine_as_test(MyPolicyMachine, settings=settings(max_examples=50))

    Or build a subclass on the fly with :meth:`for_policy`. Subclasses may add rules of
    their own; use :attr:`workers` (the current pool) and :attr:`policy`.
    """

    policy_factory: ClassVar[PolicyFactory | None] = None
    """Makes the policy under test: a policy class or a zero-argument callable."""

    def __init__(self) -> None:
        super().__init__()
        factory = type(self).policy_factory  # read off the class: a function stays unbound
        if factory is None:
            raise TypeError(
                f"{type(self).__name__} must set policy_factory (a policy class or a "
                "zero-argument callable returning a policy)"
            )
        self.policy: LoadBalancingPolicy = policy_factory(factory)()
        self.workers: list[BasicWorker] = []
        self.known: dict[str, BasicWorker] = {}
        self.baseline: dict[str, int] = {}
        self.leases: list[Lease | PairLease] = []
        self._added = 0
        self._broken = False

    @classmethod
    def for_policy(
        cls, policy: LoadBalancingPolicy | PolicyFactory | str, name: str | None = None
    ) -> type[PolicyStateMachine]:
        """A subclass testing ``policy`` (an instance, a factory or class, or a registered name)."""
        factory = policy_factory(policy)
        label = name or (policy if isinstance(policy, str) else getattr(policy, "__name__", ""))
        return type(
            f"{cls.__name__}[{label or 'policy'}]",
            (cls,),
            {"policy_factory": staticmethod(factory)},
        )

    # -- helpers

    def _fail(self, invariant: str, message: str) -> PolicyInvariantError:
        self._broken = True
        return PolicyInvariantError(invariant, message)

    def _track(self, worker: BasicWorker) -> None:
        self.known[worker.url] = worker
        self.baseline[worker.url] = worker.load()

    def _pick(self, items: Sequence[Any], pick: int) -> int:
        return pick % len(items)

    def _split(self) -> tuple[list[BasicWorker], list[BasicWorker]]:
        prefill = [w for w in self.workers if w.worker_type is WorkerType.PREFILL]
        decode = [w for w in self.workers if w.worker_type is WorkerType.DECODE]
        return prefill, decode

    def _acquire(self, request_text: RequestText) -> Lease | None:
        try:
            lease = acquire(self.policy, self.workers, request_text)
        except NoHealthyWorkerError:
            if any(w.is_healthy() for w in self.workers):
                raise self._fail(
                    NONE_IFF_NO_HEALTHY,
                    f"acquire() with policy {_policy_name(self.policy)} found no healthy "
                    f"worker although one is healthy; workers: {_describe(self.workers)}",
                ) from None
            return None
        except ValueError as exc:  # acquire() rejects an index out of range
            raise self._fail(INDEX_IN_RANGE, f"{exc}; workers: {_describe(self.workers)}") from exc
        except TypeError as exc:
            raise self._fail(
                VALID_REQUEST_TEXT,
                f"acquire() with policy {_policy_name(self.policy)} raised TypeError: {exc}; "
                f"request_text={_short(request_text)}",
            ) from exc
        if not lease.worker.is_healthy():
            raise self._fail(
                ONLY_HEALTHY,
                f"acquire() with policy {_policy_name(self.policy)} leased unhealthy worker "
                f"{lease.worker.url}; workers: {_describe(self.workers)}",
            )
        return lease

    # -- rules

    @initialize(
        cluster=clusters(max_size=6, worker_types=tuple(WorkerType), max_load=3),
        sync=st.booleans(),
    )
    def start(self, cluster: list[BasicWorker], sync: bool) -> None:
        """Start with a generated pool; maybe tell the policy about it."""
        for worker in cluster:
            self._track(worker)
        self.workers = list(cluster)
        if sync:
            self.policy.sync_workers(self.workers)

    @rule(request_text=_any_request_text())
    def take_lease(self, request_text: RequestText) -> None:
        """``acquire``: load +1 on a healthy worker, or ``NoHealthyWorkerError`` iff none is."""
        lease = self._acquire(request_text)
        if lease is not None:
            self.leases.append(lease)

    @rule(request_text=_any_request_text())
    def take_pair_lease(self, request_text: RequestText) -> None:
        """``acquire_pair`` over the prefill and decode workers of the pool."""
        prefill, decode = self._split()
        ok = any(w.is_healthy() for w in prefill) and any(w.is_healthy() for w in decode)
        try:
            lease = acquire_pair(self.policy, prefill, decode, request_text)
        except NoHealthyWorkerError:
            if ok:
                raise self._fail(
                    NONE_IFF_NO_HEALTHY,
                    f"acquire_pair() with policy {_policy_name(self.policy)} found no pair "
                    f"although both lists have a healthy worker; prefill: "
                    f"{_describe(prefill)}; decode: {_describe(decode)}",
                ) from None
            return
        except ValueError as exc:
            raise self._fail(INDEX_IN_RANGE, str(exc)) from exc
        if not ok:
            raise self._fail(
                NONE_IFF_NO_HEALTHY,
                f"acquire_pair() with policy {_policy_name(self.policy)} leased "
                f"{lease!r} but a list has no healthy worker; prefill: {_describe(prefill)}; "
                f"decode: {_describe(decode)}",
            )
        if not (lease.prefill.is_healthy() and lease.decode.is_healthy()):
            raise self._fail(
                ONLY_HEALTHY,
                f"acquire_pair() with policy {_policy_name(self.policy)} leased an unhealthy "
                f"worker: {lease!r}",
            )
        self.leases.append(lease)

    @precondition(lambda self: bool(self.leases))
    @rule(pick=st.integers(0, _BIG), success=st.booleans())
    def release_lease(self, pick: int, success: bool) -> None:
        """Release an open lease with either outcome."""
        lease = self.leases.pop(self._pick(self.leases, pick))
        try:
            released = lease.release(success=success)
        except LoadUnderflowError as exc:
            raise self._fail(LOADS_CONSERVED, f"releasing {lease!r} underflowed: {exc}") from exc
        if not released:
            raise self._fail(LOADS_CONSERVED, f"first release of {lease!r} returned False")

    @precondition(lambda self: bool(self.leases))
    @rule(pick=st.integers(0, _BIG))
    def release_twice(self, pick: int) -> None:
        """Release an open lease twice: the second release gives nothing back."""
        lease = self.leases.pop(self._pick(self.leases, pick))
        lease.release(success=True)
        if lease.release(success=False):
            raise self._fail(LOADS_CONSERVED, f"second release of {lease!r} returned True")

    @rule(request_text=_any_request_text())
    def raise_inside_with(self, request_text: RequestText) -> None:
        """An exception inside ``with acquire(...)`` propagates and gives the load back."""
        lease = self._acquire(request_text)
        if lease is None:
            return
        raised = False
        try:
            with lease:
                raise _Boom
        except _Boom:
            raised = True
        if not (raised and lease.released and lease.success is False):
            raise self._fail(
                LOADS_CONSERVED,
                f"an exception inside `with {lease!r}` did not release it with success=False",
            )

    @rule(request_text=_any_request_text())
    def select_only(self, request_text: RequestText) -> None:
        """``select_worker`` without a lease: a valid choice, and no load changed."""
        before = _loads(self.workers)
        result = _call(
            self.policy,
            "select_worker",
            lambda: self.policy.select_worker(self.workers, request_text),
            request_text,
            self.workers,
        )
        try:
            _check_index(self.policy, "select_worker", result, self.workers, request_text)
            _check_loads_unchanged(self.policy, "select_worker", self.workers, before)
        except PolicyInvariantError:
            self._broken = True
            raise

    @precondition(lambda self: bool(self.workers))
    @rule(pick=st.integers(0, _BIG))
    def flip_health(self, pick: int) -> None:
        """Mark a worker unhealthy (or healthy again); its open leases stay open."""
        worker = self.workers[self._pick(self.workers, pick)]
        worker.set_healthy(not worker.is_healthy())

    @rule(
        healthy=st.booleans(),
        worker_type=st.sampled_from(tuple(WorkerType)),
        position=st.integers(0, _BIG),
    )
    def add_worker(self, healthy: bool, worker_type: WorkerType, position: int) -> None:
        """A worker joins the pool (``on_worker_added``) at any position."""
        self._added += 1
        worker = BasicWorker(
            f"http://added-{self._added}.local:8000", worker_type=worker_type, healthy=healthy
        )
        self._track(worker)
        self.workers.insert(position % (len(self.workers) + 1), worker)
        self.policy.on_worker_added(worker)

    @precondition(lambda self: bool(self.workers))
    @rule(pick=st.integers(0, _BIG))
    def remove_worker(self, pick: int) -> None:
        """A worker leaves the pool for good (``on_worker_removed``); its leases stay open."""
        worker = self.workers.pop(self._pick(self.workers, pick))
        self.policy.on_worker_removed(worker)

    @rule()
    def sync(self) -> None:
        """The gateway re-announces the whole pool (``sync_workers``)."""
        self.policy.sync_workers(self.workers)

    # -- invariants

    def expected_loads(self) -> dict[str, int]:
        """Every known worker's starting load plus its open leases, by URL."""
        expected = dict(self.baseline)
        for lease in self.leases:
            if isinstance(lease, Lease):
                expected[lease.worker.url] += 1
            else:
                expected[lease.prefill.url] += 1
                expected[lease.decode.url] += 1
        return expected

    @invariant()
    def loads_match_open_leases(self) -> None:
        """Each worker's load == its starting load + its open leases."""
        expected = self.expected_loads()
        wrong = {
            url: (w.load(), expected[url])
            for url, w in self.known.items()
            if w.load() != expected[url]
        }
        if wrong:
            detail = ", ".join(
                f"{url}: load {got}, expected {want}" for url, (got, want) in wrong.items()
            )
            raise self._fail(
                LOADS_CONSERVED,
                f"with policy {_policy_name(self.policy)}, loads differ from starting load + "
                f"open leases ({len(self.leases)} open): {detail}",
            )

    def teardown(self) -> None:
        """Release every open lease; every load must be back at its starting value."""
        leases, self.leases = self.leases, []
        try:
            for lease in leases:
                lease.release(success=True)
            if not self._broken:
                wrong = {
                    url: (w.load(), self.baseline[url])
                    for url, w in self.known.items()
                    if w.load() != self.baseline[url]
                }
                if wrong:
                    raise self._fail(
                        LOADS_CONSERVED,
                        f"with policy {_policy_name(self.policy)}, after releasing every "
                        f"lease, loads are not back at their starting values: {wrong} "
                        "(url: (load, expected))",
                    )
        finally:
            self.policy.close()


# --------------------------------------------------------------------------- check_policy


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


def _check_select(
    factory: PolicyFactory, settings: hypothesis.settings, max_workers: int, models: int
) -> None:
    @settings
    @hypothesis.given(
        cluster=clusters(max_size=max_workers, models=models),
        stream=request_streams(max_size=12, kinds="mixed", include_none=True),
        churn=st.lists(st.tuples(st.integers(0, _BIG), st.booleans()), max_size=12),
        sync=st.booleans(),
    )
    def select(
        cluster: list[BasicWorker],
        stream: list[RequestText],
        churn: list[tuple[int, bool]],
        sync: bool,
    ) -> None:
        policy = factory()
        if sync:
            policy.sync_workers(cluster)
        for step, request_text in enumerate(stream):
            before = _loads(cluster)
            result = _call(
                policy,
                "select_worker",
                functools.partial(policy.select_worker, cluster, request_text),
                request_text,
                cluster,
            )
            _check_index(policy, "select_worker", result, cluster, request_text)
            _check_loads_unchanged(policy, "select_worker", cluster, before)
            if step < len(churn) and cluster:
                pick, hold = churn[step]
                if hold and result is not None:  # the request stays in flight
                    cluster[result].increment_load()
                    cluster[result].increment_processed()
                else:
                    flipped = cluster[pick % len(cluster)]
                    flipped.set_healthy(not flipped.is_healthy())
        policy.close()

    select()


def _check_pair(factory: PolicyFactory, settings: hypothesis.settings, max_workers: int) -> None:
    size = max(1, max_workers // 2)

    @settings
    @hypothesis.given(
        prefill=clusters(max_size=size, worker_types=(WorkerType.PREFILL,), name="prefill"),
        decode=clusters(max_size=size, worker_types=(WorkerType.DECODE,), name="decode"),
        stream=request_streams(max_size=6, kinds="mixed", include_none=True),
        flips=st.lists(st.integers(0, _BIG), max_size=6),
    )
    def pair(
        prefill: list[BasicWorker],
        decode: list[BasicWorker],
        stream: list[RequestText],
        flips: list[int],
    ) -> None:
        policy = factory()
        both = prefill + decode
        for step, request_text in enumerate(stream):
            before = _loads(both)
            result = _call(
                policy,
                "select_worker_pair",
                functools.partial(policy.select_worker_pair, prefill, decode, request_text),
                request_text,
                both,
            )
            ok = any(w.is_healthy() for w in prefill) and any(w.is_healthy() for w in decode)
            where = f"policy {_policy_name(policy)} select_worker_pair returned {result!r}"
            lists = (
                f"; prefill: {_describe(prefill)}; decode: {_describe(decode)}; "
                f"request_text={_short(request_text)}"
            )
            if result is None:
                if ok:
                    raise PolicyInvariantError(
                        NONE_IFF_NO_HEALTHY,
                        f"{where} although both lists have a healthy worker{lists}",
                    )
            elif not ok:
                raise PolicyInvariantError(
                    NONE_IFF_NO_HEALTHY,
                    f"{where} but a list has no healthy worker: expected None{lists}",
                )
            elif type(result) is not tuple or len(result) != 2:
                raise PolicyInvariantError(
                    INDEX_IN_RANGE, f"{where}, not a (prefill, decode) tuple{lists}"
                )
            else:
                _check_index(policy, "select_worker_pair", result[0], prefill, request_text, "[0]")
                _check_index(policy, "select_worker_pair", result[1], decode, request_text, "[1]")
            _check_loads_unchanged(policy, "select_worker_pair", both, before)
            if step < len(flips) and both:
                flipped = both[flips[step] % len(both)]
                flipped.set_healthy(not flipped.is_healthy())
        policy.close()

    pair()


def _check_request_text_type(
    factory: PolicyFactory, settings: hypothesis.settings, max_workers: int
) -> None:
    @settings
    @hypothesis.given(
        cluster=clusters(max_size=max_workers),
        prefill=clusters(max_size=3, worker_types=(WorkerType.PREFILL,), name="prefill"),
        decode=clusters(max_size=3, worker_types=(WorkerType.DECODE,), name="decode"),
        bad=bad_request_texts(),
    )
    def request_text_type(
        cluster: list[BasicWorker],
        prefill: list[BasicWorker],
        decode: list[BasicWorker],
        bad: object,
    ) -> None:
        policy = factory()
        calls: list[tuple[str, Callable[[], object], list[BasicWorker]]] = [
            ("select_worker", lambda: policy.select_worker(cluster, bad), cluster),  # type: ignore[arg-type]
            (
                "select_worker_pair",
                lambda: policy.select_worker_pair(prefill, decode, bad),  # type: ignore[arg-type]
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
                    f"policy {_policy_name(policy)} {method} raised {type(exc).__name__} "
                    f"instead of TypeError for request_text={_short(bad)}",
                ) from exc
            raise PolicyInvariantError(
                BAD_REQUEST_TEXT,
                f"policy {_policy_name(policy)} {method} returned {result!r} for "
                f"request_text={_short(bad)} ({type(bad).__name__}) instead of raising "
                f"TypeError; workers: {_describe(described)}",
            )
        policy.close()

    request_text_type()


def _check_leases(factory: PolicyFactory, settings: hypothesis.settings, steps: int) -> None:
    machine = PolicyStateMachine.for_policy(factory)
    run_state_machine_as_test(
        machine, settings=hypothesis.settings(settings, stateful_step_count=steps)
    )


# Stable healthy (H), stable unhealthy (U) and flapping (F) workers for the threaded check.
_THREAD_PATTERN = "HUHFUHFUHU"


def _check_threads(
    factory: PolicyFactory, threads: int, iterations: int, seed: int, timeout: float
) -> None:
    policy = factory()
    name = _policy_name(policy)
    rng = random.Random(seed)
    pool = [
        BasicWorker(f"http://thread-{i}.local:8000", healthy=kind != "U")
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
    views: list[list[BasicWorker]] = []
    for t in range(threads):
        shift = (3 * t) % len(pool)
        view = pool[shift:] + pool[:shift]
        view = view[: len(view) - (t % 3)]
        if not any(kinds[w.url] == "H" for w in view):
            view = list(pool)
        views.append(view)
    policy.sync_workers(pool)
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()

    def validate(t: int, view: list[BasicWorker], index: object, text: RequestText) -> None:
        if type(index) is not int or not 0 <= index < len(view):
            errors.append(
                f"thread {t}: select_worker returned {index!r} for its {len(view)} workers"
            )
        elif kinds[view[index].url] == "U":
            errors.append(
                f"thread {t}: select_worker returned {index}, the always-unhealthy "
                f"{view[index].url}"
            )

    def hammer(t: int) -> None:
        local = random.Random(seed * 7919 + t)
        view = views[t]
        try:
            barrier.wait()
            for k in range(iterations):
                if len(errors) > 20:
                    return
                text = local.choice(texts)
                validate(t, view, policy.select_worker(view, text), text)
                try:
                    with acquire(policy, view, text) as lease:
                        if kinds[lease.worker.url] == "U" or view[lease.index] is not lease.worker:
                            errors.append(f"thread {t}: leased {lease.worker.url}")
                        if k % 7 == 0:
                            raise _Boom
                        if k % 5 == 0:  # two requests in flight from this thread
                            with acquire(policy, view, local.choice(texts)) as inner:
                                if kinds[inner.worker.url] == "U":
                                    errors.append(f"thread {t}: leased {inner.worker.url}")
                except _Boom:
                    pass
        except NoHealthyWorkerError as exc:
            errors.append(f"thread {t}: {exc} although an always-healthy worker exists")
        except Exception as exc:
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    def flap() -> None:
        local = random.Random(seed)
        barrier.wait()
        while not stop.is_set():
            worker = local.choice(flapping)
            worker.set_healthy(not worker.is_healthy())

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
        for thread in workers_threads:
            thread.join(timeout)
        hung = [thread.name for thread in workers_threads if thread.is_alive()]
    finally:
        stop.set()
        flapper.join(timeout)
        sys.setswitchinterval(interval)
    if hung:
        raise PolicyInvariantError(
            THREAD_SAFETY,
            f"policy {name}: threads {hung} still running after {timeout:.0f} s "
            "(deadlock or livelock?)",
        )
    loads = {w.url: w.load() for w in pool if w.load() != 0}
    if errors or loads:
        shown = "; ".join(errors[:5]) + (f"; ... ({len(errors)} errors)" if len(errors) > 5 else "")
        leaked = f"; loads not back at 0 after every lease was released: {loads}" if loads else ""
        raise PolicyInvariantError(
            THREAD_SAFETY,
            f"policy {name} with {threads} threads x {iterations} iterations: {shown}{leaked}",
        )
    policy.close()


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
        max_examples: hypothesis examples per check group.
        checks: the groups to run, a subset of :data:`CHECKS`.
        max_workers: most workers in a generated cluster.
        models: models per generated cluster (gateways pass one model's workers; ``1``).
        stateful_steps: most steps per state-machine run.
        threads: threads in the threaded check.
        thread_iterations: select + lease iterations per thread.
        thread_timeout: seconds before a thread that has not finished counts as hung.
        seed: seed of the threaded check's inputs (it is not hypothesis-driven, so that
            a race found once is not reported as a flaky example).
        settings: parent hypothesis settings (e.g. a profile's database or verbosity);
            ``max_examples`` and ``deadline=None`` are applied on top.

    Do not call it from inside a ``@given`` test: it runs hypothesis itself.

    Raises:
        PolicyInvariantError: an invariant is broken (an ``AssertionError``).
        ValueError: an unknown check name or a bad argument.
        TypeError: ``policy`` is not a policy, factory or name.
    """
    factory = policy_factory(policy)
    selected = tuple(CHECKS if checks is None else checks)
    unknown = sorted(set(selected) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    _check_size("max_examples", max_examples, 1)
    _check_size("max_workers", max_workers, 1)
    _check_size("models", models, 1)
    _check_size("stateful_steps", stateful_steps, 1)
    _check_size("threads", threads, 1)
    _check_size("thread_iterations", thread_iterations, 1)
    run_settings = _settings(max_examples, settings)
    runs: dict[str, Callable[[], None]] = {
        "select": lambda: _check_select(factory, run_settings, max_workers, models),
        "pair": lambda: _check_pair(factory, run_settings, max_workers),
        "request_text_type": lambda: _check_request_text_type(factory, run_settings, max_workers),
        "leases": lambda: _check_leases(factory, run_settings, stateful_steps),
        "threads": lambda: _check_threads(
            factory, threads, thread_iterations, seed, thread_timeout
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


def _self_check(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - manual use
    """``python -m cacheroute.testing [name ...]``: check registered policies by name."""
    from cacheroute.policies import available_policies

    names = list(argv if argv is not None else sys.argv[1:]) or available_policies()
    for name in names:
        check_policy(name, max_examples=50)
        print(f"{name}: ok")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_self_check())
