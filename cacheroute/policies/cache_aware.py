"""``cache_aware``: prefix affinity while load is balanced, load first when it is not.

The algorithm (SGLang's cache-aware router, with each of its field failures closed; see
``docs/policies/cache_aware.md``):

1. Only *eligible* workers count: healthy, and not removed through
   :meth:`CacheAwarePolicy.on_worker_removed` / :meth:`CacheAwarePolicy.sync_workers`.
   ``min_load`` and ``max_load`` are taken over them alone (an unhealthy idle worker
   never makes a balanced cluster look imbalanced).
2. **Imbalanced** when ``max_load - min_load > balance_abs_threshold`` and
   ``max_load > balance_rel_threshold * min_load``.
3. **Balanced.** ``match_rate = longest match / request units`` (the match of each worker
   is looked up in the tree of its own model). Above ``cache_threshold``: the worker
   holding the longest match, ties by (load, processed, index). At or below (a miss):
   least load, ties by (smallest tree, processed, index), never the smallest tree alone.
4. **Imbalanced**, ``imbalance_mode="locality"`` (default): among eligible workers with
   ``load <= min_load + balance_abs_threshold``, the longest match when its rate is above
   ``cache_threshold``; otherwise least load. ``imbalance_mode="least_load"``: SGLang's
   pure least load. Ties by (load, processed, index) in both.
5. Every branch inserts the request for the chosen worker in its model's tree, in the
   same locked walk as the match (:meth:`cacheroute.tree.Tree.match_and_insert`), and
   calls the chosen worker's ``increment_processed()``. Load is never touched here: the
   lease (:func:`cacheroute.acquire`) counts it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import compress
from operator import and_
from typing import Any, Literal, cast

from cacheroute.policies.base import LoadBalancingPolicy, RequestText, check_request_text
from cacheroute.tree import Tree
from cacheroute.worker import BasicWorker, Worker

__all__ = [
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "Decision",
    "DecisionObserver",
    "DecisionReason",
    "ImbalanceMode",
]

_log = logging.getLogger(__name__)

ImbalanceMode = Literal["locality", "least_load"]
"""What the imbalanced branch does: keep locality inside a load window, or pure least load."""

_IMBALANCE_MODES: tuple[str, ...] = ("locality", "least_load")


class DecisionReason(str, enum.Enum):
    """Which branch made a decision. A ``str`` enum: ``reason == "cache_hit"`` works."""

    CACHE_HIT = "cache_hit"
    """Balanced load, match rate above ``cache_threshold``: the longest-match holder."""
    CACHE_MISS = "cache_miss"
    """Balanced load, match rate at or below ``cache_threshold`` (or no text): least load."""
    IMBALANCED = "imbalanced"
    """Load imbalanced: the imbalanced branch of ``imbalance_mode`` decided."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One routing decision, as passed to the ``on_decision`` observer.

    Built only when an observer is set (no cost otherwise).
    """

    index: int
    """Index of the chosen worker in the list passed to ``select_worker``."""
    url: str
    """The chosen worker's URL (its tenant in the tree)."""
    model_id: str
    """The chosen worker's model."""
    reason: DecisionReason
    """The branch that decided."""
    match_rate: float
    """Longest match among the workers the branch considered, over ``request_units``: the
    value compared with ``cache_threshold`` (0.0 without text)."""
    matched_units: int
    """Units of this request the chosen worker already held (its expected cache reuse)."""
    request_units: int
    """Units (characters or tokens) in the request; 0 without text."""
    min_load: int
    """Least load over the eligible (healthy, not removed) workers."""
    max_load: int
    """Greatest load over the eligible workers."""


DecisionObserver = Callable[[Decision], None]
"""Type of the ``on_decision`` observer."""


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    return float(value)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    return value


@dataclass(frozen=True)
class CacheAwareConfig:
    """Validated settings of :class:`CacheAwarePolicy` (frozen; nothing is clamped).

    Args:
        cache_threshold: in [0, 1]. A balanced request goes to the longest-match holder
            only when ``matched / request units`` is strictly above it. Default 0.3
            (SGLang's CLI; its library says 0.5): the tree sees prompts only, not the
            replies the engine also caches, so a chat's second turn often matches below
            0.5 although most of it is cached; 0.5 would move such conversations.
        balance_abs_threshold: int >= 0. Load gap (requests in flight) that, together
            with the relative test, makes the cluster imbalanced; also the width of the
            load window of ``imbalance_mode="locality"``. Default 8 (SGLang: 32 in the
            library, 64 in the CLI): the locality window keeps cache hits inside the
            imbalanced branch, so a tight gap costs little hit rate and stops a hot shared
            prefix from piling requests on one worker (measured with ``cacheroute
            simulate``; see docs/policies/cache_aware.md).
        balance_rel_threshold: >= 1.0 (``math.inf`` never reports imbalance). Imbalanced
            also needs ``max_load > balance_rel_threshold * min_load``. Default 1.5
            (SGLang: 1.1 in the library, 1.5 in the CLI).
        max_tree_size: int > 0. Total units (characters or tokens) per tree, one tree per
            (model, text or tokens), enforced inside every insert. Default 2**24.
        max_tree_size_per_worker: int > 0 or ``None``. Optional cap on one worker's units
            in a tree (e.g. its KV-cache size), also enforced on insert. Default ``None``.
        imbalance_mode: ``"locality"`` (default) or ``"least_load"``; see the module doc.
        on_decision: ``None`` (default, zero cost) or a callable receiving each
            :class:`Decision` after the decision is made, outside every lock. Its
            exceptions are logged (logger ``cacheroute.policies.cache_aware``) and never
            fail the routing call.

    Raises:
        TypeError: a value of the wrong type (the message names the field and the value).
        ValueError: a value out of range (the message names the field and the value).

    Construction (validation included) is O(1).
    """

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 2**24
    max_tree_size_per_worker: int | None = None
    imbalance_mode: ImbalanceMode = "locality"
    on_decision: DecisionObserver | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        ct = _check_real("cache_threshold", self.cache_threshold)
        if not 0.0 <= ct <= 1.0:  # also rejects NaN
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold!r}")
        ab = _check_int("balance_abs_threshold", self.balance_abs_threshold)
        if ab < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {ab!r}")
        rel = _check_real("balance_rel_threshold", self.balance_rel_threshold)
        if not rel >= 1.0:  # also rejects NaN
            raise ValueError(
                f"balance_rel_threshold must be >= 1.0, got {self.balance_rel_threshold!r}"
            )
        mts = _check_int("max_tree_size", self.max_tree_size)
        if mts <= 0:
            raise ValueError(f"max_tree_size must be > 0, got {mts!r}")
        per = self.max_tree_size_per_worker
        if per is not None and _check_int("max_tree_size_per_worker", per) <= 0:
            raise ValueError(f"max_tree_size_per_worker must be > 0 or None, got {per!r}")
        if not isinstance(self.imbalance_mode, str) or self.imbalance_mode not in _IMBALANCE_MODES:
            raise ValueError(
                f"imbalance_mode must be one of {', '.join(map(repr, _IMBALANCE_MODES))}, "
                f"got {self.imbalance_mode!r}"
            )
        if self.on_decision is not None and not callable(self.on_decision):
            raise TypeError(f"on_decision must be callable or None, got {self.on_decision!r}")
        # Normalise numeric types (an int threshold is fine; store floats).
        object.__setattr__(self, "cache_threshold", ct)
        object.__setattr__(self, "balance_rel_threshold", rel)


_STATIC_CACHE = 8  # worker lists whose derived data is kept

_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(CacheAwareConfig)}


class _Static:
    """What a policy derives once per distinct worker list (urls, models, removed mask).

    Keyed by the tuple of worker objects (compared element by element, identity first,
    at C speed) and by the removed-url set it was built against.
    """

    __slots__ = (
        "all_idx",
        "basic",
        "key",
        "mask",
        "models",
        "removed",
        "rng",
        "single_model",
        "trees",
        "url_idx",
        "urls",
    )

    def __init__(self, key: tuple[Worker, ...], removed: frozenset[str]) -> None:
        self.key = key
        self.removed = removed
        self.urls: tuple[str, ...] = tuple(w.url for w in key)
        self.models: tuple[str, ...] = tuple(w.model_id for w in key)
        self.rng = range(len(key))
        self.all_idx: list[int] = list(self.rng)  # shared, never mutated
        self.trees: dict[str, Tree] = {}  # kind -> tree of single_model
        self.basic = all(type(w) is BasicWorker for w in key)
        distinct = set(self.models)
        self.single_model: str | None = self.models[0] if len(distinct) == 1 else None
        # model -> url -> indices (a url listed twice maps to both indices)
        url_idx: dict[str, dict[str, tuple[int, ...]]] = {}
        for i, (u, m) in enumerate(zip(self.urls, self.models, strict=True)):
            per = url_idx.setdefault(m, {})
            per[u] = (*per.get(u, ()), i)
        self.url_idx = url_idx
        # True = may be chosen (not removed); None when nothing in the list is removed.
        mask = tuple(u not in removed for u in self.urls)
        self.mask: tuple[bool, ...] | None = None if all(mask) else mask


class _Request:
    """Per-call state shared by the decision helpers (one object per call)."""

    __slots__ = ("elig", "loads", "max_load", "min_load", "n", "ok", "st", "workers")

    def __init__(
        self,
        workers: tuple[Worker, ...],
        st: _Static,
        ok: list[bool] | None,
        elig: list[int],
        loads: list[int],
        min_load: int,
        max_load: int,
    ) -> None:
        self.workers = workers
        self.st = st
        self.ok = ok  # eligibility mask, or None when every worker is eligible
        self.elig = elig
        self.loads = loads  # per index; -1 for unhealthy workers
        self.min_load = min_load
        self.max_load = max_load
        self.n = 0


class CacheAwarePolicy(LoadBalancingPolicy):
    """Prefix affinity when load is balanced, least load (keeping locality) when it is not.

    Build it with keyword settings (the fields of :class:`CacheAwareConfig`, validated the
    same way) or with ``config=``; ``make_policy("cache_aware", **settings)`` takes the
    same keys. ``config=`` cannot be combined with settings that differ from their
    defaults, except ``on_decision``, which then replaces ``config.on_decision``.

    Trees: one :class:`cacheroute.tree.Tree` per (``model_id``, ``"text"`` or
    ``"tokens"``), created on first use, each bounded to ``max_tree_size`` total units on
    every insert. No background thread; :meth:`close` has nothing to stop.

    Workers: a worker is known from the first list it appears in (no registration
    needed). :meth:`on_worker_removed` (alias :meth:`remove_worker`) drops its tenant
    from every tree and records its URL as removed: it is never chosen again, even when
    a caller still passes it in a list, until :meth:`on_worker_added` (alias
    :meth:`add_worker`) or :meth:`sync_workers` lists it again. Health flips need no
    call: unhealthy workers are skipped on each call and used again once healthy.

    Observer, e.g. Prometheus counters in a gateway (no metrics package is needed here)::

        from prometheus_client import Counter, Histogram
        DECISIONS = Counter("router_decisions_total", "decisions", ["reason", "worker"])
        MATCH = Histogram("router_match_rate", "longest match / prompt")

        def observe(d: Decision) -> None:
            DECISIONS.labels(d.reason.value, d.url).inc()
            MATCH.observe(d.match_rate)

        policy = make_policy("cache_aware", on_decision=observe)

    Thread-safe: the trees carry their own locks; the match, the choice and the insert of
    one request happen under the lock of the tree(s) involved. ``select_worker`` costs
    O(n) plain reads of the n workers (health, load) plus one tree walk of the request
    (O(m) C-level compares, m = request units) plus O(t) for the t tenants matching it.
    """

    name = "cache_aware"
    description = (
        "prefix affinity while load is balanced; least load keeping locality when imbalanced"
    )
    needs_request_text = True

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
        config: CacheAwareConfig | None = None,
    ) -> None:
        if config is None:
            config = CacheAwareConfig(
                cache_threshold,
                balance_abs_threshold,
                balance_rel_threshold,
                max_tree_size,
                max_tree_size_per_worker,
                imbalance_mode,
                on_decision,
            )
        else:
            given: dict[str, object] = {
                "cache_threshold": cache_threshold,
                "balance_abs_threshold": balance_abs_threshold,
                "balance_rel_threshold": balance_rel_threshold,
                "max_tree_size": max_tree_size,
                "max_tree_size_per_worker": max_tree_size_per_worker,
                "imbalance_mode": imbalance_mode,
            }
            if not isinstance(config, CacheAwareConfig):
                raise TypeError(f"config must be a CacheAwareConfig or None, got {config!r}")
            clash = sorted(
                k
                for k, v in given.items()
                if not (v is _DEFAULTS[k] or (type(v) is type(_DEFAULTS[k]) and v == _DEFAULTS[k]))
            )
            if clash:
                raise TypeError(
                    f"pass either config= or keyword settings, not both: got config= and "
                    f"{', '.join(f'{k}={given[k]!r}' for k in clash)}"
                )
            if on_decision is not None:
                config = replace(config, on_decision=on_decision)
        self._config = config
        self._threshold = config.cache_threshold
        self._abs = config.balance_abs_threshold
        self._rel = config.balance_rel_threshold
        self._locality = config.imbalance_mode == "locality"
        self._observer = config.on_decision
        self._trees: dict[tuple[str, str], Tree] = {}
        self._lock = threading.Lock()  # guards tree creation and the removed set
        self._removed: frozenset[str] = frozenset()
        self._statics: list[_Static] = []

    # ------------------------------------------------------------------ public state

    @property
    def config(self) -> CacheAwareConfig:
        """The validated settings. O(1)."""
        return self._config

    def tree(
        self, model_id: str, kind: Literal["text", "tokens"] = "text", *, create: bool = False
    ) -> Tree | None:
        """The tree of ``model_id`` for text or token-id requests.

        ``None`` if no request has used it yet, unless ``create`` (then an empty, bounded
        tree is made, e.g. to warm it from a known state). O(1).
        """
        if kind not in ("text", "tokens"):
            raise ValueError(f"kind must be 'text' or 'tokens', got {kind!r}")
        if create:
            return self._get_tree(model_id, kind)
        return self._trees.get((model_id, kind))

    def tree_sizes(self) -> dict[tuple[str, str], int]:
        """``{(model_id, kind): total units}`` of every tree. O(trees)."""
        return {k: t.total_size() for k, t in list(self._trees.items())}

    def removed_urls(self) -> frozenset[str]:
        """URLs that are never chosen (removed and not added back). O(1)."""
        return self._removed

    # ------------------------------------------------------------------ hot path

    def _static_for(self, key: tuple[Worker, ...]) -> _Static:
        """The derived data of this worker list: a hit costs one C-level tuple compare.

        The few most recent lists are kept (a gateway serving several models alternates
        between per-model lists). Copy-on-write: a racing thread builds its own entry.
        """
        removed = self._removed
        statics = self._statics
        for st in statics:
            if st.key == key and st.removed is removed:
                return st
        st = _Static(key, removed)
        self._statics = [st, *statics[: _STATIC_CACHE - 1]]
        return st

    def _get_tree(self, model_id: str, kind: str) -> Tree:
        key = (model_id, kind)
        t = self._trees.get(key)
        if t is None:
            with self._lock:
                t = self._trees.get(key)
                if t is None:
                    t = Tree(
                        max_size=self._config.max_tree_size,
                        max_size_per_tenant=self._config.max_tree_size_per_worker,
                    )
                    self._trees[key] = t
        return t

    def _prepare(self, workers: Sequence[Worker]) -> _Request | None:
        """Read health and load once; ``None`` when no worker is eligible. O(n)."""
        key = workers if type(workers) is tuple else tuple(workers)
        st = self._static_for(key)
        # One pass: the load of each healthy worker, -1 for an unhealthy one (loads are
        # never negative: Worker.decrement_load refuses to go below 0).
        if st.basic:
            # Exact BasicWorker instances (checked when the list was first seen): read the
            # slots behind is_healthy()/load() directly, 3x cheaper than the method calls.
            bkey = cast("tuple[BasicWorker, ...]", key)
            loads = [w._load if w._healthy else -1 for w in bkey]
        else:
            loads = [w.load() if w.is_healthy() else -1 for w in key]
        if not loads:
            return None
        srt = sorted(loads)  # C-level, type-specialised compares: cheaper than min() + max()
        if srt[0] >= 0 and st.mask is None:  # all eligible: the common case
            return _Request(key, st, None, st.all_idx, loads, srt[0], srt[-1])
        ok = [x >= 0 for x in loads]
        if st.mask is not None:
            ok = list(map(and_, ok, st.mask))
        return self._subset(key, st, ok, loads)

    @staticmethod
    def _subset(
        key: tuple[Worker, ...], st: _Static, ok: list[bool], loads: list[int]
    ) -> _Request | None:
        elig = list(compress(st.rng, ok))
        if not elig:
            return None
        srt = sorted(map(loads.__getitem__, elig))
        return _Request(key, st, ok, elig, loads, srt[0], srt[-1])

    def _recheck_removed(self, rq: _Request) -> _Request | None:
        """Inside the tree lock: drop workers removed since :meth:`_prepare` (rare race)."""
        removed = self._removed
        if removed is rq.st.removed:
            return rq
        st = _Static(rq.st.key, removed)
        ok = [x >= 0 for x in rq.loads]
        if st.mask is not None:
            ok = list(map(and_, ok, st.mask))
        cur = self._subset(rq.workers, st, ok, rq.loads)
        if cur is not None:
            cur.n = rq.n
        return cur

    def _tie(self, rq: _Request, cands: list[int]) -> int:
        """Among ``cands`` (equal so far): least load, then fewest processed, then index."""
        if len(cands) == 1:
            return cands[0]
        loads = rq.loads
        low = min(map(loads.__getitem__, cands))
        cands = [i for i in cands if loads[i] == low]
        if len(cands) == 1:
            return cands[0]
        ws = rq.workers
        return min(cands, key=lambda i: (ws[i].processed(), i))

    def _least_loaded(self, rq: _Request, trees: dict[str, Tree] | None) -> int:
        """Least load; ties by smallest tree (when ``trees``), fewest processed, index."""
        elig, low = rq.elig, rq.min_load
        el = rq.loads if rq.ok is None else list(map(rq.loads.__getitem__, elig))
        if el.count(low) == 1:
            return elig[el.index(low)]
        ties = list(compress(elig, [x == low for x in el]))
        ws, st = rq.workers, rq.st
        if trees is None:
            return min(ties, key=lambda i: (ws[i].processed(), i))
        models, urls = st.models, st.urls
        if len(ties) <= 4:
            return min(ties, key=lambda i: (trees[models[i]].size(urls[i]), ws[i].processed(), i))
        # Many ties (e.g. an idle cluster): one O(T) snapshot per tree beats a locked call each.
        sizes = {m: trees[m].used_size_per_tenant() for m in {models[i] for i in ties}}
        return min(ties, key=lambda i: (sizes[models[i]].get(urls[i], 0), ws[i].processed(), i))

    def _best_match(
        self, rq: _Request, lengths: dict[str, dict[str, int]], limit: int | None
    ) -> tuple[int, list[int]]:
        """Longest match among eligible workers (with load <= ``limit`` if given).

        O(tenants matching), not O(workers). Returns ``(matched units, holders)``.
        """
        best = 0
        cands: list[int] = []
        ok, loads, url_idx = rq.ok, rq.loads, rq.st.url_idx
        for model, per in lengths.items():
            idx_of = url_idx[model]
            for url, m in per.items():
                if m < best:
                    continue
                idxs = idx_of.get(url)
                if idxs is None:
                    continue
                for i in idxs:
                    if (ok is None or ok[i]) and (limit is None or loads[i] <= limit):
                        if m > best:
                            best = m
                            cands = [i]
                        else:
                            cands.append(i)
        return best, cands

    def _decide(
        self,
        rq: _Request,
        lengths: dict[str, dict[str, int]],
        trees: dict[str, Tree] | None,
    ) -> tuple[int, DecisionReason, int]:
        """The decision proper: ``(index, reason, longest match considered)``."""
        n = rq.n
        lo, hi = rq.min_load, rq.max_load
        if hi - lo > self._abs and hi > self._rel * lo:
            if self._locality:
                best, cands = self._best_match(rq, lengths, lo + self._abs)
                if n and best / n > self._threshold:
                    return self._tie(rq, cands), DecisionReason.IMBALANCED, best
                return self._least_loaded(rq, None), DecisionReason.IMBALANCED, best
            best = self._best_match(rq, lengths, None)[0] if lengths else 0
            return self._least_loaded(rq, None), DecisionReason.IMBALANCED, best
        best, cands = self._best_match(rq, lengths, None)
        if n and best / n > self._threshold:
            return self._tie(rq, cands), DecisionReason.CACHE_HIT, best
        return self._least_loaded(rq, trees), DecisionReason.CACHE_MISS, best

    def select_worker(
        self, workers: Sequence[Worker], request_text: RequestText = None
    ) -> int | None:
        """Choose a worker; insert the request for it; count it as processed.

        Args:
            workers: the candidates (normally one model's workers; several models work).
            request_text: ``str`` (a unit is a code point), token ids (``list``,
                ``tuple``, ``array.array`` or another sequence of non-negative ints), or
                ``None``. ``None`` or empty: least load, nothing inserted.

        Returns:
            The index of an eligible (healthy, not removed) worker, or ``None`` when
            there is none (nothing is inserted or counted then).

        Raises:
            TypeError: ``request_text`` of a wrong type, or a token that is not an int.
            ValueError: a negative (or >= 2**64) token id.
            Nothing is inserted and nothing counted when it raises.

        Complexity: O(n) worker reads + one fused tree walk, O(m) C-level compares for a
        request of m units, + O(t) for the t tenants matching it.
        """
        if type(request_text) is not str:  # a str needs no check: skip the call
            check_request_text(request_text)
        rq = self._prepare(workers)
        if rq is None:
            return None
        if request_text is None or len(request_text) == 0:
            return self._finish(rq, *self._decide(rq, {}, None), 0)
        kind = "text" if isinstance(request_text, str) else "tokens"
        units: Any = request_text
        rq.n = len(units)
        st = rq.st
        model = st.single_model
        if model is None:
            models = {st.models[i] for i in rq.elig}
            if len(models) > 1:
                return self._select_multi(rq, units, kind, sorted(models))
            model = models.pop()
        if model is st.single_model:
            tree = st.trees.get(kind)  # trees are never dropped: safe to cache per list
            if tree is None:
                tree = st.trees[kind] = self._get_tree(model, kind)
        else:
            tree = self._get_tree(model, kind)
        result: list[Any] = []

        def choose(lengths: dict[str, int]) -> str | None:
            cur = rq if self._removed is rq.st.removed else self._recheck_removed(rq)
            if cur is None:
                return None
            result.append(cur)
            result.extend(self._decide(cur, {model: lengths}, {model: tree}))
            url: str = cur.st.urls[result[1]]
            return url

        _, matched = tree.match_and_insert(units, choose)
        if not result:
            return None
        return self._finish(result[0], result[1], result[2], result[3], matched)

    def _select_multi(self, rq: _Request, units: Any, kind: str, models: list[str]) -> int | None:
        """Several models among the eligible workers: nested fused walks, one per model
        tree, entered in sorted order (so concurrent calls cannot deadlock); the decision
        is made with every tree's lengths in hand and only the chosen tree inserts."""
        trees = {m: self._get_tree(m, kind) for m in models}
        lengths: dict[str, dict[str, int]] = {}
        result: list[Any] = []

        def enter(level: int) -> None:
            model = models[level]

            def choose(per: dict[str, int]) -> str | None:
                lengths[model] = per
                if level + 1 < len(models):
                    enter(level + 1)
                else:
                    cur = self._recheck_removed(rq)
                    if cur is None:
                        return None
                    result.append(cur)
                    result.extend(self._decide(cur, lengths, trees))
                if not result:
                    return None
                cur_rq: _Request = result[0]
                i: int = result[1]
                return cur_rq.st.urls[i] if cur_rq.st.models[i] == model else None

            out = trees[model].match_and_insert(units, choose)
            if out[0] is not None:
                result.append(out[1])

        enter(0)
        if not result:
            return None
        return self._finish(result[0], result[1], result[2], result[3], result[4])

    def _finish(self, rq: _Request, i: int, reason: DecisionReason, best: int, matched: int) -> int:
        worker = rq.workers[i]
        worker.increment_processed()
        observer = self._observer
        if observer is not None:
            n = rq.n
            decision = Decision(
                i,
                rq.st.urls[i],
                rq.st.models[i],
                reason,
                best / n if n else 0.0,
                matched,
                n,
                rq.min_load,
                rq.max_load,
            )
            try:
                observer(decision)
            except Exception:
                _log.exception("cache_aware on_decision observer raised; decision kept")
        return i

    # ------------------------------------------------------------------ pairs

    def select_worker_pair(
        self,
        prefill_workers: Sequence[Worker],
        decode_workers: Sequence[Worker],
        request_text: RequestText = None,
    ) -> tuple[int, int] | None:
        """Prefill cache-aware (:meth:`select_worker`), decode by least load.

        Decode: least load over eligible (healthy, not removed) decode workers, ties by
        fewest processed, then index. The decode leg is chosen first: when none is
        eligible, ``None`` is returned and no tree is touched. O(n_prefill + n_decode)
        plus the prefill tree walk.
        """
        check_request_text(request_text)
        rq = self._prepare(decode_workers)
        if rq is None:
            return None
        decode = self._least_loaded(rq, None)
        prefill = self.select_worker(prefill_workers, request_text)
        if prefill is None:
            return None
        decode_workers[decode].increment_processed()
        return prefill, decode

    # ------------------------------------------------------------------ membership

    def on_worker_added(self, worker: Worker) -> None:
        """A worker joined (or came back): it may be chosen again. O(removed urls)."""
        url = worker.url
        with self._lock:
            if url in self._removed:
                self._removed = self._removed - {url}

    def on_worker_removed(self, worker: Worker) -> None:
        """A worker left for good: drop its tenant from every tree; never choose it again.

        Its URL is recorded as removed first, so a concurrent ``select_worker`` either
        inserted before the tenant is dropped or sees the URL removed. O(units it held).
        """
        url = worker.url
        with self._lock:
            self._removed = self._removed | {url}
            trees = list(self._trees.values())
        for t in trees:
            t.remove_tenant(url)

    def add_worker(self, worker: Worker) -> None:
        """Alias of :meth:`on_worker_added`. O(removed urls)."""
        self.on_worker_added(worker)

    def remove_worker(self, worker: Worker) -> None:
        """Alias of :meth:`on_worker_removed`. O(units the worker held)."""
        self.on_worker_removed(worker)

    def sync_workers(self, workers: Sequence[Worker]) -> None:
        """Make the pool exactly ``workers``.

        Every tenant held in any tree whose URL is not listed is removed (as by
        :meth:`on_worker_removed`); every listed URL may be chosen again. Workers first
        seen later in a ``select_worker`` list are accepted as new. O(tenants + units
        dropped).
        """
        urls = {w.url for w in workers}
        with self._lock:
            trees = list(self._trees.values())
            stale = {t for tree in trees for t in tree.tenants() if t not in urls}
            self._removed = frozenset((self._removed | stale) - urls)
        for tree in trees:
            for t in stale:
                tree.remove_tenant(t)

    def __repr__(self) -> str:
        c = self._config
        return (
            f"CacheAwarePolicy(cache_threshold={c.cache_threshold}, "
            f"balance_abs_threshold={c.balance_abs_threshold}, "
            f"balance_rel_threshold={c.balance_rel_threshold}, max_tree_size={c.max_tree_size}, "
            f"imbalance_mode={c.imbalance_mode!r}, trees={len(self._trees)})"
        )
