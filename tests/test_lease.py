"""Load leases: load +1 on acquire, -1 exactly once, whatever happens (seed 001)."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest
from conftest import build_workers

from cacheroute import (
    BasicWorker,
    Lease,
    LoadUnderflowError,
    NoHealthyWorkerError,
    acquire,
    acquire_pair,
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
