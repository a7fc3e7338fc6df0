"""``vllm_router``: vLLM production-stack's prefix-aware router (``PrefixAwareRouter``).

The published algorithm (production-stack ``routing_logic.py`` and its ``HashTrie``):
the prompt is cut into 128-character chunks hashed with xxh64 into a trie; the endpoints
at the deepest matched node (all available endpoints when nothing matches) are the
candidates, one is chosen uniformly at random, and the prompt is inserted for it. It is
blind to load and its trie has no eviction ("we assume that there is no eviction of
prefix cache"). Our Tree stands for the trie (on token ids it matches units, the
simulator's blocks, rather than 128-character chunks).
"""

from __future__ import annotations

import random
from typing import Any

from cacheroute.policies import register_policy
from cacheroute.policies.base import DecisionReason
from cacheroute.policies.prefix import PoolView, PrefixPolicy
from cacheroute.tree import Tree

__all__ = ["VLLMPrefixAwarePolicy"]


class VLLMPrefixAwarePolicy(PrefixPolicy):
    """vLLM production-stack's prefix-aware routing (module doc)."""

    name = "vllm_router"
    description = "peer: vLLM production-stack prefix-aware (random among longest-match holders)"

    def __init__(
        self,
        max_tree_size: int = 2**30,
        *,
        seed: int | None = None,
        on_decision: Any = None,
        tokens_per_unit: float | None = None,
    ) -> None:
        self._rng = random.Random(seed)
        self._init_prefix(max_tree_size, None, on_decision, tokens_per_unit, None)

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        _, holders = view.holders(lengths)
        if holders:
            return self._rng.choice(holders), DecisionReason.CACHE_HIT, None
        return self._rng.choice(view.eligible), DecisionReason.CACHE_MISS, None


register_policy(VLLMPrefixAwarePolicy.name, VLLMPrefixAwarePolicy, replace=True)
