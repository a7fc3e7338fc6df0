"""``dynamo``: NVIDIA Dynamo's KV router, in its approximate (no KV events) mode.

The published algorithm (Dynamo docs "KV Router" / "Router Design", ``DefaultWorkerSelector``):

* per worker, ``logit = overlap_score_weight * potential_prefill_blocks +
  potential_decode_blocks``; the least logit wins (``router_temperature = 0``, the
  default), ties at random; a positive temperature samples a softmax of the negated,
  range-normalised logits;
* ``potential_prefill_blocks`` = (the worker's prefill tokens in flight, i.e. prompts
  routed there whose first token is not out yet, + this request's tokens minus its
  overlap) / block size;
* ``potential_decode_blocks`` = the worker's active blocks (distinct blocks of every
  request routed there and not yet freed, shared prefixes counted once) + this request's
  blocks not yet active there;
* ``--no-kv-events``: the overlap comes from an index of the blocks the router itself
  routed, each (block, worker) entry expiring 120 s after it was last routed, the whole
  index pruned to 80 % of its 2**20-entry cap (oldest first) when it outgrows it.

Mapping onto cacheroute: the prefill tokens in flight are the workers'
``pending_prefill_tokens()`` (the leases maintain exactly that: moved out at the first
token); the active blocks are tracked here from the decisions, and released when the
lease of a request on that worker completes (``on_request_complete`` does not say which
request, so the worker's oldest active request is released: FIFO, exact in count).
Blocks are the request's units (one unit = ``tokens_per_unit`` tokens; the simulator's
block ids); block size cancels out of the argmin, so costs are kept in tokens. Time is
``clock()`` (``time.monotonic`` by default; the compare harness passes simulated time).

Defaults as Dynamo ships them: ``overlap_score_weight=1.0``, ``router_temperature=0.0``,
``ttl_s=120``, ``max_index_blocks=2**20``, ``prune_target=0.8``.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # loaded by file path (cacheroute simulate --plugin ...)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cacheroute.policies import register_policy
from cacheroute.policies.base import RequestText
from cacheroute.worker import Worker
from peers._common import Clock, PeerPolicy, chained_hashes

__all__ = ["DynamoPolicy"]


class DynamoPolicy(PeerPolicy):
    """Dynamo's KV-router cost, approximate index (see the module doc)."""

    name = "dynamo"
    description = "peer: Dynamo KV router (w * prefill blocks + decode blocks, TTL index)"

    def __init__(
        self,
        overlap_score_weight: float = 1.0,
        router_temperature: float = 0.0,
        ttl_s: float = 120.0,
        max_index_blocks: int = 2**20,
        prune_target: float = 0.8,
        block_tokens: int = 16,
        *,
        clock: Clock | None = None,
        seed: int | None = None,
        on_decision: Any = None,
        tokens_per_unit: float | None = None,
    ) -> None:
        self.weight = float(overlap_score_weight)
        self.temperature = float(router_temperature)
        self.ttl = float(ttl_s)
        self.max_blocks = int(max_index_blocks)
        self.prune_target = float(prune_target)
        self.block_tokens = int(block_tokens)
        self._clock: Clock = clock or time.monotonic
        self._init_peer(seed, on_decision, tokens_per_unit)
        # the approximate index: block hash -> {url: expiry}; expiry order for pruning
        self._index: dict[int, dict[str, float]] = {}
        self._order: OrderedDict[tuple[int, str], float] = OrderedDict()
        # active sequences per worker url: block refcounts and requests in FIFO order
        self._refs: dict[str, dict[int, int]] = {}
        self._active: dict[str, deque[list[int]]] = {}

    def _block_units(self, request_text: RequestText) -> int:
        """Units per Dynamo block: the KV block size in units (at least one unit)."""
        return max(1, round(self.block_tokens / self.tpu(request_text)))

    def _drop_oldest(self) -> float:
        (h, url), exp = self._order.popitem(last=False)
        holders = self._index.get(h)
        if holders is not None:
            holders.pop(url, None)
            if not holders:
                del self._index[h]
        return exp

    def _expire(self, now: float) -> None:
        """Drop expired entries (one TTL for all, so the order is the expiry order), then
        prune to ``prune_target`` of the cap if the index outgrew it."""
        order = self._order
        while order and next(iter(order.values())) <= now:
            self._drop_oldest()
        if len(order) > self.max_blocks:
            while len(order) > self.max_blocks * self.prune_target:
                self._drop_oldest()

    def _overlaps(self, hashes: list[int], now: float) -> dict[str, int]:
        """Blocks of the prompt's prefix each worker holds (consecutive, unexpired)."""
        if not hashes:
            return {}
        first = self._index.get(hashes[0])
        if not first:
            return {}
        alive = [u for u, exp in first.items() if exp > now]
        out = dict.fromkeys(alive, 1)
        for k in range(1, len(hashes)):
            if not alive:
                break
            holders = self._index.get(hashes[k])
            if not holders:
                break
            alive = [u for u in alive if holders.get(u, 0.0) > now]
            for u in alive:
                out[u] = k + 1
        return out

    def choose(
        self,
        workers: tuple[Worker, ...],
        eligible: list[int],
        loads: list[int],
        prefill: list[int],
        decode: list[int],
        request_text: RequestText,
    ) -> tuple[int, int, float | None]:
        now = self._clock()
        self._expire(now)
        units = request_text or ""
        tpu = self.tpu(request_text)
        bu = self._block_units(request_text)
        hashes = chained_hashes(units, bu)
        block_tok = bu * tpu
        isl = len(units) * tpu
        overlaps = self._overlaps(hashes, now)
        logits = [math.inf] * len(workers)
        for i in eligible:
            url = workers[i].url
            ov = overlaps.get(url, 0)
            prefill_tokens = prefill[i] + max(0.0, isl - ov * block_tok)
            refs = self._refs.get(url)
            if refs:
                new_blocks = sum(1 for h in hashes if h not in refs)
                active = len(refs)
            else:
                new_blocks, active = len(hashes), 0
            # tokens beyond the full blocks (the partial last block) are new as well
            tail = max(0.0, isl - len(hashes) * block_tok)
            decode_tokens = (active + new_blocks) * block_tok + tail
            logits[i] = (self.weight * prefill_tokens + decode_tokens) / block_tok
        if self.temperature > 0:
            index = self._softmax(eligible, logits)
        else:
            index = self.pick_min(eligible, logits)
        url = workers[index].url
        exp = now + self.ttl
        order, idx = self._order, self._index
        for h in hashes:
            idx.setdefault(h, {})[url] = exp
            key = (h, url)
            if key in order:
                order.move_to_end(key)
            order[key] = exp
        refs = self._refs.setdefault(url, {})
        for h in hashes:
            refs[h] = refs.get(h, 0) + 1
        self._active.setdefault(url, deque()).append(hashes)
        matched = overlaps.get(url, 0) * bu
        return index, min(matched, len(units)), logits[index]

    def _softmax(self, eligible: list[int], logits: list[float]) -> int:
        lo = min(logits[i] for i in eligible)
        hi = max(logits[i] for i in eligible)
        if hi == lo:
            return self._rng.choice(eligible)
        scaled = [-(logits[i] / (hi - lo)) / self.temperature for i in eligible]
        top = max(scaled)
        weights = [math.exp(s - top) for s in scaled]
        return self._rng.choices(eligible, weights)[0]

    def on_request_complete(self, worker_url: str, success: bool) -> None:
        """Free the worker's oldest active request (see the module doc)."""
        active = self._active.get(worker_url)
        if not active:
            return
        hashes = active.popleft()
        refs = self._refs[worker_url]
        for h in hashes:
            c = refs[h] - 1
            if c:
                refs[h] = c
            else:
                del refs[h]


register_policy(DynamoPolicy.name, DynamoPolicy, replace=True)
