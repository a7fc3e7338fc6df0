"""Load leases: the one safe way for a gateway to take load and work on a worker.

Seed 001: a proxy path chose a worker but never counted its load, so the imbalance check
never fired and one engine took all 480 requests while seven idled. With a lease,
choosing a worker and counting its load are one step, and giving the load back happens
exactly once, whatever happens::

    with acquire(policy, workers, request_text) as lease:  # load +1 on lease.worker
        forward(lease.worker)                               # stream the response here
        ...                # on the first streamed byte: lease.first_token()
    # load -1 exactly once: on exit, on exception, or earlier via lease.release(success=...)

``async with acquire(...)`` works the same way. Selection itself is synchronous (it is
microseconds of CPU work and must not yield between choosing and counting).

**Work.** A lease also carries the request's work (see :mod:`cacheroute.worker`): from
:func:`acquire` until :meth:`Lease.first_token` its *prefill tokens* (the prompt's tokens
the policy does not expect cached on the worker) count in the worker's
``pending_prefill_tokens()``; from the first token until release its *context tokens*
(the prompt's tokens) count in ``decode_tokens()``. Work-aware policies read these totals
to estimate how long a new request would wait. Call ``first_token()`` when the engine's
first output byte arrives; a lease released without it gives its prefill work back then.

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
``success=False``) and *then* a ``ResourceWarning`` is issued, so the load is back even
when warnings are errors; the release comes late, so always use ``with`` or ``finally``.

**Interrupts.** On a :class:`~cacheroute.worker.BasicWorker`, taking, moving and giving
back a lease's load and work are each one atomic step that also records the lease's
state: a ``KeyboardInterrupt`` (or any exception) can land before it or after it, never
between the load changing and the lease knowing. If :func:`acquire` is interrupted after
the step, the half-built lease is garbage-collected with the exception's traceback and
gives its load back then (with a ``ResourceWarning``). On a custom
:class:`~cacheroute.worker.Worker`, each change is the worker's own call
(``increment_load()``, ``add_work()``, ``decrement_load()``) followed or preceded by the
lease's record of it: an interrupt landing exactly between a call that adds (load or work)
and its record, or inside that call after its effect, leaks that call's delta (one unit
of load, or one lease's tokens), which no pure-Python code can prevent for an object whose
locking it does not own. Give-backs are recorded before their call, so nothing is ever
given back twice; the price is that an interrupt landing inside a give-back call
(``decrement_load()``, ``add_work()``) before its effect leaks that call's delta too. A
release interrupted between its calls is finished by the next release or by garbage
collection. **Cancellation** (asyncio) can only land at an ``await``: nothing in
:func:`acquire` awaits, so ``async with acquire(...)`` is never cancelled between taking
the load and entering the block. A lease taken with ``lease = acquire(...)`` and entered
after an ``await`` is held across that ``await``: if the task is cancelled there, the
lease is released only when the task's traceback (which references it) is freed. Enter
the lease (``with``/``async with``/``try``) before the next ``await``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from types import TracebackType

from cacheroute._validation import check_bool, check_int, fail
from cacheroute.policies.base import (
    Decision,
    LoadBalancingPolicy,
    RequestText,
    check_workers,
)
from cacheroute.worker import BasicWorker, Worker

__all__ = ["Lease", "NoHealthyWorkerError", "PairLease", "acquire", "acquire_pair"]

# Lease states (``Lease._state[0]``).
_NEW, _PREFILL, _DECODE, _RELEASED = 0, 1, 2, 3


class NoHealthyWorkerError(LookupError):
    """No healthy worker could be chosen (the list was empty or all were unhealthy)."""


class _RefusedDecision(ValueError):
    """acquire()'s refusal of what a policy returned: a ``ValueError`` (as documented)
    whose ``field`` says what was wrong, ``"index"`` (or a pair that is not one) or
    ``"tokens"`` (a Decision's token counts), for :mod:`cacheroute.testing` to name the
    invariant the policy broke."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _checked_decision(
    policy: LoadBalancingPolicy, decision: Decision, n: int, param: str = "index"
) -> int:
    """``decision.index``, once it and the token counts are checked: a user policy returning
    garbage must fail loudly here, before any load is taken (garbage counts would go
    straight into the worker's totals, a negative one taking other leases' work)."""
    index = decision.index
    if type(index) is not int or not 0 <= index < n:
        raise _RefusedDecision(
            f"policy {policy.name!r} returned {param}={index!r}, not an index into the "
            f"{n} workers it was given",
            "index",
        )
    prompt, cached = decision.prompt_tokens, decision.cached_tokens
    if type(prompt) is not int or prompt < 0:
        raise _bad_count(policy, "prompt_tokens", prompt)
    if type(cached) is not int:
        raise _bad_count(policy, "cached_tokens", cached)
    return index


def _bad_count(policy: LoadBalancingPolicy, field: str, value: object) -> ValueError:
    return _RefusedDecision(
        f"policy {policy.name!r} returned a Decision with {field}={value!r}, not a token count",
        "tokens",
    )


class Lease:
    """One unit of load, and one request's work, held on one worker. Made by :func:`acquire`.

    States: *prefill* (from :func:`acquire`), *decode* (after :meth:`first_token`),
    *released* (after :meth:`release`, exactly once). Every transition is atomic and
    thread-safe; any number of threads may call ``first_token``/``release``.

    Attributes:
        worker: the chosen worker.
        index: its index in the list given to :func:`acquire`.
        policy: the policy that chose it.
        decision: the policy's :class:`~cacheroute.policies.base.Decision`.
        prefill_tokens: the prompt's tokens not expected cached on the worker.
        context_tokens: the prompt's tokens (decode work after the first token).
        success: the outcome passed at release (``None`` while held).

    >>> from cacheroute import BasicWorker, acquire, make_policy
    >>> w = BasicWorker("http://w1")
    >>> lease = acquire(make_policy("round_robin"), [w], [1] * 100)
    >>> w.load(), w.pending_prefill_tokens(), w.decode_tokens()
    (1, 100, 0)
    >>> lease.first_token(); w.pending_prefill_tokens(), w.decode_tokens()
    True
    (0, 100)
    >>> lease.release(); w.load(), w.decode_tokens()
    True
    (0, 0)
    """

    __slots__ = (
        "__weakref__",
        "_basic",
        "_held",
        "_lock",
        "_state",
        "context_tokens",
        "decision",
        "index",
        "policy",
        "prefill_tokens",
        "success",
        "worker",
    )

    def __init__(
        self,
        policy: LoadBalancingPolicy,
        worker: Worker,
        index: int,
        decision: Decision | None = None,
        prefill_tokens: int = 0,
        context_tokens: int = 0,
    ) -> None:
        """A lease not yet holding anything: :func:`acquire` builds and takes it."""
        self.policy = policy
        self.worker = worker
        self.index = index
        self.decision = decision
        self.prefill_tokens = prefill_tokens
        self.context_tokens = context_tokens
        self.success: bool | None = None
        self._state = [_NEW]
        # BasicWorker: its own lock makes each step atomic with the state change. Other
        # workers: a per-lease lock orders the steps (see the module notes on interrupts).
        self._basic = type(worker) is BasicWorker
        self._lock: threading.Lock | None = None if self._basic else threading.Lock()
        self._held: list[int] | None = None if self._basic else [0, 0, 0]

    def _step(self, expect: int, new: int, load: int, prefill: int, decode: int) -> bool:
        """Move ``expect -> new`` applying the deltas to a BasicWorker, atomically."""
        step = self.worker._transition  # type: ignore[attr-defined]
        return bool(step(self._state, expect, new, load, prefill, decode))

    # Custom workers: each change is the worker's own call. ``_held`` records what the
    # lease holds there ([load, prefill tokens, decode tokens]): written right after a
    # call that adds, right before a call that gives back (restored if the worker refuses
    # with an Exception). So an interrupt between a call and its record can only leak
    # that call's delta, never make a later release give something back twice.

    def _custom_take(self) -> None:
        worker, held, lock = self.worker, self._held, self._lock
        assert held is not None and lock is not None
        add_work = getattr(worker, "add_work", None)
        with lock:
            if self._state[0] != _NEW:
                return
            worker.increment_load()
            held[0] = 1
            self._state[0] = _PREFILL
            if add_work is not None and self.prefill_tokens:
                try:
                    add_work(self.prefill_tokens, 0)
                except Exception:
                    self._state[0] = _NEW
                    held[0] = 0
                    worker.decrement_load()
                    raise
                held[1] = self.prefill_tokens

    def _custom_first_token(self) -> bool:
        worker, held, lock = self.worker, self._held, self._lock
        assert held is not None and lock is not None
        add_work = getattr(worker, "add_work", None)
        with lock:
            if self._state[0] != _PREFILL:
                return False
            if add_work is not None and self.context_tokens:
                add_work(0, self.context_tokens)
                held[2] = self.context_tokens
            self._state[0] = _DECODE
            pending = held[1]
            if add_work is not None and pending:
                held[1] = 0
                try:
                    add_work(-pending, 0)
                except Exception:
                    held[1] = pending
                    raise
            return True

    def _custom_give_back(self) -> bool:
        worker, held, lock = self.worker, self._held, self._lock
        assert held is not None and lock is not None
        add_work = getattr(worker, "add_work", None)
        with lock:
            if self._state[0] not in (_PREFILL, _DECODE):
                return False
            if held[0]:
                held[0] = 0
                try:
                    worker.decrement_load()
                except Exception:  # refused (e.g. load given back by hand): nothing changed
                    held[0] = 1
                    raise
            prefill, decode = held[1], held[2]
            if add_work is not None and (prefill or decode):
                held[1] = held[2] = 0
                try:
                    add_work(-prefill, -decode)
                except Exception:  # refused: a later release gives the work back
                    held[1], held[2] = prefill, decode
                    raise
            self._state[0] = _RELEASED  # last: until here a later release finishes the job
            return True

    def _take(self) -> None:
        if self._basic:
            self._step(_NEW, _PREFILL, 1, self.prefill_tokens, 0)
        else:
            self._custom_take()

    @property
    def released(self) -> bool:
        """Whether the load has been given back."""
        return self._state[0] == _RELEASED

    @property
    def in_prefill(self) -> bool:
        """Whether the lease is held and :meth:`first_token` has not been called."""
        return self._state[0] == _PREFILL

    def first_token(self) -> bool:
        """The engine produced the first token: the prefill work becomes decode work.

        Non-blocking (an O(1) locked step), so call it from sync or async code alike, on
        the first byte streamed from the engine. Idempotent: ``True`` the first time,
        ``False`` after (or once released).
        """
        if not self._basic:
            return self._custom_first_token()
        return self._step(_PREFILL, _DECODE, 0, -self.prefill_tokens, self.context_tokens)

    def release(self, success: bool = True) -> bool:
        """Give the load and work back now. Idempotent: ``True`` the first time, then ``False``.

        ``policy.on_request_complete(url, success)`` is called after the load has been
        given back (so an exception in the callback cannot leak load).

        Raises:
            TypeError: ``success`` is not a ``bool`` (the lease stays held).
        """
        check_bool("success", success)
        if not self._give_back():
            return False
        self.success = success
        self.policy.on_request_complete(self.worker.url, success)
        return True

    def _give_back(self) -> bool:
        if not self._basic:
            return self._custom_give_back()
        return self._step(_PREFILL, _RELEASED, -1, -self.prefill_tokens, 0) or self._step(
            _DECODE, _RELEASED, -1, 0, -self.context_tokens
        )

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(success=exc_type is None)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(success=exc_type is None)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is None or state[0] in (_NEW, _RELEASED):
            return
        # Give the load back before warning: under ``-W error`` the warning raises.
        if self._give_back():
            self.success = False
            try:
                self.policy.on_request_complete(self.worker.url, False)
            finally:
                warnings.warn(
                    f"{self!r} was garbage-collected without release(); its load was given "
                    "back now (use `with acquire(...)` or release in `finally`)",
                    ResourceWarning,
                    stacklevel=1,
                )

    def __repr__(self) -> str:
        state = ("new", "held", "decoding", "released")[self._state[0]]
        return f"<Lease {state} worker={self.worker.url!r} index={self.index}>"


class PairLease:
    """Load held on a prefill worker and a decode worker together. Made by :func:`acquire_pair`.

    Two :class:`Lease` legs: the prefill leg carries the prefill work, the decode leg the
    context tokens once :meth:`first_token` is called. Both legs are released together,
    each exactly once.

    Attributes:
        prefill, decode: the two workers; ``prefill_index``, ``decode_index`` their indices.
        prefill_lease, decode_lease: the legs.
    """

    __slots__ = ("__weakref__", "decode_lease", "policy", "prefill_lease")

    def __init__(self, policy: LoadBalancingPolicy, prefill: Lease, decode: Lease) -> None:
        self.policy = policy
        self.prefill_lease = prefill
        self.decode_lease = decode

    @property
    def prefill(self) -> Worker:
        return self.prefill_lease.worker

    @property
    def decode(self) -> Worker:
        return self.decode_lease.worker

    @property
    def prefill_index(self) -> int:
        return self.prefill_lease.index

    @property
    def decode_index(self) -> int:
        return self.decode_lease.index

    @property
    def released(self) -> bool:
        """Whether both legs have been given back."""
        return self.prefill_lease.released and self.decode_lease.released

    @property
    def success(self) -> bool | None:
        """The outcome passed at release (``None`` while held)."""
        return self.prefill_lease.success

    def first_token(self) -> bool:
        """Prefill done: the prefill leg's work ends, the decode leg's begins."""
        a = self.prefill_lease.first_token()
        b = self.decode_lease.first_token()
        return a or b

    def release(self, success: bool = True) -> bool:
        """Release both legs; ``True`` if this call released anything."""
        check_bool("success", success)
        try:
            a = self.prefill_lease.release(success)
        finally:
            b = self.decode_lease.release(success)
        return a or b

    def __enter__(self) -> PairLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(success=exc_type is None)

    async def __aenter__(self) -> PairLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(success=exc_type is None)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<PairLease {state} prefill={self.prefill.url!r} decode={self.decode.url!r}>"


def _check_policy(policy: object) -> LoadBalancingPolicy:
    if not isinstance(policy, LoadBalancingPolicy):
        raise fail("policy", "a LoadBalancingPolicy", policy, TypeError)
    return policy


def _lease(
    policy: LoadBalancingPolicy,
    workers: Sequence[Worker],
    decision: Decision,
    param: str,
    prompt_tokens: int | None,
    decode_leg: bool = False,
) -> Lease:
    index = _checked_decision(policy, decision, len(workers), param)
    tokens = decision.prompt_tokens if prompt_tokens is None else prompt_tokens
    cached = min(max(decision.cached_tokens, 0), tokens)
    if decode_leg:
        return Lease(policy, workers[index], index, decision, 0, tokens)
    return Lease(policy, workers[index], index, decision, tokens - cached, tokens)


def acquire(
    policy: LoadBalancingPolicy,
    workers: Sequence[Worker],
    request_text: RequestText = None,
    *,
    prompt_tokens: int | None = None,
) -> Lease:
    """Choose a worker with ``policy`` and take one unit of load (and the request's work) on it.

    The load is taken immediately, so ``lease.worker`` is usable at once; use the lease as
    a (sync or async) context manager, or call :meth:`Lease.release` in a ``finally``.

    Args:
        policy: the routing policy.
        workers: the candidate workers (one model's).
        request_text: prompt text, token ids, or ``None``.
        prompt_tokens: the prompt's exact token count when the caller knows it;
            otherwise the policy's estimate (token ids: their number; text: characters
            / :data:`~cacheroute.policies.base.CHARS_PER_TOKEN`).

    Raises:
        NoHealthyWorkerError: no worker in ``workers`` is healthy.
        TypeError: ``policy`` is not a policy, ``workers`` is not a list of workers, or
            ``request_text`` / ``prompt_tokens`` has a wrong type.
        ValueError: the policy returned something that is not an index into ``workers``.

    Nothing is taken when it raises. O(policy decision).
    """
    _check_policy(policy)
    check_workers(workers)
    check_int("prompt_tokens", prompt_tokens, minimum=0, none_ok=True)
    decision = policy.decide(workers, request_text)
    if decision is None:
        raise NoHealthyWorkerError(
            f"policy {policy.name!r} found no healthy worker among {len(workers)}"
        )
    lease = _lease(policy, workers, decision, "index", prompt_tokens)
    lease._take()
    return lease


def acquire_pair(
    policy: LoadBalancingPolicy,
    prefill_workers: Sequence[Worker],
    decode_workers: Sequence[Worker],
    request_text: RequestText = None,
    *,
    prompt_tokens: int | None = None,
) -> PairLease:
    """Choose a (prefill, decode) pair with ``policy`` and take load on both.

    Raises :class:`NoHealthyWorkerError` when either list has no healthy worker.
    If taking load on the decode leg fails, the prefill leg's load is given back first.
    Arguments and errors as :func:`acquire`.
    """
    _check_policy(policy)
    check_workers(prefill_workers, "prefill_workers")
    check_workers(decode_workers, "decode_workers")
    check_int("prompt_tokens", prompt_tokens, minimum=0, none_ok=True)
    pair = policy.decide_pair(prefill_workers, decode_workers, request_text)
    if pair is None:
        raise NoHealthyWorkerError(
            f"policy {policy.name!r} found no healthy (prefill, decode) pair among "
            f"{len(prefill_workers)} prefill and {len(decode_workers)} decode workers"
        )
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise _RefusedDecision(
            f"policy {policy.name!r} returned {pair!r}, not a (prefill, decode) pair", "index"
        )
    prefill = _lease(policy, prefill_workers, pair[0], "prefill index", prompt_tokens)
    decode = _lease(policy, decode_workers, pair[1], "decode index", prompt_tokens, True)
    prefill._take()
    try:
        decode._take()
    except BaseException:
        prefill._give_back()
        raise
    return PairLease(policy, prefill, decode)
