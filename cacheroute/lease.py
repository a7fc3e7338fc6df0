"""Load leases: the one safe way for a gateway to take load on a worker.

Seed 001: a proxy path chose a worker but never counted its load, so the imbalance check
never fired and one engine took all 480 requests while seven idled. With a lease,
choosing a worker and counting its load are one step, and giving the load back happens
exactly once, whatever happens::

    with acquire(policy, workers, request_text) as lease:  # load +1 on lease.worker
        forward(lease.worker)                               # stream the response here
    # load -1 exactly once: on exit, on exception, or earlier via lease.release(success=...)

``async with acquire(...)`` works the same way. Selection itself is synchronous (it is
microseconds of CPU work and must not yield between choosing and counting).

**Streaming.** Hold the lease until the last byte of the response has been sent: open it
before the upstream request, and release it in a ``finally`` that is certain to run when the
response ends, however it ends. In an ASGI server that is the response object's own
``__call__`` (or the handler's task), not the body generator: a generator that never
started, or that is suspended at a ``yield`` when the client disconnects, runs its
``finally`` only when it is closed or garbage-collected::

    lease = acquire(policy, workers, prompt)

    class LeasedStream(StreamingResponse):          # Starlette
        async def __call__(self, scope, receive, send):
            ok = False
            try:
                await super().__call__(scope, receive, send)   # relays the engine's bytes
                ok = True
            finally:
                lease.release(success=ok)   # completion, upstream error, client disconnect

A client disconnect cancels that call, so the lease is released with ``success=False`` at
once; then close the upstream connection so the engine stops generating.
``examples/gateway.py`` and ``docs/gateway.md`` show the whole pattern, errors and
timeouts included.

**No healthy worker.** :func:`acquire` raises :class:`NoHealthyWorkerError` (a
``LookupError``): a gateway maps it to HTTP 503. It never returns a lease without a worker.

**Forgotten leases.** A lease that is garbage-collected unreleased is released then (with
``success=False``) and a ``ResourceWarning`` is issued: the load never leaks, but the
release comes late, so always use ``with`` or ``finally``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import TracebackType

from cacheroute.policies.base import LoadBalancingPolicy, RequestText
from cacheroute.worker import Worker

__all__ = ["Lease", "NoHealthyWorkerError", "PairLease", "acquire", "acquire_pair"]


class NoHealthyWorkerError(LookupError):
    """No healthy worker could be chosen (the list was empty or all were unhealthy)."""


def _checked_index(policy: LoadBalancingPolicy, index: object, n: int, param: str) -> int:
    # A user policy returning garbage must fail loudly here, before any load is taken.
    if type(index) is not int or not 0 <= index < n:
        raise ValueError(
            f"policy {policy.name!r} returned {param}={index!r}, not an index into the "
            f"{n} workers it was given"
        )
    return index


class _Releasable:
    """Exactly-once release shared by :class:`Lease` and :class:`PairLease`."""

    __slots__ = ("__weakref__", "_token", "policy", "success")

    def __init__(self, policy: LoadBalancingPolicy) -> None:
        self.policy = policy
        self.success: bool | None = None
        # list.pop() is atomic in CPython: whichever thread pops the token releases;
        # every later call finds the list empty. No lock needed for exactly-once.
        self._token: list[bool] = [True]

    @property
    def released(self) -> bool:
        """Whether the load has been given back."""
        return not self._token

    def release(self, success: bool = True) -> bool:
        """Give the load back now. Idempotent: returns ``True`` the first time, then ``False``.

        ``policy.on_request_complete(url, success)`` is called once per leg, after the
        load has been given back (so an exception in the callback cannot leak load).
        """
        try:
            self._token.pop()
        except IndexError:
            return False
        self.success = bool(success)
        self._give_back(self.success)
        return True

    def _give_back(self, success: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Releasable:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(success=exc_type is None)

    async def __aenter__(self) -> _Releasable:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(success=exc_type is None)

    def __del__(self) -> None:
        if getattr(self, "_token", None):
            warnings.warn(
                f"{type(self).__name__} was garbage-collected without release(); "
                "its load is given back now (use `with acquire(...)` or release in `finally`)",
                ResourceWarning,
                stacklevel=1,
            )
            self.release(success=False)


class Lease(_Releasable):
    """One unit of load held on one worker. Made by :func:`acquire`.

    Attributes:
        worker: the chosen worker.
        index: its index in the list given to :func:`acquire`.
        policy: the policy that chose it.
        success: the outcome passed at release (``None`` while held).
    """

    __slots__ = ("index", "worker")

    def __init__(self, policy: LoadBalancingPolicy, worker: Worker, index: int) -> None:
        super().__init__(policy)
        self.worker = worker
        self.index = index

    def _give_back(self, success: bool) -> None:
        self.worker.decrement_load()
        self.policy.on_request_complete(self.worker.url, success)

    def __enter__(self) -> Lease:
        return self

    async def __aenter__(self) -> Lease:
        return self

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Lease {state} worker={self.worker.url!r} index={self.index}>"


class PairLease(_Releasable):
    """Load held on a prefill worker and a decode worker together. Made by :func:`acquire_pair`.

    Both legs are released together, exactly once.
    """

    __slots__ = ("decode", "decode_index", "prefill", "prefill_index")

    def __init__(
        self,
        policy: LoadBalancingPolicy,
        prefill: Worker,
        prefill_index: int,
        decode: Worker,
        decode_index: int,
    ) -> None:
        super().__init__(policy)
        self.prefill = prefill
        self.prefill_index = prefill_index
        self.decode = decode
        self.decode_index = decode_index

    def _give_back(self, success: bool) -> None:
        try:
            self.prefill.decrement_load()
        finally:
            self.decode.decrement_load()
        try:
            self.policy.on_request_complete(self.prefill.url, success)
        finally:
            self.policy.on_request_complete(self.decode.url, success)

    def __enter__(self) -> PairLease:
        return self

    async def __aenter__(self) -> PairLease:
        return self

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<PairLease {state} prefill={self.prefill.url!r} decode={self.decode.url!r}>"


def acquire(
    policy: LoadBalancingPolicy, workers: Sequence[Worker], request_text: RequestText = None
) -> Lease:
    """Choose a worker with ``policy`` and take one unit of load on it.

    The load is taken immediately, so ``lease.worker`` is usable at once; use the lease as
    a (sync or async) context manager, or call :meth:`Lease.release` in a ``finally``.

    Raises:
        NoHealthyWorkerError: no worker in ``workers`` is healthy.
        TypeError: bad ``request_text`` (from the policy).
        ValueError: the policy returned something that is not an index into ``workers``.
    """
    index = policy.select_worker(workers, request_text)
    if index is None:
        raise NoHealthyWorkerError(
            f"policy {policy.name!r} found no healthy worker among {len(workers)}"
        )
    index = _checked_index(policy, index, len(workers), "index")
    worker = workers[index]
    worker.increment_load()
    return Lease(policy, worker, index)


def acquire_pair(
    policy: LoadBalancingPolicy,
    prefill_workers: Sequence[Worker],
    decode_workers: Sequence[Worker],
    request_text: RequestText = None,
) -> PairLease:
    """Choose a (prefill, decode) pair with ``policy`` and take load on both.

    Raises :class:`NoHealthyWorkerError` when either list has no healthy worker.
    If taking load on the decode leg fails, the prefill leg's load is given back first.
    """
    pair = policy.select_worker_pair(prefill_workers, decode_workers, request_text)
    if pair is None:
        raise NoHealthyWorkerError(
            f"policy {policy.name!r} found no healthy (prefill, decode) pair among "
            f"{len(prefill_workers)} prefill and {len(decode_workers)} decode workers"
        )
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise ValueError(f"policy {policy.name!r} returned {pair!r}, not a (prefill, decode) pair")
    i = _checked_index(policy, pair[0], len(prefill_workers), "prefill index")
    j = _checked_index(policy, pair[1], len(decode_workers), "decode index")
    prefill, decode = prefill_workers[i], decode_workers[j]
    prefill.increment_load()
    try:
        decode.increment_load()
    except BaseException:
        prefill.decrement_load()
        raise
    return PairLease(policy, prefill, i, decode, j)
