"""``cache_aware``: prefix affinity while load is balanced, load first when it is not.

The algorithm (SGLang's cache-aware router, with each of its field failures closed; see
``docs/policies/cache_aware.md``):

1. Only *eligible* workers count: healthy, and not removed. ``min_load`` and
   ``max_load`` are taken over them alone (an unhealthy idle worker never makes a
   balanced cluster look imbalanced).
2. **Imbalanced** when ``max_load - min_load > balance_abs_threshold`` and
   ``max_load > balance_rel_threshold * min_load``.
3. **Balanced.** ``match rate = longest match / request units``. Above
   ``cache_threshold``: the worker holding the longest match. At or below (a miss):
   least load, never the smallest tree alone (seed 000: that was the death spiral).
4. **Imbalanced**, ``imbalance_mode="locality"`` (default): among eligible workers with
   ``load <= min_load + balance_abs_threshold``, the longest match when its rate is above
   ``cache_threshold``; otherwise least load. ``imbalance_mode="least_load"``: SGLang's
   pure least load.

Ties, everywhere, by one rule (:meth:`~cacheroute.policies.prefix.PoolView.pick`): least
load, then (on a miss) the smallest share of the tree, then fewest processed, then index.
The request is then inserted for the chosen worker (every branch) and counted as
processed (:class:`~cacheroute.policies.prefix.PrefixPolicy` does both).

It counts requests, not work: a hit goes to its holder even when that holder has a
200k-token prefill queued, as long as the request counts are within the thresholds. The
default policy (``work_aware``) prices that work instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cacheroute._validation import (
    check_callable,
    check_choice,
    check_int,
    check_real,
    fail,
    settle_config,
)
from cacheroute.policies.base import DecisionReason
from cacheroute.policies.precise import IndexMode, KVIndex
from cacheroute.policies.prefix import (
    DEFAULT_MAX_TREE_NODES,
    DecisionObserver,
    PoolView,
    PrefixPolicy,
)
from cacheroute.tree import Tree

__all__ = ["CacheAwareConfig", "CacheAwarePolicy", "ImbalanceMode"]

ImbalanceMode = Literal["locality", "least_load"]
"""What the imbalanced branch does: keep locality inside a load window, or pure least load."""


@dataclass(frozen=True)
class CacheAwareConfig:
    """Validated settings of :class:`CacheAwarePolicy` (frozen; nothing is clamped).

    Args:
        cache_threshold: in [0, 1]. A balanced request goes to the longest-match holder
            only when ``matched / request units`` is strictly above it. Default 0.3
            (SGLang's CLI; its library says 0.5): the tree sees prompts only, not the
            replies the engine also caches, so a chat's second turn often matches below
            0.5 although most of it is cached.
        balance_abs_threshold: int >= 0. Load gap (requests in flight) that, together
            with the relative test, makes the cluster imbalanced; also the width of the
            load window of ``imbalance_mode="locality"``. Default 8 (SGLang: 32 in the
            library, 64 in the CLI); see docs/policies/cache_aware.md.
        balance_rel_threshold: real >= 1.0 (``math.inf`` never reports imbalance). Imbalanced
            also needs ``max_load > balance_rel_threshold * min_load``. Default 1.5.
        max_tree_size: int > 0. Total units (characters or tokens) per tree, one tree per
            (model, text or tokens), enforced inside every insert. Default 2**24.
        max_tree_size_per_worker: int > 0 or ``None``: cap on one worker's units in a
            tree (e.g. its KV-cache size), also enforced on insert. Default ``None``.
        imbalance_mode: ``"locality"`` (default) or ``"least_load"``; see the module doc.
        tokens_per_unit: real > 0 or ``None`` (default: 1 for token ids, 1/4 for text):
            tokens one request unit stands for (a block id of 16 tokens: 16).
        kv_capacity_tokens: int > 0 or ``None`` (default, as SGLang: no per-worker cap):
            each engine's KV capacity in tokens; caps each worker's share of a tree.
        max_tree_nodes: int > 0 or ``None``: nodes per tree, counted once per worker
            holding them: what memory follows when prompts are short and distinct.
            Default ``DEFAULT_MAX_TREE_NODES`` (335,544), which with the default
            ``max_tree_size`` keeps a tree within 256 MiB.
        index: ``None`` (default: the routed history only) or a KV-event index
            (e.g. :class:`cacheroute.events.KVEventIndex`): precise mode for token-id
            requests (see :class:`~cacheroute.policies.prefix.PrefixPolicy`).
        index_mode: ``"hybrid"`` (default) or ``"precise"``.
        claim_ttl_s: real > 0: how long a hybrid claim counts. Default 30 s.
        index_namespace: ``None`` or keyword arguments for the index's ``match``.
        on_decision: ``None`` (default) or a callable receiving each
            :class:`~cacheroute.policies.base.Decision`, outside every lock. Its exceptions
            are logged (logger ``cacheroute.policies``) and never fail the routing call.

    Raises:
        TypeError: a value of the wrong type (the message names the field and the value).
        ValueError: a value out of range (the message names the field and the value).

    SGLang's router, exactly: ``CacheAwareConfig(cache_threshold=0.3,
    balance_abs_threshold=64, balance_rel_threshold=1.5, imbalance_mode="least_load",
    max_tree_size=2**30)`` (its CLI defaults; its tree is bounded per tenant, not in
    total, so a total that never binds).

    >>> CacheAwareConfig(balance_abs_threshold=64).balance_abs_threshold
    64
    """

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 2**24
    max_tree_size_per_worker: int | None = None
    max_tree_nodes: int | None = DEFAULT_MAX_TREE_NODES
    imbalance_mode: ImbalanceMode = "locality"
    tokens_per_unit: float | None = None
    kv_capacity_tokens: int | None = None
    index: KVIndex | None = field(default=None, compare=False)
    index_mode: IndexMode = "hybrid"
    claim_ttl_s: float = 30.0
    index_namespace: Mapping[str, Any] | None = field(default=None, compare=False)
    on_decision: DecisionObserver | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        ct = check_real("cache_threshold", self.cache_threshold, minimum=0.0, maximum=1.0)
        check_int("balance_abs_threshold", self.balance_abs_threshold, minimum=0)
        rel = check_real(
            "balance_rel_threshold", self.balance_rel_threshold, minimum=1.0, finite=False
        )
        check_int("max_tree_size", self.max_tree_size, minimum=1)
        check_int(
            "max_tree_size_per_worker", self.max_tree_size_per_worker, minimum=1, none_ok=True
        )
        check_int("max_tree_nodes", self.max_tree_nodes, minimum=1, none_ok=True)
        check_choice("imbalance_mode", self.imbalance_mode, ("locality", "least_load"))
        tpu = check_real(
            "tokens_per_unit", self.tokens_per_unit, minimum=0.0, min_open=True, none_ok=True
        )
        check_int("kv_capacity_tokens", self.kv_capacity_tokens, minimum=1, none_ok=True)
        check_callable("on_decision", self.on_decision, none_ok=True)
        if self.index is not None and not isinstance(self.index, KVIndex):
            raise fail(
                "index", "None or a KV-event index (match, urls, stale_urls)", self.index, TypeError
            )
        check_choice("index_mode", self.index_mode, ("precise", "hybrid"))
        if self.index_namespace is not None and not isinstance(self.index_namespace, Mapping):
            raise fail("index_namespace", "None or a mapping", self.index_namespace, TypeError)
        ttl = check_real("claim_ttl_s", self.claim_ttl_s, minimum=0.0, min_open=True)
        object.__setattr__(self, "tokens_per_unit", tpu)
        object.__setattr__(self, "claim_ttl_s", ttl)
        # An int threshold is fine; store floats.
        object.__setattr__(self, "cache_threshold", ct)
        object.__setattr__(self, "balance_rel_threshold", rel)


class CacheAwarePolicy(PrefixPolicy):
    """Prefix affinity when load is balanced, least load (keeping locality) when it is not.

    Build it with keyword settings (the fields of :class:`CacheAwareConfig`, validated the
    same way) or with ``config=``; ``make_policy("cache_aware", **settings)`` takes the
    same keys. ``config=`` cannot be combined with settings that differ from their
    defaults, except ``on_decision``, which then replaces ``config.on_decision``.
    ``clock`` (not a setting): the clock of hybrid claims, for simulations.

    Trees, membership, observer and pairs: see
    :class:`~cacheroute.policies.prefix.PrefixPolicy`. No background thread.

    >>> from cacheroute import BasicWorker
    >>> ws = [BasicWorker("http://a"), BasicWorker("http://b")]
    >>> p = CacheAwarePolicy()
    >>> first = p.select_worker(ws, "You are a helpful assistant. Hi")
    >>> p.select_worker(ws, "You are a helpful assistant. Bye") == first
    True

    Complexity of ``select_worker``: O(n) worker reads + one tree match and insert
    (O(m) C-level compares for m request units) + O(t) for the t tenants matching.
    """

    name = "cache_aware"
    description = (
        "prefix affinity while load is balanced; least load keeping locality when imbalanced"
    )

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 8,
        balance_rel_threshold: float = 1.5,
        max_tree_size: int = 2**24,
        max_tree_size_per_worker: int | None = None,
        imbalance_mode: ImbalanceMode = "locality",
        on_decision: DecisionObserver | None = None,
        *,
        tokens_per_unit: float | None = None,
        kv_capacity_tokens: int | None = None,
        max_tree_nodes: int | None = DEFAULT_MAX_TREE_NODES,
        index: KVIndex | None = None,
        index_mode: IndexMode = "hybrid",
        claim_ttl_s: float = 30.0,
        index_namespace: Mapping[str, Any] | None = None,
        config: CacheAwareConfig | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        given: dict[str, object] = {
            "cache_threshold": cache_threshold,
            "balance_abs_threshold": balance_abs_threshold,
            "balance_rel_threshold": balance_rel_threshold,
            "max_tree_size": max_tree_size,
            "max_tree_size_per_worker": max_tree_size_per_worker,
            "imbalance_mode": imbalance_mode,
            "tokens_per_unit": tokens_per_unit,
            "kv_capacity_tokens": kv_capacity_tokens,
            "max_tree_nodes": max_tree_nodes,
            "index": index,
            "index_mode": index_mode,
            "claim_ttl_s": claim_ttl_s,
            "index_namespace": index_namespace,
        }
        config = settle_config(CacheAwareConfig, config, given, on_decision=on_decision)
        self._config = config
        self._threshold = config.cache_threshold
        self._abs = config.balance_abs_threshold
        self._rel = config.balance_rel_threshold
        self._locality = config.imbalance_mode == "locality"
        self._init_prefix_from(config, clock)

    @property
    def config(self) -> CacheAwareConfig:
        """The validated settings. O(1)."""
        return self._config

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        """SGLang's rule with locality kept under imbalance (see the module doc). O(t + n)."""
        n, lo, hi = view.units, view.min_load, view.max_load
        if hi - lo > self._abs and hi > self._rel * lo:
            if self._locality:
                best, holders = view.holders(lengths, lo + self._abs)
                if n and best / n > self._threshold:
                    return view.pick(holders), DecisionReason.IMBALANCED, None
            return view.pick(view.eligible), DecisionReason.IMBALANCED, None
        best, holders = view.holders(lengths)
        if n and best / n > self._threshold:
            return view.pick(holders), DecisionReason.CACHE_HIT, None
        return view.pick(view.eligible, tree), DecisionReason.CACHE_MISS, None

    def _describe_config(self) -> str:
        c = self._config
        return (
            f"cache_threshold={c.cache_threshold}, "
            f"balance_abs_threshold={c.balance_abs_threshold}, "
            f"balance_rel_threshold={c.balance_rel_threshold}, max_tree_size={c.max_tree_size}, "
            f"imbalance_mode={c.imbalance_mode!r}, "
        )
