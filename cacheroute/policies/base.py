"""The one interface every routing policy implements.

Shared semantics, true of every policy (the project's own property tests and
:func:`cacheroute.testing.check_policy` check them for every registered policy):

* only healthy workers are chosen;
* ``None`` is returned exactly when no worker is healthy (an empty list included);
* the index points into the list the caller passed;
* ``request_text`` may be a ``str``, a sequence of non-negative ``int`` token ids
  (``list``, ``tuple``, ``array.array``) or ``None``; any other type raises ``TypeError``.
  Policies that ignore the text check only its container type (O(1)); policies that read
  token ids (the cache-aware tree) validate every id, at C speed;
* ``workers`` that is not a ``list``/``tuple`` of :class:`~cacheroute.worker.Worker`
  raises ``TypeError`` naming it (or the index of the first bad element).

One request flows through :meth:`LoadBalancingPolicy.decide`, which returns a
:class:`Decision`: the chosen index plus what the policy expects of it (prompt tokens,
tokens already cached there). :func:`cacheroute.acquire` turns that into a lease holding
the load and the work on the worker. ``select_worker`` is ``decide(...).index``.
"""

from __future__ import annotations

import array
import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from cacheroute._validation import check_bool, check_sequence, check_str, fail
from cacheroute.worker import BasicWorker, Worker, _not_a_worker

__all__ = [
    "CHARS_PER_TOKEN",
    "Decision",
    "DecisionReason",
    "LoadBalancingPolicy",
    "RequestText",
    "check_request_text",
    "check_token_ids",
    "check_workers",
    "estimate_tokens",
    "healthy_indices",
    "least_loaded_index",
]

RequestText: TypeAlias = "str | Sequence[int] | None"
"""What a policy may route on: prompt text, token ids, or nothing."""

CHARS_PER_TOKEN = 4
"""Characters per token assumed when a prompt is text (English BPE vocabularies average
about 4); pass ``prompt_tokens`` to :func:`cacheroute.acquire` when you know the count."""


class DecisionReason(str, enum.Enum):
    """Which rule made a decision. A ``str`` enum: ``reason == "cache_hit"`` works."""

    CACHE_HIT = "cache_hit"
    """Balanced load, match above the threshold: the longest-match holder (cache_aware)."""
    CACHE_MISS = "cache_miss"
    """Balanced load, match at or below the threshold, or no text: least load."""
    IMBALANCED = "imbalanced"
    """Load imbalanced: the imbalanced branch decided (cache_aware)."""
    LEAST_COST = "least_cost"
    """The least estimated cost (work_aware: estimated time to first token)."""
    HASH = "hash"
    """The prompt's place on a hash ring (prefix_hash)."""
    POLICY = "policy"
    """A policy without reasons of its own (round robin, random, least load, yours)."""


@dataclass(slots=True)
class Decision:
    """One routing decision: what :meth:`LoadBalancingPolicy.decide` returns.

    A plain slotted record (cheap to build on every request; treat it as read-only).
    :func:`cacheroute.acquire` takes ``prompt_tokens - cached_tokens`` as the lease's
    pending prefill work on the worker.

    >>> d = Decision(0, "http://w1", DecisionReason.CACHE_HIT, 10, 8, 40, 32)
    >>> d.index, d.reason == "cache_hit", d.prompt_tokens - d.cached_tokens
    (0, True, 8)
    """

    index: int
    """Index of the chosen worker in the list the caller passed."""
    url: str
    """The chosen worker's URL."""
    reason: str
    """The rule that decided: a :class:`DecisionReason` for the built-in policies."""
    request_units: int = 0
    """Units (characters or tokens) in the request; 0 without text."""
    matched_units: int = 0
    """Units of the request the policy believes the chosen worker already caches."""
    prompt_tokens: int = 0
    """The policy's estimate of the prompt's tokens (see :func:`estimate_tokens`)."""
    cached_tokens: int = 0
    """Of those, tokens expected to be served from the chosen worker's prefix cache."""
    cost: float | None = None
    """Policy-specific score of the chosen worker (work_aware: estimated seconds to first
    token), ``None`` when the policy computes none."""


_TOKEN_CONTAINERS = (list, tuple, array.array)


def estimate_tokens(request_text: RequestText) -> int:
    """Tokens in a prompt: its length for token ids, ``ceil(chars / CHARS_PER_TOKEN)`` for
    text, 0 for ``None``. O(1).

    Raises:
        TypeError: ``request_text`` is not a ``str``, a token-id sequence or ``None``.

    >>> estimate_tokens([1, 2, 3]), estimate_tokens("x" * 10), estimate_tokens(None)
    (3, 3, 0)
    """
    if request_text is None:
        return 0
    if type(request_text) is str:
        return -(-len(request_text) // CHARS_PER_TOKEN)
    check_request_text(request_text)
    if isinstance(request_text, str):
        return -(-len(request_text) // CHARS_PER_TOKEN)
    return len(request_text)


_U32 = "I" if array.array("I").itemsize == 4 else None


def check_token_ids(request_text: RequestText) -> None:
    """Raise unless ``request_text`` is text, ``None`` or token ids in ``[0, 2**32)``.

    What a prefix policy's tree accepts; O(m) at C speed (one ``array`` conversion), the
    message naming ``request_text[i]`` and the value. For callers that must refuse bad ids
    before changing any state (the prefix policies' :meth:`LoadBalancingPolicy.can_decide`).

    >>> check_token_ids([1, 2, 3])
    >>> check_token_ids([1, -2])
    Traceback (most recent call last):
    ...
    ValueError: request_text[1] must be a token id in [0, 2**32), got -2 (int)
    """
    check_request_text(request_text)
    if request_text is None or isinstance(request_text, str):
        return
    if _U32 is not None:
        try:
            array.array(_U32, request_text)  # C speed: refuses non-ints and ids out of range
            return
        except (TypeError, OverflowError):
            pass
    for i, t in enumerate(request_text):  # the slow path names the first bad id
        if type(t) is not int and (isinstance(t, bool) or not isinstance(t, int)):
            raise fail(f"request_text[{i}]", "an int token id", t, TypeError)
        if not 0 <= t < 2**32:
            raise fail(f"request_text[{i}]", "a token id in [0, 2**32)", t)


def check_workers(workers: object, param: str = "workers") -> Sequence[Worker]:
    """``workers`` if it is a ``list``/``tuple`` (or other non-text ``Sequence``).

    O(1): elements are checked where they are read (a non-Worker element raises
    ``TypeError`` naming its index then). ``str``, ``bytes``, dicts, sets and
    generators raise ``TypeError`` naming ``workers`` (or ``param``).
    """
    if type(workers) is list or type(workers) is tuple:
        return workers
    return check_sequence(param, workers)


def _check_all_workers(workers: object, param: str = "workers") -> Sequence[Worker]:
    """``check_workers`` and every element a Worker (O(n): for rare calls, not per request)."""
    seq = check_workers(workers, param)
    if all(type(w) is BasicWorker for w in seq):  # the common case, without protocol checks
        return seq
    for i, w in enumerate(seq):
        if not isinstance(w, Worker):
            raise fail(f"{param}[{i}]", "a Worker", w, TypeError)
    return seq


def _check_worker(worker: object, param: str = "worker") -> Worker:
    if not isinstance(worker, Worker):
        raise fail(param, "a Worker", worker, TypeError)
    return worker


def _renamed(exc: TypeError, param: str) -> TypeError:
    """A ``workers...`` error raised for the list the caller passed as ``param``."""
    text = str(exc)
    if text.startswith("workers"):
        return TypeError(param + text[len("workers") :])
    return exc


def check_request_text(request_text: object) -> None:
    """Raise ``TypeError`` unless ``request_text`` is a ``str``, a token-id sequence or ``None``.

    O(1): only the container type is checked. ``bytes`` and ``bytearray`` are rejected
    (they are neither text nor token ids; decode them first).
    """
    if request_text is None or type(request_text) is str or type(request_text) in _TOKEN_CONTAINERS:
        return
    if isinstance(request_text, (str, *_TOKEN_CONTAINERS)) or (
        isinstance(request_text, Sequence)
        and not isinstance(request_text, (bytes, bytearray, memoryview))
    ):
        return
    raise TypeError(
        "request_text must be a str, a sequence of non-negative int token ids, or None; "
        f"got {type(request_text).__name__}: {request_text!r:.60}"
    )


def healthy_indices(workers: Sequence[Worker]) -> list[int]:
    """Indices of the healthy workers, in order. O(n).

    >>> from cacheroute import BasicWorker
    >>> healthy_indices([BasicWorker("http://a", healthy=False), BasicWorker("http://b")])
    [1]
    """
    try:
        return [i for i, w in enumerate(check_workers(workers)) if w.is_healthy()]
    except AttributeError:
        raise _not_a_worker(workers) from None


def least_loaded_index(workers: Sequence[Worker], *, _param: str = "workers") -> int | None:
    """The healthy worker with the least load; ties by fewest processed, then lowest index.

    Breaking ties by processed count keeps equal (or stale) loads from all landing on
    worker 0. ``None`` when no worker is healthy. O(n), one pass, no allocation per worker.

    >>> from cacheroute import BasicWorker
    >>> a, b = BasicWorker("http://a"), BasicWorker("http://b")
    >>> a.increment_processed(); least_loaded_index([a, b])
    1
    """
    best = -1
    best_load = best_processed = 0
    try:
        for i, w in enumerate(check_workers(workers, _param)):
            if not w.is_healthy():
                continue
            load = w.load()
            if best < 0 or load < best_load:
                best, best_load, best_processed = i, load, w.processed()
            elif load == best_load:
                processed = w.processed()
                if processed < best_processed:
                    best, best_processed = i, processed
    except AttributeError:
        raise _not_a_worker(workers, _param) from None
    return None if best < 0 else best


class LoadBalancingPolicy(ABC):
    """Base class of every routing policy.

    Subclass it, set :attr:`name` and :attr:`description`, implement
    :meth:`select_worker` (or, to report what you expect cached, :meth:`decide`), and
    register the class with :func:`cacheroute.policies.register_policy` to make it
    available by name::

        class FirstHealthy(LoadBalancingPolicy):
            name = "first_healthy"
            description = "the first healthy worker in the list"

            def select_worker(self, workers, request_text=None):
                check_request_text(request_text)
                for i, w in enumerate(workers):
                    if w.is_healthy():
                        return i
                return None

    Policies are shared by every request thread of a gateway: implementations must be
    thread-safe. A policy never changes a worker's load: that is the lease's job
    (:func:`cacheroute.acquire`), so load is counted the same way for every policy.
    The built-in policies call ``increment_processed()`` on the worker they choose, so
    the processed count (the tie-breaker between equal loads) means "requests routed
    here"; do the same in your own policy if it relies on that tie-break.
    """

    name: ClassVar[str] = "base"
    """The registry name of the policy."""
    description: ClassVar[str] = ""
    """One line shown by ``cacheroute policies``."""
    needs_request_text: ClassVar[bool] = False
    """Whether the policy reads ``request_text``; gateways may skip building it if not."""

    @abstractmethod
    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        """Choose a worker for one request.

        Args:
            workers: the candidate workers (already filtered to the request's model).
            request_text: prompt text, token ids, or ``None``.

        Returns:
            An index into ``workers`` of a healthy worker, or ``None`` when none is healthy.

        Raises:
            TypeError: ``request_text`` is not a ``str``, token-id sequence or ``None``,
                or ``workers`` is not a list of workers.
        """

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        """Choose a worker and say what is expected of it: the path of one request.

        The default wraps :meth:`select_worker` and expects nothing cached
        (``cached_tokens=0``). Policies that know what a worker caches override this and
        define :meth:`select_worker` as ``decide(...).index`` (so a subclass of such a
        policy overrides ``decide``). :func:`cacheroute.acquire` calls this.

        Returns:
            A :class:`Decision`, or ``None`` when no worker is healthy.
        """
        index = self.select_worker(workers, request_text)
        if index is None:
            return None
        url = workers[index].url if type(index) is int and 0 <= index < len(workers) else ""
        n = 0 if request_text is None else len(request_text)
        return Decision(index, url, DecisionReason.POLICY, n, 0, estimate_tokens(request_text))

    def can_decide(self, workers: Sequence[Worker], request_text: RequestText = None) -> bool:
        """Whether :meth:`decide` would choose a worker of ``workers`` now, without deciding.

        Raises what :meth:`decide` would raise for these arguments and otherwise returns
        ``False`` exactly when it would return ``None``; it changes nothing (no worker is
        counted, no prefix remembered). For callers that must refuse a request before
        changing other state: :class:`~cacheroute.policies.PairPolicy` asks its prefill
        policy before deciding its decode leg. Not on the path of :meth:`decide`.

        The answer holds for the moment it is read: a worker may turn unhealthy (or be
        removed) before a following :meth:`decide`, which then returns ``None``.

        The default checks the container type of ``request_text`` and that some worker is
        healthy, which is what :meth:`decide` refuses and needs under the shared semantics.
        Override it when your policy refuses more (token ids it cannot read) or chooses
        among fewer workers (the prefix policies, prefix_hash and
        :class:`~cacheroute.policies.PairPolicy` do).

        Raises:
            TypeError: ``workers`` or ``request_text`` of a wrong type.

        Complexity: O(n) health reads (overrides add their own validation of the text,
        O(m) for m token ids).

        >>> from cacheroute import BasicWorker, make_policy
        >>> p = make_policy("round_robin")
        >>> p.can_decide([BasicWorker("http://a", healthy=False)]), p.can_decide([])
        (False, False)
        >>> w = BasicWorker("http://b"); p.can_decide([w], "hi"), w.processed()
        (True, 0)
        """
        check_request_text(request_text)
        return bool(healthy_indices(workers))

    def select_worker_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[int, int] | None:
        """Choose a (prefill, decode) pair for prefill/decode-disaggregated serving.

        The default: this policy on the prefill list, least load on the decode list
        (decode holds the KV cache for the whole generation, so its load is what matters).
        ``None`` when either list has no healthy worker; the prefill policy is then not
        consulted, so no tree is updated for a request that cannot be served.
        Use :class:`cacheroute.policies.PairPolicy` to combine any two policies.
        """
        pair = self.decide_pair(prefill_workers, decode_workers, request_text)
        return None if pair is None else (pair[0].index, pair[1].index)

    def decide_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[Decision, Decision] | None:
        """:meth:`select_worker_pair` with a :class:`Decision` per leg (what
        :func:`cacheroute.acquire_pair` calls). The default: least load on the decode list
        first, then :meth:`decide` on the prefill list."""
        check_request_text(request_text)
        check_workers(prefill_workers, "prefill_workers")
        decode = least_loaded_index(decode_workers, _param="decode_workers")
        if decode is None:
            return None
        try:
            prefill = self.decide(prefill_workers, request_text)
        except TypeError as exc:
            raise _renamed(exc, "prefill_workers") from None
        if prefill is None:
            return None
        worker = decode_workers[decode]
        worker.increment_processed()
        n = 0 if request_text is None else len(request_text)
        tokens = estimate_tokens(request_text)
        return prefill, Decision(decode, worker.url, DecisionReason.POLICY, n, 0, tokens)

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        """Called once per request when its lease is released, with the outcome.

        The default only checks its arguments (``TypeError`` naming a wrong one).
        Policies may use it, for example, to track failures.
        """
        check_str("worker_url", worker_url)
        check_bool("success", success)

    def on_worker_added(self, worker: Worker) -> None:
        """Hook for policies with per-worker state: a worker joined the pool.

        The default only checks that ``worker`` is a Worker (``TypeError`` otherwise).
        """
        _check_worker(worker)

    def on_worker_removed(self, worker: Worker) -> None:
        """Hook for policies with per-worker state: a worker left the pool for good.

        It must never be chosen again; its state (e.g. its tree tenant) is dropped.
        The default only checks that ``worker`` is a Worker (``TypeError`` otherwise).
        """
        _check_worker(worker)

    def sync_workers(self, workers: Sequence[Worker]) -> None:
        """Hook for policies with per-worker state: make the known pool exactly ``workers``.

        The default only checks that ``workers`` is a list of Workers (``TypeError``
        naming it, or the index of the first bad element); stateless policies need
        nothing else.
        """
        _check_all_workers(workers)

    def close(self) -> None:  # noqa: B027
        """Release any background resources. The default does nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
