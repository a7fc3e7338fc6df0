"""``llmd`` and ``llmd_scorers``: the llm-d / Gateway API Inference Extension endpoint picker.

Two published compositions of llm-d's filter -> scorers -> picker pipeline:

* ``llmd`` -- the "optimized baseline" llm-d recommends out of the box (2026): the
  ``prefix-cache-affinity-filter`` keeps only the *sticky* endpoints (prefix-cache score
  >= ``affinityThreshold`` 0.80) unless their TTFT, estimated as in-flight uncached
  tokens / ``peakPrefillThroughput``, exceeds the best non-sticky endpoint's by more than
  ``maxTTFTPenaltyMs`` (18 s) -- then all endpoints stay; exploration probability 0 (the
  current default). Then the ``token-load-scorer`` (score ``1 - min(1, tokens /
  queueThresholdTokens)``, tokens = the endpoint's uncached tokens in flight + this
  request's tokens it has not cached, threshold 4Mi) and the max-score picker (ties at
  random).
* ``llmd_scorers`` -- the classic weighted-scorer profile (GIE ``default-plugins``):
  ``prefix-cache-scorer`` (weight 3, matched blocks / request blocks), ``queue-scorer``
  (weight 1, ``(max - q) / (max - min)`` over the candidates, 1 when all equal) and
  ``kv-cache-utilization-scorer`` (weight 1, ``1 - utilization``), max-score picker.

The prefix index is llm-d's approximate one: per endpoint, an LRU of the blocks routed
there, capped at the endpoint's KV capacity (``AutoTune``: the engine's GPU blocks); our
Tree with ``kv_capacity_tokens`` is that. Signals a router-side re-implementation cannot
scrape are approximated from the workers' lease totals: in-flight uncached tokens =
``pending_prefill_tokens()``; queue depth = requests in flight; KV utilization =
(decode + pending prefill tokens) / KV capacity. ``peak_prefill_throughput`` defaults to
26,700 tokens/s: the llm-d calibration recipe (one unloaded 8192-token chunk) applied to
the simulator's engine (5 ms + 8192 x 32.5 us + attention = 0.307 s); llm-d's own default
(15,928) is calibrated for Qwen3-32B on two H100s.
"""

from __future__ import annotations

import random
from typing import Any

from cacheroute.policies import register_policy
from cacheroute.policies.base import DecisionReason
from cacheroute.policies.prefix import PoolView, PrefixPolicy
from cacheroute.tree import Tree

__all__ = ["LLMDOptimizedBaselinePolicy", "LLMDScorersPolicy"]


class _LLMDBase(PrefixPolicy):
    reads_work = True

    def _setup(
        self,
        seed: int | None,
        on_decision: Any,
        tokens_per_unit: float | None,
        kv_capacity_tokens: int | None,
    ) -> None:
        self._rng = random.Random(seed)
        self._cap = kv_capacity_tokens
        self._init_prefix(2**30, None, on_decision, tokens_per_unit, kv_capacity_tokens)

    def _tree_tpu(self, tree: Tree | None) -> float:
        kind = "text" if tree is not None and tree.kind == "text" else "tokens"
        return self.tokens_per_unit(kind)

    def _matches(self, view: PoolView, lengths: dict[str, int]) -> list[int]:
        m = [0] * len(view.loads)
        index_of = view.pool.index_of
        for url, k in lengths.items():
            for i in index_of.get(url, ()):
                m[i] = k
        return m

    def _argmax(self, cands: list[int], score: list[float]) -> int:
        best = max(score[i] for i in cands)
        ties = [i for i in cands if score[i] == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)


class LLMDOptimizedBaselinePolicy(_LLMDBase):
    """llm-d's optimized baseline: affinity filter + token-load scorer (module doc)."""

    name = "llmd"
    description = "peer: llm-d optimized baseline (prefix affinity gate 0.8 + token-load scorer)"

    def __init__(
        self,
        affinity_threshold: float = 0.8,
        max_ttft_penalty_s: float = 18.0,
        peak_prefill_throughput: float = 26_700.0,
        exploration_probability: float = 0.0,
        queue_threshold_tokens: int = 4_194_304,
        *,
        seed: int | None = None,
        on_decision: Any = None,
        tokens_per_unit: float | None = None,
        kv_capacity_tokens: int | None = None,
    ) -> None:
        self.affinity_threshold = float(affinity_threshold)
        self.max_ttft_penalty_s = float(max_ttft_penalty_s)
        self.peak_prefill_throughput = float(peak_prefill_throughput)
        self.exploration_probability = float(exploration_probability)
        self.queue_threshold_tokens = int(queue_threshold_tokens)
        self._setup(seed, on_decision, tokens_per_unit, kv_capacity_tokens)

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        n = view.units
        tpu = self._tree_tpu(tree)
        m = self._matches(view, lengths)
        pending = view.prefill_tokens or [0] * len(view.loads)
        eligible = view.eligible
        cands = eligible
        reason = DecisionReason.POLICY
        if n and self._rng.random() >= self.exploration_probability:
            sticky = [i for i in eligible if m[i] / n >= self.affinity_threshold]
            if sticky and len(sticky) < len(eligible):
                rest = [i for i in eligible if m[i] / n < self.affinity_threshold]
                gap = min(pending[i] for i in sticky) - min(pending[i] for i in rest)
                if gap / self.peak_prefill_throughput <= self.max_ttft_penalty_s:
                    cands, reason = sticky, DecisionReason.CACHE_HIT
                else:
                    reason = DecisionReason.IMBALANCED
        score = [0.0] * len(view.loads)
        qt = self.queue_threshold_tokens
        for i in cands:
            tokens = pending[i] + (n - m[i]) * tpu
            score[i] = 1.0 - min(1.0, tokens / qt)
        return self._argmax(cands, score), reason, None


class LLMDScorersPolicy(_LLMDBase):
    """llm-d / GIE classic weighted scorers (module doc)."""

    name = "llmd_scorers"
    description = "peer: llm-d weighted scorers (prefix 3, queue 1, KV utilization 1)"

    def __init__(
        self,
        prefix_weight: float = 3.0,
        queue_weight: float = 1.0,
        kv_weight: float = 1.0,
        *,
        seed: int | None = None,
        on_decision: Any = None,
        tokens_per_unit: float | None = None,
        kv_capacity_tokens: int | None = None,
    ) -> None:
        self.weights = (float(prefix_weight), float(queue_weight), float(kv_weight))
        self._setup(seed, on_decision, tokens_per_unit, kv_capacity_tokens)

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        n = view.units
        m = self._matches(view, lengths)
        loads = view.loads
        pending = view.prefill_tokens or [0] * len(loads)
        decode = view.decode_tokens or [0] * len(loads)
        eligible = view.eligible
        wp, wq, wk = self.weights
        qmax = max(loads[i] for i in eligible)
        qmin = min(loads[i] for i in eligible)
        cap = self._cap
        score = [0.0] * len(loads)
        for i in eligible:
            s = wp * (m[i] / n if n else 0.0)
            s += wq * (1.0 if qmax == qmin else (qmax - loads[i]) / (qmax - qmin))
            util = min(1.0, (decode[i] + pending[i]) / cap) if cap else 0.0
            s += wk * (1.0 - util)
            score[i] = s
        return self._argmax(eligible, score), DecisionReason.POLICY, None


register_policy(LLMDOptimizedBaselinePolicy.name, LLMDOptimizedBaselinePolicy, replace=True)
register_policy(LLMDScorersPolicy.name, LLMDScorersPolicy, replace=True)
