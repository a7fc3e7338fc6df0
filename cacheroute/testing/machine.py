"""``PolicyStateMachine``: a stateful hypothesis test of a policy with real leases.

Subclass it and set :attr:`PolicyStateMachine.policy_factory` (and, to run it over your
own Worker class, :attr:`PolicyStateMachine.worker_factory`)::

    class MyPolicyMachine(PolicyStateMachine):
        policy_factory = MyPolicy

    TestMyPolicyMachine = MyPolicyMachine.TestCase

After every step the machine compares every worker's load and token totals with a
brute-force model of the open leases; see :class:`PolicyStateMachine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cacheroute._validation import check_callable, check_str
from cacheroute.lease import (
    Lease,
    NoHealthyWorkerError,
    PairLease,
    _RefusedDecision,
    acquire,
    acquire_pair,
)
from cacheroute.policies.base import Decision, LoadBalancingPolicy, RequestText
from cacheroute.testing._core import (
    DECISION_CONSISTENT,
    INDEX_IN_RANGE,
    LOADS_CONSERVED,
    NONE_IFF_NO_HEALTHY,
    ONLY_HEALTHY,
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
from cacheroute.testing.strategies import (
    WorkerFactory,
    any_request_text,
    clusters,
    make_worker,
    set_health,
)
from cacheroute.worker import LoadUnderflowError, Worker, WorkerType

__all__ = ["PolicyStateMachine"]

_BIG = 1 << 20

_PROMPT_TOKENS = st.none() | st.integers(0, 5000)
"""``prompt_tokens=`` passed to acquire: the policy's estimate, or the caller's count."""


class _Boom(Exception):
    """Raised inside ``with acquire(...)`` by the state machine."""


def _lease_work(decision: Decision, prompt_tokens: int | None, decode_leg: bool) -> list[int]:
    """The model of one lease leg's work: ``[prefill tokens, context tokens]``.

    As documented in :mod:`cacheroute.lease`: the prompt's tokens (the caller's count, or
    the policy's estimate), of which the tokens the policy expects cached (clamped to
    ``[0, prompt]``) need no prefill; the decode leg of a pair has no prefill work.
    """
    prompt = decision.prompt_tokens if prompt_tokens is None else prompt_tokens
    cached = min(max(decision.cached_tokens, 0), prompt)
    return [0 if decode_leg else prompt - cached, prompt]


def _refused_by_acquire(exc: BaseException) -> str | None:
    """The invariant broken when ``exc`` is acquire()'s own refusal of what the policy
    returned (a bad index or pair, or a Decision's bad token counts); ``None`` when the
    policy itself raised it (on valid input)."""
    if isinstance(exc, _RefusedDecision):
        return INDEX_IN_RANGE if exc.field == "index" else DECISION_CONSISTENT
    return None


class _Model:
    """One open lease as the model sees it: its legs and whether it is past first_token."""

    __slots__ = ("decoding", "lease", "legs")

    def __init__(self, lease: Lease | PairLease, legs: list[tuple[str, list[int]]]) -> None:
        self.lease = lease
        self.legs = legs  # (worker url, [prefill tokens, context tokens]) per leg
        self.decoding = False


class PolicyStateMachine(RuleBasedStateMachine):
    """A stateful test of a policy with real leases; subclass it and set :attr:`policy_factory`.

    Rules: acquire a lease (with the policy's token estimate or a caller's
    ``prompt_tokens``), acquire a prefill/decode pair lease, report a lease's first token,
    release a lease (with either outcome), release one twice, raise inside
    ``with acquire(...)``, select or decide without a lease, flip a worker's health, add a
    worker, remove a worker (leases on it stay open until released), and call
    ``sync_workers``. Every choice and every :class:`~cacheroute.policies.base.Decision`
    is checked against the shared invariants. After every step, a brute-force model of the
    open leases must match every worker: its load is its starting load plus its open lease
    legs, its pending prefill tokens the prefill work of its legs not past their first
    token, its decode tokens the context tokens of its legs past it. At teardown every
    lease is released and every load and total must be back where it started. Failures
    raise :class:`~cacheroute.testing.PolicyInvariantError`.

    Usage::

        class MyPolicyMachine(PolicyStateMachine):
            policy_factory = MyPolicy              # or a lambda: make_policy("x", k=1)
            worker_factory = MyWorker              # optional: (url, model_id, type) -> Worker

        TestMyPolicyMachine = MyPolicyMachine.TestCase   # collected by pytest / unittest
        # or: run_state_machine_as_test(MyPolicyMachine, settings=settings(max_examples=50))

    Or build a subclass on the fly with :meth:`for_policy`. Subclasses may add rules of
    their own; use ``workers`` (the current pool), ``policy`` and :attr:`leases`.
    """

    policy_factory: ClassVar[PolicyFactory | None] = None
    """Makes the policy under test: a policy class or a zero-argument callable."""
    worker_factory: ClassVar[WorkerFactory | None] = None
    """Builds the workers: ``None`` for BasicWorker, or ``(url, model_id, worker_type) ->
    Worker`` (see :data:`~cacheroute.testing.strategies.WorkerFactory`); its workers need
    ``set_healthy(bool)``, since the machine flips health."""

    def __init__(self) -> None:
        super().__init__()
        factory = type(self).policy_factory  # read off the class: a function stays unbound
        if factory is None:
            raise TypeError(
                f"{type(self).__name__} must set policy_factory (a policy class or a "
                "zero-argument callable returning a policy)"
            )
        self._worker_factory = type(self).worker_factory
        check_callable("worker_factory", self._worker_factory, none_ok=True)
        self.policy: LoadBalancingPolicy = policy_factory(factory)()
        self.workers: list[Worker] = []
        self.known: dict[str, Worker] = {}
        self.baseline: dict[str, int] = {}
        self.baseline_work: dict[str, tuple[int, int]] = {}
        self.models: list[_Model] = []
        self._added = 0
        self._broken = False

    @property
    def leases(self) -> list[Lease | PairLease]:
        """The open leases (the model's view), oldest first."""
        return [m.lease for m in self.models]

    @classmethod
    def for_policy(
        cls,
        policy: LoadBalancingPolicy | PolicyFactory | str,
        name: str | None = None,
        *,
        worker_factory: WorkerFactory | None = None,
    ) -> type[PolicyStateMachine]:
        """A subclass testing ``policy`` (an instance, a factory or class, or a registered
        name), over workers built by ``worker_factory`` (``None``: BasicWorker)."""
        factory = policy_factory(policy)
        check_str("name", name, none_ok=True)
        check_callable("worker_factory", worker_factory, none_ok=True)
        label = name or (policy if isinstance(policy, str) else getattr(policy, "__name__", ""))
        attrs: dict[str, Any] = {"policy_factory": staticmethod(factory)}
        if worker_factory is not None:
            attrs["worker_factory"] = staticmethod(worker_factory)
        return type(f"{cls.__name__}[{label or 'policy'}]", (cls,), attrs)

    # -- helpers

    def _fail(self, invariant: str, message: str) -> PolicyInvariantError:
        self._broken = True
        return PolicyInvariantError(invariant, message)

    def _track(self, worker: Worker) -> None:
        self.known[worker.url] = worker
        self.baseline[worker.url] = worker.load()
        self.baseline_work[worker.url] = work(worker)

    def _pick(self, items: Sequence[Any], pick: int) -> int:
        return pick % len(items)

    def _split(self) -> tuple[list[Worker], list[Worker]]:
        prefill = [w for w in self.workers if w.worker_type is WorkerType.PREFILL]
        decode = [w for w in self.workers if w.worker_type is WorkerType.DECODE]
        return prefill, decode

    def _checked(self, run: Any) -> None:
        try:
            run()
        except PolicyInvariantError:
            self._broken = True
            raise

    def _acquire(self, request_text: RequestText, prompt_tokens: int | None) -> Lease | None:
        try:
            lease = acquire(self.policy, self.workers, request_text, prompt_tokens=prompt_tokens)
        except NoHealthyWorkerError:
            if any(w.is_healthy() for w in self.workers):
                raise self._fail(
                    NONE_IFF_NO_HEALTHY,
                    f"acquire() with policy {policy_name(self.policy)} found no healthy "
                    f"worker although one is healthy; workers: {describe_workers(self.workers)}",
                ) from None
            return None
        except (TypeError, ValueError) as exc:
            refused = _refused_by_acquire(exc)  # acquire() refuses a bad index or count
            if refused is not None:
                raise self._fail(
                    refused, f"{exc}; workers: {describe_workers(self.workers)}"
                ) from exc
            raise self._fail(
                VALID_REQUEST_TEXT,
                f"acquire() with policy {policy_name(self.policy)} raised "
                f"{type(exc).__name__}: {exc}; request_text={short(request_text)}",
            ) from exc
        if not lease.worker.is_healthy():
            raise self._fail(
                ONLY_HEALTHY,
                f"acquire() with policy {policy_name(self.policy)} leased unhealthy worker "
                f"{lease.worker.url}; workers: {describe_workers(self.workers)}",
            )
        decision = lease.decision
        assert decision is not None  # acquire() always records the decision
        self._checked(
            lambda: check_decision(
                self.policy, "decide (in acquire)", decision, self.workers, request_text
            )
        )
        return lease

    def _open(self, lease: Lease, prompt_tokens: int | None) -> _Model:
        assert lease.decision is not None
        model = _Model(
            lease, [(lease.worker.url, _lease_work(lease.decision, prompt_tokens, False))]
        )
        self.models.append(model)
        return model

    # -- rules

    @initialize(data=st.data(), sync=st.booleans())
    def start(self, data: st.DataObject, sync: bool) -> None:
        """Start with a generated pool; maybe tell the policy about it."""
        cluster = data.draw(
            clusters(
                max_size=6,
                worker_types=tuple(WorkerType),
                max_load=3,
                worker_factory=self._worker_factory,
            ),
            label="cluster",
        )
        for worker in cluster:
            self._track(worker)
        self.workers = list(cluster)
        if sync:
            self.policy.sync_workers(self.workers)

    @rule(request_text=any_request_text(), prompt_tokens=_PROMPT_TOKENS)
    def take_lease(self, request_text: RequestText, prompt_tokens: int | None) -> None:
        """``acquire``: load +1 and the prompt's work on a healthy worker, or
        ``NoHealthyWorkerError`` iff none is healthy."""
        lease = self._acquire(request_text, prompt_tokens)
        if lease is not None:
            self._open(lease, prompt_tokens)

    @rule(request_text=any_request_text(), prompt_tokens=_PROMPT_TOKENS)
    def take_pair_lease(self, request_text: RequestText, prompt_tokens: int | None) -> None:
        """``acquire_pair`` over the prefill and decode workers of the pool."""
        prefill, decode = self._split()
        ok = any(w.is_healthy() for w in prefill) and any(w.is_healthy() for w in decode)
        try:
            lease = acquire_pair(
                self.policy, prefill, decode, request_text, prompt_tokens=prompt_tokens
            )
        except NoHealthyWorkerError:
            if ok:
                raise self._fail(
                    NONE_IFF_NO_HEALTHY,
                    f"acquire_pair() with policy {policy_name(self.policy)} found no pair "
                    f"although both lists have a healthy worker; prefill: "
                    f"{describe_workers(prefill)}; decode: {describe_workers(decode)}",
                ) from None
            return
        except (TypeError, ValueError) as exc:
            refused = _refused_by_acquire(exc)
            if refused is not None:
                raise self._fail(refused, str(exc)) from exc
            raise self._fail(
                VALID_REQUEST_TEXT,
                f"acquire_pair() with policy {policy_name(self.policy)} raised "
                f"{type(exc).__name__}: {exc}; request_text={short(request_text)}",
            ) from exc
        if not ok:
            raise self._fail(
                NONE_IFF_NO_HEALTHY,
                f"acquire_pair() with policy {policy_name(self.policy)} leased "
                f"{lease!r} but a list has no healthy worker; prefill: "
                f"{describe_workers(prefill)}; decode: {describe_workers(decode)}",
            )
        if not (lease.prefill.is_healthy() and lease.decode.is_healthy()):
            raise self._fail(
                ONLY_HEALTHY,
                f"acquire_pair() with policy {policy_name(self.policy)} leased an unhealthy "
                f"worker: {lease!r}",
            )
        legs = []
        for leg, pool, decode_leg in (
            (lease.prefill_lease, prefill, False),
            (lease.decode_lease, decode, True),
        ):
            decision = leg.decision
            assert decision is not None
            self._checked(
                lambda d=decision, p=pool: check_decision(
                    self.policy, "decide_pair (in acquire_pair)", d, p, request_text
                )
            )
            legs.append((leg.worker.url, _lease_work(decision, prompt_tokens, decode_leg)))
        self.models.append(_Model(lease, legs))

    @precondition(lambda self: bool(self.models))
    @rule(pick=st.integers(0, _BIG))
    def first_token(self, pick: int) -> None:
        """``first_token()``: prefill work becomes decode work; ``True`` only the first time."""
        model = self.models[self._pick(self.models, pick)]
        moved = model.lease.first_token()
        if moved is model.decoding:
            raise self._fail(
                WORK_CONSERVED,
                f"first_token() on {model.lease!r} returned {moved}; expected "
                f"{not model.decoding} ({'already' if model.decoding else 'not yet'} decoding)",
            )
        model.decoding = True

    @precondition(lambda self: bool(self.models))
    @rule(pick=st.integers(0, _BIG), success=st.booleans())
    def release_lease(self, pick: int, success: bool) -> None:
        """Release an open lease with either outcome."""
        lease = self.models.pop(self._pick(self.models, pick)).lease
        try:
            released = lease.release(success=success)
        except LoadUnderflowError as exc:
            raise self._fail(LOADS_CONSERVED, f"releasing {lease!r} underflowed: {exc}") from exc
        if not released:
            raise self._fail(LOADS_CONSERVED, f"first release of {lease!r} returned False")

    @precondition(lambda self: bool(self.models))
    @rule(pick=st.integers(0, _BIG))
    def release_twice(self, pick: int) -> None:
        """Release an open lease twice: the second release gives nothing back."""
        lease = self.models.pop(self._pick(self.models, pick)).lease
        lease.release(success=True)
        if lease.release(success=False):
            raise self._fail(LOADS_CONSERVED, f"second release of {lease!r} returned True")
        if lease.first_token():
            raise self._fail(WORK_CONSERVED, f"first_token() after release of {lease!r}")

    @rule(request_text=any_request_text(), first=st.booleans())
    def raise_inside_with(self, request_text: RequestText, first: bool) -> None:
        """An exception inside ``with acquire(...)`` (maybe after the first token)
        propagates and gives the load and the work back."""
        lease = self._acquire(request_text, None)
        if lease is None:
            return
        raised = False
        try:
            with lease:
                if first:
                    lease.first_token()
                raise _Boom
        except _Boom:
            raised = True
        if not (raised and lease.released and lease.success is False):
            raise self._fail(
                LOADS_CONSERVED,
                f"an exception inside `with {lease!r}` did not release it with success=False",
            )

    @rule(request_text=any_request_text(), use_decide=st.booleans())
    def select_only(self, request_text: RequestText, use_decide: bool) -> None:
        """``select_worker`` or ``decide`` without a lease: a valid choice, no load changed."""
        before = loads(self.workers)
        method = "decide" if use_decide else "select_worker"
        call = self.policy.decide if use_decide else self.policy.select_worker
        result = call_valid(
            self.policy,
            method,
            lambda: call(self.workers, request_text),
            request_text,
            self.workers,
        )
        check = check_decision if use_decide else check_index

        def run() -> None:
            check(self.policy, method, result, self.workers, request_text)
            check_loads_unchanged(self.policy, method, self.workers, before)

        self._checked(run)

    @precondition(lambda self: bool(self.workers))
    @rule(pick=st.integers(0, _BIG))
    def flip_health(self, pick: int) -> None:
        """Mark a worker unhealthy (or healthy again); its open leases stay open."""
        worker = self.workers[self._pick(self.workers, pick)]
        set_health(worker, not worker.is_healthy())

    @rule(
        healthy=st.booleans(),
        worker_type=st.sampled_from(tuple(WorkerType)),
        position=st.integers(0, _BIG),
    )
    def add_worker(self, healthy: bool, worker_type: WorkerType, position: int) -> None:
        """A worker joins the pool (``on_worker_added``) at any position."""
        self._added += 1
        url = f"http://added-{self._added}.local:8000"
        worker = make_worker(self._worker_factory, url, "default", worker_type, healthy=healthy)
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

    # -- the model

    def expected_loads(self) -> dict[str, int]:
        """Every known worker's starting load plus its open lease legs, by URL."""
        expected = dict(self.baseline)
        for model in self.models:
            for url, _ in model.legs:
                expected[url] += 1
        return expected

    def expected_work(self) -> dict[str, tuple[int, int]]:
        """Every known worker's starting ``(pending prefill, decode)`` tokens plus its open
        legs' work: prefill tokens before the first token, context tokens after, by URL."""
        totals = {url: list(w) for url, w in self.baseline_work.items()}
        for model in self.models:
            for url, (prefill, context) in model.legs:
                if model.decoding:
                    totals[url][1] += context
                else:
                    totals[url][0] += prefill
        accounting = {
            url for url, w in self.known.items() if getattr(w, "add_work", None) is not None
        }
        return {url: (p, d) if url in accounting else (0, 0) for url, (p, d) in totals.items()}

    def _wrong(self) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[Any, Any]]]:
        want_loads, want_work = self.expected_loads(), self.expected_work()
        wrong_loads = {
            url: (w.load(), want_loads[url])
            for url, w in self.known.items()
            if w.load() != want_loads[url]
        }
        wrong_work = {
            url: (work(w), want_work[url])
            for url, w in self.known.items()
            if work(w) != want_work[url]
        }
        return wrong_loads, wrong_work

    @invariant()
    def loads_and_work_match_open_leases(self) -> None:
        """Each worker's load and token totals == the model of its open leases."""
        wrong_loads, wrong_work = self._wrong()
        if wrong_loads:
            detail = ", ".join(
                f"{url}: load {got}, expected {want}" for url, (got, want) in wrong_loads.items()
            )
            raise self._fail(
                LOADS_CONSERVED,
                f"with policy {policy_name(self.policy)}, loads differ from starting load + "
                f"open leases ({len(self.models)} open): {detail}",
            )
        if wrong_work:
            detail = ", ".join(
                f"{url}: (prefill, decode) tokens {got}, expected {want}"
                for url, (got, want) in wrong_work.items()
            )
            raise self._fail(
                WORK_CONSERVED,
                f"with policy {policy_name(self.policy)}, token totals differ from the open "
                f"leases' work ({len(self.models)} open): {detail}",
            )

    def teardown(self) -> None:
        """Release every open lease; every load and total must be back at its start."""
        models, self.models = self.models, []
        try:
            for model in models:
                model.lease.release(success=True)
            if not self._broken:
                wrong_loads, wrong_work = self._wrong()
                if wrong_loads or wrong_work:
                    raise self._fail(
                        LOADS_CONSERVED if wrong_loads else WORK_CONSERVED,
                        f"with policy {policy_name(self.policy)}, after releasing every "
                        f"lease, loads or token totals are not back at their starting "
                        f"values: loads {wrong_loads}, (prefill, decode) tokens {wrong_work} "
                        "(url: (got, expected))",
                    )
        finally:
            self.policy.close()
