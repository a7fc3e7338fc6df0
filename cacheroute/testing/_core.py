"""What the kit's modules share: the invariants, the error, policy factories, reporting.

Private: the public names are re-exported by :mod:`cacheroute.testing.checks` and
:mod:`cacheroute.testing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from cacheroute._validation import fail
from cacheroute.policies.base import Decision, LoadBalancingPolicy
from cacheroute.policies.registry import make_policy
from cacheroute.worker import Worker

# --------------------------------------------------------------------------- invariants

ONLY_HEALTHY = "only healthy workers chosen"
"""A policy never chooses an unhealthy worker."""
NONE_IFF_NO_HEALTHY = "None exactly when no worker is healthy"
"""``select_worker``/``decide`` return ``None`` when, and only when, no worker is healthy
(empty list included); ``select_worker_pair``/``decide_pair`` when either list has no
healthy worker."""
INDEX_IN_RANGE = "index in range"
"""The result is an ``int`` index into the list the caller passed (a pair: two of them)."""
DECISION_CONSISTENT = "decision consistent"
"""``decide`` returns a :class:`~cacheroute.policies.base.Decision` whose ``url`` is the
chosen worker's and whose token counts are ints with
``0 <= cached_tokens <= prompt_tokens``."""
BAD_REQUEST_TEXT = "request_text of a bad type raises TypeError"
"""A ``request_text`` that is not a ``str``, token-id sequence or ``None`` raises TypeError."""
VALID_REQUEST_TEXT = "valid request_text accepted"
"""A ``str``, a token-id sequence (list, tuple, ``array.array``) or ``None`` never raises."""
LOADS_CONSERVED = "loads conserved through leases"
"""Every worker's load equals its starting load plus its open leases; a policy never changes
load itself; when every lease is released, every load is back where it started."""
WORK_CONSERVED = "work conserved through leases"
"""Every worker's pending prefill tokens equal the prefill tokens of its leases not past
their first token, and its decode tokens the context tokens of its leases past it
(workers with :class:`~cacheroute.worker.WorkAccounting`); both are back where they started
when every lease is released."""
THREAD_SAFETY = "thread safety"
"""Several threads selecting and leasing at once: no exception, every choice valid, no
hang, and every load and token total back where it started."""

INVARIANTS: tuple[str, ...] = (
    ONLY_HEALTHY,
    NONE_IFF_NO_HEALTHY,
    INDEX_IN_RANGE,
    DECISION_CONSISTENT,
    BAD_REQUEST_TEXT,
    VALID_REQUEST_TEXT,
    LOADS_CONSERVED,
    WORK_CONSERVED,
    THREAD_SAFETY,
)
"""Every invariant :func:`~cacheroute.testing.check_policy` checks; failure messages start
with ``[name]``."""


class PolicyInvariantError(AssertionError):
    """A policy broke one of the shared invariants.

    Attributes:
        invariant: the broken invariant, one of :data:`INVARIANTS`.

    The message starts with ``[invariant]`` and says what the policy did, on which workers.

    >>> str(PolicyInvariantError(ONLY_HEALTHY, "policy 'x' chose w0"))
    "[only healthy workers chosen] policy 'x' chose w0"
    """

    def __init__(self, invariant: str, message: str) -> None:
        super().__init__(f"[{invariant}] {message}")
        self.invariant = invariant


PolicyFactory: TypeAlias = Callable[[], LoadBalancingPolicy]
"""A zero-argument callable returning a fresh policy (a policy class works)."""


def policy_factory(policy: LoadBalancingPolicy | PolicyFactory | str) -> PolicyFactory:
    """Normalise what :func:`~cacheroute.testing.check_policy` accepts into a factory.

    Args:
        policy: a policy instance (reused by every example, as a gateway reuses it), a
            zero-argument factory or policy class (a fresh policy per example), or a
            registered policy name (``make_policy(name)`` per example).

    Raises:
        TypeError: ``policy`` is none of these, or the factory returns a non-policy.
        ValueError: ``policy`` is a name that is not registered.

    >>> factory = policy_factory("round_robin")
    >>> factory() is factory()
    False
    """
    if isinstance(policy, LoadBalancingPolicy):
        instance = policy
        return lambda: instance
    if isinstance(policy, str):
        name = policy
        make_policy(name)  # fail now, with the list of known names, on a typo
        return lambda: make_policy(name)
    if not callable(policy):
        raise fail(
            "policy",
            "a LoadBalancingPolicy, a zero-argument factory or a registered policy name",
            policy,
            TypeError,
        )
    factory = policy

    def checked() -> LoadBalancingPolicy:
        made = factory()
        if not isinstance(made, LoadBalancingPolicy):
            raise TypeError(f"policy factory {factory!r} returned {made!r}, not a policy")
        return made

    return checked


# --------------------------------------------------------------------------- reporting


def describe_workers(workers: Sequence[Worker]) -> str:
    """One line per worker (index, URL, health, load), for failure messages."""
    if not workers:
        return "[] (no workers)"
    parts = [
        f"[{i}] {w.url} {'healthy' if w.is_healthy() else 'UNHEALTHY'} load={w.load()}"
        for i, w in enumerate(workers[:16])
    ]
    more = f", ... ({len(workers)} in all)" if len(workers) > 16 else ""
    return "; ".join(parts) + more


def short(value: object) -> str:
    """``repr(value)`` cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def policy_name(policy: LoadBalancingPolicy) -> str:
    """``'name' (ClassName)`` of a policy, for failure messages."""
    return f"{policy.name!r} ({type(policy).__name__})"


def check_index(
    policy: LoadBalancingPolicy,
    method: str,
    result: object,
    workers: Sequence[Worker],
    request_text: object,
    what: str = "",
    returned: object = None,
) -> None:
    """Check one index result of ``method`` against ``workers``; raise on a broken invariant.

    ``returned``: what ``method`` returned, when ``result`` was taken from it (a
    :class:`Decision`'s index), so that messages show the whole of it.
    """
    shown = result if returned is None else returned
    where = f"policy {policy_name(policy)} {method}{what} returned {shown!r}"
    context = f"; workers: {describe_workers(workers)}; request_text={short(request_text)}"
    any_healthy = any(w.is_healthy() for w in workers)
    if result is None:
        if any_healthy:
            raise PolicyInvariantError(
                NONE_IFF_NO_HEALTHY, f"{where} although a worker is healthy{context}"
            )
        return
    if not any_healthy:
        raise PolicyInvariantError(
            NONE_IFF_NO_HEALTHY, f"{where} but no worker is healthy: expected None{context}"
        )
    if type(result) is not int or not 0 <= result < len(workers):
        raise PolicyInvariantError(
            INDEX_IN_RANGE,
            f"{where}, not an int index into the {len(workers)} workers it was given{context}",
        )
    if not workers[result].is_healthy():
        raise PolicyInvariantError(
            ONLY_HEALTHY, f"{where}, an unhealthy worker ({workers[result].url}){context}"
        )


def check_decision(
    policy: LoadBalancingPolicy,
    method: str,
    decision: object,
    workers: Sequence[Worker],
    request_text: object,
    what: str = "",
) -> None:
    """Check one :class:`Decision` (or ``None``) returned by ``method`` against ``workers``."""
    if decision is not None and not isinstance(decision, Decision):
        raise PolicyInvariantError(
            DECISION_CONSISTENT,
            f"policy {policy_name(policy)} {method}{what} returned {short(decision)}, not a "
            f"Decision or None; request_text={short(request_text)}",
        )
    index = None if decision is None else decision.index
    check_index(policy, method, index, workers, request_text, what, decision)
    if decision is None:
        return
    where = f"policy {policy_name(policy)} {method}{what} returned {decision!r}"
    context = f"; workers: {describe_workers(workers)}; request_text={short(request_text)}"
    counts = (decision.prompt_tokens, decision.cached_tokens)
    if any(type(c) is not int for c in counts):
        raise PolicyInvariantError(
            DECISION_CONSISTENT, f"{where}: prompt_tokens and cached_tokens must be ints{context}"
        )
    if not 0 <= decision.cached_tokens <= decision.prompt_tokens:
        raise PolicyInvariantError(
            DECISION_CONSISTENT,
            f"{where}: expected 0 <= cached_tokens <= prompt_tokens{context}",
        )
    chosen = workers[decision.index].url
    if decision.url != chosen:
        raise PolicyInvariantError(
            DECISION_CONSISTENT,
            f"{where}: url {decision.url!r} is not the chosen worker's ({chosen!r}){context}",
        )


def call_valid(
    policy: LoadBalancingPolicy,
    method: str,
    call: Callable[[], Any],
    request_text: object,
    workers: Sequence[Worker],
) -> Any:
    """Run a policy call with valid input; an exception from it breaks VALID_REQUEST_TEXT."""
    try:
        return call()
    except PolicyInvariantError:
        raise
    except Exception as exc:
        raise PolicyInvariantError(
            VALID_REQUEST_TEXT,
            f"policy {policy_name(policy)} {method} raised {type(exc).__name__}: {exc} "
            f"on valid input; request_text={short(request_text)}; "
            f"workers: {describe_workers(workers)}",
        ) from exc


def loads(workers: Sequence[Worker]) -> list[int]:
    """Every worker's load."""
    return [w.load() for w in workers]


def work(worker: Worker) -> tuple[int, int]:
    """``(pending prefill tokens, decode tokens)``; ``(0, 0)`` without WorkAccounting."""
    pending = getattr(worker, "pending_prefill_tokens", None)
    if pending is None:
        return 0, 0
    return pending(), worker.decode_tokens()  # type: ignore[attr-defined]


def check_loads_unchanged(
    policy: LoadBalancingPolicy, method: str, workers: Sequence[Worker], before: list[int]
) -> None:
    """A policy call must never change a load."""
    after = loads(workers)
    if after != before:
        raise PolicyInvariantError(
            LOADS_CONSERVED,
            f"policy {policy_name(policy)} {method} changed worker loads from {before} to "
            f"{after}: a policy must never change load (leases do); workers: "
            f"{describe_workers(workers)}",
        )
