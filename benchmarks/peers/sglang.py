"""``sglang``: SGLang's cache-aware router with its own defaults (sgl-model-gateway CLI).

The algorithm is our ``cache_aware`` (``cacheroute/policies/cache_aware.py``), which
re-implements SGLang's rule; this module only fixes SGLang's settings:
``cache_threshold=0.3``, ``balance_abs_threshold=64``, ``balance_rel_threshold=1.5``,
``imbalance_mode="least_load"`` (SGLang's imbalanced branch is pure least load), and no
cap of a worker's share of the tree at its engine's KV capacity (SGLang bounds the tree
at ``max_tree_size`` = 2**26 characters per tenant and evicts every 120 s, which at these
sizes never binds: its tree does not forget what the engine evicted).
"""

from __future__ import annotations

from typing import Any

from cacheroute.policies import CacheAwarePolicy, register_policy

__all__ = ["SGLangCacheAwarePolicy"]


class SGLangCacheAwarePolicy(CacheAwarePolicy):
    """``cache_aware`` with SGLang's CLI defaults and no KV-capacity cap (module doc)."""

    name = "sglang"
    description = "peer: SGLang cache_aware (0.3 / 64 / 1.5, least load when imbalanced)"

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        max_tree_size: int = 2**30,
        imbalance_mode: Any = "least_load",
        on_decision: Any = None,
        *,
        tokens_per_unit: float | None = None,
    ) -> None:
        super().__init__(
            cache_threshold=cache_threshold,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
            max_tree_size=max_tree_size,
            imbalance_mode=imbalance_mode,
            on_decision=on_decision,
            tokens_per_unit=tokens_per_unit,
        )


register_policy(SGLangCacheAwarePolicy.name, SGLangCacheAwarePolicy, replace=True)
