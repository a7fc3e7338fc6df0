"""The one interface every routing policy implements.

Shared semantics, true of every policy (the project's own property tests and
:func:`cacheroute.testing.check_policy` check them for every registered policy):

* only healthy workers are chosen;
* ``None`` is returned exactly when no worker is healthy (an empty list included);
* the index points into the list the caller passed;
* ``request_text`` may be a ``str``, a sequence of non-negative ``int`` token ids
  (``list``, ``tuple``, ``array.array``) or ``None``; any other type raises ``TypeError``.
  Policies that ignore the text check only its container type (O(1)); policies that read
  token ids (the cache-aware tree) validate every id, at C speed.
"""

from __future__ import annotations

import array
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, TypeAlias

from cacheroute.worker import Worker

__all__ = [
    "LoadBalancingPolicy",
    "RequestText",
    "check_request_text",
    "healthy_indices",
    "least_loaded_index",
]

RequestText: TypeAlias = "str | Sequence[int] | None"
"""What a policy may route on: prompt text, token ids, or nothing."""

_TOKEN_CONTAINERS = (list, tuple, array.array)


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
    """Indices of the healthy workers, in order. O(n)."""
    return [i for i, w in enumerate(workers) if w.is_healthy()]


def least_loaded_index(workers: Sequence[Worker]) -> int | None:
    """The healthy worker with the least load; ties by fewest processed, then lowest index.

    Breaking ties by processed count keeps equal (or stale) loads from all landing on
    worker 0. ``None`` when no worker is healthy. O(n), one pass, no allocation per worker.
    """
    best = -1
    best_load = best_processed = 0
    for i, w in enumerate(workers):
        if not w.is_healthy():
            continue
        load = w.load()
        if best < 0 or load < best_load:
            best, best_load, best_processed = i, load, w.processed()
        elif load == best_load:
            processed = w.processed()
            if processed < best_processed:
                best, best_processed = i, processed
    return None if best < 0 else best


class LoadBalancingPolicy(ABC):
    """Base class of every routing policy.

    Subclass it, set :attr:`name` and :attr:`description`, implement
    :meth:`select_worker`, and register the class with
    :func:`cacheroute.policies.register_policy` to make it available by name::

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
            TypeError: ``request_text`` is not a ``str``, token-id sequence or ``None``.
        """

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
        check_request_text(request_text)
        decode = least_loaded_index(decode_workers)
        if decode is None:
            return None
        prefill = self.select_worker(prefill_workers, request_text)
        if prefill is None:
            return None
        decode_workers[decode].increment_processed()
        return prefill, decode

    def on_request_complete(self, worker_url: str, success: bool) -> None:  # noqa: B027
        """Called once per request when its lease is released, with the outcome.

        The default does nothing. Policies may use it, for example, to track failures.
        """

    def on_worker_added(self, worker: Worker) -> None:  # noqa: B027
        """Hook for policies with per-worker state: a worker joined the pool."""

    def on_worker_removed(self, worker: Worker) -> None:  # noqa: B027
        """Hook for policies with per-worker state: a worker left the pool for good.

        It must never be chosen again; its state (e.g. its tree tenant) is dropped.
        """

    def sync_workers(self, workers: Sequence[Worker]) -> None:  # noqa: B027
        """Hook for policies with per-worker state: make the known pool exactly ``workers``.

        The default does nothing (stateless policies need nothing).
        """

    def close(self) -> None:  # noqa: B027
        """Release any background resources. The default does nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
