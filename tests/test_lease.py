"""Load leases: load +1 on acquire, -1 exactly once, whatever happens (seed 001)."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings

import pytest
from conftest import build_workers
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cacheroute import (
    BasicWorker,
    Lease,
    LoadUnderflowError,
    NoHealthyWorkerError,
    acquire,
    acquire_pair,
    available_policies,
    make_policy,
)
from cacheroute.policies import LoadBalancingPolicy, ShortestQueuePolicy


class Recorder(ShortestQueuePolicy):
    def __init__(self) -> None:
        self.completed: list[tuple[str, bool]] = []

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        self.completed.append((worker_url, success))


class Boom(Exception):
    pass


def test_with_takes_and_gives_back() -> None:
    workers = build_workers([0, 0])
    policy = Recorder()
    with acquire(policy, workers, "hello") as lease:
        assert isinstance(lease, Lease)
        assert lease.worker is workers[lease.index]
        assert lease.worker.load() == 1 and not lease.released
    assert [w.load() for w in workers] == [0, 0]
    assert lease.released and lease.success is True
    assert policy.completed == [(lease.worker.url, True)]


def test_exception_releases_with_failure() -> None:
    workers = build_workers([0])
    policy = Recorder()
    with pytest.raises(Boom), acquire(policy, workers) as lease:
        raise Boom
    assert workers[0].load() == 0 and lease.success is False
    assert policy.completed == [("http://w0", False)]


def test_early_release_is_idempotent() -> None:
    workers = build_workers([0])
    policy = Recorder()
    with acquire(policy, workers) as lease:
        assert lease.release(success=False) is True
        assert workers[0].load() == 0
        assert lease.release() is False
    assert workers[0].load() == 0
    assert policy.completed == [("http://w0", False)]


def test_async_with() -> None:
    workers = build_workers([0, 0])
    policy = Recorder()

    async def main() -> None:
        async with acquire(policy, workers, "x") as lease:
            await asyncio.sleep(0)
            assert lease.worker.load() == 1
        with pytest.raises(Boom):
            async with acquire(policy, workers, "x"):
                raise Boom

    asyncio.run(main())
    assert [w.load() for w in workers] == [0, 0]
    assert [ok for _, ok in policy.completed] == [True, False]


def test_no_healthy_worker_raises_and_takes_nothing() -> None:
    workers = build_workers([0, 0], healthy=[False, False])
    with pytest.raises(NoHealthyWorkerError, match="no healthy worker"):
        acquire(make_policy("round_robin"), workers)
    with pytest.raises(NoHealthyWorkerError):
        acquire(make_policy("round_robin"), [])
    assert [w.load() for w in workers] == [0, 0]
    assert issubclass(NoHealthyWorkerError, LookupError)


class Liar(LoadBalancingPolicy):
    name = "liar"

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def select_worker(self, workers, request_text=None):  # type: ignore[no-untyped-def]
        return self.answer

    def select_worker_pair(self, prefill, decode, request_text=None):  # type: ignore[no-untyped-def]
        return self.answer


@pytest.mark.parametrize("answer", [5, -1, "0", 1.0, True])
def test_policy_returning_garbage_takes_no_load(answer: object) -> None:
    workers = build_workers([0, 0])
    with pytest.raises(ValueError, match="liar"):
        acquire(Liar(answer), workers)
    assert [w.load() for w in workers] == [0, 0]


def test_pair_lease() -> None:
    prefill, decode = build_workers([0, 0]), build_workers([2, 0])
    policy = Recorder()
    with acquire_pair(policy, prefill, decode, "p") as lease:
        assert lease.decode_index == 1
        assert lease.prefill.load() == 1 and lease.decode.load() == 1
    assert [w.load() for w in prefill + decode] == [0, 0, 2, 0]
    assert len(policy.completed) == 2 and lease.release() is False
    with pytest.raises(NoHealthyWorkerError):
        acquire_pair(policy, prefill, [])
    for bad in [(0,), (0, 9), None.__class__]:
        with pytest.raises(ValueError):
            acquire_pair(Liar(bad), prefill, decode)
    assert [w.load() for w in prefill + decode] == [0, 0, 2, 0]


def test_pair_rolls_back_prefill_when_decode_increment_fails() -> None:
    class Broken(BasicWorker):
        def increment_load(self) -> None:
            raise RuntimeError("counter store down")

    prefill = build_workers([0])
    with pytest.raises(RuntimeError, match="counter store"):
        acquire_pair(make_policy("round_robin"), prefill, [Broken("http://d")])
    assert prefill[0].load() == 0


def test_callback_error_does_not_leak_load() -> None:
    class Raising(ShortestQueuePolicy):
        def on_request_complete(self, worker_url: str, success: bool) -> None:
            raise Boom

    workers = build_workers([0])
    lease = acquire(Raising(), workers)
    with pytest.raises(Boom):
        lease.release()
    assert workers[0].load() == 0 and lease.released


def test_forgotten_lease_released_on_gc_with_warning() -> None:
    workers = build_workers([0])
    policy = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acquire(policy, workers)  # dropped on the floor
        gc.collect()
    assert workers[0].load() == 0
    assert policy.completed == [("http://w0", False)]
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


def test_manual_decrement_then_release_is_a_caller_bug() -> None:
    workers = build_workers([0])
    lease = acquire(make_policy("round_robin"), workers)
    workers[0].decrement_load()  # the bug seed 001's fix avoided: load given back by hand
    with pytest.raises(LoadUnderflowError):
        lease.release()
    assert workers[0].load() == 0 and not lease.released  # refused: nothing changed
    workers[0].increment_load()  # the caller repairs its bug
    assert lease.release() and workers[0].load() == 0


@pytest.mark.parametrize("name", available_policies())
def test_load_counted_for_every_policy(name: str) -> None:
    # Seed 001 gated load tracking on the policy's name. Nothing here does.
    workers = build_workers([0, 0, 0])
    leases = [acquire(make_policy(name), workers, f"prompt {i}") for i in range(6)]
    assert sum(w.load() for w in workers) == 6
    for lease in leases:
        lease.release()
    assert [w.load() for w in workers] == [0, 0, 0]


def test_threads_8_by_10000_end_at_zero() -> None:
    workers = build_workers([0] * 4)
    policy = make_policy("power_of_two", seed=1)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        barrier.wait()
        try:
            for k in range(10_000):
                if k % 3 == 0:
                    try:
                        with acquire(policy, workers, "p"):
                            raise Boom
                    except Boom:
                        pass
                elif k % 3 == 1:
                    lease = acquire(policy, workers)
                    lease.release()
                    lease.release()
                else:
                    with acquire(policy, workers) as lease:
                        pass
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [w.load() for w in workers] == [0, 0, 0, 0]
    assert sum(w.processed() for w in workers) == 80_000  # one routing decision per lease


class LeaseMachine(RuleBasedStateMachine):
    """Any interleaving of acquire, release, exceptions and health flips keeps
    every worker's load equal to its open leases."""

    @initialize(n=st.integers(1, 5), name=st.sampled_from(available_policies()))
    def setup(self, n: int, name: str) -> None:
        self.workers = build_workers([0] * n)
        self.policy = make_policy(name)
        self.open: list[Lease] = []

    @rule(text=st.one_of(st.none(), st.text(max_size=8)))
    def open_lease(self, text: str | None) -> None:
        any_healthy = any(w.is_healthy() for w in self.workers)
        try:
            lease = acquire(self.policy, self.workers, text)
        except NoHealthyWorkerError:
            assert not any_healthy
            return
        assert any_healthy and lease.worker.is_healthy()
        self.open.append(lease)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), success=st.booleans())
    def release(self, data: st.DataObject, success: bool) -> None:
        lease = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        assert lease.release(success=success) is True
        assert lease.release() is False

    @rule()
    def exception_inside_with(self) -> None:
        if not any(w.is_healthy() for w in self.workers):
            return
        with pytest.raises(Boom), acquire(self.policy, self.workers, "q"):
            raise Boom

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release_twice_via_with(self, data: st.DataObject) -> None:
        lease = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        with lease:
            lease.release()

    @rule(data=st.data())
    def flip_health(self, data: st.DataObject) -> None:
        w = self.workers[data.draw(st.integers(0, len(self.workers) - 1))]
        w.set_healthy(not w.is_healthy())

    @invariant()
    def load_equals_open_leases(self) -> None:
        for w in self.workers:
            assert w.load() == sum(1 for lease in self.open if lease.worker is w)

    def teardown(self) -> None:
        for lease in self.open:
            lease.release()
        assert all(w.load() == 0 for w in self.workers)


TestLeaseMachine = LeaseMachine.TestCase
TestLeaseMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
