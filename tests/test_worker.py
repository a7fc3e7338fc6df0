import gc
import threading
import warnings
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cacheroute import BasicWorker, LoadUnderflowError, Worker, WorkerType


def test_defaults_and_protocol() -> None:
    w = BasicWorker("http://w1:8000")
    assert isinstance(w, Worker)
    assert (w.url, w.model_id, w.worker_type) == ("http://w1:8000", "default", WorkerType.REGULAR)
    assert w.is_healthy() and w.load() == 0 and w.processed() == 0
    assert w.bootstrap_port is None


def test_counters() -> None:
    w = BasicWorker("http://w1", model_id="llama")
    w.increment_load()
    w.increment_load()
    w.decrement_load()
    w.increment_processed()
    assert (w.load(), w.processed()) == (1, 1)


def test_decrement_at_zero_raises_and_stays_zero() -> None:
    w = BasicWorker("http://w1")
    with pytest.raises(LoadUnderflowError, match="http://w1"):
        w.decrement_load()
    assert w.load() == 0
    w.increment_load()
    w.decrement_load()
    with pytest.raises(LoadUnderflowError):
        w.decrement_load()
    assert w.load() == 0


def test_health_flip_keeps_counters() -> None:
    w = BasicWorker("http://w1")
    w.increment_load()
    w.set_healthy(False)
    assert not w.is_healthy() and w.load() == 1
    w.set_healthy(True)
    assert w.is_healthy()
    with pytest.raises(TypeError, match="healthy"):
        w.set_healthy(1)  # type: ignore[arg-type]


def test_prefill_bootstrap_port() -> None:
    w = BasicWorker("http://p1", worker_type=WorkerType.PREFILL, bootstrap_port=8998)
    assert w.bootstrap_port == 8998 and w.worker_type is WorkerType.PREFILL
    assert "bootstrap_port=8998" in repr(w)


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"url": ""}, ValueError, "url"),
        ({"url": 5}, TypeError, "url"),
        ({"url": "u", "model_id": None}, TypeError, "model_id"),
        ({"url": "u", "model_id": ""}, ValueError, "model_id"),
        ({"url": "u", "worker_type": "regular"}, TypeError, "worker_type"),
        ({"url": "u", "bootstrap_port": 8998}, ValueError, "bootstrap_port"),
        (
            {"url": "u", "worker_type": WorkerType.PREFILL, "bootstrap_port": 0},
            ValueError,
            "bootstrap_port",
        ),
        (
            {"url": "u", "worker_type": WorkerType.PREFILL, "bootstrap_port": 70000},
            ValueError,
            "70000",
        ),
        ({"url": "u", "healthy": "yes"}, TypeError, "healthy"),
    ],
)
def test_bad_construction_names_parameter(kwargs: dict, exc: type, word: str) -> None:
    with pytest.raises(exc, match=word):
        BasicWorker(**kwargs)


def _in_threads(n: int, per: int, step: Callable[[], None]) -> None:
    """``step`` called ``per`` times on each of ``n`` threads started together."""
    barrier = threading.Barrier(n)

    def work() -> None:
        barrier.wait()
        for _ in range(per):
            step()

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_counters_lose_no_update_under_threads() -> None:
    w = BasicWorker("http://w1")

    def step() -> None:
        w.increment_load()
        w.increment_processed()
        w.increment_load()
        w.decrement_load()

    _in_threads(8, 20_000, step)
    assert w.load() == 8 * 20_000
    assert w.processed() == 8 * 20_000


def test_prefill_tokens_leased_only_grow_with_what_is_leased() -> None:
    from cacheroute import acquire, make_policy

    w = BasicWorker("http://w1")
    assert w.prefill_tokens_leased() == 0
    p = make_policy("work_aware")
    first = acquire(p, [w], list(range(1000)))
    second = acquire(p, [w], list(range(5000, 5300)))
    assert (w.prefill_tokens_leased(), w.pending_prefill_tokens()) == (1300, 1300)
    first.first_token()  # its prefill left the queue: pending drops, the running total stays
    assert (w.prefill_tokens_leased(), w.pending_prefill_tokens()) == (1300, 300)
    second.release()  # given back before its first token
    first.release()
    assert (w.prefill_tokens_leased(), w.pending_prefill_tokens()) == (1300, 0)
    with pytest.raises(LoadUnderflowError):
        w.add_work(-1, 0)  # refused: nothing changes
    w.add_work(0, 500)  # decode tokens are not prefill
    assert w.prefill_tokens_leased() == 1300


@given(st.lists(st.tuples(st.integers(-5000, 5000), st.integers(-5000, 5000)), max_size=40))
def test_prefill_tokens_leased_is_the_sum_of_what_was_added(
    deltas: list[tuple[int, int]],
) -> None:
    """Model: the pending total, and the sums of the accepted positive and negative
    prefill deltas (a refused call changes nothing)."""
    w = BasicWorker("http://w1")
    pending = decode = added = removed = 0
    for dp, dd in deltas:
        if pending + dp < 0 or decode + dd < 0:
            with pytest.raises(LoadUnderflowError):
                w.add_work(dp, dd)
        else:
            w.add_work(dp, dd)
            pending, decode = pending + dp, decode + dd
            added += max(dp, 0)
            removed += max(-dp, 0)
        assert w.prefill_tokens_leased() == added
        assert w.prefill_tokens_leased() - w.pending_prefill_tokens() == removed


def test_prefill_tokens_leased_lose_no_update_under_threads() -> None:
    w = BasicWorker("http://w1")

    def step() -> None:
        w.add_work(3, 0)
        w.add_work(-3, 3)
        w.add_work(0, -3)

    _in_threads(8, 5_000, step)
    assert (w.prefill_tokens_leased(), w.pending_prefill_tokens()) == (3 * 8 * 5_000, 0)


def test_an_underflow_error_is_not_built_under_the_worker_lock() -> None:
    # Building an exception allocates, which may run a collection; a forgotten lease on
    # the same worker then gives its load back in __del__, taking the worker's lock: were
    # the error built under it, the thread would wait on itself for ever.
    from cacheroute import acquire, make_policy

    w = BasicWorker("http://w0")
    policy = make_policy("round_robin")
    errors: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        old = gc.get_threshold()
        gc.set_threshold(5)  # a collection every few allocations
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                for _ in range(2000):
                    lease = acquire(policy, [w])
                    cycle: list[object] = [lease]
                    cycle.append(cycle)  # forgotten: freed only by a collection
                    del lease, cycle
                    with pytest.raises(LoadUnderflowError):
                        w.add_work(0, -1)
                    with pytest.raises(LoadUnderflowError):
                        BasicWorker("http://z").decrement_load()
        except BaseException as exc:  # (reported to the test thread)
            errors.append(exc)
        finally:
            gc.set_threshold(*old)
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(20), "deadlocked: a forgotten lease's __del__ waited for w's own lock"
    assert not errors, errors
    gc.collect()
    assert w.load() == 0 and not w._lock.locked()
