"""``PrefixPolicy``: the shared machinery of policies that remember where prefixes live.

A prefix-aware policy decides one request in four steps, all in :meth:`PrefixPolicy.decide`,
top to bottom:

1. **View.** Read every worker's health and load once, through
   :mod:`cacheroute.worker`'s fast readers (work-aware policies read pending prefill
   and decode tokens too, of the workers they need, when they need them). Workers that
   are unhealthy or removed are not eligible.
2. **Match.** Ask the prefix index of the request's model which workers hold how much of
   the prompt (one tree descent, :meth:`cacheroute.tree.Tree.match_lengths`).
3. **Choose.** The subclass's rule, :meth:`PrefixPolicy.choose`, returns the index, the
   reason and (optionally) a cost. This is the one method a prefix policy implements.
4. **Record.** Insert the prompt for the chosen worker (it will cache it once it serves
   the request) and count it as processed; then build the
   :class:`~cacheroute.policies.base.Decision`.

Membership: a worker is known from the first list it appears in. ``remove_worker`` drops
its tenant from every tree and marks its URL removed (never chosen again, even if a
caller still passes it) until ``add_worker`` or ``sync_workers`` lists it again.

Sizing: each worker's share of a tree is capped at its engine's KV capacity,
``kv_capacity_tokens`` converted to units with ``tokens_per_unit``, so the tree forgets
roughly what the engine evicts; the whole tree is also capped in units.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import compress
from operator import is_
from typing import Any, ClassVar, Literal

from cacheroute._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_real,
    check_str,
    fail,
)
from cacheroute.policies.base import (
    CHARS_PER_TOKEN,
    Decision,
    DecisionReason,
    LoadBalancingPolicy,
    RequestText,
    check_request_text,
    check_token_ids,
    check_workers,
)
from cacheroute.policies.precise import IndexMode, KVIndex, PreciseMatcher
from cacheroute.tree import Tree, TreeMatch
from cacheroute.worker import Worker, _not_a_worker, _read_tokens, all_basic, read_loads

__all__ = ["DEFAULT_MAX_TREE_NODES", "DecisionObserver", "PoolView", "PrefixPolicy", "TreeKind"]

_log = logging.getLogger("cacheroute.policies")

TreeKind = Literal["text", "tokens"]
"""The kind of units of a tree: characters of text, or token ids."""

DecisionObserver = Callable[[Decision], None]
"""Type of the ``on_decision`` observer."""

_POOL_CACHE = 8  # distinct worker lists whose derived data is kept


class _Pool:
    """What a policy derives once per distinct worker list (and removed set)."""

    __slots__ = ("all", "basic", "cached", "index_of", "key", "mask", "model", "removed", "urls")

    def __init__(self, key: tuple[Worker, ...], removed: frozenset[str]) -> None:
        self.key = key
        self.removed = removed
        self.cached = False  # kept (and its workers known) once a decision used it
        try:
            self.urls: tuple[str, ...] = tuple(w.url for w in key)
            models = {w.model_id for w in key}
        except AttributeError:
            raise _not_a_worker(key) from None
        if len(models) > 1:
            raise ValueError(
                f"workers must all serve one model (pass one model's workers per call), "
                f"got model_ids {sorted(models)}"
            )
        self.model = models.pop() if models else ""
        self.basic = all_basic(key)
        self.all = list(range(len(key)))  # shared, never mutated
        index_of: dict[str, tuple[int, ...]] = {}
        for i, u in enumerate(self.urls):
            index_of[u] = (*index_of.get(u, ()), i)
        self.index_of = index_of
        mask = [u not in removed for u in self.urls]
        self.mask: list[bool] | None = None if all(mask) else mask


class PoolView:
    """One call's view of the pool, handed to :meth:`PrefixPolicy.choose`.

    Attributes:
        workers: the workers passed (as a tuple).
        urls: their URLs.
        loads: in-flight load per index, ``-1`` for a worker that may not be chosen
            (unhealthy or removed).
        eligible: the indices that may be chosen, ascending (never empty).
        min_load, max_load: over the eligible workers.
        prefill_tokens, decode_tokens: per index (policies with ``reads_work``), else
            ``None``.
        units: units of the request (0 without text).
        match: the tree's :class:`~cacheroute.tree.TreeMatch` of the request, given to
            :meth:`PrefixPolicy.choose` with its lengths (``None`` without text), e.g.
            for :meth:`~cacheroute.tree.Tree.shared_length`.

    ``min_load``, ``max_load`` and the token lists are computed on first use (each an
    O(n) pass over the workers that not every policy needs), then kept.
    """

    __slots__ = (
        "_bounds",
        "_reads_work",
        "_tokens",
        "eligible",
        "loads",
        "match",
        "pool",
        "units",
        "urls",
        "workers",
    )

    def __init__(
        self, pool: _Pool, loads: list[int], eligible: list[int], units: int, reads_work: bool
    ) -> None:
        self.pool = pool
        self.workers = pool.key
        self.urls = pool.urls
        self.loads = loads
        self.eligible = eligible
        self.units = units
        self.match: TreeMatch | None = None
        self._reads_work = reads_work
        self._bounds: tuple[int, int] | None = None
        self._tokens: tuple[list[int], list[int]] | None = None

    def _load_bounds(self) -> tuple[int, int]:
        # Computed on first use: two O(n) passes that not every policy needs.
        b = self._bounds
        if b is None:
            loads, eligible = self.loads, self.eligible
            el = loads if eligible is self.pool.all else [loads[i] for i in eligible]
            b = self._bounds = (min(el), max(el))
        return b

    @property
    def min_load(self) -> int:
        """The least load over the eligible workers. O(n) on first use, then O(1)."""
        return self._load_bounds()[0]

    @property
    def max_load(self) -> int:
        """The greatest load over the eligible workers. O(n) on first use, then O(1)."""
        return self._load_bounds()[1]

    def _token_lists(self) -> tuple[list[int], list[int]] | None:
        if not self._reads_work:
            return None
        t = self._tokens
        if t is None:
            t = self._tokens = _read_tokens(self.workers, self.pool.basic)
        return t

    @property
    def prefill_tokens(self) -> list[int] | None:
        """Pending prefill tokens per index (policies with ``reads_work``), else ``None``."""
        t = self._token_lists()
        return None if t is None else t[0]

    @property
    def decode_tokens(self) -> list[int] | None:
        """Decode tokens per index (policies with ``reads_work``), else ``None``."""
        t = self._token_lists()
        return None if t is None else t[1]

    def holders(self, lengths: dict[str, int], limit: int | None = None) -> tuple[int, list[int]]:
        """The longest match among eligible workers (with load <= ``limit`` if given).

        Returns ``(matched units, indices holding it)``; ``(0, [])`` when none matches.
        O(tenants in ``lengths``), not O(workers).
        """
        best = 0
        cands: list[int] = []
        loads, index_of = self.loads, self.pool.index_of
        for url, m in lengths.items():
            if m < best:
                continue
            for i in index_of.get(url, ()):
                if loads[i] >= 0 and (limit is None or loads[i] <= limit):
                    if m > best:
                        best, cands = m, [i]
                    else:
                        cands.append(i)
        return best, cands

    def pick(self, cands: Sequence[int], tree: Tree | None = None) -> int:
        """The one tie-break rule: least load, then (with ``tree``) the smallest share of
        the tree, then fewest processed, then lowest index.

        Processed breaks ties so that equal (or stale) loads do not all land on worker 0;
        the tree size spreads fresh prefixes over workers that hold less. O(len(cands)),
        plus O(tenants) for the tree sizes when several candidates tie on load.
        """
        if len(cands) == 1:
            return cands[0]
        loads = self.loads
        ls = [loads[i] for i in cands]
        low = min(ls)
        ties = [i for i, x in zip(cands, ls, strict=True) if x == low]
        if len(ties) == 1:
            return ties[0]
        ws = self.workers
        if tree is not None:  # one criterion at a time: no key tuple per candidate
            sizes, urls = tree.used_size_per_tenant(), self.urls
            ss = [sizes.get(urls[i], 0) for i in ties]
            low = min(ss)
            ties = [i for i, x in zip(ties, ss, strict=True) if x == low]
            if len(ties) == 1:
                return ties[0]
        return min(ties, key=lambda i: (ws[i].processed(), i))


def _match(tree: Tree, units: str | Sequence[int]) -> TreeMatch:
    """``tree.match(units)``, with errors naming the policy's argument, ``request_text``."""
    try:
        return tree.match(units)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        if not text.startswith("units"):
            raise
        raise type(exc)("request_text" + text[len("units") :]) from None


@contextmanager
def _naming(param: str) -> Iterator[None]:
    """Errors about ``workers`` inside name ``param`` instead (a pair's two lists)."""
    try:
        yield
    except TypeError as exc:
        text = str(exc)
        if not text.startswith("workers"):
            raise
        raise TypeError(param + text[len("workers") :]) from None


DEFAULT_MAX_TREE_NODES: int = Tree.max_nodes_for(256 * 2**20, max_size=2**24)
"""The prefix policies' default ``max_tree_nodes`` (335,544): with the default
``max_tree_size`` (2**24 units) a tree stays within 256 MiB whatever it is fed
(:meth:`Tree.max_nodes_for`; measured by ``benchmarks/bench_tree_memory.py``)."""


class PrefixPolicy(LoadBalancingPolicy):
    """Base class of policies that keep a prefix tree of what they routed where.

    Subclasses implement :meth:`choose`; everything else (worker views, one tree per
    (model, text or tokens), membership, tree bounds, the observer, the decode leg of
    pairs) is here. Thread-safe: decisions are serialized by one lock, held from the
    pool view to the tree insert (:meth:`choose` runs under it, so it must not decide
    again; the ``on_decision`` observer runs after it and may); the trees carry their own
    locks; membership is copy-on-write under another lock.

    Settings shared by subclasses (keyword arguments of their constructors):
        max_tree_size: int > 0, units per tree (all workers), enforced on insert.
        max_tree_size_per_worker: int > 0 or ``None``: units per worker per tree.
        max_tree_nodes: int > 0 or ``None``: nodes per tree, counted once per worker
            holding them (``Tree(max_nodes=...)``): what memory follows when prompts are
            short and distinct. Default :data:`DEFAULT_MAX_TREE_NODES`, which with the
            default ``max_tree_size`` bounds a tree to 256 MiB.
        tokens_per_unit: real > 0 or ``None``: tokens one unit of the request stands for
            (``None``: 1 for token ids, ``1 / CHARS_PER_TOKEN`` for text; a block id of
            16 tokens: 16). Converts matches to cached tokens and capacities to units.
        kv_capacity_tokens: int > 0 or ``None``: each engine's KV-cache capacity in
            tokens (vLLM: ``num_gpu_blocks x block_size``). A worker's share of a tree
            is capped at it, so the tree forgets roughly what the engine evicts.
        on_decision: ``None`` or a callable receiving each
            :class:`~cacheroute.policies.base.Decision`, outside every lock; its
            exceptions are logged (logger ``cacheroute.policies``), never raised.
        index: ``None`` (routed history only) or a KV-event index
            (:class:`~cacheroute.policies.precise.KVIndex`, e.g.
            :class:`cacheroute.events.KVEventIndex`) fed by the engines: precise mode,
            for token-id requests (see :mod:`cacheroute.policies.precise`).
        index_mode: ``"hybrid"`` (default: reports plus short-lived claims of what was
            just routed) or ``"precise"`` (reports only).
        claim_ttl_s: real > 0: how long a hybrid claim counts at most (default 30 s: a
            long prefill plus the event delay); it stops counting sooner once the
            engine's reports cover it.
        index_namespace: keyword arguments for the index's ``match`` (e.g.
            ``{"lora_name": "my-adapter"}`` for a policy routing one LoRA adapter).
        clock: ``None`` (``time.monotonic``) or a callable returning seconds: the clock
            of hybrid claims (simulations pass their simulated time).
    """

    needs_request_text = True
    reads_work: ClassVar[bool] = False
    """Whether :meth:`choose` needs pending prefill and decode tokens in its view."""

    def _init_prefix_from(self, config: Any, clock: Callable[[], float] | None) -> None:
        """:meth:`_init_prefix` with the settings every prefix policy's config dataclass
        has under the same names (``CacheAwareConfig``, ``WorkAwareConfig``)."""
        self._init_prefix(
            config.max_tree_size,
            config.max_tree_size_per_worker,
            config.on_decision,
            config.tokens_per_unit,
            config.kv_capacity_tokens,
            config.index,
            config.index_mode,
            config.claim_ttl_s,
            config.index_namespace,
            clock,
            config.max_tree_nodes,
        )

    def _init_prefix(
        self,
        max_tree_size: int,
        max_tree_size_per_worker: int | None,
        on_decision: DecisionObserver | None,
        tokens_per_unit: float | None,
        kv_capacity_tokens: int | None,
        index: KVIndex | None = None,
        index_mode: IndexMode = "hybrid",
        claim_ttl_s: float = 30.0,
        index_namespace: Mapping[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
        max_tree_nodes: int | None = DEFAULT_MAX_TREE_NODES,
    ) -> None:
        if index is not None and not isinstance(index, KVIndex):
            raise fail(
                "index", "None or a KV-event index (match, urls, stale_urls)", index, TypeError
            )
        check_choice("index_mode", index_mode, ("precise", "hybrid"))
        check_callable("clock", clock, none_ok=True)
        claim_ttl_s = check_real("claim_ttl_s", claim_ttl_s, minimum=0.0, min_open=True)
        if index_namespace is not None and not isinstance(index_namespace, Mapping):
            raise fail("index_namespace", "None or a mapping", index_namespace, TypeError)
        self._max_tree_size = max_tree_size
        self._max_tree_size_per_worker = max_tree_size_per_worker
        self._max_tree_nodes = max_tree_nodes
        self._observer = on_decision
        self._tokens_per_unit = tokens_per_unit
        self._kv_capacity_tokens = kv_capacity_tokens
        self._trees: dict[tuple[str, str], Tree] = {}
        self._lock = threading.Lock()  # guards tree creation and membership
        # One decision at a time. Under CPython's GIL the decisions run one at a time
        # anyway; what this lock changes is how threads wait. Without it a decision takes
        # four locks (the tree's twice, the policy state's, the worker's), and a thread
        # preempted while holding one makes the others block on it: each such handoff is
        # an OS context switch (a lock convoy; measured 0.6 per decision with 2 threads,
        # throughput 0.3-0.45x of one thread). With it there is one handoff point per
        # decision and the inner locks are never contended.
        self._deciding = threading.Lock()
        self._removed: frozenset[str] = frozenset()
        self._known: frozenset[str] = frozenset()
        self._pools: list[_Pool] = []
        self._precise = (
            None
            if index is None
            else PreciseMatcher(
                index,
                index_mode,
                claim_ttl_s,
                lambda: Tree(
                    max_size=max_tree_size,
                    max_size_per_tenant=max_tree_size_per_worker,
                    max_nodes=max_tree_nodes,
                ),
                index_namespace,
                time.monotonic if clock is None else clock,
            )
        )

    # ------------------------------------------------------------------ the rule

    def choose(
        self, view: PoolView, lengths: dict[str, int], tree: Tree | None
    ) -> tuple[int, str, float | None]:
        """The decision rule: ``(index, reason, cost)`` for one request.

        Args:
            view: the pool as read for this call (loads, eligible workers, ...).
            lengths: ``{url: matched units}`` from the request's tree (``{}`` without
                text); may name workers outside the list (ignore them: use
                :meth:`PoolView.holders`).
            tree: the request's tree, or ``None`` without text.

        Returns:
            An index in ``view.eligible``, a reason (a
            :class:`~cacheroute.policies.base.DecisionReason`) and a cost or ``None``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ one request

    def decide(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> Decision | None:
        """Choose a worker, record the prompt for it, count it as processed.

        Returns:
            The :class:`~cacheroute.policies.base.Decision`, or ``None`` when no worker is
            eligible (healthy and not removed); nothing is recorded or counted then.

        Raises:
            TypeError: ``workers`` or ``request_text`` of a wrong type (or a token id that
                is not an int); ValueError: a negative token id, or workers of several
                models. Nothing is recorded or counted when it raises.

        Complexity: O(n) worker reads + one tree descent (O(m) C-level compares for m
        units) + O(t) for the t tenants matching + the insert.
        """
        if type(request_text) is not str:
            check_request_text(request_text)
        check_workers(workers)
        with self._deciding:
            decision = self._decide(workers, request_text)
        observer = self._observer
        if observer is not None and decision is not None:
            try:
                observer(decision)  # outside the lock: it may call back into the policy
            except Exception:
                _log.exception("%s on_decision observer raised; decision kept", self.name)
        return decision

    def _decide(self, workers: Sequence[Worker], request_text: RequestText) -> Decision | None:
        """:meth:`decide` once the arguments are checked, under ``_deciding``."""
        key = workers if type(workers) is tuple else tuple(workers)
        units: str | Sequence[int] = request_text or ""
        n = len(units)
        kind: TreeKind = "text" if isinstance(units, str) else "tokens"
        tree: Tree | None = None
        while True:
            pool = self._pool(key)
            view = self._view(pool, n)
            if view is None:
                if not pool.cached:
                    self._keep(pool)  # its workers are known even if none is eligible now
                return None
            if n and tree is None:
                tree = self._trees.get((pool.model, kind))
                if tree is None:  # the first request of its kind: validate before creating
                    _match(Tree(), units)
                    tree = self._tree(pool.model, kind)
            if tree is None:
                match, lengths = None, {}
            else:
                match = _match(tree, units)
                lengths = match.lengths
                if self._precise is not None and kind == "tokens":
                    lengths = self._precise.lengths(units, lengths)  # type: ignore[arg-type]
            view.match = match
            index, reason, cost = self.choose(view, lengths, tree)
            if self._removed is pool.removed:
                break  # membership unchanged since the view: commit
        url = pool.urls[index]
        if not pool.cached:
            self._keep(pool)
        if tree is not None and match is not None:
            tree.insert_match(match, url)  # reuses the descent unless the tree changed since
            if self._precise is not None and kind == "tokens":
                self._precise.claim(units, url)  # type: ignore[arg-type]
            if url in self._removed:  # removed while we inserted: take it out again
                tree.remove_tenant(url)
                if self._precise is not None:
                    self._precise.forget(url)
        key[index].increment_processed()
        matched = lengths.get(url, 0)
        tpu = self._tpu(request_text)
        return Decision(
            index, url, reason, n, matched, -int(-n * tpu // 1), int(matched * tpu), cost
        )

    def can_decide(self, workers: Sequence[Worker], request_text: RequestText = None) -> bool:
        """Whether :meth:`decide` would choose a worker now (some worker is healthy and not
        removed), without deciding: nothing is recorded, counted or cached.

        Raises:
            TypeError: ``workers`` or ``request_text`` of a wrong type (or a token id that
                is not an int); ValueError: a token id outside a tree's ``[0, 2**32)``, or
                workers of several models. As :meth:`decide` would.

        Complexity: O(n) worker reads + O(m) for m token ids (one C-level conversion).

        >>> from cacheroute import BasicWorker, CacheAwarePolicy
        >>> p, w = CacheAwarePolicy(), BasicWorker("http://a")
        >>> p.remove_worker(w); p.can_decide([w], "hi"), p.tree_sizes()
        (False, {})
        """
        check_token_ids(request_text)
        check_workers(workers)
        key = workers if type(workers) is tuple else tuple(workers)
        return self._view(self._pool(key), 0) is not None

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        """:meth:`decide`, returning only the index (``None`` when none is eligible)."""
        decision = self.decide(workers, request_text)
        return None if decision is None else decision.index

    def _tpu(self, request_text: RequestText) -> float:
        if self._tokens_per_unit is not None:
            return self._tokens_per_unit
        return 1.0 / CHARS_PER_TOKEN if isinstance(request_text, str) else 1.0

    def tokens_per_unit(self, kind: TreeKind) -> float:
        """Tokens one unit of a ``kind`` tree stands for: ``tokens_per_unit`` when set,
        else 1 for token ids and ``1 / CHARS_PER_TOKEN`` for text. O(1)."""
        check_choice("kind", kind, ("text", "tokens"))
        if self._tokens_per_unit is not None:
            return self._tokens_per_unit
        return 1.0 / CHARS_PER_TOKEN if kind == "text" else 1.0

    def worker_tree_limit(self, kind: TreeKind) -> int | None:
        """Units of a ``kind`` tree one worker may hold: its KV capacity in units
        (``kv_capacity_tokens / tokens_per_unit``), within ``max_tree_size_per_worker``;
        ``None`` when neither is set. O(1)."""
        check_choice("kind", kind, ("text", "tokens"))
        caps = []
        if self._kv_capacity_tokens is not None:
            caps.append(max(1, int(self._kv_capacity_tokens / self.tokens_per_unit(kind))))
        if self._max_tree_size_per_worker is not None:
            caps.append(self._max_tree_size_per_worker)
        return min(caps) if caps else None

    def _pool(self, key: tuple[Worker, ...]) -> _Pool:
        """The derived data of this worker list: a hit costs one C-level tuple compare (and,
        unless the workers are all exact ``BasicWorker``, an identity pass).

        The few most recent lists are kept (a gateway serving several models alternates
        between per-model lists; see :meth:`_keep`). Copy-on-write: a racing thread builds
        its own entry.
        """
        removed = self._removed
        pools = self._pools
        for p in pools:
            # The same objects, not equal ones: a Worker type with its own __eq__ (by URL,
            # say) must not make a rebuilt list read the cached list's objects. Exact
            # BasicWorkers compare by identity, so == settles it for a list of them (4-10x
            # cheaper), unless the new list holds a type whose own __eq__ calls a
            # BasicWorker equal to it, which is not checked.
            if p.removed is removed and p.key == key and (p.basic or all(map(is_, p.key, key))):
                return p
        return _Pool(key, removed)

    def _keep(self, pool: _Pool) -> None:
        """A decision used ``pool``: cache it and know its workers (not before: a call
        that raises leaves no trace)."""
        pool.cached = True
        with self._lock:
            self._known = self._known | set(pool.urls)
        self._pools = [pool, *self._pools[: _POOL_CACHE - 1]]

    def _view(self, pool: _Pool, units: int) -> PoolView | None:
        loads = read_loads(pool.key, pool.basic)  # token totals: when the policy asks
        if not loads:
            return None
        mask = pool.mask
        # All eligible, the common case. A BasicWorker's load is never negative, so -1
        # (unhealthy) is the one value to look for, a cheaper scan than min().
        if mask is None and (-1 not in loads if pool.basic else min(loads) >= 0):
            return PoolView(pool, loads, pool.all, units, self.reads_work)
        if mask is not None:
            loads = [x if ok else -1 for x, ok in zip(loads, mask, strict=True)]
        eligible = list(compress(pool.all, [x >= 0 for x in loads]))
        if not eligible:
            return None
        return PoolView(pool, loads, eligible, units, self.reads_work)

    def _tree(self, model: str, kind: TreeKind) -> Tree:
        key = (model, kind)
        tree = self._trees.get(key)
        if tree is None:
            with self._lock:
                tree = self._trees.get(key)
                if tree is None:
                    tree = Tree(
                        max_size=self._max_tree_size,
                        max_size_per_tenant=self.worker_tree_limit(kind),
                        max_nodes=self._max_tree_nodes,
                    )
                    self._trees[key] = tree
        return tree

    # ------------------------------------------------------------------ pairs

    def decide_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[Decision, Decision] | None:
        """Prefill by :meth:`decide`; decode by least load over eligible decode workers
        (ties by fewest processed, then index). The decode leg is chosen first: when none
        is eligible, ``None`` is returned and no tree is touched."""
        check_request_text(request_text)
        with _naming("decode_workers"):
            check_workers(decode_workers)
            key = decode_workers if type(decode_workers) is tuple else tuple(decode_workers)
            view = self._view(self._pool(key), 0)
        if view is None:
            return None
        d = view.pick(view.eligible)
        with _naming("prefill_workers"):
            prefill = self.decide(prefill_workers, request_text)
        if prefill is None:
            return None
        if not view.pool.cached:
            self._keep(view.pool)
        key[d].increment_processed()
        leg = Decision(
            d, view.urls[d], DecisionReason.POLICY, prefill.request_units, 0, prefill.prompt_tokens
        )
        return prefill, leg

    # ------------------------------------------------------------------ state

    def tree(self, model_id: str, kind: TreeKind = "text", *, create: bool = False) -> Tree | None:
        """The tree of ``model_id`` for text or token-id requests.

        ``None`` if no request has used it yet, unless ``create`` (then an empty, bounded
        tree is made, e.g. to warm it from a known state). O(1).
        """
        check_str("model_id", model_id)
        check_choice("kind", kind, ("text", "tokens"))
        if check_bool("create", create):
            return self._tree(model_id, kind)
        return self._trees.get((model_id, kind))

    def tree_sizes(self) -> dict[tuple[str, str], int]:
        """``{(model_id, kind): total units}`` of every tree. O(trees)."""
        return {k: t.total_size() for k, t in list(self._trees.items())}

    def removed_urls(self) -> frozenset[str]:
        """URLs that are never chosen (removed and not added back). O(1)."""
        return self._removed

    # ------------------------------------------------------------------ membership

    @staticmethod
    def _check_worker(param: str, worker: object) -> Worker:
        if not isinstance(worker, Worker):
            raise fail(param, "a Worker", worker, TypeError)
        return worker

    def on_worker_added(self, worker: Worker) -> None:
        """A worker joined (or came back): it may be chosen again. O(removed urls)."""
        url = self._check_worker("worker", worker).url
        with self._lock:
            self._known = self._known | {url}
            if url in self._removed:
                self._removed = self._removed - {url}

    def on_worker_removed(self, worker: Worker) -> None:
        """A worker left for good: drop its tenant from every tree; never choose it again.

        Its URL is recorded as removed first, so a concurrent ``decide`` either inserted
        before the tenant is dropped or sees the URL removed. O(units it held).
        """
        url = self._check_worker("worker", worker).url
        with self._lock:
            self._removed = self._removed | {url}
            trees = list(self._trees.values())
        for t in trees:
            t.remove_tenant(url)
        if self._precise is not None:
            self._precise.forget(url)

    def add_worker(self, worker: Worker) -> None:
        """Alias of :meth:`on_worker_added`."""
        self.on_worker_added(worker)

    def remove_worker(self, worker: Worker) -> None:
        """Alias of :meth:`on_worker_removed`."""
        self.on_worker_removed(worker)

    def sync_workers(self, workers: Sequence[Worker]) -> None:
        """Make the pool exactly ``workers``: every other known worker is removed (as by
        :meth:`on_worker_removed`); every listed one may be chosen. Workers first seen
        later in a list are accepted as new. O(known workers + units dropped)."""
        check_workers(workers)
        urls = {self._check_worker(f"workers[{i}]", w).url for i, w in enumerate(workers)}
        with self._lock:
            trees = list(self._trees.values())
            tenants = {t for tree in trees for t in tree.tenants()}
            stale = (self._known | tenants) - urls
            self._removed = frozenset((self._removed | stale) - urls)
            self._known = frozenset(urls)
        for tree in trees:
            for t in stale:
                tree.remove_tenant(t)
        if self._precise is not None:
            for t in stale:
                self._precise.forget(t)

    def _describe_config(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe_config()}trees={len(self._trees)})"
