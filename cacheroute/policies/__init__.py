"""Routing policies: one base class, one module per policy, and a registry by name.

>>> from cacheroute.policies import make_policy, available_policies
>>> policy = make_policy("round_robin")
"""

from cacheroute.policies.base import (
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    healthy_indices,
    least_loaded_index,
)
from cacheroute.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy, Decision
from cacheroute.policies.pair import PairPolicy
from cacheroute.policies.power_of_two import PowerOfTwoPolicy
from cacheroute.policies.random import RandomPolicy
from cacheroute.policies.registry import (
    available_policies,
    make_policy,
    policy_class,
    policy_descriptions,
    register_policy,
)
from cacheroute.policies.round_robin import RoundRobinPolicy
from cacheroute.policies.shortest_queue import ShortestQueuePolicy

for _cls in (
    CacheAwarePolicy,
    RoundRobinPolicy,
    RandomPolicy,
    ShortestQueuePolicy,
    PowerOfTwoPolicy,
):
    register_policy(_cls.name, _cls)
del _cls

__all__ = [
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "Decision",
    "LoadBalancingPolicy",
    "PairPolicy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RequestText",
    "RoundRobinPolicy",
    "ShortestQueuePolicy",
    "available_policies",
    "check_request_text",
    "healthy_indices",
    "least_loaded_index",
    "make_policy",
    "policy_class",
    "policy_descriptions",
    "register_policy",
]
