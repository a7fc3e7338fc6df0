"""Routing policies: one base class, one module per policy, and a registry by name.

>>> from cacheroute.policies import make_policy, available_policies
>>> policy = make_policy("round_robin")
"""

from cacheroute.policies.base import (
    CHARS_PER_TOKEN,
    Decision,
    DecisionReason,
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    check_workers,
    estimate_tokens,
    healthy_indices,
    least_loaded_index,
)
from cacheroute.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy
from cacheroute.policies.pair import PairPolicy
from cacheroute.policies.power_of_two import PowerOfTwoPolicy
from cacheroute.policies.prefix import DEFAULT_MAX_TREE_NODES, PoolView, PrefixPolicy
from cacheroute.policies.prefix_hash import PrefixHashConfig, PrefixHashPolicy
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
from cacheroute.policies.work_aware import WorkAwareConfig, WorkAwarePolicy

for _cls in (
    WorkAwarePolicy,
    CacheAwarePolicy,
    RoundRobinPolicy,
    RandomPolicy,
    ShortestQueuePolicy,
    PowerOfTwoPolicy,
    PrefixHashPolicy,
):
    register_policy(_cls.name, _cls)
del _cls

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_MAX_TREE_NODES",
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "Decision",
    "DecisionReason",
    "LoadBalancingPolicy",
    "PairPolicy",
    "PoolView",
    "PowerOfTwoPolicy",
    "PrefixHashConfig",
    "PrefixHashPolicy",
    "PrefixPolicy",
    "RandomPolicy",
    "RequestText",
    "RoundRobinPolicy",
    "ShortestQueuePolicy",
    "WorkAwareConfig",
    "WorkAwarePolicy",
    "available_policies",
    "check_request_text",
    "check_workers",
    "estimate_tokens",
    "healthy_indices",
    "least_loaded_index",
    "make_policy",
    "policy_class",
    "policy_descriptions",
    "register_policy",
]
