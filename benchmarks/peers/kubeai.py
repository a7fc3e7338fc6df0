"""``kubeai``: KubeAI's ``PrefixHash`` load balancer (consistent hashing with bounded loads).

The algorithm is our ``prefix_hash`` (``cacheroute/policies/prefix_hash.py``), which
re-implements KubeAI's CHWBL walk and bound (``in_flight + 1 <= (total + 1) / n *
load_factor``, every endpoint qualifying while the total is 0, the first endpoint met
taking the request when none qualifies); this module fixes KubeAI's settings: the first
100 characters of the prompt (``prefixCharLength``; for token ids, 25 tokens, 100 / 4
characters per token), 256 virtual nodes per endpoint, load factor 1.25.
"""

from __future__ import annotations

from typing import Any

from cacheroute.policies import PrefixHashPolicy, register_policy

__all__ = ["KubeAIPrefixHashPolicy"]


class KubeAIPrefixHashPolicy(PrefixHashPolicy):
    """``prefix_hash`` with KubeAI's defaults (module doc)."""

    name = "kubeai"
    description = "peer: KubeAI PrefixHash (CHWBL on the first 100 chars, 256 vnodes, 1.25)"

    def __init__(
        self,
        prefix_chars: int = 100,
        prefix_tokens: int = 25,
        virtual_nodes: int = 256,
        load_factor: float = 1.25,
        on_decision: Any = None,
        *,
        tokens_per_unit: float | None = None,
    ) -> None:
        super().__init__(
            prefix_chars=prefix_chars,
            prefix_tokens=prefix_tokens,
            virtual_nodes=virtual_nodes,
            load_factor=load_factor,
            on_decision=on_decision,
            tokens_per_unit=tokens_per_unit,
        )


register_policy(KubeAIPrefixHashPolicy.name, KubeAIPrefixHashPolicy, replace=True)
