"""Workers: the serving engines (SGLang or vLLM replicas) a policy chooses between.

A policy only ever reads a worker through the :class:`Worker` protocol, so a gateway
can pass its own worker objects. :class:`BasicWorker` is the ready, thread-safe
implementation.

Load is the number of requests in flight on the worker: it goes up when a request is
dispatched and down when its response (streams included) has finished. Take load only
through :func:`cacheroute.acquire`, which gives it back exactly once (seed 001: a path
that forgot to count load made one engine take every request).

**Work.** Requests differ by orders of magnitude (a 50-token chat turn, a 200k-token
agent context), so a count of requests says little about how long the next one will wait.
A worker that also implements :class:`WorkAccounting` (``BasicWorker`` does) keeps two
token totals, maintained by the leases: *pending prefill tokens* (tokens leased for
prefill whose first output token has not been reported yet: the queue in front of a new
request) and *decode tokens* (context tokens of requests past their first token: the
pressure on every decode step and on KV memory). Work-aware policies read them through
:func:`read_work`; workers without them read as zero work and policies fall back to
counts. ``BasicWorker`` also keeps the running total of prefill tokens ever leased
(:meth:`BasicWorker.prefill_tokens_leased`): less the pending total, it says how many
have left the queue, which is how a policy that shares the worker with other gateways
tells when its own prefills are done.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from cacheroute._validation import (
    check_bool,
    check_int,
    check_sequence,
    check_str,
    describe,
    fail,
)

__all__ = [
    "BasicWorker",
    "LoadUnderflowError",
    "WorkAccounting",
    "Worker",
    "WorkerType",
    "all_basic",
    "read_loads",
    "read_work",
]


class WorkerType(enum.Enum):
    """The role of a worker in regular or prefill/decode-disaggregated serving."""

    REGULAR = "regular"
    """Serves whole requests (prefill and decode)."""
    PREFILL = "prefill"
    """Prefill leg of a disaggregated pair; may carry a bootstrap port for KV transfer."""
    DECODE = "decode"
    """Decode leg of a disaggregated pair."""


class LoadUnderflowError(RuntimeError):
    """Raised when a worker's load would go below zero.

    With leases a double release cannot happen, so this always signals a caller bug:
    load given back that was never taken, or given back twice by hand.
    """


@runtime_checkable
class Worker(Protocol):
    """What a policy needs to know about a worker.

    Implementations must make the counter methods safe to call from many threads.
    ``isinstance(obj, Worker)`` checks the method names only (a runtime-checkable
    protocol), not their behaviour.
    """

    @property
    def url(self) -> str:
        """The worker's base URL; also its tenant name in prefix trees."""
        ...

    @property
    def model_id(self) -> str:
        """The model the worker serves; cache-aware policies keep one tree per model."""
        ...

    @property
    def worker_type(self) -> WorkerType:
        """Regular, prefill or decode."""
        ...

    def is_healthy(self) -> bool:
        """Whether the worker may be chosen."""
        ...

    def load(self) -> int:
        """Requests currently in flight on the worker."""
        ...

    def increment_load(self) -> None:
        """Count one more request in flight."""
        ...

    def decrement_load(self) -> None:
        """Count one request finished; raises :class:`LoadUnderflowError` at zero."""
        ...

    def processed(self) -> int:
        """Requests routed to the worker so far (a tie-breaker for load)."""
        ...

    def increment_processed(self) -> None:
        """Count one more request routed to the worker."""
        ...


@runtime_checkable
class WorkAccounting(Protocol):
    """Optional token totals of a worker, kept by the leases (``BasicWorker`` has them).

    Both totals are sums over the worker's leases, so they return to 0 when every lease
    is released. :meth:`add_work` must apply both deltas atomically and refuse (raising
    :class:`LoadUnderflowError`, changing nothing) to take a total below 0.
    """

    def pending_prefill_tokens(self) -> int:
        """Uncached prompt tokens leased here whose first output token is not out yet."""
        ...

    def decode_tokens(self) -> int:
        """Context tokens of the requests leased here that are past their first token."""
        ...

    def add_work(self, prefill_tokens: int, decode_tokens: int) -> None:
        """Add (signed) deltas to both totals, atomically."""
        ...

    # Optional, read with getattr (a worker without it still works):
    # ``prefill_tokens_leased() -> int``, the running total of prefill tokens ever added
    # to the pending total (see :meth:`BasicWorker.prefill_tokens_leased`).


class BasicWorker:
    """A thread-safe :class:`Worker` with in-memory counters.

    Args:
        url: the worker's base URL, e.g. ``"http://10.0.0.1:8000"``. A non-empty ``str``.
        model_id: the served model; ``"default"`` when the gateway serves one model.
        worker_type: :attr:`WorkerType.REGULAR` (default), ``PREFILL`` or ``DECODE``.
        bootstrap_port: KV-transfer bootstrap port, for ``PREFILL`` workers only.
        healthy: initial health.

    Every counter method is O(1) and takes the worker's own lock, so no update is lost
    however many threads call it. Reads (:meth:`load`, :meth:`processed`,
    :meth:`pending_prefill_tokens`, :meth:`decode_tokens`) take no lock.

    >>> w = BasicWorker("http://w1:8000", model_id="llama")
    >>> w.increment_load(); w.load()
    1
    >>> w.add_work(1200, 0); w.pending_prefill_tokens()
    1200
    """

    __slots__ = (
        "_bootstrap_port",
        "_decode",
        "_healthy",
        "_leased",
        "_load",
        "_lock",
        "_model_id",
        "_prefill",
        "_processed",
        "_url",
        "_work",
        "_worker_type",
    )

    def __init__(
        self,
        url: str,
        model_id: str = "default",
        worker_type: WorkerType = WorkerType.REGULAR,
        *,
        bootstrap_port: int | None = None,
        healthy: bool = True,
    ) -> None:
        check_str("url", url)
        check_str("model_id", model_id)
        if not isinstance(worker_type, WorkerType):
            raise fail("worker_type", "a WorkerType", worker_type, TypeError)
        if bootstrap_port is not None:
            check_int("bootstrap_port", bootstrap_port, minimum=1, maximum=65535)
            if worker_type is not WorkerType.PREFILL:
                raise fail("bootstrap_port", "None unless worker_type is PREFILL", bootstrap_port)
        check_bool("healthy", healthy)
        self._url = url
        self._model_id = model_id
        self._worker_type = worker_type
        self._bootstrap_port = bootstrap_port
        self._healthy = healthy
        self._load = 0
        self._processed = 0
        self._prefill = 0
        self._decode = 0
        self._work = 0  # _prefill + _decode, kept for policies that rank workers by it
        self._leased = 0  # prefill tokens ever added to _prefill: it only grows
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._url

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def worker_type(self) -> WorkerType:
        return self._worker_type

    @property
    def bootstrap_port(self) -> int | None:
        """The prefill worker's bootstrap port, or ``None``."""
        return self._bootstrap_port

    def is_healthy(self) -> bool:
        """Whether the worker may be chosen. O(1), no lock."""
        return self._healthy

    def set_healthy(self, healthy: bool) -> None:
        """Mark the worker (un)healthy. Load and processed counts are kept as they are:
        requests in flight on a worker that turns unhealthy still finish and release."""
        self._healthy = check_bool("healthy", healthy)

    def load(self) -> int:
        """Requests in flight (leases held). O(1), no lock."""
        return self._load

    def increment_load(self) -> None:
        """Count one more request in flight (leases do this; do not call it by hand)."""
        with self._lock:
            self._load += 1

    def decrement_load(self) -> None:
        """Count one request finished; raises :class:`LoadUnderflowError` at zero."""
        # The error is built after the lock is released: an allocation under it may run a
        # collection, whose forgotten leases give back (take this lock) in __del__.
        with self._lock:
            if self._load > 0:
                self._load -= 1
                return
        raise LoadUnderflowError(
            f"decrement_load() on worker {self._url!r} whose load is already 0: "
            "load was given back that was never taken (use cacheroute.acquire)"
        )

    def processed(self) -> int:
        """Requests routed here so far (the tie-breaker between equal loads). O(1)."""
        return self._processed

    def increment_processed(self) -> None:
        """Count one more request routed here (policies call it on the worker they choose)."""
        with self._lock:
            self._processed += 1

    def pending_prefill_tokens(self) -> int:
        """Uncached prompt tokens leased here whose first output token is not out yet."""
        return self._prefill

    def decode_tokens(self) -> int:
        """Context tokens of the requests leased here that are past their first token."""
        return self._decode

    def prefill_tokens_leased(self) -> int:
        """Prefill tokens ever added to :meth:`pending_prefill_tokens` (by leases or
        :meth:`add_work`): a running total that only grows. Less the pending total, it is
        how many have left the queue (prefilled, or given back). Engines prefill first
        come first served, so a prefill leased when this read ``n`` is done once more
        than ``n`` have left: a policy can follow its own prefills even when other
        gateways' work keeps the pending total up. O(1), no lock.

        >>> w = BasicWorker("http://w1:8000")
        >>> w.add_work(1200, 0); w.add_work(-1200, 1200)
        >>> w.prefill_tokens_leased(), w.pending_prefill_tokens()
        (1200, 0)
        """
        return self._leased

    def add_work(self, prefill_tokens: int, decode_tokens: int) -> None:
        """Add signed deltas to both token totals, atomically. O(1).

        Raises:
            TypeError: a delta is not an int.
            LoadUnderflowError: a total would go below 0 (nothing is changed).
        """
        check_int("prefill_tokens", prefill_tokens)
        check_int("decode_tokens", decode_tokens)
        with self._lock:  # the error is built outside it (see decrement_load)
            p = self._prefill + prefill_tokens
            d = self._decode + decode_tokens
            if p >= 0 and d >= 0:
                self._prefill = p
                self._decode = d
                self._work = p + d
                if prefill_tokens > 0:
                    self._leased += prefill_tokens
                return
        raise LoadUnderflowError(
            f"add_work({prefill_tokens}, {decode_tokens}) on worker {self._url!r} "
            f"would take its totals to prefill={p}, decode={d}: work was given back "
            "that was never taken (use cacheroute.acquire)"
        )

    def _transition(
        self, state: list[int], expect: int, new: int, load: int, prefill: int, decode: int
    ) -> bool:
        """The one atomic step of a lease on this worker (used by :mod:`cacheroute.lease`).

        If ``state[0] == expect``: add the deltas and set ``state[0] = new``; else change
        nothing. The body calls nothing between the first change and the last, so neither
        another thread (the lock) nor an asynchronous exception such as
        ``KeyboardInterrupt`` (CPython delivers those only at calls and loop edges) can
        observe load changed without the lease's state changed with it.
        """
        with self._lock:  # the error is built outside it (see decrement_load)
            if state[0] != expect:
                return False
            n = self._load + load
            p = self._prefill + prefill
            d = self._decode + decode
            if n >= 0 and p >= 0 and d >= 0:
                self._load = n
                self._prefill = p
                self._decode = d
                self._work = p + d
                if prefill > 0:
                    self._leased += prefill
                state[0] = new
                return True
        raise LoadUnderflowError(
            f"a lease on worker {self._url!r} would take its load to {n} (prefill "
            f"tokens {p}, decode tokens {d}): load was given back by hand that a "
            "lease still holds"
        )

    def __repr__(self) -> str:
        extra = f", bootstrap_port={self._bootstrap_port}" if self._bootstrap_port else ""
        return (
            f"BasicWorker({self._url!r}, model_id={self._model_id!r}, "
            f"worker_type={self._worker_type.name}{extra}, healthy={self._healthy}, "
            f"load={self._load}, processed={self._processed}, "
            f"prefill_tokens={self._prefill}, decode_tokens={self._decode})"
        )


def _check_list(workers: object, param: str = "workers") -> None:
    """O(1): ``workers`` must be a list, tuple or other non-text Sequence."""
    if type(workers) is not list and type(workers) is not tuple:
        check_sequence(param, workers)


def all_basic(workers: Sequence[Worker]) -> bool:
    """Whether every worker is exactly a :class:`BasicWorker` (the fast read paths apply).

    Policies compute it once per distinct worker list. O(n).

    Raises:
        TypeError: ``workers`` is not a list or tuple.
    """
    _check_list(workers)
    return all(type(w) is BasicWorker for w in workers)


def _not_a_worker(workers: Sequence[object], param: str = "workers") -> TypeError:
    """The error for a worker list holding something that is not a Worker (slow path)."""
    for i, w in enumerate(workers):
        if not isinstance(w, Worker):
            return TypeError(f"{param}[{i}] must be a Worker, got {describe(w)}")
    return TypeError(f"{param} must hold Worker objects, got {describe(workers)}")


def read_loads(workers: Sequence[Worker], basic: bool = False) -> list[int]:
    """The load of each worker, ``-1`` for an unhealthy one, in one pass. O(n).

    Args:
        workers: the workers, in order.
        basic: ``True`` when :func:`all_basic` holds for ``workers`` (the caller caches
            it): the slots behind ``is_healthy()``/``load()`` are then read directly,
            about 3x cheaper than the method calls.

    Raises:
        TypeError: ``workers`` is not a list or tuple, an element is not a :class:`Worker`
            (the message names its index), or ``basic`` is not a bool.

    >>> read_loads([BasicWorker("http://a"), BasicWorker("http://b", healthy=False)])
    [0, -1]
    """
    _check_list(workers)
    if basic is not True and basic is not False:
        raise fail("basic", "a bool", basic, TypeError)
    try:
        if basic:
            return [w._load if w._healthy else -1 for w in workers]  # type: ignore[attr-defined]
        return [w.load() if w.is_healthy() else -1 for w in workers]
    except AttributeError:
        raise _not_a_worker(workers) from None


def read_work(
    workers: Sequence[Worker], basic: bool = False
) -> tuple[list[int], list[int], list[int]]:
    """``(loads, pending prefill tokens, decode tokens)`` of each worker, in one pass. O(n).

    Loads are as in :func:`read_loads` (``-1`` for an unhealthy worker). A worker that
    does not implement :class:`WorkAccounting` reads as 0 tokens.

    >>> w = BasicWorker("http://a"); w.add_work(300, 2000)
    >>> read_work([w], basic=True)
    ([0], [300], [2000])
    """
    loads = read_loads(workers, basic)
    return (loads, *_read_tokens(workers, basic))


def _read_tokens(
    workers: Sequence[Worker], basic: bool, indices: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """``(pending prefill tokens, decode tokens)`` of each worker, or of ``workers[i]``
    for each ``i`` in ``indices``: a policy may read only the few workers it prices.
    ``basic`` as in :func:`read_loads`. O(n), or O(len(indices))."""
    if basic:
        if indices is not None:
            return (
                [workers[i]._prefill for i in indices],  # type: ignore[attr-defined]
                [workers[i]._decode for i in indices],  # type: ignore[attr-defined]
            )
        return (
            [w._prefill for w in workers],  # type: ignore[attr-defined]
            [w._decode for w in workers],  # type: ignore[attr-defined]
        )
    ws = workers if indices is None else [workers[i] for i in indices]
    prefill: list[int] = []
    decode: list[int] = []
    for w in ws:
        # getattr, not isinstance(w, WorkAccounting): a runtime protocol check costs µs.
        pending = getattr(w, "pending_prefill_tokens", None)
        if pending is None:
            prefill.append(0)
            decode.append(0)
        else:
            prefill.append(pending())
            decode.append(w.decode_tokens())  # type: ignore[attr-defined]
    return prefill, decode


def _read_leased(
    workers: Sequence[Worker], basic: bool, indices: Sequence[int] | None = None
) -> list[int | None]:
    """:func:`_read_prefill_leased` of each worker, or of ``workers[i]`` for each ``i`` in
    ``indices``, in one pass. O(n), or O(len(indices))."""
    if basic:
        if indices is not None:
            return [workers[i]._leased for i in indices]  # type: ignore[attr-defined]
        return [w._leased for w in workers]  # type: ignore[attr-defined]
    ws = workers if indices is None else [workers[i] for i in indices]
    return [_read_prefill_leased(w, False) for w in ws]


def _read_prefill_leased(worker: Worker, basic: bool) -> int | None:
    """``worker.prefill_tokens_leased()``, or ``None`` for a worker without it. ``basic``
    as in :func:`read_loads` (then read from the slot). O(1)."""
    if basic:
        return worker._leased  # type: ignore[attr-defined, no-any-return]
    leased = getattr(worker, "prefill_tokens_leased", None)
    return None if leased is None else leased()


def _read_work_totals(workers: Sequence[Worker], basic: bool) -> list[int]:
    """Pending prefill plus decode tokens of each worker (0 without
    :class:`WorkAccounting`): one read per ``BasicWorker``, which keeps the sum. O(n)."""
    if basic:
        return [w._work for w in workers]  # type: ignore[attr-defined]
    prefill, decode = _read_tokens(workers, False)
    return [p + d for p, d in zip(prefill, decode, strict=True)]
