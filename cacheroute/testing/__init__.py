"""Property-test any routing policy: hypothesis strategies, ``check_policy`` and a state machine.

This package needs [hypothesis](https://hypothesis.readthedocs.io), an optional dependency
(the ``test`` extra); the rest of cacheroute never imports it.

Check that a policy keeps the shared semantics every policy must keep (see
:mod:`cacheroute.policies.base`)::

    from cacheroute.testing import check_policy

    def test_my_policy():
        check_policy(MyPolicy)            # a class or factory: a fresh policy per example
        check_policy(MyPolicy, worker_factory=MyWorker)   # over your own Worker class

:func:`check_policy` raises :class:`PolicyInvariantError` (an ``AssertionError``) whose
message starts with the broken invariant in brackets, one of :data:`INVARIANTS`::

    [only healthy workers chosen] policy 'mine' select_worker returned 1, an unhealthy ...

Write your own properties with the strategies (:func:`workers`, :func:`clusters`,
:func:`request_texts`, :func:`token_ids`, :func:`request_streams`, :func:`bad_request_texts`,
:func:`bad_worker_lists`), and run stateful tests by subclassing
:class:`PolicyStateMachine`::

    class MyPolicyMachine(PolicyStateMachine):
        policy_factory = MyPolicy

    TestMyPolicyMachine = MyPolicyMachine.TestCase

The package has three modules, every public name re-exported here:
:mod:`cacheroute.testing.strategies` (the strategies),
:mod:`cacheroute.testing.machine` (:class:`PolicyStateMachine`) and
:mod:`cacheroute.testing.checks` (:func:`check_policy`, the invariants,
:class:`PolicyInvariantError`).
"""

from __future__ import annotations

try:
    import hypothesis  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "cacheroute.testing needs hypothesis, an optional dependency: "
        "pip install hypothesis (or the 'test' extra)"
    ) from _exc

from cacheroute.testing.checks import (
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
    PolicyFactory,
    PolicyInvariantError,
    check_policy,
    policy_factory,
)
from cacheroute.testing.machine import PolicyStateMachine
from cacheroute.testing.strategies import (
    SYSTEM_PROMPTS,
    HealthMix,
    WorkerFactory,
    bad_request_texts,
    bad_worker_lists,
    clusters,
    request_streams,
    request_texts,
    token_ids,
    workers,
)

__all__ = [
    "BAD_REQUEST_TEXT",
    "CHECKS",
    "DECISION_CONSISTENT",
    "INDEX_IN_RANGE",
    "INVARIANTS",
    "LOADS_CONSERVED",
    "NONE_IFF_NO_HEALTHY",
    "ONLY_HEALTHY",
    "SYSTEM_PROMPTS",
    "THREAD_SAFETY",
    "VALID_REQUEST_TEXT",
    "WORK_CONSERVED",
    "HealthMix",
    "PolicyFactory",
    "PolicyInvariantError",
    "PolicyStateMachine",
    "WorkerFactory",
    "bad_request_texts",
    "bad_worker_lists",
    "check_policy",
    "clusters",
    "policy_factory",
    "request_streams",
    "request_texts",
    "token_ids",
    "workers",
]
