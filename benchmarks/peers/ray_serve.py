"""``ray``: Ray Serve LLM's ``PrefixCacheAffinityRouter``.

The published algorithm (Ray docs "Prefix-aware routing", ``PrefixAwarePow2ReplicaRouter``):

1. **Imbalanced** when ``max queue length - min queue length > imbalanced_threshold``
   (queue length = requests in flight on the replica): power of two choices (two random
   replicas, the shorter queue).
2. Otherwise the prefix tree of what was routed where gives the longest match:
   ``match rate = matched characters / prompt characters``. At or above
   ``match_rate_threshold`` (0.1) the candidates are the replicas holding that longest
   match; below it, the replicas with the *smallest* trees ("to increase utilization").
   The candidate with the shortest queue is chosen (ties at random).
3. No text: power of two choices.

The prompt is inserted for the chosen replica. Eviction (``do_eviction``, 400k -> 360k
characters per tenant every 10 s) is off by default, as in Ray, so the tree never
forgets; ``imbalanced_threshold`` defaults to ``math.inf`` (Ray's current default; it
was 10 in earlier releases). Our Tree stands for Ray's character radix tree (on token ids
it matches units, the simulator's blocks).
"""

from __future__ import annotations

import math
import random
from typing import Any

from cacheroute.policies import register_policy
from cacheroute.policies.base import DecisionReason
from cacheroute.policies.prefix import PoolView, PrefixPolicy
from cacheroute.tree import Tree

__all__ = ["RayPrefixAffinityPolicy"]


class RayPrefixAffinityPolicy(PrefixPolicy):
    """Ray Serve's prefix-cache affinity router (module doc)."""

    name = "ray"
    description = "peer: Ray Serve PrefixCacheAffinityRouter (match >= 0.1, else smallest tree)"

    def __init__(
        self,
        imbalanced_threshold: float = math.inf,
        match_rate_threshold: float = 0.1,
        max_tree_size: int = 2**30,
        *,
        seed: int | None = None,
        on_decision: Any = None,
        tokens_per_unit: float | None = None,
    ) -> None:
        self.imbalanced_threshold = float(imbalanced_threshold)
        self.match_rate_threshold = float(match_rate_threshold)
        self._rng = random.Random(seed)
        self._init_prefix(max_tree_size, None, on_decision, tokens_per_unit, None)

    def _pow2(self, view: PoolView) -> int:
        el = view.eligible
        if len(el) == 1:
            return el[0]
        a, b = self._rng.sample(el, 2)
        return a if view.loads[a] <= view.loads[b] else b

    def _shortest(self, view: PoolView, cands: list[int]) -> int:
        loads = view.loads
        low = min(loads[i] for i in cands)
        ties = [i for i in cands if loads[i] == low]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        if tree is None or not view.units:
            return self._pow2(view), DecisionReason.POLICY, None
        if view.max_load - view.min_load > self.imbalanced_threshold:
            return self._pow2(view), DecisionReason.IMBALANCED, None
        best, holders = view.holders(lengths)
        if holders and best / view.units >= self.match_rate_threshold:
            return self._shortest(view, holders), DecisionReason.CACHE_HIT, None
        sizes = tree.used_size_per_tenant()
        urls = view.urls
        smallest = min(sizes.get(urls[i], 0) for i in view.eligible)
        cands = [i for i in view.eligible if sizes.get(urls[i], 0) == smallest]
        return self._shortest(view, cands), DecisionReason.CACHE_MISS, None


register_policy(RayPrefixAffinityPolicy.name, RayPrefixAffinityPolicy, replace=True)
