"""``cacheroute.testing``: every registered policy passes the kit; the kit catches broken ones."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence

import pytest
from hypothesis import Phase, given, settings
from hypothesis.stateful import run_state_machine_as_test

from cacheroute import BasicWorker, WorkerType, available_policies, make_policy
from cacheroute.policies import LoadBalancingPolicy, RoundRobinPolicy
from cacheroute.policies.base import RequestText, check_request_text, least_loaded_index
from cacheroute.testing import (
    BAD_REQUEST_TEXT,
    CHECKS,
    INDEX_IN_RANGE,
    INVARIANTS,
    LOADS_CONSERVED,
    NONE_IFF_NO_HEALTHY,
    ONLY_HEALTHY,
    THREAD_SAFETY,
    VALID_REQUEST_TEXT,
    PolicyInvariantError,
    PolicyStateMachine,
    bad_request_texts,
    check_policy,
    clusters,
    request_streams,
    request_texts,
    token_ids,
    workers,
)
from cacheroute.worker import Worker

POLICIES = available_policies()  # at collection time: cache_aware and any later policy included
# Broken policies: no database (their failures must not be replayed against the good ones)
# and no shrinking (slow; one test below checks that shrinking gives a small example).
NO_DB = settings(database=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


# --------------------------------------------------------------------------- every policy passes


@pytest.mark.parametrize("name", POLICIES)
def test_check_policy_passes_for_every_registered_policy(name: str) -> None:
    check_policy(name, max_examples=40, stateful_steps=25)


@pytest.mark.parametrize("name", POLICIES)
def test_state_machine_for_every_registered_policy(name: str) -> None:
    machine = PolicyStateMachine.for_policy(name)
    run_state_machine_as_test(
        machine, settings=settings(max_examples=25, stateful_step_count=40, deadline=None)
    )


def test_check_policy_accepts_an_instance_and_a_class() -> None:
    check_policy(make_policy("round_robin"), max_examples=10, checks=["select", "leases"])
    check_policy(RoundRobinPolicy, max_examples=10, checks=["select", "threads"])


class RoundRobinMachine(PolicyStateMachine):
    """The documented way to use the state machine: subclass, set the factory."""

    policy_factory = RoundRobinPolicy


TestRoundRobinMachine = RoundRobinMachine.TestCase
TestRoundRobinMachine.settings = settings(max_examples=15, stateful_step_count=20, deadline=None)


def test_state_machine_without_factory_says_so() -> None:
    with pytest.raises(TypeError, match="policy_factory"):
        PolicyStateMachine()


def test_check_policy_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown check"):
        check_policy("round_robin", checks=["nope"])
    with pytest.raises(ValueError, match="unknown policy"):
        check_policy("no_such_policy")
    with pytest.raises(TypeError):
        check_policy(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_examples"):
        check_policy("round_robin", max_examples=0)


def test_invariant_names_are_exported() -> None:
    assert len(set(INVARIANTS)) == len(INVARIANTS) == 7
    assert set(CHECKS) == {"select", "pair", "request_text_type", "leases", "threads"}


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


def test_failures_shrink_to_a_small_example() -> None:
    with pytest.raises(PolicyInvariantError) as info:
        # derandomize: shrinking from a random start is not guaranteed to reach the minimum.
        check_policy(
            PicksUnhealthy, checks=["select"], settings=settings(database=None, derandomize=True)
        )
    message = str(info.value)
    assert message.startswith(f"[{ONLY_HEALTHY}] ")
    # Shrunk to a handful of workers (two suffice: one sick, one healthy; max_workers is 8).
    assert "[3]" not in message, message
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


@settings(max_examples=80, deadline=None)
@given(bad=bad_request_texts())
def test_bad_request_texts_are_all_rejected_by_the_base_check(bad: object) -> None:
    with pytest.raises(TypeError):
        check_request_text(bad)


def test_strategy_arguments_are_validated() -> None:
    with pytest.raises(ValueError):
        clusters(min_size=3, max_size=2)
    with pytest.raises(ValueError):
        clusters(health="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        token_ids(containers=("set",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        request_streams(kinds="audio")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- optional dependency

_BLOCK_HYPOTHESIS = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    sys.modules["hypothesis"] = None  # any `import hypothesis` now raises ImportError
    import cacheroute
    for info in pkgutil.walk_packages(cacheroute.__path__, "cacheroute."):
        if info.name in ("cacheroute.testing", "cacheroute.__main__"):
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
    assert "pip install 'cacheroute[test]'" in done.stdout


def test_importing_cacheroute_does_not_import_hypothesis() -> None:
    code = "import sys, cacheroute, cacheroute.cli; print('hypothesis' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
