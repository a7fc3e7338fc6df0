"""The invariants every policy and every lease keep, in one place.

* every registered policy (read at collection time, so a newly registered policy is covered
  the moment it exists) passes the kit's ``check_policy``, over BasicWorkers and over a
  custom Worker class;
* leases against a brute-force model of loads and token totals (a hypothesis state
  machine, for BasicWorker, a custom Worker with token totals and one without);
* 8 threads x 10,000 leases, with first tokens and releases at random points and from
  other threads: every load and total back at 0.

What is specific to one policy lives in its own ``test_policy_*.py``.
"""

from __future__ import annotations

import gc
import random
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cacheroute import (
    BasicWorker,
    Decision,
    Lease,
    LoadUnderflowError,
    NoHealthyWorkerError,
    WorkerType,
    acquire,
    available_policies,
    make_policy,
)
from cacheroute.policies import LoadBalancingPolicy
from cacheroute.policies.base import RequestText
from cacheroute.testing import check_policy
from cacheroute.worker import Worker

POLICIES = available_policies()  # at collection time: any later registered policy included


class CustomWorker:
    """A Worker that is not a BasicWorker (leases take the per-lease-lock path)."""

    def __init__(self, url: str, model_id: str = "default", worker_type: Any = None) -> None:
        self.url, self.model_id = url, model_id
        self.worker_type = worker_type or WorkerType.REGULAR
        self._healthy = True
        self._load = self._processed = self._prefill = self._decode = 0
        self._lock = threading.Lock()

    def is_healthy(self) -> bool:
        return self._healthy

    def set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy

    def load(self) -> int:
        return self._load

    def increment_load(self) -> None:
        with self._lock:
            self._load += 1

    def decrement_load(self) -> None:
        with self._lock:
            if self._load <= 0:
                raise LoadUnderflowError(self.url)
            self._load -= 1

    def processed(self) -> int:
        return self._processed

    def increment_processed(self) -> None:
        with self._lock:
            self._processed += 1

    def pending_prefill_tokens(self) -> int:
        return self._prefill

    def decode_tokens(self) -> int:
        return self._decode

    def add_work(self, prefill_tokens: int, decode_tokens: int) -> None:
        with self._lock:
            p, d = self._prefill + prefill_tokens, self._decode + decode_tokens
            if p < 0 or d < 0:
                raise LoadUnderflowError(self.url)
            self._prefill, self._decode = p, d


class ProtocolOnlyWorker(CustomWorker):
    """Only the Worker protocol: no token totals (leases then carry no work here)."""

    pending_prefill_tokens = decode_tokens = add_work = None  # type: ignore[assignment]


def _totals(w: Any) -> tuple[int, int, int]:
    if getattr(w, "add_work", None) is None:
        return (w.load(), 0, 0)
    return (w.load(), w.pending_prefill_tokens(), w.decode_tokens())


# --------------------------------------------------------------------------- every policy


@pytest.mark.slow
@pytest.mark.parametrize("worker_factory", [None, CustomWorker], ids=["BasicWorker", "custom"])
@pytest.mark.parametrize("name", POLICIES)
def test_every_registered_policy_keeps_every_shared_invariant(
    name: str, worker_factory: Callable[..., Worker] | None
) -> None:
    # Sized for CI: each group stops at its first broken invariant, and the kit's own
    # tests (test_testing_kit.py) prove every group catches the faults it is for.
    check_policy(
        name,
        max_examples=30 if worker_factory is None else 12,
        stateful_steps=25,
        thread_iterations=200 if worker_factory is None else 100,
        worker_factory=worker_factory,
    )


# --------------------------------------------------------------------------- leases vs a model


class Scripted(LoadBalancingPolicy):
    """Returns the decision the state machine scripted; records every completion."""

    name = "scripted"

    def __init__(self) -> None:
        self.next: Decision | None = None
        self.completed: list[tuple[str, bool]] = []

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        return None if self.next is None else self.next.index

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        return self.next

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        self.completed.append((worker_url, success))


class _Boom(Exception):
    pass


class LeaseModel(RuleBasedStateMachine):
    """Leases against a brute-force model: per open lease its worker, prefill and context
    tokens and phase; every worker's load and totals must be the model's sums."""

    worker_class: Callable[[str], Any] = BasicWorker

    @initialize(n=st.integers(1, 4))
    def setup(self, n: int) -> None:
        self.workers = [type(self).worker_class(f"http://w{i}") for i in range(n)]
        self.policy = Scripted()
        self.open: list[tuple[Lease, dict[str, Any]]] = []
        self.completed: list[tuple[str, bool]] = []
        self.accounting = getattr(self.workers[0], "add_work", None) is not None

    def _script(self, pick: int, estimate: int, cached: int) -> int | None:
        healthy = [i for i, w in enumerate(self.workers) if w.is_healthy()]
        if not healthy:
            self.policy.next = None
            return None
        i = healthy[pick % len(healthy)]
        self.policy.next = Decision(i, self.workers[i].url, "policy", 0, 0, estimate, cached)
        return i

    def _expect(self, estimate: int, cached: int, prompt_tokens: int | None) -> tuple[int, int]:
        prompt = estimate if prompt_tokens is None else prompt_tokens
        return prompt - min(max(cached, 0), prompt), prompt

    @rule(
        pick=st.integers(0, 99),
        estimate=st.integers(0, 3000),
        cached=st.integers(-5, 3500),  # negative and above the prompt: clamped
        prompt_tokens=st.none() | st.integers(0, 3000),
    )
    def take(self, pick: int, estimate: int, cached: int, prompt_tokens: int | None) -> None:
        i = self._script(pick, estimate, cached)
        if i is None:
            with pytest.raises(NoHealthyWorkerError):
                acquire(self.policy, self.workers, None, prompt_tokens=prompt_tokens)
            return
        lease = acquire(self.policy, self.workers, None, prompt_tokens=prompt_tokens)
        assert lease.worker is self.workers[i] and lease.index == i and lease.in_prefill
        prefill, context = self._expect(estimate, cached, prompt_tokens)
        self.open.append((lease, {"i": i, "prefill": prefill, "context": context, "dec": False}))

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 99))
    def first_token(self, pick: int) -> None:
        lease, m = self.open[pick % len(self.open)]
        assert lease.first_token() is (not m["dec"])
        m["dec"] = True
        assert not lease.in_prefill and not lease.released

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 99), success=st.booleans())
    def release(self, pick: int, success: bool) -> None:
        lease, _ = self.open.pop(pick % len(self.open))
        assert lease.release(success=success) is True
        self.completed.append((lease.worker.url, success))
        assert lease.released and lease.success is success

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 99))
    def release_twice_then_first_token(self, pick: int) -> None:
        lease, _ = self.open.pop(pick % len(self.open))
        assert lease.release() is True
        self.completed.append((lease.worker.url, True))
        assert lease.release(success=False) is False
        assert lease.first_token() is False
        assert lease.success is True

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 99), bad=st.sampled_from(["false", 0, 1, None]))
    def release_with_a_non_bool_is_refused(self, pick: int, bad: object) -> None:
        lease, _ = self.open[pick % len(self.open)]
        with pytest.raises(TypeError, match="success must be a bool"):
            lease.release(success=bad)  # type: ignore[arg-type]
        assert not lease.released  # still held: the model is unchanged

    @rule(
        pick=st.integers(0, 99),
        estimate=st.integers(0, 3000),
        cached=st.integers(0, 3000),
        first=st.booleans(),
    )
    def exception_inside_with(self, pick: int, estimate: int, cached: int, first: bool) -> None:
        i = self._script(pick, estimate, cached)
        if i is None:
            return
        with pytest.raises(_Boom), acquire(self.policy, self.workers) as lease:
            if first:
                assert lease.first_token()
            raise _Boom
        self.completed.append((self.workers[i].url, False))
        assert lease.released and lease.success is False

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 99))
    def drop_unreleased(self, pick: int) -> None:
        lease, _ = self.open.pop(pick % len(self.open))
        url = lease.worker.url
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del lease  # no reference cycle: freed (and released) at once...
            gc.collect(0)  # ...or at the latest by a young collection (cheap, unlike a full one)
        assert any(issubclass(w.category, ResourceWarning) for w in caught)
        self.completed.append((url, False))

    @rule(pick=st.integers(0, 99))
    def flip_health(self, pick: int) -> None:
        w = self.workers[pick % len(self.workers)]
        w.set_healthy(not w.is_healthy())

    @invariant()
    def workers_match_the_model(self) -> None:
        for i, w in enumerate(self.workers):
            mine = [m for _, m in self.open if m["i"] == i]
            want = (
                len(mine),
                sum(m["prefill"] for m in mine if not m["dec"]) if self.accounting else 0,
                sum(m["context"] for m in mine if m["dec"]) if self.accounting else 0,
            )
            assert _totals(w) == want, (w.url, _totals(w), want)
        assert self.policy.completed == self.completed

    def teardown(self) -> None:
        for lease, _ in self.open:
            lease.release()
        assert all(_totals(w) == (0, 0, 0) for w in self.workers)


LEASE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestLeasesBasicWorker = LeaseModel.TestCase
TestLeasesBasicWorker.settings = LEASE_SETTINGS


class CustomLeaseModel(LeaseModel):
    worker_class = CustomWorker


TestLeasesCustomWorker = CustomLeaseModel.TestCase
TestLeasesCustomWorker.settings = LEASE_SETTINGS


class ProtocolOnlyLeaseModel(LeaseModel):
    worker_class = ProtocolOnlyWorker


TestLeasesProtocolOnlyWorker = ProtocolOnlyLeaseModel.TestCase
TestLeasesProtocolOnlyWorker.settings = settings(LEASE_SETTINGS, max_examples=20)


# --------------------------------------------------------------------------- threads


@pytest.mark.slow
@pytest.mark.parametrize("worker_class", [BasicWorker, CustomWorker], ids=["BasicWorker", "custom"])
def test_threads_8_by_10000_leases_end_with_every_total_at_zero(
    worker_class: Callable[[str], Any],
) -> None:
    workers = [worker_class(f"http://w{i}") for i in range(4)]
    policy = make_policy("power_of_two", seed=1)
    handoff: list[Lease] = []  # leases released (and first-tokened) by another thread
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        rng = random.Random(t)
        try:
            barrier.wait()
            for _ in range(10_000):
                lease = acquire(policy, workers, None, prompt_tokens=rng.randrange(0, 4000))
                r = rng.random()
                if r < 0.25:
                    lease.first_token()
                    lease.release()
                elif r < 0.5:
                    try:
                        with lease:
                            if rng.random() < 0.5:
                                lease.first_token()
                            raise _Boom
                    except _Boom:
                        pass
                elif r < 0.75:
                    handoff.append(lease)  # list.append/pop are atomic
                    try:
                        other = handoff.pop(0)
                    except IndexError:
                        continue
                    if rng.random() < 0.5:
                        other.first_token()
                    other.release(success=rng.random() < 0.5)
                else:
                    lease.release()
                    assert lease.first_token() is False
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for lease in handoff:
        lease.release()
    assert [_totals(w) for w in workers] == [(0, 0, 0)] * 4
    assert sum(w.processed() for w in workers) == 80_000  # one routing decision per lease
