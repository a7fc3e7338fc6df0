"""cacheroute: cache-aware, load-aware routing policies for LLM serving gateways.

>>> from cacheroute import DEFAULT_POLICY, BasicWorker, acquire, make_policy
>>> DEFAULT_POLICY
'work_aware'
>>> workers = [BasicWorker("http://w1:8000"), BasicWorker("http://w2:8000")]
>>> policy = make_policy("shortest_queue")
>>> with acquire(policy, workers, "You are a helpful assistant. Hi!") as lease:
...     lease.worker.load()
1
"""

from cacheroute._version import __version__
from cacheroute.lease import Lease, NoHealthyWorkerError, PairLease, acquire, acquire_pair
from cacheroute.policies import (
    CacheAwareConfig,
    CacheAwarePolicy,
    Decision,
    DecisionReason,
    LoadBalancingPolicy,
    PairPolicy,
    PrefixHashPolicy,
    WorkAwareConfig,
    WorkAwarePolicy,
    available_policies,
    make_policy,
    register_policy,
)
from cacheroute.tree import Tree
from cacheroute.worker import BasicWorker, LoadUnderflowError, WorkAccounting, Worker, WorkerType

DEFAULT_POLICY = "work_aware"
"""Registry name of the recommended policy,
:class:`~cacheroute.policies.work_aware.WorkAwarePolicy`: it estimates, in seconds, each
engine's time to first token, decode pressure and recompute waste for the request.
``make_policy(DEFAULT_POLICY)`` builds it; ``cacheroute policies`` lists it first."""

__all__ = [
    "DEFAULT_POLICY",
    "BasicWorker",
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "Decision",
    "DecisionReason",
    "Lease",
    "LoadBalancingPolicy",
    "LoadUnderflowError",
    "NoHealthyWorkerError",
    "PairLease",
    "PairPolicy",
    "PrefixHashPolicy",
    "Tree",
    "WorkAccounting",
    "WorkAwareConfig",
    "WorkAwarePolicy",
    "Worker",
    "WorkerType",
    "__version__",
    "acquire",
    "acquire_pair",
    "available_policies",
    "make_policy",
    "register_policy",
]
