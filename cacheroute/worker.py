"""Workers: the serving engines (SGLang or vLLM replicas) a policy chooses between.

A policy only ever reads a worker through the :class:`Worker` protocol, so a gateway
can pass its own worker objects. :class:`BasicWorker` is the ready, thread-safe
implementation.

Load is the number of requests in flight on the worker: it goes up when a request is
dispatched and down when its response (streams included) has finished. Take load only
through :func:`cacheroute.acquire`, which gives it back exactly once (seed 001: a path
that forgot to count load made one engine take every request).
"""

from __future__ import annotations

import enum
import threading
from typing import Protocol, runtime_checkable

__all__ = ["BasicWorker", "LoadUnderflowError", "Worker", "WorkerType"]


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


class BasicWorker:
    """A thread-safe :class:`Worker` with in-memory counters.

    Args:
        url: the worker's base URL, e.g. ``"http://10.0.0.1:8000"``. A non-empty ``str``.
        model_id: the served model; ``"default"`` when the gateway serves one model.
        worker_type: :attr:`WorkerType.REGULAR` (default), ``PREFILL`` or ``DECODE``.
        bootstrap_port: KV-transfer bootstrap port, for ``PREFILL`` workers only.
        healthy: initial health.

    Every counter method is O(1) and takes the worker's own lock, so no update is lost
    however many threads call it. Reads (:meth:`load`, :meth:`processed`) take no lock.

    >>> w = BasicWorker("http://w1:8000", model_id="llama")
    >>> w.increment_load(); w.load()
    1
    """

    __slots__ = (
        "_bootstrap_port",
        "_healthy",
        "_load",
        "_lock",
        "_model_id",
        "_processed",
        "_url",
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
        for param, value in (("url", url), ("model_id", model_id)):
            if not isinstance(value, str):
                raise TypeError(f"{param} must be a str, got {type(value).__name__}: {value!r}")
            if not value:
                raise ValueError(f"{param} must be a non-empty str, got {value!r}")
        if not isinstance(worker_type, WorkerType):
            raise TypeError(f"worker_type must be a WorkerType, got {worker_type!r}")
        if bootstrap_port is not None:
            if worker_type is not WorkerType.PREFILL:
                raise ValueError(
                    f"bootstrap_port is only for PREFILL workers, got bootstrap_port="
                    f"{bootstrap_port!r} with worker_type={worker_type.name}"
                )
            if (
                not isinstance(bootstrap_port, int)
                or isinstance(bootstrap_port, bool)
                or not 1 <= bootstrap_port <= 65535
            ):
                raise ValueError(
                    f"bootstrap_port must be an int in [1, 65535], got {bootstrap_port!r}"
                )
        if not isinstance(healthy, bool):
            raise TypeError(f"healthy must be a bool, got {healthy!r}")
        self._url = url
        self._model_id = model_id
        self._worker_type = worker_type
        self._bootstrap_port = bootstrap_port
        self._healthy = healthy
        self._load = 0
        self._processed = 0
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
        return self._healthy

    def set_healthy(self, healthy: bool) -> None:
        """Mark the worker (un)healthy. Load and processed counts are kept as they are:
        requests in flight on a worker that turns unhealthy still finish and release."""
        if not isinstance(healthy, bool):
            raise TypeError(f"healthy must be a bool, got {healthy!r}")
        self._healthy = healthy

    def load(self) -> int:
        return self._load

    def increment_load(self) -> None:
        with self._lock:
            self._load += 1

    def decrement_load(self) -> None:
        with self._lock:
            if self._load <= 0:
                raise LoadUnderflowError(
                    f"decrement_load() on worker {self._url!r} whose load is already 0: "
                    "load was given back that was never taken (use cacheroute.acquire)"
                )
            self._load -= 1

    def processed(self) -> int:
        return self._processed

    def increment_processed(self) -> None:
        with self._lock:
            self._processed += 1

    def __repr__(self) -> str:
        extra = f", bootstrap_port={self._bootstrap_port}" if self._bootstrap_port else ""
        return (
            f"BasicWorker({self._url!r}, model_id={self._model_id!r}, "
            f"worker_type={self._worker_type.name}{extra}, healthy={self._healthy}, "
            f"load={self._load}, processed={self._processed})"
        )
