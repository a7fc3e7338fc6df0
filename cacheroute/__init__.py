"""cacheroute: cache-aware, load-aware routing policies for LLM serving gateways.

>>> from cacheroute import BasicWorker, acquire, make_policy
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
    available_policies,
    make_policy,
    register_policy,
)
from cacheroute.tree import Tree
from cacheroute.worker import BasicWorker, LoadUnderflowError, WorkAccounting, Worker, WorkerType

__all__ = [
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
    "Tree",
    "WorkAccounting",
    "Worker",
    "WorkerType",
    "__version__",
    "acquire",
    "acquire_pair",
    "available_policies",
    "make_policy",
    "register_policy",
]
