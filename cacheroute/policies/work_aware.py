"""``work_aware``: route each request to the engine where it costs the system least time.

Per eligible worker the policy estimates, in seconds, what sending this request there would
cost, and takes the least (``docs/policies/work_aware.md`` has the derivation and the
measurements). The estimate starts with the request's **time to first token** there,
``T = Q + p + A``:

* ``Q``, the prefill work queued ahead of it: the worker's pending prefill tokens, priced
  by a *ledger* of the prefills this policy sent there (each with its own estimate,
  attention included), kept in step with the worker's pending-token total and its count
  of prefill tokens ever leased (so that other gateways' work there keeps no finished
  prefill in it);
* ``p``, its own prefill there: ``u * prefill_token_s + u * (c + u / 2) *
  attention_token_s`` for the ``u`` tokens not cached there after the ``c`` that are (the
  tree's match);
* ``A``, waiting to be admitted: for a batch slot when the worker already runs
  ``max_batch`` requests, and for KV memory when its in-flight contexts plus this prompt
  exceed ``kv_capacity_tokens``: the part of a decode run (``reply_tokens`` steps) that
  must complete first, each step reading at most ``kv_capacity_tokens`` of KV (queued
  prompts are prefill to wait for, not a longer step); plus the decode step in progress.
  In-flight contexts: those decoding and the prompts this policy queued there, those
  cached whole included (with none, the pending tokens); a slot frees among the requests
  running.

To ``T`` it adds what the request does to the others there, which depends on whether its
context already lives somewhere:

* a **continuation** (its longest cached prefix is longer than the rest, Preble's test:
  a conversation's next turn, an agent's next step) adds ``p * in_flight``: engines run
  prefill before decode steps, so its prefill stalls every request in flight on that
  worker. Staying costs its short prefill there; moving costs its whole prompt, times
  the requests it would stall, plus the duplicate (below);
* **new context** adds ``decode_horizon`` decode steps at ``decode_token_s`` per context
  token of the decode batch it joins (the worker's decode tokens plus its own), and the
  recompute waste ``(p - p_min) * in_flight``: prefilling more than the best placement
  would (``p_min``) stalls the requests in flight there for the difference, so recompute
  is priced by the work queued behind it, free on an idle engine, decisive on a busy one.

Of that recompute, what lies beyond the part of the prompt other prompts share (the
tree's :meth:`~cacheroute.tree.Tree.shared_length`: a system prompt, a template) is this
prompt's own history, a conversation's earlier turns. Recomputing it anywhere duplicates
it, and counts once more: work done for nothing, which the next requests there wait
behind even when it is idle now (without it, conversations left a holder decoding a few
others for an engine that merely had nothing in flight). Recomputing the shared part on a
worker lacking it makes a new holder of it, which is how a hot prefix gains one: that
counts only as a stall.

Both stalls (``p * in_flight`` and ``(p - p_min) * in_flight``) are scaled by
``stall_weight`` (1 by default: a second of delay to each of the others counts as a second
of this request's own TTFT; lower favours TTFT, higher end-to-end latency). New context's
prefill stalls the requests in flight too, ``p_min`` of it wherever it goes;
``new_context_stall_weight`` (0 by default) counts that part as well, at that weight:
``(p - p_min + new_context_stall_weight * p_min) * in_flight``. Above 0 it sends new
context where fewer requests are in flight: long agentic sessions gain, chat and
all-at-once bursts lose (measured in ``docs/policies/work_aware.md``).

A request whose cached part is all shared with other prompts (a new request on a shared
system prompt or template) is a continuation by that test, priced by the stall of its
short prefill; the decode batch it joins does not count. ``shared_prefix_decode_weight``
(0 by default) adds that batch's decode pressure, at that weight, as new context has it.
Above 0 it spreads single-turn traffic on a few long shared prompts by decode load: the
end-to-end tail of long replies gains, the TTFT tail and chat lose (measured in
``docs/policies/work_aware.md``).

With ``kv_capacity_tokens`` it also adds the prefill time of the other prefixes that worker
would have to evict to hold this request.

Ties (equal estimates) go to the least load, then the smallest share of the tree, then the
fewest processed, then the lowest index, so an idle cluster spreads new prefixes instead of
sending them all to worker 0. Workers without work accounting (custom ``Worker`` objects
without ``pending_prefill_tokens``) read as zero work: each request in flight then counts
as one of this size, so the policy falls back to counts.

Every weight is a physical quantity with a default derived from the engine of the
simulator (Llama-3.1-8B in bf16 on one H100); ``docs/policies/work_aware.md`` shows how to
derive them for another model and GPU.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cacheroute._validation import (
    check_callable,
    check_choice,
    check_int,
    check_real,
    fail,
    settle_config,
)
from cacheroute.policies.base import CHARS_PER_TOKEN, DecisionReason
from cacheroute.policies.precise import IndexMode, KVIndex
from cacheroute.policies.prefix import (
    DEFAULT_MAX_TREE_NODES,
    DecisionObserver,
    PoolView,
    PrefixPolicy,
    _Pool,
)
from cacheroute.tree import Tree
from cacheroute.worker import (
    Worker,
    _read_leased,
    _read_prefill_leased,
    _read_tokens,
    _read_work_totals,
)

__all__ = ["WorkAwareConfig", "WorkAwarePolicy"]

_NO_MARK = float("inf")
"""A ledger entry's mark on a worker that does not count the prefill tokens leased."""
_UNBOUNDED = float("inf")
"""The cost bound before any worker is priced."""
_EXACT_UP_TO = 16
"""Eligible workers up to which every worker is priced exactly (see :meth:`choose`)."""
_SHORTLIST = 8
"""Beyond that, the non-holders priced: those with the least pending plus decode tokens."""


@dataclass(frozen=True)
class WorkAwareConfig:
    """Validated settings of :class:`WorkAwarePolicy` (frozen; nothing is clamped).

    Defaults are Llama-3.1-8B in bf16 on one H100 SXM (989 TFLOP/s bf16, 3.35 TB/s), the
    engine of ``cacheroute simulate``; for another deployment derive them the same way
    (``docs/policies/work_aware.md``).

    Args:
        prefill_token_s: real > 0. Seconds of prefill per uncached prompt token, the
            linear layers: 2 x 8.03e9 FLOP at 50 % of 989 TFLOP/s = 3.25e-5 (~31k
            tokens/s).
        attention_token_s: real >= 0. Seconds per (new token x context token) pair of
            prefill attention: 4 x 4,096 hidden x 32 layers FLOP at 50 % of peak =
            1.06e-9. A 100k-token context costs ~3x its linear prefill.
        decode_step_s: real >= 0. Seconds of one decode step with an empty batch, reading
            the weights: 16.06 GB at 80 % of 3.35 TB/s = 0.006.
        decode_token_s: real >= 0. Seconds per decode step per context token in the batch,
            reading its KV (128 KiB per token at 80 % of 3.35 TB/s) = 4.89e-8.
        reply_tokens: int >= 1. Mean reply length: how many decode steps a running
            request keeps its batch slot and KV memory. Default 256.
        decode_horizon: int >= 0. Decode steps of a request bringing new context charged
            with the decode pressure of the batch it joins. Default 512, a long reply:
            the end-to-end tail is made of long replies. 0 ignores decode pressure.
        max_batch: int >= 1. Requests an engine runs at once (vLLM ``max_num_seqs``,
            SGLang ``max_running_requests``). Default 256 (vLLM's).
        max_tree_size: int > 0, units per tree (all workers), as for every prefix policy
            (:class:`~cacheroute.policies.prefix.PrefixPolicy`). Default 2**24.
        max_tree_size_per_worker: int > 0 or ``None``: units per worker per tree.
        tokens_per_unit: real > 0 or ``None`` (1 for token ids, 1/4 for text): tokens one
            request unit stands for (a block id of 16 tokens: 16).
        kv_capacity_tokens: int > 0 or ``None``: each engine's KV capacity in tokens
            (vLLM: ``num_gpu_blocks x block_size``). Caps each worker's share of the tree
            and enables the memory wait and the eviction price; ``None`` (default) leaves
            both out.
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
        on_decision: ``None`` or a callable receiving each
            :class:`~cacheroute.policies.base.Decision`; its exceptions are logged
            (logger ``cacheroute.policies``), never raised.
        stall_weight: real >= 0. What a second by which this request's prefill delays
            each request in flight on a worker counts for, against a second of its own
            time to first token. 1 (default) counts it as the second it is. Lower favours
            the request's own TTFT: a conversation leaves a holder busy decoding others
            less often. Higher favours the others' end-to-end latency. 0 leaves the stalls
            out of the price. ``docs/policies/work_aware.md`` measures the trade.
        new_context_stall_weight: real >= 0. How much of a new context's prefill at its
            best placement (``p_min``) counts as a stall of each request in flight where
            it runs, on top of the recompute beyond it (which always counts). 0 (default)
            prices new context by the work queued and the decode batch it joins; 1
            prices its prefill's stall as a continuation's is. Above 0 it favours the
            in-flight requests' end-to-end latency over new requests' TTFT, which pays
            where prompts are long and sessions many (agentic traffic);
            ``docs/policies/work_aware.md`` measures it.
        shared_prefix_decode_weight: real >= 0. For a request whose cached part is all
            shared with other prompts (a system prompt, a template: ``Tree.shared_length``
            covers its longest match), how much the decode pressure of the batch it joins
            counts: ``weight x decode_horizon x decode_token_s x`` the worker's decode
            tokens, as for new context at 1. 0 (default) prices such a request as a
            continuation only. Above 0 it favours the end-to-end tail of long replies on
            a few hot shared prompts (llm-d's prefix-heavy benchmark shape) over the TTFT
            tail; ``docs/policies/work_aware.md`` measures it.

    Raises:
        TypeError: a value of the wrong type (the message names the field and the value).
        ValueError: a value out of range (the message names the field and the value).
    """

    prefill_token_s: float = 3.25e-5
    attention_token_s: float = 1.06e-9
    decode_step_s: float = 0.006
    decode_token_s: float = 4.89e-8
    reply_tokens: int = 256
    decode_horizon: int = 512
    max_batch: int = 256
    max_tree_size: int = 2**24
    max_tree_size_per_worker: int | None = None
    max_tree_nodes: int | None = DEFAULT_MAX_TREE_NODES
    tokens_per_unit: float | None = None
    kv_capacity_tokens: int | None = None
    index: KVIndex | None = field(default=None, compare=False)
    index_mode: IndexMode = "hybrid"
    claim_ttl_s: float = 30.0
    index_namespace: Mapping[str, Any] | None = field(default=None, compare=False)
    on_decision: DecisionObserver | None = field(default=None, compare=False)
    stall_weight: float = 1.0
    new_context_stall_weight: float = 0.0
    shared_prefix_decode_weight: float = 0.0

    def __post_init__(self) -> None:
        reals = {
            "prefill_token_s": check_real(
                "prefill_token_s", self.prefill_token_s, minimum=0.0, min_open=True
            ),
            "attention_token_s": check_real(
                "attention_token_s", self.attention_token_s, minimum=0.0
            ),
            "decode_step_s": check_real("decode_step_s", self.decode_step_s, minimum=0.0),
            "decode_token_s": check_real("decode_token_s", self.decode_token_s, minimum=0.0),
            "stall_weight": check_real("stall_weight", self.stall_weight, minimum=0.0),
            "new_context_stall_weight": check_real(
                "new_context_stall_weight", self.new_context_stall_weight, minimum=0.0
            ),
            "shared_prefix_decode_weight": check_real(
                "shared_prefix_decode_weight", self.shared_prefix_decode_weight, minimum=0.0
            ),
        }
        check_int("reply_tokens", self.reply_tokens, minimum=1)
        check_int("decode_horizon", self.decode_horizon, minimum=0)
        check_int("max_batch", self.max_batch, minimum=1)
        check_int("max_tree_size", self.max_tree_size, minimum=1)
        check_int(
            "max_tree_size_per_worker", self.max_tree_size_per_worker, minimum=1, none_ok=True
        )
        check_int("max_tree_nodes", self.max_tree_nodes, minimum=1, none_ok=True)
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
        reals["claim_ttl_s"] = check_real(
            "claim_ttl_s", self.claim_ttl_s, minimum=0.0, min_open=True
        )
        for k, v in reals.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "tokens_per_unit", tpu)


def _least_busy(
    g: list[int], work: list[int], skip: Collection[int], loads: list[int], collapse: bool
) -> tuple[list[int], Callable[[], list[int]] | None]:
    """Of the workers ``g`` (ascending) of one match, less those in ``skip`` (priced
    elsewhere): those to price, and (or ``None``) a function listing those that tie with
    the first of them without being priced.

    ``work[i]`` is worker ``i``'s pending prefill plus decode tokens (never negative, as
    :class:`~cacheroute.worker.WorkAccounting` requires). Priced: the ``_SHORTLIST`` with
    the least work, ties at the cut kept. When that many have none (an idle cluster) and
    ``collapse``, those cost the same for the same load and no less for more (the same
    own prefill, nothing queued, every load term growing with load), so only the least
    loaded of them can win: the first is priced and the others tie with it.
    O(len(g) log len(g)).
    """
    if len(g) <= _SHORTLIST + len(skip):
        return [i for i in g if i not in skip], None
    ks = work if len(g) == len(work) else [work[i] for i in g]
    idle = collapse and not any(ks)  # no work anywhere: no need to sort
    order = g.copy() if idle else sorted(g, key=work.__getitem__)  # stable: ties by index
    if len(skip) <= _SHORTLIST:
        for i in skip:  # a few C scans: cheaper than a Python pass over the list
            order.remove(i)
    else:
        order = [i for i in order if i not in skip]
    if not idle:
        cut = work[order[_SHORTLIST - 1]]
        end = bisect_right(order, cut, key=work.__getitem__)
        if cut or not collapse:
            return order[:end], None
        del order[end:]  # those without work, in index order
    rep = min(order, key=loads.__getitem__)  # the first of the least loaded
    low = loads[rep]
    return [rep], lambda: [i for i in order if loads[i] == low and i != rep]


class _Ledger:
    """The prefills this policy queued on one worker whose first token is not out yet.

    Entries are ``(tokens, seconds, prompt_tokens, mark)`` in routing order. Engines
    prefill first come first served, so the oldest entries are the first done. Where the
    worker counts the prefill tokens ever leased there
    (:meth:`~cacheroute.worker.BasicWorker.prefill_tokens_leased`), an entry's ``mark`` is
    that count when it was routed, plus one (none for an entry with nothing to prefill):
    once more tokens than that have left the queue, every prefill queued ahead of it is
    done and so is it, whatever other gateways have queued since. Without the count
    (``mark`` infinite), or when it lags, the pending total settles it: when the total
    drops below the ledger's, entries are popped from the front while the rest still
    covers it. The total stays the authority; the ledger only says what its tokens cost
    (seconds per token) and how many requests and prompt tokens they are.
    """

    __slots__ = ("n", "prompt", "q", "sec", "tok")

    def __init__(self) -> None:
        self.q: deque[tuple[float, float, float, float]] = deque()
        self.tok = 0.0
        self.sec = 0.0
        self.prompt = 0.0
        self.n = 0

    def sync(self, pending: int, left: int | None) -> None:
        """Drop the entries done, given the worker's pending prefill tokens and how many
        have ever left its queue (``None``: unknown)."""
        q = self.q
        if pending <= 0:
            q.clear()
            self.tok = self.sec = self.prompt = 0.0
            self.n = 0
            return
        if left is not None:
            while self.n and q[0][3] <= left:
                self._pop()
            if not self.n:
                self.tok = self.sec = self.prompt = 0.0  # no float residue
                return
        while self.n > 1 and self.tok - q[0][0] >= pending:
            self._pop()

    def _pop(self) -> None:
        t, s, pr, _ = self.q.popleft()
        self.tok -= t
        self.sec -= s
        self.prompt -= pr
        self.n -= 1

    def push(self, tokens: float, seconds: float, prompt: float, mark: float) -> None:
        self.q.append((tokens, seconds, prompt, mark))
        self.tok += tokens
        self.sec += seconds
        self.prompt += prompt
        self.n += 1


class WorkAwarePolicy(PrefixPolicy):
    """Least estimated cost in seconds: time to first token plus what the request does to
    the others (prefill stalls, decode pressure, recompute, eviction; see the module doc).
    The default policy (:data:`cacheroute.DEFAULT_POLICY`).

    Build it with keyword settings (the fields of :class:`WorkAwareConfig`, validated the
    same way) or with ``config=``; ``make_policy("work_aware", **settings)`` takes the same
    keys. ``config=`` cannot be combined with settings that differ from their defaults,
    except ``on_decision``, which then replaces ``config.on_decision``. ``clock`` (not a
    setting): the clock of hybrid claims, for simulations.

    Use it with leases (:func:`cacheroute.acquire`, and ``lease.first_token()`` on the
    first streamed byte): the pending prefill and decode tokens they keep on the workers
    are what it prices. :attr:`Decision.cost <cacheroute.policies.base.Decision.cost>` is
    the estimated time to first token on the chosen worker, in seconds.

    >>> from cacheroute import BasicWorker, acquire
    >>> ws = [BasicWorker("http://a"), BasicWorker("http://b")]
    >>> p = WorkAwarePolicy()
    >>> with acquire(p, ws, "You are a helpful assistant. " * 40 + "Hi") as first:
    ...     pass  # the engine answers; its cache now holds the prompt
    >>> acquire(p, ws, "You are a helpful assistant. " * 40 + "Bye").index == first.index
    True

    Trees, membership, observer and pairs: see
    :class:`~cacheroute.policies.prefix.PrefixPolicy`. Thread-safe; no background thread.

    Complexity of ``decide``: O(n) worker reads + one tree match and insert (and, when some
    of the prompt is cached, :meth:`~cacheroute.tree.Tree.shared_length`) + O(n) pricing,
    n the eligible workers; a worker whose queued prefill at the linear rate plus its own
    prefill already exceed the least cost found so far is skipped (every other term is
    non-negative). Beyond 16 eligible workers, a sort by pending plus decode
    tokens (one read per worker) and the pricing of a few: every worker holding some of
    the prompt (of a match held by more than 8, the 8 least busy), and of the others the
    8 least busy, ties at the cut kept; when 8 or more of those have no work at all (and
    ``kv_capacity_tokens`` is unset), one of the least loaded of them is priced and the
    others of its load tie with it (the same cost). Only the priced workers' token totals
    are read.
    """

    name = "work_aware"
    description = "least estimated seconds: queued and own prefill, stalls, decode pressure"
    reads_work = True

    def __init__(
        self,
        prefill_token_s: float = 3.25e-5,
        attention_token_s: float = 1.06e-9,
        decode_step_s: float = 0.006,
        decode_token_s: float = 4.89e-8,
        reply_tokens: int = 256,
        decode_horizon: int = 512,
        max_batch: int = 256,
        max_tree_size: int = 2**24,
        max_tree_size_per_worker: int | None = None,
        on_decision: DecisionObserver | None = None,
        *,
        tokens_per_unit: float | None = None,
        kv_capacity_tokens: int | None = None,
        max_tree_nodes: int | None = DEFAULT_MAX_TREE_NODES,
        index: KVIndex | None = None,
        index_mode: IndexMode = "hybrid",
        claim_ttl_s: float = 30.0,
        index_namespace: Mapping[str, Any] | None = None,
        stall_weight: float = 1.0,
        new_context_stall_weight: float = 0.0,
        shared_prefix_decode_weight: float = 0.0,
        config: WorkAwareConfig | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        given: dict[str, object] = {
            "prefill_token_s": prefill_token_s,
            "attention_token_s": attention_token_s,
            "decode_step_s": decode_step_s,
            "decode_token_s": decode_token_s,
            "reply_tokens": reply_tokens,
            "decode_horizon": decode_horizon,
            "max_batch": max_batch,
            "max_tree_size": max_tree_size,
            "max_tree_size_per_worker": max_tree_size_per_worker,
            "tokens_per_unit": tokens_per_unit,
            "kv_capacity_tokens": kv_capacity_tokens,
            "max_tree_nodes": max_tree_nodes,
            "index": index,
            "index_mode": index_mode,
            "claim_ttl_s": claim_ttl_s,
            "index_namespace": index_namespace,
            "stall_weight": stall_weight,
            "new_context_stall_weight": new_context_stall_weight,
            "shared_prefix_decode_weight": shared_prefix_decode_weight,
        }
        config = settle_config(WorkAwareConfig, config, given, on_decision=on_decision)
        self._config = config
        self._consts = (
            config.prefill_token_s,
            config.attention_token_s,
            config.decode_step_s,
            config.decode_token_s,
            float(config.reply_tokens),
            config.decode_horizon * config.decode_token_s,
            config.max_batch,
            config.kv_capacity_tokens,
            config.stall_weight,
            config.new_context_stall_weight,
            config.shared_prefix_decode_weight * config.decode_horizon * config.decode_token_s,
        )
        tpu = config.tokens_per_unit
        self._tpu_text = 1.0 / CHARS_PER_TOKEN if tpu is None else tpu
        self._tpu_tokens = 1.0 if tpu is None else tpu
        self._ledgers: dict[str, _Ledger] = {}
        self._aligned: dict[int, tuple[_Pool, list[_Ledger]]] = {}
        self._state_lock = threading.Lock()
        self._init_prefix_from(config, clock)

    @property
    def config(self) -> WorkAwareConfig:
        """The validated settings. O(1)."""
        return self._config

    def _ledgers_of(self, pool: _Pool) -> list[_Ledger]:
        """The ledgers of a pool's workers, by index (one per URL, shared across pools)."""
        entry = self._aligned.get(id(pool))
        if entry is not None and entry[0] is pool:
            return entry[1]
        ledgers = self._ledgers
        aligned = []
        for url in pool.urls:
            lg = ledgers.get(url)
            if lg is None:
                lg = ledgers[url] = _Ledger()
            aligned.append(lg)
        if len(self._aligned) >= 16:
            self._aligned.clear()
        self._aligned[id(pool)] = (pool, aligned)
        return aligned

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        """The worker of least estimated cost (see the module doc); the cost reported is
        the estimated time to first token there. O(n + t); O(n log n + t) beyond 16
        eligible workers (see the class doc)."""
        a, b, d0, e, reply, he, max_batch, cap, sw, nsw, hs = self._consts
        loads = view.loads
        tpu = self._tpu_text if tree is not None and tree.kind == "text" else self._tpu_tokens
        prompt = view.units * tpu
        eligible = view.eligible

        # Own prefill per holder (the few workers matching the prompt) and at best.
        p_cold = a * prompt + b * prompt * prompt / 2
        p_min = p_cold
        top = 0.0
        own: dict[int, tuple[float, float]] = {}  # index -> (cached tokens, prefill s)
        if lengths:
            index_of = view.pool.index_of
            for url, k in lengths.items():
                for i in index_of.get(url, ()):
                    if loads[i] >= 0:
                        ci = k * tpu
                        if ci > prompt:
                            ci = prompt
                        u = prompt - ci
                        pi = a * u + b * u * (ci + u / 2)
                        own[i] = (ci, pi)
                        if pi < p_min:  # least over the eligible (p_cold: a non-holder)
                            p_min = pi
                        if ci > top:
                            top = ci
        continuation = top > prompt - top  # most of the prompt already lives somewhere
        base_stall = nsw * p_min  # new context: the part of its stall paid wherever it goes
        # What a worker without the whole match recomputes beyond the part other prompts
        # share is this prompt's own history: a duplicate wherever it is recomputed.
        dup_beyond_shared = 0.0
        shared = top
        shared_decode = 0.0  # a continuation of a shared prefix only: its decode pressure
        if top > 0 and len(eligible) > 1 and tree is not None and view.match is not None:
            shared = tree.shared_length(view.match) * tpu
            if shared < top:
                u = prompt - shared
                dup_beyond_shared = a * u + b * u * (shared + u / 2) - p_min
                if dup_beyond_shared < 0.0:
                    dup_beyond_shared = 0.0
            elif continuation:
                shared_decode = hs

        cands = eligible
        # priced worker -> lists the unpriced ones of equal cost (only if needed: when it
        # wins or ties, which a request whose prefix is held somewhere seldom lets it)
        alike: dict[int, Callable[[], list[int]]] = {}
        if len(eligible) > _EXACT_UP_TO:
            # Workers with the same match pay the same own prefill: of each such group
            # only the least busy are priced (see _least_busy).
            work = _read_work_totals(view.workers, view.pool.basic)
            collapse = cap is None  # with KV capacity, eviction prices differ per worker
            parts: list[tuple[list[int], Callable[[], list[int]] | None]] = []
            if len(own) <= _SHORTLIST:  # no match has more holders than that: all priced
                parts.append((list(own), None))
            else:
                groups: dict[float, list[int]] = {}
                for i, (ci, _) in own.items():
                    groups.setdefault(ci, []).append(i)
                parts += (_least_busy(g, work, (), loads, collapse) for g in groups.values())
            if len(own) < len(eligible):  # the non-holders
                parts.append(_least_busy(eligible, work, own, loads, collapse))
            cands = []
            for priced, tied in parts:
                cands += priced
                if tied is not None:
                    alike[priced[0]] = tied
        sizes = tree.used_size_per_tenant() if cap is not None and tree is not None else None
        urls = view.urls
        he_prompt = he * prompt
        evict_rate = a + b * (prompt if cap is None or prompt < cap else cap) / 2
        no_own = (0.0, p_cold)
        # Token totals of the priced workers only (beyond 16, not of every worker).
        workers = view.workers
        basic = view.pool.basic
        some = None if cands is view.pool.all else cands
        pre, dec = _read_tokens(workers, basic, some)
        leased_of = _read_leased(workers, basic, some)

        # Every term of a cost is >= 0, and queued prefill costs at least its linear rate:
        # a worker whose queued plus own prefill (new context: plus its own decode
        # pressure) exceeds the best cost so far can neither win nor tie, and is skipped.
        lower_extra = 0.0 if continuation else he_prompt

        with self._state_lock:
            ledgers = self._ledgers_of(view.pool)
            best = best_pw = -1
            best_cost = best_ttft = best_p = 0.0
            bound = _UNBOUNDED
            ties: dict[int, tuple[float, float, int]] | None = None
            dw: float
            for i, pw, dw, leased in zip(cands, pre, dec, leased_of, strict=True):
                ci, p = own.get(i, no_own)
                if a * pw + p + lower_extra > bound:
                    continue  # costs more than the best
                ld = loads[i]
                lg = ledgers[i]
                n_led = lg.n
                if n_led:
                    left = None if leased is None else leased - pw
                    if pw <= 0 or lg.tok > pw or (left is not None and lg.q[0][3] <= left):
                        lg.sync(pw, left)
                        n_led = lg.n
                if n_led:  # (entries with nothing to prefill still queue, and count)
                    if pw >= lg.tok:  # the rest: other gateways' tokens, priced linearly
                        queued = lg.sec + a * (pw - lg.tok)
                        queued_n = float(n_led)
                        ctx = dw + lg.prompt
                    else:
                        f = pw / lg.tok
                        queued = lg.sec * f
                        queued_n = n_led * f
                        ctx = dw + lg.prompt * f
                else:
                    queued = a * pw
                    queued_n = 0.0
                    ctx = dw + pw
                    if ld > 0 and not pw and not dw:  # no work accounting: count requests
                        dw = ctx = ld * prompt
                ttft = queued + p
                if dw:
                    ttft += d0 + e * dw  # the decode step in progress
                # A decode step while it waits: no step reads more KV than the engine holds.
                step = d0 + e * (ctx if cap is None or ctx < cap else cap)
                if ld >= max_batch:  # wait for a batch slot
                    running = ld - queued_n
                    ttft += (ld + 1 - max_batch) * reply * step / (running if running > 1 else 1.0)
                if cap is not None:  # wait for KV memory
                    over = ctx + prompt + reply - cap
                    if over > 0 and ctx > 0:
                        ttft += (over / ctx if over < ctx else 1.0) * reply * step
                # Recompute (prefilling more than the best placement would) stalls the
                # requests in flight here. What of it is the prompt's own history (beyond
                # the part other prompts share) is also a duplicate: work done for
                # nothing, which the next requests here wait behind even if idle now.
                # (Recomputing a shared prefix makes a new holder of it: how a hot system
                # prompt gains one; that counts as a stall only.)
                waste = p - p_min
                if shared < top:
                    dup = waste if ci >= shared else dup_beyond_shared
                else:  # all of it shared: holding part of it, this worker copies the rest
                    dup = waste if ci > 0 else 0.0
                stalled = sw * ld
                if continuation:  # its prefill here stalls the requests in flight here
                    cost = ttft + p * stalled + dup
                    if shared_decode:
                        cost += shared_decode * dw
                else:  # new context joins this decode batch; its prefill stalls the others
                    cost = ttft + he * dw + he_prompt + (waste + base_stall) * stalled + dup
                if sizes is not None and cap is not None:  # evicting others' prefixes
                    held = sizes.get(urls[i], 0) * tpu - ci
                    if held > 0:
                        over = held + prompt - ci + reply - cap
                        if over > 0:
                            cost += (over if over < held else held) * evict_rate
                if best < 0 or cost < best_cost:
                    best, best_cost, best_ttft, best_p, best_pw, ties = i, cost, ttft, p, pw, None
                    bound = cost * (1.0 + 1e-9) + 1e-9  # float drift of the ledger's sums
                elif cost == best_cost:
                    if ties is None:
                        ties = {best: (best_ttft, best_p, best_pw)}
                    ties[i] = (ttft, p, pw)
            if alike:  # the workers costing the same as a priced one tie with it
                for i in [best] if ties is None else list(ties):
                    tied = alike.get(i)
                    if tied is not None:
                        if ties is None:
                            ties = {best: (best_ttft, best_p, best_pw)}
                        ties.update(dict.fromkeys(tied(), ties[i]))
            if ties is not None:
                best = view.pick(list(ties), tree)
                best_ttft, best_p, best_pw = ties[best]
            if prompt:
                lg = ledgers[best]
                if lg.n and best_pw <= 0:  # an alike chosen unpriced: sync as pricing would
                    lg.sync(0, None)
                tokens = prompt - own.get(best, no_own)[0]
                # Done once more tokens than have been leased there so far have left its
                # queue (its own lease adds its tokens after this): see _Ledger.
                leased = _read_prefill_leased(workers[best], basic)
                mark = _NO_MARK if leased is None else leased + (1 if tokens >= 1 else 0)
                lg.push(tokens, best_p, prompt, mark)
        return best, DecisionReason.LEAST_COST, best_ttft

    def on_worker_removed(self, worker: Worker) -> None:
        """As :meth:`PrefixPolicy.on_worker_removed`, and its ledger is dropped (a new
        worker under the same URL starts with none)."""
        super().on_worker_removed(worker)
        with self._state_lock:
            self._ledgers.pop(worker.url, None)
            self._aligned.clear()

    def sync_workers(self, workers: Sequence[Worker]) -> None:
        """As :meth:`PrefixPolicy.sync_workers`, and the ledgers of the workers not
        listed are dropped."""
        super().sync_workers(workers)
        urls = {w.url for w in workers}
        with self._state_lock:
            for url in [u for u in self._ledgers if u not in urls]:
                del self._ledgers[url]
            self._aligned.clear()

    def _describe_config(self) -> str:
        c = self._config
        return (
            f"prefill_token_s={c.prefill_token_s}, attention_token_s={c.attention_token_s}, "
            f"decode_step_s={c.decode_step_s}, decode_token_s={c.decode_token_s}, "
            f"reply_tokens={c.reply_tokens}, decode_horizon={c.decode_horizon}, "
            f"max_batch={c.max_batch}, kv_capacity_tokens={c.kv_capacity_tokens}, "
            f"stall_weight={c.stall_weight}, "
            f"new_context_stall_weight={c.new_context_stall_weight}, "
            f"shared_prefix_decode_weight={c.shared_prefix_decode_weight}, "
        )
