"""``cacheroute.testing``: every registered policy passes the kit; the kit catches broken ones."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from hypothesis import Phase, given, settings

from cacheroute import BasicWorker, CacheAwarePolicy, LoadUnderflowError, WorkerType, make_policy
from cacheroute.policies import LoadBalancingPolicy, RoundRobinPolicy, ShortestQueuePolicy
from cacheroute.policies.base import (
    Decision,
    RequestText,
    check_request_text,
    healthy_indices,
    least_loaded_index,
)
from cacheroute.testing import (
    BAD_REQUEST_TEXT,
    CHECKS,
    DECISION_CONSISTENT,
    INDEX_IN_RANGE,
    INVARIANTS,
    LOADS_CONSERVED,
    NONE_IFF_NO_HEALTHY,
    ONLY_HEALTHY,
    THREAD_SAFETY,
    VALID_REQUEST_TEXT,
    WORK_CONSERVED,
    PolicyInvariantError,
    PolicyStateMachine,
    bad_request_texts,
    bad_worker_lists,
    check_policy,
    clusters,
    request_streams,
    request_texts,
    token_ids,
    workers,
)
from cacheroute.testing.checks import _settings
from cacheroute.worker import Worker

# Broken policies: no database (their failures must not be replayed against the good ones)
# and no shrinking (slow; one test below checks that shrinking gives a small example).
NO_DB = settings(database=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


# --------------------------------------------------------------------------- the documented uses


def test_check_policy_accepts_an_instance_and_a_class() -> None:
    check_policy(make_policy("round_robin"), max_examples=10, checks=["select", "leases"])
    check_policy(RoundRobinPolicy, max_examples=10, checks=("select", "threads"))


class RoundRobinMachine(PolicyStateMachine):
    """The documented way to use the state machine: subclass, set the factory."""

    policy_factory = RoundRobinPolicy


TestRoundRobinMachine = RoundRobinMachine.TestCase
TestRoundRobinMachine.settings = settings(max_examples=15, stateful_step_count=20, deadline=None)


def test_several_models_are_routed_one_model_per_call() -> None:
    # Prefix-aware policies refuse a list mixing models (ValueError naming them): the kit
    # splits a multi-model cluster by model, as a gateway does, and checks each list.
    check_policy("cache_aware", models=3, max_examples=20, checks=["select"])
    with pytest.raises(ValueError, match="one model"):
        CacheAwarePolicy().select_worker(
            [BasicWorker("http://a", model_id="m0"), BasicWorker("http://b", model_id="m1")]
        )


def test_state_machine_without_factory_says_so() -> None:
    with pytest.raises(TypeError, match="policy_factory"):
        PolicyStateMachine()


def test_every_public_name_is_re_exported_from_the_package() -> None:
    import cacheroute.testing as kit
    from cacheroute.testing import checks, machine, strategies

    for module in (checks, machine, strategies):
        for name in module.__all__:
            assert getattr(kit, name) is getattr(module, name), name
            assert name in kit.__all__, name


def test_invariant_names_are_exported() -> None:
    assert len(set(INVARIANTS)) == len(INVARIANTS) == 9
    assert {DECISION_CONSISTENT, WORK_CONSERVED} < set(INVARIANTS)
    assert set(CHECKS) == {"select", "pair", "request_text_type", "leases", "threads"}


# --------------------------------------------------------------------------- argument checks


def _kit_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("cacheroute-check")]


def test_check_policy_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"checks\[0\] must be one of 'select'.*got 'nope'"):
        check_policy("round_robin", checks=["nope"])
    with pytest.raises(ValueError, match="unknown policy"):
        check_policy("no_such_policy")
    with pytest.raises(TypeError, match="policy must be"):
        check_policy(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_examples"):
        check_policy("round_robin", max_examples=0)
    with pytest.raises(TypeError, match="settings"):
        check_policy("round_robin", settings={"max_examples": 1})  # type: ignore[arg-type]


def test_a_str_seed_is_refused_before_any_thread_starts() -> None:
    # Found by an adversarial pass: seed="abc" killed every hammer thread before the
    # barrier, the check passed having tested nothing, and the flapper thread stayed
    # blocked in barrier.wait() for ever.
    before = _kit_threads()
    for seed in ("abc", 1.5, None, True):
        with pytest.raises(TypeError, match=rf"seed must be an int, got {seed!r}"):
            check_policy("round_robin", checks=["threads"], seed=seed)  # type: ignore[arg-type]
    assert _kit_threads() == before


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        ("60", TypeError),
        (True, TypeError),
    ],
)
def test_thread_timeout_must_be_a_finite_positive_number(value: object, exc: type) -> None:
    with pytest.raises(exc, match=rf"thread_timeout must be .*got {re.escape(repr(value))}"):
        check_policy("round_robin", checks=["threads"], thread_timeout=value)  # type: ignore[arg-type]


def test_checks_as_one_str_is_refused_not_split_into_letters() -> None:
    with pytest.raises(TypeError, match=r"checks must be None or a list of check names.*'select'"):
        check_policy("round_robin", checks="select")
    with pytest.raises(TypeError, match=r"checks\[0\] must be one of"):
        check_policy("round_robin", checks=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"checks must be None or a non-empty list"):
        check_policy("round_robin", checks=[])  # would pass having checked nothing
    with pytest.raises(TypeError, match=r"checks must be None or a list"):
        check_policy("round_robin", checks={})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: workers(model_ids="llama"), "model_ids"),
        (lambda: workers(model_ids=[]), "model_ids"),
        (lambda: workers(model_ids=["a", 1]), r"model_ids\[1\]"),
        (lambda: workers(worker_types="regular"), "worker_types"),
        (lambda: workers(healthy="yes"), "healthy"),
        (lambda: workers(max_load=-1), "max_load"),
        (lambda: workers(max_load=2.0), "max_load"),
        (lambda: workers(urls="http://x"), "urls"),
        (lambda: workers(worker_factory=BasicWorker("http://x")), "worker_factory"),
        (lambda: clusters(models="llama"), "models"),
        (lambda: clusters(models=0), "models"),
        (lambda: clusters(models=True), "models"),
        (lambda: clusters(min_size=3, max_size=2), "max_size"),
        (lambda: clusters(health="sometimes"), "health"),
        (lambda: clusters(name=""), "name"),
        (lambda: token_ids(containers="list"), "containers"),
        (lambda: token_ids(containers=("set",)), r"containers\[0\]"),
        (lambda: token_ids(vocab_size=0), "vocab_size"),
        (lambda: token_ids(shared_prefixes=None), "shared_prefixes"),
        (lambda: request_texts(prompts="You are"), "prompts"),
        (lambda: request_texts(prompts=[]), "prompts"),
        (lambda: request_streams(kinds="audio"), "kinds"),
        (lambda: request_streams(include_none=1), "include_none"),
    ],
)
def test_strategy_arguments_are_validated_naming_the_parameter(
    build: Callable[[], object], param: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=rf"^{param} must be"):
        build()


# --------------------------------------------------------------------------- broken policies


class _Base(LoadBalancingPolicy):
    name = "broken"

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)
        return least_loaded_index(workers)


class PicksUnhealthy(_Base):
    """Prefers an unhealthy worker whenever one exists."""

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        best = super().select_worker(workers, request_text)
        if best is None:
            return None
        sick = [i for i, w in enumerate(workers) if not w.is_healthy()]
        return sick[0] if sick else best


class OutOfRange(_Base):
    """Returns len(workers), one past the end (a classic off-by-one)."""

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        best = super().select_worker(workers, request_text)
        return None if best is None else len(workers)


class WorkerWhenNoneHealthy(_Base):
    """Falls back to worker 0 when nothing is healthy."""

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        best = super().select_worker(workers, request_text)
        return 0 if best is None and workers else best


class NoneWithOneHealthy(_Base):
    """Gives up when only one worker is healthy."""

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        best = super().select_worker(workers, request_text)
        return None if sum(w.is_healthy() for w in workers) == 1 else best


class IgnoresBadText(_Base):
    """Never checks request_text."""

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        return least_loaded_index(workers)

    def select_worker_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[int, int] | None:
        i, j = least_loaded_index(prefill_workers), least_loaded_index(decode_workers)
        return None if i is None or j is None else (i, j)


class RejectsTuples(_Base):
    """Only accepts token ids as a list."""

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        if isinstance(request_text, tuple):
            raise TypeError("tuples are not token ids")
        return super().select_worker(workers, request_text)


class BadPair(_Base):
    """select_worker is fine; the decode index of a pair is off by one."""

    def select_worker_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[int, int] | None:
        pair = super().select_worker_pair(prefill_workers, decode_workers, request_text)
        return None if pair is None else (pair[0], len(decode_workers))


class TakesLoadInSelect(_Base):
    """Counts load itself, so every leased request is counted twice."""

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        best = super().select_worker(workers, request_text)
        if best is not None:
            workers[best].increment_load()
        return best


class LeaksOnFailure(_Base):
    """Selection is perfect, but a failed request puts load back on ("for the retry")."""

    def __init__(self) -> None:
        self._seen: dict[str, Worker] = {}

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        self._seen.update((w.url, w) for w in workers)
        return super().select_worker(workers, request_text)

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        if not success:
            self._seen[worker_url].increment_load()


class SharedScratch(_Base):
    """Keeps its candidate list on self: correct alone, wrong when threads interleave."""

    def __init__(self) -> None:
        self._candidates: list[int] = []

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        check_request_text(request_text)
        self._candidates = [i for i, w in enumerate(workers) if w.is_healthy()]
        time.sleep(0.0002)  # some work; another thread's list may land on self meanwhile
        return self._candidates[-1] if self._candidates else None


class NotReentrant(_Base):
    """Refuses concurrent use, like a wrapped C library that is not thread-safe."""

    def __init__(self) -> None:
        self._busy = False

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        if self._busy:
            raise RuntimeError("select_worker re-entered from another thread")
        self._busy = True
        try:
            time.sleep(0.0002)
            return super().select_worker(workers, request_text)
        finally:
            self._busy = False


def _caught(policy: type[LoadBalancingPolicy], **kwargs: object) -> PolicyInvariantError:
    kwargs.setdefault("settings", NO_DB)
    with pytest.raises(PolicyInvariantError) as info:
        check_policy(policy, max_examples=100, **kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    ("policy", "invariant", "checks"),
    [
        (PicksUnhealthy, ONLY_HEALTHY, None),
        (OutOfRange, INDEX_IN_RANGE, None),
        (WorkerWhenNoneHealthy, NONE_IFF_NO_HEALTHY, None),
        (NoneWithOneHealthy, NONE_IFF_NO_HEALTHY, None),
        (IgnoresBadText, BAD_REQUEST_TEXT, ["request_text_type", "leases"]),
        (RejectsTuples, VALID_REQUEST_TEXT, None),
        (BadPair, INDEX_IN_RANGE, ["pair"]),
        (TakesLoadInSelect, LOADS_CONSERVED, None),
        (LeaksOnFailure, LOADS_CONSERVED, ["leases"]),
        (SharedScratch, THREAD_SAFETY, ["threads"]),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_check_policy_names_the_broken_invariant(
    policy: type[LoadBalancingPolicy], invariant: str, checks: list[str] | None
) -> None:
    error = _caught(policy, checks=checks)
    assert error.invariant == invariant
    assert str(error).startswith(f"[{invariant}] ")
    assert isinstance(error, AssertionError)


def test_single_threaded_checks_miss_the_thread_bug_and_the_threaded_check_finds_it() -> None:
    # Proves the threaded check earns its place: the other checks pass SharedScratch.
    check_policy(
        SharedScratch,
        max_examples=15,
        checks=["select", "pair", "request_text_type", "leases"],
        settings=NO_DB,
    )
    error = _caught(SharedScratch, checks=["threads"], thread_iterations=200)
    assert "thread" in str(error) and "returned" in str(error)


def test_threaded_check_reports_exceptions_in_threads() -> None:
    error = _caught(NotReentrant, checks=["threads"], thread_iterations=200)
    assert error.invariant == THREAD_SAFETY
    assert "RuntimeError" in str(error)


def test_leak_on_failure_is_invisible_to_selection_checks() -> None:
    # Only releases with success=False put load back: the state machine (the "leases"
    # check, parametrized above) is what catches LeaksOnFailure.
    check_policy(LeaksOnFailure, max_examples=20, checks=["select", "pair"], settings=NO_DB)


@pytest.mark.slow
def test_failures_are_shrunk_and_the_reported_example_shows_the_fault() -> None:
    # What hypothesis guarantees, asserted exactly: the kit keeps the shrink phase and the
    # falsifying-example note, and the message describes a real counterexample (the chosen
    # worker is unhealthy while another is healthy). How far shrinking gets is not
    # guaranteed (hypothesis mixes constants from the loaded modules into generation, so
    # the same seed explores differently inside a full run): no size is asserted.
    assert Phase.shrink in _settings(10, None).phases
    with pytest.raises(PolicyInvariantError) as info:
        check_policy(PicksUnhealthy, checks=["select"], settings=settings(database=None))
    message = str(info.value)
    assert message.startswith(f"[{ONLY_HEALTHY}] ")
    # select_worker and decide alternate: the shrunk example may end at either
    found = re.search(r"(?:select_worker returned |decide returned Decision\(index=)(\d+)", message)
    assert found, message
    chosen = int(found.group(1))
    described = dict(re.findall(r"\[(\d+)\] \S+ (healthy|UNHEALTHY) load=", message))
    assert described[str(chosen)] == "UNHEALTHY" and "healthy" in described.values(), message
    assert any("Failing test case" in note for note in getattr(info.value, "__notes__", []))


class BreaksEveryFewCalls(_Base):
    """Out of range on every 7th call: a shared instance cannot replay the failure."""

    def __init__(self) -> None:
        self._calls = 0

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        self._calls += 1
        best = super().select_worker(workers, request_text)
        return len(workers) if best is not None and self._calls % 7 == 0 else best


def test_a_failure_that_does_not_replay_still_names_the_invariant() -> None:
    with pytest.raises(PolicyInvariantError) as info:
        check_policy(BreaksEveryFewCalls(), max_examples=100, checks=["select"], settings=NO_DB)
    assert info.value.invariant == INDEX_IN_RANGE


class CachedMoreThanPrompt(_Base):
    """decide() claims more tokens cached than the prompt has."""

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        d = super().decide(workers, request_text)
        return None if d is None else replace(d, cached_tokens=d.prompt_tokens + 1)


class DecisionNamesAnotherWorker(_Base):
    """decide() reports the URL of a worker it did not choose."""

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        d = super().decide(workers, request_text)
        return None if d is None else replace(d, url=d.url + "/other")


class DecideDisagreesWithSelect(_Base):
    """select_worker is fine; decide() points at an unhealthy worker."""

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        d = super().decide(workers, request_text)
        sick = [i for i, w in enumerate(workers) if not w.is_healthy()]
        if d is None or not sick:
            return d
        return replace(d, index=sick[0], url=workers[sick[0]].url)


class TakesWorkInDecide(_Base):
    """Books prefill work itself (the lease books it too: counted twice)."""

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        d = super().decide(workers, request_text)
        if d is not None and d.prompt_tokens:
            workers[d.index].add_work(d.prompt_tokens, 0)  # type: ignore[attr-defined]
        return d


@pytest.mark.parametrize(
    ("policy", "invariant", "checks"),
    [
        (CachedMoreThanPrompt, DECISION_CONSISTENT, ["select"]),
        (DecisionNamesAnotherWorker, DECISION_CONSISTENT, ["select"]),
        (DecideDisagreesWithSelect, ONLY_HEALTHY, ["select"]),
        (TakesWorkInDecide, WORK_CONSERVED, ["leases"]),
        (TakesWorkInDecide, THREAD_SAFETY, ["threads"]),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_decide_and_work_faults_are_caught(
    policy: type[LoadBalancingPolicy], invariant: str, checks: list[str]
) -> None:
    error = _caught(policy, checks=checks, thread_iterations=50)
    assert error.invariant == invariant, str(error)


# --------------------------------------------------------------------------- custom workers


class DictWorker:
    """A Worker that is not a BasicWorker: counters in a dict under one lock."""

    def __init__(self, url: str, model_id: str, worker_type: WorkerType) -> None:
        self.url, self.model_id, self.worker_type = url, model_id, worker_type
        self.c = {"load": 0, "processed": 0, "prefill": 0, "decode": 0}
        self._healthy = True
        self._lock = threading.Lock()

    def is_healthy(self) -> bool:
        return self._healthy

    def set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy

    def load(self) -> int:
        return self.c["load"]

    def increment_load(self) -> None:
        with self._lock:
            self.c["load"] += 1

    def decrement_load(self) -> None:
        with self._lock:
            if self.c["load"] == 0:
                raise LoadUnderflowError(self.url)
            self.c["load"] -= 1

    def processed(self) -> int:
        return self.c["processed"]

    def increment_processed(self) -> None:
        with self._lock:
            self.c["processed"] += 1

    def pending_prefill_tokens(self) -> int:
        return self.c["prefill"]

    def decode_tokens(self) -> int:
        return self.c["decode"]

    def add_work(self, prefill_tokens: int, decode_tokens: int) -> None:
        with self._lock:
            p, d = self.c["prefill"] + prefill_tokens, self.c["decode"] + decode_tokens
            if p < 0 or d < 0:
                raise LoadUnderflowError(self.url)
            self.c["prefill"], self.c["decode"] = p, d


class NoWorkAccounting(DictWorker):
    """Only the Worker protocol: no token totals."""

    pending_prefill_tokens = decode_tokens = add_work = None  # type: ignore[assignment]


class LosesReleases(DictWorker):
    """Its decrement_load forgets every third release: a worker bug the kit must see."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.calls = 0

    def decrement_load(self) -> None:
        self.calls += 1
        if self.calls % 3:
            super().decrement_load()


class Unsettable(DictWorker):
    """No set_healthy: the kit cannot flip its health."""

    set_healthy = None  # type: ignore[assignment]


@settings(max_examples=40, deadline=None)
@given(
    worker=workers(worker_factory=DictWorker, max_load=3, max_processed=2),
    cluster=clusters(min_size=1, max_size=4, health="unhealthy", worker_factory=DictWorker),
)
def test_worker_strategies_build_a_custom_worker_class(
    worker: DictWorker, cluster: list[DictWorker]
) -> None:
    assert type(worker) is DictWorker and isinstance(worker, Worker)
    assert 0 <= worker.load() <= 3 and 0 <= worker.processed() <= 2
    assert all(type(w) is DictWorker and not w.is_healthy() for w in cluster)
    assert len({w.url for w in cluster}) == len(cluster)


def test_check_policy_runs_over_a_custom_worker_class() -> None:
    seen: list[DictWorker] = []

    def factory(url: str, model_id: str, worker_type: WorkerType) -> DictWorker:
        seen.append(DictWorker(url, model_id, worker_type))
        return seen[-1]

    check_policy(
        "shortest_queue",
        max_examples=15,
        stateful_steps=15,
        thread_iterations=50,
        worker_factory=factory,
    )
    assert seen and all(type(w) is DictWorker for w in seen)
    # The leases moved work through the custom worker's add_work, and gave it all back.
    machine_workers = [w for w in seen if w.processed() and not w.url.startswith("http://thread")]
    assert machine_workers
    threaded = [w for w in seen if w.url.startswith("http://thread")]
    assert threaded and all(w.c["load"] == w.c["prefill"] == w.c["decode"] == 0 for w in threaded)
    check_policy(
        "round_robin",
        max_examples=10,
        checks=["leases", "threads"],
        thread_iterations=50,
        worker_factory=NoWorkAccounting,
    )


def test_a_custom_worker_that_loses_releases_is_caught() -> None:
    error = _caught(ShortestQueuePolicy, checks=["leases"], worker_factory=LosesReleases)
    assert error.invariant == LOADS_CONSERVED


def test_bad_worker_factories_are_refused_naming_the_parameter() -> None:
    with pytest.raises(TypeError, match="worker_factory must be callable"):
        check_policy("round_robin", worker_factory="DictWorker")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="worker_factory must be a callable returning a Worker"):
        check_policy("round_robin", worker_factory=lambda *a: object())
    with pytest.raises(TypeError, match="worker_factory must build workers with set_healthy"):
        check_policy("round_robin", worker_factory=Unsettable)
    with pytest.raises(TypeError, match="worker_factory"):
        PolicyStateMachine.for_policy("round_robin", worker_factory=3)  # type: ignore[arg-type]


def test_a_worker_without_set_healthy_can_still_be_drawn_healthy() -> None:
    @settings(max_examples=5, database=None)
    @given(cluster=clusters(min_size=1, max_size=3, health="healthy", worker_factory=Unsettable))
    def healthy(cluster: list[Unsettable]) -> None:
        assert all(w.is_healthy() for w in cluster)

    healthy()

    @settings(max_examples=5, database=None, phases=[Phase.generate])
    @given(cluster=clusters(min_size=1, max_size=3, health="unhealthy", worker_factory=Unsettable))
    def unhealthy(cluster: list[Unsettable]) -> None:
        raise AssertionError("unreachable: the draw raises")

    with pytest.raises(TypeError, match="has no set_healthy"):
        unhealthy()


# --------------------------------------------------------------------------- the strategies


@settings(max_examples=60, deadline=None)
@given(cluster=clusters(min_size=2, max_size=6, models=2, health="at_least_one"))
def test_clusters_have_unique_urls_and_honour_the_health_mix(cluster: list[BasicWorker]) -> None:
    assert 2 <= len(cluster) <= 6
    assert len({w.url for w in cluster}) == len(cluster)
    assert any(w.is_healthy() for w in cluster)
    assert {w.model_id for w in cluster} <= {"model-0", "model-1"}
    assert all(w.worker_type is WorkerType.REGULAR for w in cluster)


@settings(max_examples=30, deadline=None)
@given(
    sick=clusters(max_size=4, health="unhealthy"),
    well=clusters(max_size=4, health="healthy", worker_types=(WorkerType.DECODE,)),
)
def test_clusters_all_or_nothing_health(sick: list[BasicWorker], well: list[BasicWorker]) -> None:
    assert not any(w.is_healthy() for w in sick)
    assert all(w.is_healthy() and w.worker_type is WorkerType.DECODE for w in well)


@settings(max_examples=60, deadline=None)
@given(worker=workers(max_load=3, max_processed=4, model_ids=("a", "b")))
def test_workers_strategy(worker: BasicWorker) -> None:
    assert 0 <= worker.load() <= 3 and 0 <= worker.processed() <= 4
    assert worker.model_id in ("a", "b")
    assert worker.bootstrap_port is None or worker.worker_type is WorkerType.PREFILL


@settings(max_examples=60, deadline=None)
@given(
    texts=request_streams(min_size=5, max_size=10),
    tokens=token_ids(vocab_size=50, containers=("list", "tuple", "array")),
)
def test_texts_and_tokens_are_valid_request_texts(texts: list[RequestText], tokens: object) -> None:
    assert 5 <= len(texts) <= 10
    assert all(isinstance(t, str) for t in texts)
    assert all(0 <= t < 50 for t in tokens)  # type: ignore[attr-defined]
    check_request_text(tokens)


def test_request_texts_share_prefixes_within_an_example() -> None:
    shared: list[bool] = []

    @settings(max_examples=40, deadline=None, database=None)
    @given(a=request_texts(), b=request_texts(), c=request_texts(), d=request_texts())
    def draw(a: str, b: str, c: str, d: str) -> None:
        texts = [a, b, c, d]
        shared.append(
            any(x != y and len(x) >= 8 and y.startswith(x[:8]) for x in texts for y in texts)
        )

    draw()
    assert sum(shared) >= 5  # most examples draw from a pool of a few system prompts


def test_request_streams_contain_continued_conversations() -> None:
    continued: list[bool] = []

    @settings(max_examples=40, deadline=None, database=None)
    @given(stream=request_streams(min_size=6, max_size=10, kinds="mixed", include_none=True))
    def draw(stream: list[RequestText]) -> None:
        for r in stream:
            check_request_text(r)
        strs = [r for r in stream if isinstance(r, str)]
        continued.append(any(x != y and y.startswith(x) for x in strs for y in strs))

    draw()
    assert sum(continued) >= 5


@settings(max_examples=60, deadline=None)
@given(bad=bad_worker_lists())
def test_bad_worker_lists_are_all_rejected_by_the_base_helpers(bad: object) -> None:
    with pytest.raises(TypeError, match=r"^workers(\[0\])? must be"):
        healthy_indices(bad)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(bad=bad_request_texts())
def test_bad_request_texts_are_all_rejected_by_the_base_check(bad: object) -> None:
    with pytest.raises(TypeError):
        check_request_text(bad)


# --------------------------------------------------------------------------- optional dependency

_BLOCK_HYPOTHESIS = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    sys.modules["hypothesis"] = None  # any `import hypothesis` now raises ImportError
    import cacheroute
    for info in pkgutil.walk_packages(cacheroute.__path__, "cacheroute."):
        if info.name == "cacheroute.__main__" or info.name.startswith("cacheroute.testing"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            if "hypothesis" in str(exc):
                raise SystemExit(f"{info.name} needs hypothesis: {exc}")
            # another optional extra (plot, progress, ...): not this test's business
    try:
        import cacheroute.testing
    except ImportError as exc:
        print(exc)
    else:
        raise SystemExit("cacheroute.testing imported without hypothesis")
    """
)


def test_cacheroute_never_needs_hypothesis_and_testing_says_how_to_get_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_HYPOTHESIS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip install hypothesis (or the 'test' extra)" in done.stdout


def test_importing_cacheroute_does_not_import_hypothesis() -> None:
    code = "import sys, cacheroute, cacheroute.cli; print('hypothesis' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_bad_decision_is_reported_whole_not_as_its_index() -> None:
    from cacheroute.policies.base import DecisionReason
    from cacheroute.testing._core import check_decision

    ws = [BasicWorker("http://a:1"), BasicWorker("http://b:1", healthy=False)]
    bad = Decision(1, "http://b:1", DecisionReason.POLICY, 4, 0, 1, 0, None)
    with pytest.raises(PolicyInvariantError) as info:
        check_decision(make_policy("round_robin"), "decide", bad, ws, "text")
    assert info.value.invariant == ONLY_HEALTHY
    assert "decide returned Decision(index=1, url='http://b:1'" in str(info.value)


@settings(max_examples=300, deadline=None, database=None)
@given(text=request_texts(prompts=["P"], max_suffix_size=4))
def test_request_texts_turns_respect_max_suffix_size(text: str) -> None:
    # "max_suffix_size: longest generated turn, in characters"; a free text is one turn
    turns = text.split("\nUser: ")[1:] if text.startswith("P\nUser: ") else [text]
    assert all(len(turn) <= 4 for turn in turns), text


class HangsUntilReleased(_Base):
    """Every select blocks until the test opens the gate (a deadlock, as threads see it)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        self.gate.wait(30)
        return super().select_worker(workers, request_text)


def test_a_hang_is_reported_after_thread_timeout_not_threads_times_it() -> None:
    policy = HangsUntilReleased()
    start = time.monotonic()
    try:
        with pytest.raises(PolicyInvariantError) as info:
            check_policy(policy, checks=["threads"], threads=4, thread_timeout=1.0)
        took = time.monotonic() - start
    finally:
        policy.gate.set()  # let the hung threads finish
    assert info.value.invariant == THREAD_SAFETY
    assert took < 2.5, f"reported after {took:.1f} s with thread_timeout=1"


class ValueErrorOnTuples(_Base):
    """decide() refuses tuple token ids with ValueError (a bug on valid input)."""

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        if isinstance(request_text, tuple):
            raise ValueError("tuples are not token ids")
        return super().decide(workers, request_text)


class NegativePromptTokens(_Base):
    """decide() reports prompt_tokens=-1 (not a token count)."""

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        d = super().decide(workers, request_text)
        return None if d is None else replace(d, prompt_tokens=-1)


@pytest.mark.parametrize(
    ("policy", "text", "invariant"),
    [
        (ValueErrorOnTuples, (1, 2, 3), VALID_REQUEST_TEXT),
        (NegativePromptTokens, "hello", DECISION_CONSISTENT),
    ],
    ids=["ValueErrorOnTuples", "NegativePromptTokens"],
)
def test_the_state_machine_names_the_invariant_acquire_broke(
    policy: type, text: RequestText, invariant: str
) -> None:
    # The machine's own rules, driven by hand: one healthy worker, then one lease.
    machine = PolicyStateMachine.for_policy(policy)()
    machine.add_worker(healthy=True, worker_type=WorkerType.REGULAR, position=0)
    with pytest.raises(PolicyInvariantError) as info:
        machine.take_lease(request_text=text, prompt_tokens=None)
    assert info.value.invariant == invariant, str(info.value)
