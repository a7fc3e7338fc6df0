"""Load leases: load +1 on acquire, -1 exactly once, whatever happens (seed 001)."""

from __future__ import annotations

import asyncio
import dis
import gc
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from types import CodeType, FrameType
from typing import Any

import pytest
from conftest import build_workers
from test_invariants import CustomWorker

from cacheroute import (
    BasicWorker,
    Lease,
    LoadUnderflowError,
    NoHealthyWorkerError,
    Worker,
    acquire,
    acquire_pair,
    make_policy,
)
from cacheroute.policies import LoadBalancingPolicy, ShortestQueuePolicy
from cacheroute.policies.base import Decision, DecisionReason


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


# --------------------------------------------------------------------------- reliability


def _totals(w: Any) -> tuple[int, int, int]:
    return (w.load(), w.pending_prefill_tokens(), w.decode_tokens())


class _Unraisable:
    """Collects exceptions raised where nothing can catch them (``__del__``)."""

    def __enter__(self) -> list[type[BaseException]]:
        self.seen: list[type[BaseException]] = []
        self._old = sys.unraisablehook
        sys.unraisablehook = lambda u: self.seen.append(u.exc_type)
        return self.seen

    def __exit__(self, *exc: object) -> None:
        sys.unraisablehook = self._old


@pytest.mark.parametrize("first_token", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("worker_class", [BasicWorker, CustomWorker], ids=["basic", "custom"])
def test_a_dropped_lease_gives_everything_back_even_when_warnings_are_errors(
    worker_class: Callable[[str], Any], first_token: bool
) -> None:
    w = worker_class("http://w0")
    policy = Recorder()
    with _Unraisable() as unraisable, warnings.catch_warnings():
        warnings.simplefilter("error")
        lease = acquire(policy, [w], [1] * 40)
        if first_token:
            lease.first_token()
        assert _totals(w) == ((1, 0, 40) if first_token else (1, 40, 0))
        del lease
        gc.collect()
    assert _totals(w) == (0, 0, 0)  # given back first...
    assert unraisable == [ResourceWarning]  # ...then warned (an error here: unraisable)
    assert policy.completed == [("http://w0", False)]


# Asynchronous exceptions (KeyboardInterrupt from SIGINT, PyThreadState_SetAsyncExc) are
# delivered by CPython's eval loop only where it checks its "eval breaker": when a frame
# starts (RESUME), when a CALL-family instruction has returned, and at a loop's
# JUMP_BACKWARD; never in the middle of other instructions, and never inside C code.
# ``_run_traced`` models that exactly: it traces the opcodes of every Python frame the
# scenario runs (acquire, the policy, the lease steps, the worker's methods, the ``with``
# statement itself) and raises KeyboardInterrupt at the instruction that follows such a
# point; raising from an opcode trace event is how the exception appears to the frame.
_DELIVERS = ("RESUME", "JUMP_BACKWARD")
_OPNAMES: dict[CodeType, dict[int, str]] = {}


def _opname(code: CodeType, offset: int) -> str:
    table = _OPNAMES.get(code)
    if table is None:
        table = _OPNAMES[code] = {i.offset: i.opname for i in dis.get_instructions(code)}
    return table.get(offset, "")


def _run_traced(scenario: Callable[[], None], inject_at: int | None = None) -> list[str]:
    """Run ``scenario`` under an opcode tracer; return its delivery points (``qualname:
    offset``). With ``inject_at=k`` raise KeyboardInterrupt at the k-th one."""
    points: list[str] = []
    last: dict[FrameType, str] = {}

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            previous = last.get(frame)
            last[frame] = _opname(frame.f_code, frame.f_lasti)
            if previous is not None and (previous.startswith("CALL") or previous in _DELIVERS):
                points.append(f"{frame.f_code.co_qualname}:{frame.f_lasti}")
                if len(points) - 1 == inject_at:
                    raise KeyboardInterrupt(points[-1])
        return local

    def start(frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        return local

    gc.disable()  # no collection (and no __del__) in the middle: every run is the same
    sys.settrace(start)
    try:
        scenario()
    finally:
        sys.settrace(None)
        gc.enable()
        last.clear()
    return points


def _interrupt_everywhere(
    make: Callable[[], tuple[list[Any], Callable[[], None]]],
) -> tuple[list[str], dict[str, tuple[tuple[int, int, int], ...]], list[type[BaseException]]]:
    """Inject at every delivery point of a scenario; drop the exception and its traceback,
    collect; return the points, the totals left at each point that leaked, and what was
    raised where nothing could catch it."""
    _, scenario = make()
    points = _run_traced(scenario)
    leaks: dict[str, tuple[tuple[int, int, int], ...]] = {}
    with _Unraisable() as unraisable:
        for k, point in enumerate(points):
            workers, scenario = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                with pytest.raises(KeyboardInterrupt, match=re.escape(point)):
                    _run_traced(scenario, inject_at=k)  # raises nothing else (no underflow)
                # The traceback (and the frames holding a lease) are gone now; everything
                # the run made is young (collection was off): a young collection frees it.
                gc.collect(0)
            left = tuple(_totals(w) for w in workers)
            if any(t != (0, 0, 0) for t in left):
                gc.collect()  # in case a collection made something old meanwhile
                left = tuple(_totals(w) for w in workers)
            if any(t != (0, 0, 0) for t in left):
                leaks[point] = left
    return points, leaks, unraisable


def _scenarios(worker_class: Callable[[str], Any]) -> dict[str, Any]:
    def with_first_token() -> tuple[list[Any], Callable[[], None]]:
        w, policy = worker_class("http://w0"), make_policy("round_robin")

        def run() -> None:
            with acquire(policy, [w], [7] * 50) as lease:
                lease.first_token()

        return [w], run

    def released_in_finally() -> tuple[list[Any], Callable[[], None]]:
        w, policy = worker_class("http://w0"), make_policy("round_robin")

        def run() -> None:
            lease = acquire(policy, [w], [7] * 50, prompt_tokens=60)
            try:
                pass
            finally:
                lease.release(success=False)

        return [w], run

    def pair() -> tuple[list[Any], Callable[[], None]]:
        p, d = worker_class("http://p"), worker_class("http://d")
        policy = make_policy("shortest_queue")

        def run() -> None:
            with acquire_pair(policy, [p], [d], [7] * 50) as lease:
                lease.first_token()

        return [p, d], run

    return {"with+first_token": with_first_token, "finally": released_in_finally, "pair": pair}


@pytest.mark.parametrize("scenario", ["with+first_token", "finally", "pair"])
def test_a_keyboard_interrupt_anywhere_leaks_nothing_on_a_basic_worker(scenario: str) -> None:
    points, leaks, unraisable = _interrupt_everywhere(_scenarios(BasicWorker)[scenario])
    steps = {p.split(":")[0] for p in points}
    assert {
        "acquire" if scenario != "pair" else "acquire_pair",
        "BasicWorker._transition",
        "Lease._step",
        "Lease.release",
    } <= steps, steps
    assert not leaks, leaks
    assert LoadUnderflowError not in unraisable, unraisable


@pytest.mark.parametrize("scenario", ["with+first_token", "finally", "pair"])
def test_on_a_custom_worker_an_interrupt_leaks_only_in_the_documented_window(
    scenario: str,
) -> None:
    # lease.py, "Interrupts": on a custom Worker each change is the worker's own call,
    # then the lease's record of it; an interrupt landing between a call that *adds*
    # (increment_load, add_work with positive deltas) and the record (or inside that
    # call, after its effect) leaks exactly that call's delta. Nothing is ever given
    # back twice, and an interrupt anywhere else leaks nothing.
    points, leaks, unraisable = _interrupt_everywhere(_scenarios(CustomWorker)[scenario])
    assert LoadUnderflowError not in unraisable, unraisable
    assert leaks, "the documented window exists: an interrupt there leaks"
    adding = ("CustomWorker.increment_load", "CustomWorker.add_work", "Lease._custom_")
    for point, left in leaks.items():
        assert point.startswith(adding), (point, left)
        leaked = [t for t in left if t != (0, 0, 0)]
        one_call = {(1, 0, 0), (0, 50, 0), (0, 0, 50), (0, 60, 0), (0, 0, 60)}  # 60: prompt_tokens
        assert len(leaked) == 1 and leaked[0] in one_call, left
    assert len(leaks) <= 8, leaks  # a handful of points out of all of them
    assert len(points) > 4 * len(leaks)


def test_lease_release_refuses_a_non_bool_success_and_stays_held() -> None:
    w = BasicWorker("http://w0")
    lease = acquire(make_policy("round_robin"), [w], [1] * 10)
    for bad in ("false", 0, None):
        with pytest.raises(TypeError, match=rf"^success must be a bool, got {bad!r}"):
            lease.release(success=bad)  # type: ignore[arg-type]
        assert not lease.released and _totals(w) == (1, 10, 0)
    pair = acquire_pair(make_policy("round_robin"), [w], [BasicWorker("http://d")])
    with pytest.raises(TypeError, match=r"^success must be a bool"):
        pair.release(success="false")  # type: ignore[arg-type]
    assert not pair.released
    assert lease.release() and pair.release()


# --------------------------------------------------------------------------- asyncio

_AWAITS = 4


async def _leased_body(policy: LoadBalancingPolicy, workers: list[Any], hits: list[int]) -> None:
    async with acquire(policy, workers, [3] * 20) as lease:
        for i in range(_AWAITS):
            hits.append(i)
            await asyncio.sleep(0)
            if i == 1:
                lease.first_token()


@pytest.mark.parametrize("cancel_after", range(_AWAITS + 1))
def test_a_task_cancelled_at_any_await_inside_async_with_gives_back_at_once(
    cancel_after: int,
) -> None:
    workers = [BasicWorker("http://w0"), CustomWorker("http://w1")]
    policy = Recorder()
    hits: list[int] = []

    async def main() -> None:
        task = asyncio.ensure_future(_leased_body(policy, workers, hits))
        for _ in range(cancel_after):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # at once: no collection needed
        assert [_totals(w) for w in workers] == [(0, 0, 0), (0, 0, 0)]

    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
    assert len(hits) == cancel_after  # cancelled at the cancel_after-th await (0: never ran)
    assert policy.completed == ([] if cancel_after == 0 else [(policy.completed[0][0], False)])


def test_a_lease_held_across_an_await_before_async_with_is_released_when_the_task_goes() -> None:
    # lease.py, "Interrupts": a lease taken with `lease = acquire(...)` and entered after
    # an await is held across that await; cancelled there, it is released only when the
    # task's traceback (which references it) is freed.
    w = BasicWorker("http://w0")
    policy = Recorder()

    async def handler() -> None:
        lease = acquire(policy, [w], [3] * 20)
        await asyncio.sleep(3600)  # cancelled here, before the lease is entered
        async with lease:
            pass

    async def main() -> asyncio.Task[None]:
        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0)
        assert w.load() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = asyncio.run(main())
        del task
        gc.collect()
    assert _totals(w) == (0, 0, 0)
    assert policy.completed == [("http://w0", False)]
    assert any(issubclass(x.category, ResourceWarning) for x in caught)


@pytest.mark.parametrize(
    ("prompt_tokens", "cached_tokens"), [(-50, 0), (2.5, 0), (True, 0), (100, 1.5)]
)
def test_a_policy_deciding_garbage_token_counts_fails_before_taking_anything(
    prompt_tokens: object, cached_tokens: object
) -> None:
    class Garbage(ShortestQueuePolicy):
        def decide(self, workers: Sequence[Worker], request_text: object = None) -> Decision | None:
            counts: Any = (prompt_tokens, cached_tokens)
            return Decision(0, workers[0].url, DecisionReason.POLICY, 0, 0, *counts)

    w = BasicWorker("http://w0")
    good = acquire(make_policy("round_robin"), [w], [1] * 100)
    good.first_token()
    field = "cached_tokens" if prompt_tokens == 100 else "prompt_tokens"
    with pytest.raises(ValueError, match=f"{field}="):
        acquire(Garbage(), [w])
    assert (w.load(), w.pending_prefill_tokens(), w.decode_tokens()) == (1, 0, 100)
    assert good.release()
    assert (w.load(), w.decode_tokens()) == (0, 0)


def test_a_refused_release_on_a_basicworker_subclass_counts_its_prefill_once() -> None:
    class Sub(BasicWorker):  # not exactly a BasicWorker: the custom workers' path
        __slots__ = ()

    w = Sub("http://w0")
    lease = acquire(make_policy("round_robin"), [w], [1] * 100)
    w.decrement_load()  # the caller's bug: load given back by hand
    with pytest.raises(LoadUnderflowError):
        lease.release()
    assert not lease.released
    assert (w.prefill_tokens_leased(), w.pending_prefill_tokens()) == (100, 100)
    w.increment_load()  # the caller mends its bug
    assert lease.release()
    assert (w.load(), w.prefill_tokens_leased(), w.pending_prefill_tokens()) == (0, 100, 0)


def test_an_interrupt_inside_a_give_back_call_leaks_only_that_calls_delta() -> None:
    class Interrupted(CustomWorker):
        fired = False

        def decrement_load(self) -> None:
            if not self.fired:  # an interrupt delivered as the call starts, before its effect
                self.fired = True
                raise KeyboardInterrupt
            super().decrement_load()

    w = Interrupted("http://w0")
    lease = acquire(make_policy("round_robin"), [w], [1] * 10)
    with pytest.raises(KeyboardInterrupt):
        lease.release()
    assert lease.release()  # the rest of the release: its work
    # As the module doc says: the give-back was recorded first (never twice), so the one
    # unit of load whose call was interrupted is what leaks, and nothing else.
    assert (w.load(), w.pending_prefill_tokens(), w.decode_tokens()) == (1, 0, 0)
    assert not lease.release()
