import threading

import pytest

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


def test_counters_lose_no_update_under_threads() -> None:
    w = BasicWorker("http://w1")
    n, per = 8, 20_000
    barrier = threading.Barrier(n)

    def work() -> None:
        barrier.wait()
        for _ in range(per):
            w.increment_load()
            w.increment_processed()
            w.increment_load()
            w.decrement_load()

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.load() == n * per
    assert w.processed() == n * per
