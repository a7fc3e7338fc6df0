"""``preble``: Preble's E2 global scheduler (Srivatsa et al., "Preble: Efficient Distributed
Prompt Scheduling for LLM Serving", ICLR 2025).

The published algorithm, in the form re-implemented here:

* a global radix tree records which GPU (worker) caches which prefix (per-GPU share
  capped at its KV capacity, as Preble mirrors each GPU's eviction);
* **exploit** when the longest cached prefix is longer than what must be recomputed
  (``matched tokens > prompt tokens - matched tokens``): the request goes to the holder
  of that prefix with the least load;
* otherwise **explore**: the GPU with the least ``L_i + M_i + P_i`` -- ``L_i`` its load,
  the summed prefill and decode time of the requests assigned to it within the last
  ``window_s`` (3 minutes), ``M_i`` the recompute cost of what this request would evict
  there (its KV demand beyond the free capacity, priced at the prefill rate), ``P_i`` this
  request's prefill time there (its uncached tokens after that GPU's match);
* **load rebalancing**: an exploit target whose load exceeds ``high_load_threshold``
  (1.5) x the least loaded GPU's (plus this request's own prefill time, so that an idle
  cluster does not break affinity) is overridden by exploring; this is also how a hot
  prefix gets a second holder (Preble's prefix replication).

Prefill and decode times come from the model Preble fits by profiling each GPU; here
that is the simulator's engine (Llama-3.1-8B on one H100): 32.5 us per token plus
1.06 ns per (new x context) token pair for prefill, and ``expected_output_tokens`` (256)
x 6 ms per decoded request. Time is ``clock()`` (``time.monotonic``; the compare harness
passes simulated time).
"""

from __future__ import annotations

import random
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # loaded by file path (cacheroute simulate --plugin ...)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cacheroute.policies import register_policy
from cacheroute.policies.base import DecisionReason
from cacheroute.policies.prefix import PoolView, PrefixPolicy
from cacheroute.tree import Tree
from peers._common import Clock, prefill_seconds

__all__ = ["PreblePolicy"]


class PreblePolicy(PrefixPolicy):
    """Preble's exploit/explore scheduling with windowed load (module doc)."""

    name = "preble"
    description = "peer: Preble E2 (exploit if cached > missed, else least load+evict+prefill)"

    def __init__(
        self,
        window_s: float = 180.0,
        high_load_threshold: float = 1.5,
        expected_output_tokens: float = 256.0,
        decode_step_s: float = 0.006,
        *,
        clock: Clock | None = None,
        seed: int | None = None,
        on_decision: Any = None,
        tokens_per_unit: float | None = None,
        kv_capacity_tokens: int | None = None,
    ) -> None:
        self.window_s = float(window_s)
        self.high_load_threshold = float(high_load_threshold)
        self.decode_s = float(expected_output_tokens) * float(decode_step_s)
        self._clock: Clock = clock or time.monotonic
        self._rng = random.Random(seed)
        self._cap = kv_capacity_tokens
        self._window: dict[str, deque[tuple[float, float]]] = {}
        self._load: dict[str, float] = {}
        self._init_prefix(2**30, None, on_decision, tokens_per_unit, kv_capacity_tokens)

    def _loads(self, view: PoolView, now: float) -> list[float]:
        out = [0.0] * len(view.loads)
        horizon = now - self.window_s
        for i in view.eligible:
            url = view.urls[i]
            q = self._window.get(url)
            if q:
                total = self._load[url]
                while q and q[0][0] < horizon:
                    total -= q.popleft()[1]
                self._load[url] = total = max(0.0, total)
                out[i] = total
        return out

    def _least(self, cands: list[int], cost: list[float]) -> int:
        best = min(cost[i] for i in cands)
        ties = [i for i in cands if cost[i] == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        now = self._clock()
        loads = self._loads(view, now)
        kind = "text" if tree is not None and tree.kind == "text" else "tokens"
        tpu = self.tokens_per_unit(kind)
        total = view.units * tpu
        m = [0.0] * len(view.loads)
        for url, k in lengths.items():
            for i in view.pool.index_of.get(url, ()):
                m[i] = min(total, k * tpu)
        best, holders = view.holders(lengths)
        matched = min(total, best * tpu)
        index = -1
        reason: str = DecisionReason.CACHE_MISS
        if holders and matched > total - matched:
            index = self._least(holders, loads)
            reason = DecisionReason.CACHE_HIT
            floor = min(loads[i] for i in view.eligible)
            own = prefill_seconds(total - matched, matched)
            if loads[index] > self.high_load_threshold * floor + own:
                index, reason = -1, DecisionReason.IMBALANCED
        if index < 0:
            sizes = tree.used_size_per_tenant() if tree is not None and self._cap else {}
            cost = [0.0] * len(view.loads)
            for i in view.eligible:
                new = total - m[i]
                p = prefill_seconds(new, m[i])
                evict = 0.0
                if self._cap:
                    held = sizes.get(view.urls[i], 0) * tpu
                    evict = prefill_seconds(max(0.0, held + new - self._cap), 0.0)
                cost[i] = loads[i] + evict + p
            index = self._least(view.eligible, cost)
        url = view.urls[index]
        work = prefill_seconds(total - m[index], m[index]) + self.decode_s
        self._window.setdefault(url, deque()).append((now, work))
        self._load[url] = self._load.get(url, 0.0) + work
        return index, reason, loads[index]


register_policy(PreblePolicy.name, PreblePolicy, replace=True)
