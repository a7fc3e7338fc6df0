"""Hypothesis strategies: workers, clusters, request texts, token ids, streams, bad inputs.

Every strategy returns fresh objects, so tests may mutate what they draw. Arguments are
checked when the strategy is built: a wrong type raises ``TypeError`` and a bad value
``ValueError``, both naming the parameter.

Workers are :class:`~cacheroute.BasicWorker` by default; pass ``worker_factory`` to
draw your own :class:`~cacheroute.Worker` class instead (see :data:`WorkerFactory`).

>>> from hypothesis import given, settings
>>> @settings(max_examples=5, database=None)
... @given(cluster=clusters(min_size=1, max_size=3, health="healthy"))
... def check(cluster):
...     assert 1 <= len(cluster) <= 3 and all(w.is_healthy() for w in cluster)
>>> check()
"""

from __future__ import annotations

import array
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

from hypothesis import strategies as st

from cacheroute._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_sequence,
    check_str,
    describe,
    fail,
)
from cacheroute.policies.base import RequestText
from cacheroute.worker import BasicWorker, Worker, WorkerType

__all__ = [
    "SYSTEM_PROMPTS",
    "HealthMix",
    "WorkerFactory",
    "bad_request_texts",
    "bad_worker_lists",
    "clusters",
    "request_streams",
    "request_texts",
    "token_ids",
    "workers",
]

HealthMix: TypeAlias = Literal["mixed", "healthy", "unhealthy", "at_least_one"]
"""How :func:`clusters` sets health: each worker at random (``"mixed"``), all healthy, all
unhealthy, or at random with at least one healthy worker (``"at_least_one"``)."""

_HEALTH_MIXES = ("mixed", "healthy", "unhealthy", "at_least_one")

WorkerFactory: TypeAlias = Callable[[str, str, WorkerType], Worker]
"""Builds one worker from ``(url, model_id, worker_type)``: your own
:class:`~cacheroute.Worker` class, or a function returning one.

The strategies then give it its drawn starting load and processed count through
``increment_load()`` / ``increment_processed()``, and its drawn health through
``set_healthy(bool)`` when it does not already have it (a worker class without
``set_healthy`` can only be drawn healthy: pass ``healthy=True`` / ``health="healthy"``).
The kit's state machine and threaded check flip health the same way."""

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


def _check_str_items(param: str, value: object) -> tuple[Any, ...]:
    items = tuple(check_sequence(param, value, item=check_str))
    if not items:
        raise fail(param, "a non-empty list", value)
    return items


def _check_worker_types(value: object) -> tuple[WorkerType, ...]:
    def item(param: str, v: object) -> None:
        if not isinstance(v, WorkerType):
            raise fail(param, "a WorkerType", v, TypeError)

    types = tuple(check_sequence("worker_types", value, item=item))
    if not types:
        raise fail("worker_types", "a non-empty list of WorkerType", value)
    return types


def make_worker(
    factory: WorkerFactory | None,
    url: str,
    model_id: str,
    worker_type: WorkerType,
    *,
    healthy: bool = True,
    load: int = 0,
    processed: int = 0,
    bootstrap_port: int | None = None,
) -> Worker:
    """One worker with the given state, built by ``factory`` (``None``: a BasicWorker).

    Raises:
        TypeError: the factory returned something that is not a Worker, or a worker
            that is not already ``healthy`` and has no ``set_healthy``.
    """
    if factory is None:
        worker: Worker = BasicWorker(
            url, model_id, worker_type, bootstrap_port=bootstrap_port, healthy=healthy
        )
    else:
        worker = factory(url, model_id, worker_type)
        if not isinstance(worker, Worker):
            raise TypeError(f"worker_factory {factory!r} returned {describe(worker)}, not a Worker")
        set_health(worker, healthy)
    for _ in range(load):
        worker.increment_load()
    for _ in range(processed):
        worker.increment_processed()
    return worker


def set_health(worker: Worker, healthy: bool) -> None:
    """Make ``worker`` (un)healthy through its ``set_healthy``; TypeError if it has none."""
    if worker.is_healthy() is healthy:
        return
    setter = getattr(worker, "set_healthy", None)
    if setter is None:
        raise TypeError(
            f"{type(worker).__name__} has no set_healthy(bool), so the kit cannot make "
            f"{worker.url!r} {'healthy' if healthy else 'unhealthy'}; give it one, or "
            "draw only healthy workers (healthy=True / health='healthy')"
        )
    setter(healthy)


@st.composite
def _worker_specs(
    draw: st.DrawFn,
    urls: st.SearchStrategy[str],
    model_ids: tuple[str, ...],
    worker_types: tuple[WorkerType, ...],
    healthy: bool | None,
    max_load: int,
    max_processed: int,
    ports: bool,
) -> dict[str, Any]:
    worker_type = draw(st.sampled_from(worker_types))
    with_port = ports and worker_type is WorkerType.PREFILL
    return {
        "url": draw(urls),
        "model_id": draw(st.sampled_from(model_ids)),
        "worker_type": worker_type,
        "bootstrap_port": draw(st.none() | st.integers(1, 65535)) if with_port else None,
        "healthy": draw(st.booleans()) if healthy is None else healthy,
        "load": draw(st.integers(0, max_load)),
        "processed": draw(st.integers(0, max_processed)),
    }


def _build(factory: WorkerFactory | None, spec: dict[str, Any]) -> Worker:
    spec = dict(spec)
    return make_worker(
        factory, spec.pop("url"), spec.pop("model_id"), spec.pop("worker_type"), **spec
    )


def workers(
    *,
    urls: st.SearchStrategy[str] | None = None,
    model_ids: Sequence[str] = ("default",),
    worker_types: Sequence[WorkerType] = tuple(WorkerType),
    healthy: bool | None = None,
    max_load: int = 8,
    max_processed: int = 32,
    worker_factory: WorkerFactory | None = None,
) -> st.SearchStrategy[Any]:
    """A fresh worker with generated health, load and processed count.

    Args:
        urls: strategy for the URL; default ``http://w-<host><n>.<domain>:<port>``, some
            hosts non-ASCII (URLs are tenant names in prefix trees).
        model_ids: the models to draw from (a list or tuple of ``str``, not one ``str``).
        worker_types: the worker types to draw from (a ``PREFILL`` BasicWorker sometimes
            gets a bootstrap port).
        healthy: fixed health, or ``None`` to draw it.
        max_load: the starting load is drawn from ``[0, max_load]``.
        max_processed: the processed count is drawn from ``[0, max_processed]``.
        worker_factory: ``None`` for :class:`~cacheroute.BasicWorker`, or a
            :data:`WorkerFactory` building your own Worker class.

    The starting load is real load on the worker (as if requests were in flight before the
    test started); invariants on loads are relative to it.

    Raises:
        TypeError, ValueError: an argument of a wrong type or value (naming it).
    """
    if urls is not None and not isinstance(urls, st.SearchStrategy):
        raise fail("urls", "a hypothesis strategy of str or None", urls, TypeError)
    ids = _check_str_items("model_ids", model_ids)
    types = _check_worker_types(worker_types)
    if healthy is not None:
        check_bool("healthy", healthy)
    check_int("max_load", max_load, minimum=0)
    check_int("max_processed", max_processed, minimum=0)
    check_callable("worker_factory", worker_factory, none_ok=True)
    specs = _worker_specs(
        urls if urls is not None else _urls("w"),
        ids,
        types,
        healthy,
        max_load,
        max_processed,
        worker_factory is None,
    )
    return specs.map(lambda spec: _build(worker_factory, spec))


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
    factory: WorkerFactory | None,
) -> list[Any]:
    fixed = {"mixed": None, "at_least_one": None, "healthy": True, "unhealthy": False}[health]
    # One list of whole worker specs (not a size, then URLs, then workers): deleting an
    # element deletes a worker, so failures shrink to the fewest workers that show them.
    specs = draw(
        st.lists(
            _worker_specs(
                _urls(name),
                model_ids,
                worker_types,
                fixed,
                max_load,
                max_processed,
                factory is None,
            ),
            min_size=min_size,
            max_size=max_size,
            unique_by=lambda spec: spec["url"],
        )
    )
    if health == "at_least_one" and not any(spec["healthy"] for spec in specs):
        specs[draw(st.integers(0, len(specs) - 1))]["healthy"] = True
    return [_build(factory, spec) for spec in specs]


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
    worker_factory: WorkerFactory | None = None,
) -> st.SearchStrategy[list[Any]]:
    """A list of fresh workers with unique URLs: what a gateway passes to ``select_worker``.

    Args:
        min_size: fewest workers (``0`` allows the empty list).
        max_size: most workers.
        models: a number of models (``1`` gives ``"default"``, ``k`` gives ``"model-0"`` ...
            ``"model-{k-1}"``) or the model ids themselves (a list of ``str``); each worker
            draws one. Prefix-aware policies refuse a list mixing several models: split
            such a cluster by ``model_id`` before routing over it.
        worker_types: the worker types to draw from (``(WorkerType.PREFILL,)`` for a
            prefill list).
        health: the health mix, see :data:`HealthMix`.
        max_load: each starting load is drawn from ``[0, max_load]``.
        max_processed: each processed count is drawn from ``[0, max_processed]``.
        name: first part of every URL's host, so two clusters (prefill and decode) drawn
            with different names never share a URL.
        worker_factory: ``None`` for :class:`~cacheroute.BasicWorker`, or a
            :data:`WorkerFactory` building your own Worker class.

    Raises:
        TypeError, ValueError: an argument of a wrong type or value (naming it).
    """
    check_int("min_size", min_size, minimum=0)
    check_choice("health", health, _HEALTH_MIXES)
    floor = max(min_size, 1 if health == "at_least_one" else 0)
    check_int("max_size", max_size, minimum=floor)
    check_int("max_load", max_load, minimum=0)
    check_int("max_processed", max_processed, minimum=0)
    check_str("name", name)
    check_callable("worker_factory", worker_factory, none_ok=True)
    if type(models) is int:
        check_int("models", models, minimum=1)
        model_ids = ("default",) if models == 1 else tuple(f"model-{i}" for i in range(models))
    elif isinstance(models, (bool, int, float)):
        raise fail("models", "an int >= 1 or a list of model ids", models, TypeError)
    else:
        model_ids = _check_str_items("models", models)
    types = _check_worker_types(worker_types)
    return _clusters(
        floor,
        max_size,
        model_ids,
        types,
        health,
        max_load,
        max_processed,
        name,
        worker_factory,
    )


def bad_worker_lists() -> st.SearchStrategy[object]:
    """Values that are not a list of workers: ``None``, numbers, ``str``, ``bytes``, dicts,
    sets, generators, nested lists. Every policy must raise ``TypeError`` for them."""
    return st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
        st.sets(st.integers(0, 9), max_size=3),
        st.lists(st.integers(0, 9), max_size=3).map(lambda xs: (x for x in xs)),
        st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=2), min_size=1, max_size=3),
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
    ).map(lambda chosen: " ".join(chosen)[:max_size])  # max_size holds for words too
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
        prompts: fixed system prompts (a non-empty list of ``str``) instead of generated ones.
        max_prompts: size of the generated prompt pool.
        max_suffix_size: longest generated turn, in characters.
    """
    check_int("max_prompts", max_prompts, minimum=1)
    check_int("max_suffix_size", max_suffix_size, minimum=0)
    if prompts is not None:

        def item(param: str, v: object) -> None:
            check_str(param, v, empty_ok=True)

        fixed = tuple(check_sequence("prompts", prompts, item=item))
        if not fixed:
            raise fail("prompts", "a non-empty list of str or None", prompts)
    return _request_texts(None if prompts is None else fixed, max_prompts, max_suffix_size)


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
        vocab_size: ids are drawn from ``[0, vocab_size)`` (default: a Llama-3 vocabulary;
            at most ``2**63``, what ``array.array("q")`` holds).
        max_size: most ids after the shared prefix.
        containers: the container types to draw from, a list of ``"list"``,
            ``"tuple"``, ``"array"`` (``array.array("q")``); all are valid ``request_text``.
        shared_prefixes: start about half the sequences with one of a few prefixes shared
            by every draw of the example (like a tokenised system prompt).
    """
    check_int("vocab_size", vocab_size, minimum=1, maximum=2**63)
    check_int("max_size", max_size, minimum=0)
    names = tuple(_TOKEN_CONTAINERS)

    def item(param: str, v: object) -> None:
        check_choice(param, v, names)

    chosen = tuple(check_sequence("containers", containers, item=item))
    if not chosen:
        raise fail("containers", f"a non-empty list of {', '.join(names)}", containers)
    check_bool("shared_prefixes", shared_prefixes)
    return _token_ids(vocab_size, max_size, chosen, shared_prefixes)


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
    check_int("min_size", min_size, minimum=0)
    check_int("max_size", max_size, minimum=min_size)
    check_choice("kinds", kinds, ("text", "tokens", "mixed"))
    check_bool("include_none", include_none)
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


def any_request_text() -> st.SearchStrategy[RequestText]:
    """``None``, a request text, or token ids in any container (the kit's valid inputs)."""
    return st.one_of(st.none(), request_texts(), token_ids(containers=("list", "tuple", "array")))
