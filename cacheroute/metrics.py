"""Prometheus metrics for a cacheroute router (the ``metrics`` extra: ``prometheus_client``).

One :class:`RouterMetrics` per process exports what the router decided and what it holds::

    from prometheus_client import start_http_server
    from cacheroute import BasicWorker, make_policy
    from cacheroute.metrics import RouterMetrics

    metrics = RouterMetrics(policy="cache_aware")          # registry=None: the default REGISTRY
    policy = make_policy("cache_aware", on_decision=metrics.observe)
    workers = [BasicWorker("http://10.0.0.1:8000"), BasicWorker("http://10.0.0.2:8000")]
    metrics.track_workers(workers)                         # gauges read at scrape time
    metrics.track_policy(policy)                           # tree sizes, read at scrape time
    start_http_server(9000)                                # or generate_latest(metrics.registry)

**Per decision** (:meth:`RouterMetrics.observe`, the policy's ``on_decision`` observer): the
decision counter by policy, reason and worker; the match-ratio histogram; the prompt tokens
and the *predicted* cached tokens of the chosen worker. Rows are cached per label tuple and
counted in plain integers under one lock: an observation is two dict lookups and a few
additions (no label formatting, no prometheus_client call); the families are built at
scrape time.

**At scrape time** (a custom collector, nothing per request): every tracked worker's in-flight
load, pending prefill tokens, decode tokens, health and processed count; every tracked
policy's tree sizes per (model, kind) and per worker; and the counters of any tracked index
(an object with ``stats() -> dict``: the KV-event index's ``{url: WorkerStats}`` becomes one
metric per counter with a ``worker`` label).

**Predicted versus actual.** :meth:`RouterMetrics.record_engine_usage` counts the cached
tokens an engine reports for a request (``usage.prompt_tokens_details.cached_tokens``), next
to the prediction, per worker. The names, and what they correspond to in sgl-model-gateway,
llm-d's endpoint picker and Dynamo's router, are listed in ``docs/metrics.md``.

A source that raises while being read (a worker, a policy, an index) is skipped for that
scrape and logged (logger ``cacheroute.metrics``); the scrape itself never fails.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

from cacheroute._validation import check_int, check_sequence, check_str, fail
from cacheroute.policies.base import Decision, LoadBalancingPolicy
from cacheroute.worker import Worker

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cacheroute.metrics needs prometheus_client (the 'metrics' extra): "
        "pip install prometheus_client"
    ) from exc

__all__ = [
    "INDEX_ROW_GAUGES",
    "MATCH_RATIO_BUCKETS",
    "RouterMetrics",
    "StatsSource",
    "WorkerSource",
]

_log = logging.getLogger("cacheroute.metrics")

MATCH_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Buckets of the match-ratio histogram (llm-d's ``prefix_indexer_hit_ratio`` uses the same)."""

WorkerSource = Sequence[Worker] | Callable[[], Iterable[Worker]]
"""What :meth:`RouterMetrics.track_workers` reads at scrape time: a list (read as it is at
that moment) or a callable returning the current workers."""

StatsSource = Any
"""Any object with a ``stats() -> Mapping`` method (see :meth:`RouterMetrics.track_index`)."""

INDEX_ROW_GAUGES = frozenset({"blocks", "last_seq", "stale", "connected", "seconds_since_heard"})
"""Fields of a per-worker stats row that hold state, exported as gauges; every other numeric
field of a row is a counter. These are the state fields of the KV-event index's
:class:`~cacheroute.events.WorkerStats`; the rest of its fields count events."""

_Family: TypeAlias = "GaugeMetricFamily | CounterMetricFamily"

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _label(reason: object) -> str:
    """A reason's label value: the enum's value for :class:`DecisionReason`, else ``str``."""
    value = getattr(reason, "value", reason)
    return value if isinstance(value, str) else str(value)


def _bound(bound: float) -> str:
    return repr(float(bound))  # the exposition's le="0.1" form


def _metric_name(key: str) -> str:
    name = _NAME_BAD.sub("_", key).strip("_") or "value"
    return name if not name[0].isdigit() else f"_{name}"


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


class _Observer:
    """The decision observer of one policy label (what :meth:`RouterMetrics.observer` returns).

    Counts in plain integers under one lock (about 10x cheaper than three prometheus_client
    children and a histogram, each with its own lock); the collector turns them into
    families at scrape time.
    """

    __slots__ = ("_buckets", "_count", "_lock", "_policy", "_rows", "_sum")

    def __init__(self, policy: str) -> None:
        self._policy = policy
        self._lock = threading.Lock()
        # reason -> url -> [decisions, prompt tokens, predicted cached tokens]
        self._rows: dict[object, dict[str, list[int]]] = {}
        self._buckets = [0] * (len(MATCH_RATIO_BUCKETS) + 1)  # last: above 1.0 (never)
        self._sum = 0.0
        self._count = 0

    def __call__(self, decision: Decision) -> None:
        if type(decision) is not Decision and not isinstance(decision, Decision):
            raise fail("decision", "a Decision", decision, TypeError)
        units, matched = decision.request_units, decision.matched_units
        prompt, cached = decision.prompt_tokens, decision.cached_tokens
        # Checked before anything is counted: a counter must never go down, nor a decision
        # be counted without its tokens.
        if not (
            type(units) is int
            and type(matched) is int
            and type(prompt) is int
            and type(cached) is int
            and units >= 0
            and matched >= 0
            and prompt >= 0
            and cached >= 0
        ):
            for field in ("request_units", "matched_units", "prompt_tokens", "cached_tokens"):
                check_int(f"decision.{field}", getattr(decision, field), minimum=0)
        with self._lock:
            by_url = self._rows.get(decision.reason)
            if by_url is None:
                by_url = self._rows[decision.reason] = {}
            row = by_url.get(decision.url)
            if row is None:
                row = by_url[decision.url] = [0, 0, 0]
            row[0] += 1
            row[1] += prompt
            row[2] += cached
            if units > 0:
                ratio = matched / units
                self._buckets[bisect_left(MATCH_RATIO_BUCKETS, ratio)] += 1
                self._sum += ratio
                self._count += 1

    def _snapshot(self) -> tuple[list[tuple[str, str, list[int]]], list[int], float, int]:
        with self._lock:
            rows = [
                (_label(reason), url, list(row))
                for reason, by_url in self._rows.items()
                for url, row in by_url.items()
            ]
            return rows, list(self._buckets), self._sum, self._count

    def _forget(self, url: str) -> None:
        with self._lock:
            for by_url in self._rows.values():
                by_url.pop(url, None)

    def __repr__(self) -> str:
        return f"<cacheroute.metrics observer policy={self._policy!r}>"


class RouterMetrics:
    """The Prometheus metrics of one router process.

    Args:
        registry: the ``prometheus_client`` registry to register with; ``None`` (default)
            for the process-wide ``prometheus_client.REGISTRY`` (what ``start_http_server``
            and ``generate_latest()`` serve by default). One ``RouterMetrics`` per registry:
            a second one on the same registry raises ``ValueError`` (duplicated timeseries).
        namespace: prefix of every metric name (``cacheroute_decisions_total``, ...).
        policy: the ``policy`` label of :meth:`observe`; use :meth:`observer` for a process
            that runs several policies.

    Thread-safe: observers, ``track_*`` and scrapes may run on any threads.

    Raises:
        TypeError: ``namespace`` or ``policy`` is not a ``str``, or ``registry`` not a
            ``CollectorRegistry`` or ``None``; ValueError: ``namespace`` is not a metric-name
            prefix (``[a-zA-Z_:][a-zA-Z0-9_:]*``) or ``policy`` is empty.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "cacheroute",
        *,
        policy: str = "default",
    ) -> None:
        check_str("namespace", namespace)
        if not _NAMESPACE.fullmatch(namespace):
            raise fail("namespace", "a metric-name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*)", namespace)
        check_str("policy", policy)
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise fail(
                "registry", "a prometheus_client CollectorRegistry or None", registry, TypeError
            )
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        """The registry the metrics are registered with (pass it to ``generate_latest``)."""
        self.namespace = namespace
        """The metric-name prefix."""
        self._lock = threading.Lock()
        self._observers: dict[str, _Observer] = {}
        self._engine: dict[str, list[int]] = {}  # url -> [prompt tokens, cached tokens]
        self._state = _Collector(self)
        self.registry.register(self._state)
        self._default = self.observer(policy)

    # ------------------------------------------------------------------ per decision

    def observer(self, policy: str) -> Callable[[Decision], None]:
        """The decision observer labelling its decisions ``policy=<policy>``.

        Pass it as a policy's ``on_decision``. The same object is returned for the same
        label. O(1).
        """
        check_str("policy", policy)
        with self._lock:
            obs = self._observers.get(policy)
            if obs is None:
                obs = self._observers[policy] = _Observer(policy)
            return obs

    def observe(self, decision: Decision) -> None:
        """Record one decision under the constructor's ``policy`` label (an ``on_decision``
        observer). O(1): two dict lookups and a few integer additions under one lock.

        Raises:
            TypeError, ValueError: ``decision`` is not a Decision, or one of its unit and
                token counts is not a non-negative ``int`` (nothing is counted).
        """
        self._default(decision)

    def record_engine_usage(self, worker_url: str, prompt_tokens: int, cached_tokens: int) -> None:
        """Count the prompt and cached tokens an engine reported for one request.

        Compare ``engine_cached_tokens_total / engine_prompt_tokens_total`` (what the engine
        served from cache) with ``predicted_cached_tokens_total / prompt_tokens_total`` (what
        the router predicted) per worker. O(1).

        Raises:
            TypeError: ``worker_url`` is not a ``str`` or a token count not an ``int``;
                ValueError: ``worker_url`` is empty or a token count negative.
        """
        check_str("worker_url", worker_url)
        check_int("prompt_tokens", prompt_tokens, minimum=0)
        check_int("cached_tokens", cached_tokens, minimum=0)
        with self._lock:
            row = self._engine.get(worker_url)
            if row is None:
                row = self._engine[worker_url] = [0, 0]
            row[0] += prompt_tokens
            row[1] += cached_tokens

    def forget_worker(self, worker_url: str) -> None:
        """Drop the per-decision series of a worker that left for good (bounds the label
        cardinality when workers churn, e.g. Ray Serve replicas). O(policies x reasons)."""
        check_str("worker_url", worker_url)
        with self._lock:
            observers = list(self._observers.values())
            self._engine.pop(worker_url, None)
        for obs in observers:
            obs._forget(worker_url)

    # ------------------------------------------------------------------ scrape time

    def track_workers(self, workers: WorkerSource) -> None:
        """Export these workers' gauges at every scrape: in-flight load, pending prefill and
        decode tokens (workers without :class:`~cacheroute.worker.WorkAccounting` read 0),
        health, and the processed counter.

        ``workers`` is a list (read as it is at scrape time) or a callable returning the
        current workers. Call it once per source; a URL seen in several sources is exported
        once (the first). Costs nothing per request; O(workers) per scrape.

        Raises:
            TypeError: ``workers`` is neither a callable nor a list or tuple of workers
                (a ``str``, a generator, a dict, an element that is not a Worker).
        """
        if not callable(workers):
            try:
                check_sequence("workers", workers)
            except TypeError:
                raise fail(
                    "workers", "a list of workers or a callable", workers, TypeError
                ) from None
            for i, w in enumerate(workers):
                if not isinstance(w, Worker):
                    raise fail(f"workers[{i}]", "a Worker", w, TypeError)
        self._state.add_workers(workers)

    def track_policy(self, policy: LoadBalancingPolicy, name: str | None = None) -> str:
        """Export this policy's tree sizes at every scrape: total units per (model, kind)
        and units per worker. Policies without trees (``tree_sizes``) export nothing.

        Args:
            policy: the policy.
            name: its ``policy`` label; default ``policy.name``.

        Returns:
            The label used.

        Raises:
            ValueError: another tracked policy already has this label.
        """
        if not isinstance(policy, LoadBalancingPolicy):
            raise TypeError(f"policy must be a LoadBalancingPolicy, got {type(policy).__name__}")
        label = policy.name if name is None else check_str("name", name)
        self._state.add_policy(label, policy)
        return label

    def tracked_policy_labels(self) -> list[str]:
        """The labels of the tracked policies, in tracking order."""
        return self._state.policy_labels()

    def track_index(
        self,
        index: StatsSource,
        name: str = "kv_events",
        *,
        row_gauges: Collection[str] = INDEX_ROW_GAUGES,
    ) -> None:
        """Export the counters of ``index.stats()`` at every scrape, labelled ``index=<name>``.

        ``stats()`` returns a mapping; each item is one of

        * ``key: number``: one sample of ``<namespace>_index_<key>``;
        * ``key: {label: number}``: one sample per entry, with a ``worker=<label>`` label;
        * ``worker: row``, where ``row`` is a dataclass instance of counters (what
          :meth:`cacheroute.events.index.KVEventIndex.stats` returns, ``{url: WorkerStats}``):
          transposed, one metric per numeric field, one sample per worker, labelled
          ``worker=<worker>``. Fields in ``row_gauges`` (and ``bool`` fields) are gauges,
          the others counters (``<namespace>_index_<field>_total``); ``None`` fields are
          left out for that worker.

        For the first two shapes, keys ending in ``_total`` are exported as counters,
        others as gauges. ``bool`` values export as 0/1; anything else is skipped. The
        KV-event index exports, per worker, ``batches_total``, ``events_total``,
        ``gaps_total``, ``replays_total``, ``lost_batches_total``, ``resets_total``, ... and
        the gauges ``blocks``, ``last_seq``, ``stale``, ``connected``,
        ``seconds_since_heard``. Any object with such a ``stats()`` works::

            {"events_applied_total": 120, "gaps_total": 1,
             "lag_seconds": {"http://w1:8000": 0.02, "http://w2:8000": 0.4}}

        Raises:
            TypeError: ``index`` has no callable ``stats``, or ``row_gauges`` is not a set,
                list or tuple of ``str``.
            ValueError: another tracked index already has this name.
        """
        if not callable(getattr(index, "stats", None)):
            raise TypeError(f"index must have a stats() method, got {type(index).__name__}")
        if not isinstance(row_gauges, (set, frozenset, list, tuple)) or not all(
            isinstance(g, str) for g in row_gauges
        ):
            raise fail("row_gauges", "a set, list or tuple of field names", row_gauges, TypeError)
        self._state.add_index(check_str("name", name), index, frozenset(row_gauges))

    def __repr__(self) -> str:
        return f"RouterMetrics(namespace={self.namespace!r}, {self._state!r})"


class _Collector(Collector):
    """Exports the decision counts and reads the tracked sources, at scrape time."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self._ns = metrics.namespace
        self._lock = threading.Lock()
        self._workers: list[WorkerSource] = []
        self._policies: list[tuple[str, LoadBalancingPolicy]] = []
        self._indexes: list[tuple[str, StatsSource, frozenset[str]]] = []

    def add_workers(self, source: WorkerSource) -> None:
        with self._lock:
            self._workers = [*self._workers, source]

    def add_policy(self, label: str, policy: LoadBalancingPolicy) -> None:
        with self._lock:
            if any(label == known for known, _ in self._policies):
                raise ValueError(f"a policy labelled {label!r} is already tracked")
            self._policies = [*self._policies, (label, policy)]

    def remove_policy(self, policy: LoadBalancingPolicy) -> None:
        with self._lock:
            self._policies = [(k, p) for k, p in self._policies if p is not policy]

    def policy_labels(self) -> list[str]:
        return [label for label, _ in self._policies]

    def add_index(self, name: str, index: StatsSource, row_gauges: frozenset[str]) -> None:
        with self._lock:
            if any(name == known for known, _, _ in self._indexes):
                raise ValueError(f"an index named {name!r} is already tracked")
            self._indexes = [*self._indexes, (name, index, row_gauges)]

    def describe(self) -> list[Metric]:
        # The fixed families (empty), so that a second RouterMetrics on the same registry
        # is refused as a duplicate; the index families are named by their stats() keys.
        return [*self._collect_decisions(empty=True), *self._collect_workers(empty=True)]

    def collect(self) -> Iterator[Metric]:
        yield from self._collect_decisions()
        yield from self._collect_workers()
        yield from self._collect_trees()
        yield from self._collect_indexes()

    def _collect_decisions(self, empty: bool = False) -> Iterator[Metric]:
        ns, m = self._ns, self._metrics
        decisions = CounterMetricFamily(
            f"{ns}_decisions",
            "Routing decisions, by policy, the rule that decided (reason) and chosen worker.",
            labels=["policy", "reason", "worker"],
        )
        ratio = HistogramMetricFamily(
            f"{ns}_match_ratio",
            "Matched units / request units of each decision with a prompt: the chosen "
            "worker's prefix match as the policy predicts it.",
            labels=["policy"],
        )
        prompt = CounterMetricFamily(
            f"{ns}_prompt_tokens",
            "Prompt tokens routed to each worker (the policy's estimate for text prompts).",
            labels=["policy", "worker"],
        )
        cached = CounterMetricFamily(
            f"{ns}_predicted_cached_tokens",
            "Prompt tokens the policy predicted cached on the chosen worker.",
            labels=["policy", "worker"],
        )
        engine_prompt = CounterMetricFamily(
            f"{ns}_engine_prompt_tokens",
            "Prompt tokens of requests as the engine reported them (record_engine_usage).",
            labels=["worker"],
        )
        engine_cached = CounterMetricFamily(
            f"{ns}_engine_cached_tokens",
            "Prompt tokens the engine reported served from its prefix cache.",
            labels=["worker"],
        )
        if not empty:
            with m._lock:
                observers = list(m._observers.values())
                engine = [(url, list(row)) for url, row in m._engine.items()]
            for obs in observers:
                rows, buckets, total, count = obs._snapshot()
                tokens: dict[str, list[int]] = {}
                for reason, url, (n, p, c) in rows:
                    decisions.add_metric([obs._policy, reason, url], n)
                    acc = tokens.setdefault(url, [0, 0])
                    acc[0] += p
                    acc[1] += c
                for url, (p, c) in tokens.items():
                    prompt.add_metric([obs._policy, url], p)
                    cached.add_metric([obs._policy, url], c)
                cumulative, running = [], 0
                for bound, n in zip(MATCH_RATIO_BUCKETS, buckets, strict=False):
                    running += n
                    cumulative.append((_bound(bound), running))
                cumulative.append(("+Inf", count))
                ratio.add_metric([obs._policy], cumulative, total)
            for url, (p, c) in engine:
                engine_prompt.add_metric([url], p)
                engine_cached.add_metric([url], c)
        yield from (decisions, ratio, prompt, cached, engine_prompt, engine_cached)

    def _collect_workers(self, empty: bool = False) -> Iterator[Metric]:
        ns, labels = self._ns, ["worker", "model"]
        load = GaugeMetricFamily(
            f"{ns}_worker_load", "Requests in flight (leases held).", labels=labels
        )
        prefill = GaugeMetricFamily(
            f"{ns}_worker_pending_prefill_tokens",
            "Uncached prompt tokens leased whose first token is not out yet.",
            labels=labels,
        )
        decode = GaugeMetricFamily(
            f"{ns}_worker_decode_tokens",
            "Context tokens of the leased requests past their first token.",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            f"{ns}_worker_healthy", "1 if the worker may be chosen, else 0.", labels=labels
        )
        processed = CounterMetricFamily(
            f"{ns}_worker_processed", "Requests routed to the worker.", labels=labels
        )
        seen: set[str] = set()
        for source in [] if empty else self._workers:
            try:
                rows = []
                for w in source() if callable(source) else list(source):
                    url = w.url
                    if url in seen:
                        continue
                    pending = getattr(w, "pending_prefill_tokens", None)
                    work = (pending(), w.decode_tokens()) if pending is not None else (0, 0)  # type: ignore[attr-defined]
                    rows.append(([url, w.model_id], w.load(), work, w.is_healthy(), w.processed()))
            except Exception:
                _log.exception("reading workers for metrics failed; skipped this scrape")
                continue
            for values, n, (p, d), ok, done in rows:
                seen.add(values[0])
                load.add_metric(values, n)
                prefill.add_metric(values, p)
                decode.add_metric(values, d)
                healthy.add_metric(values, 1.0 if ok else 0.0)
                processed.add_metric(values, done)
        yield from (load, prefill, decode, healthy, processed)

    def _collect_trees(self) -> Iterator[Metric]:
        ns = self._ns
        total = GaugeMetricFamily(
            f"{ns}_tree_size",
            "Units (characters or tokens) held by a policy's prefix tree.",
            labels=["policy", "model", "kind"],
        )
        per_worker = GaugeMetricFamily(
            f"{ns}_tree_worker_size",
            "Units of a policy's prefix tree held for one worker.",
            labels=["policy", "model", "kind", "worker"],
        )
        for label, policy in self._policies:
            sizes = getattr(policy, "tree_sizes", None)
            if sizes is None:
                continue
            try:
                rows = []
                for (model, kind), size in sorted(sizes().items()):
                    tree = policy.tree(model, kind)  # type: ignore[attr-defined]
                    tenants = sorted(tree.used_size_per_tenant().items()) if tree else []
                    rows.append((model, kind, size, tenants))
            except Exception:
                _log.exception("reading the trees of policy %r failed; skipped", label)
                continue
            for model, kind, size, tenants in rows:
                total.add_metric([label, model, kind], size)
                for url, units in tenants:
                    per_worker.add_metric([label, model, kind, url], units)
        yield from (total, per_worker)

    def _collect_indexes(self) -> Iterator[Metric]:
        families: dict[str, _Family] = {}
        for name, index, row_gauges in self._indexes:
            try:
                stats = index.stats()
                if not isinstance(stats, Mapping):
                    raise TypeError(f"stats() returned {type(stats).__name__}, not a mapping")
                items = list(stats.items())
            except Exception:
                _log.exception("reading stats() of index %r failed; skipped", name)
                continue
            for key, value in items:
                if not isinstance(key, str):
                    continue
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    self._index_row(families, name, key, value, row_gauges)
                    continue
                if isinstance(value, Mapping):
                    samples = []
                    for label_value, raw in value.items():
                        number = _number(raw)
                        if number is not None:
                            samples.append(([name, str(label_value)], number))
                    labels = ["index", "worker"]
                else:
                    number = _number(value)
                    if number is None:
                        continue
                    samples, labels = [([name], number)], ["index"]
                family = self._index_family(families, key, labels)
                if family is None:
                    continue
                for values, number in samples:
                    family.add_metric(values, number)
        yield from families.values()

    def _index_row(
        self,
        families: dict[str, _Family],
        name: str,
        worker: str,
        row: Any,
        gauges: frozenset[str],
    ) -> None:
        """One worker's row of counters (a dataclass): one sample per numeric field."""
        labels = ["index", "worker"]
        for f in dataclasses.fields(row):
            raw = getattr(row, f.name)
            number = _number(raw)
            if number is None:
                continue
            counter = f.name not in gauges and not isinstance(raw, bool)
            family = self._index_family(families, f.name, labels, counter)
            if family is not None:
                family.add_metric([name, worker], number)

    def _index_family(
        self,
        families: dict[str, _Family],
        key: str,
        labels: list[str],
        counter: bool | None = None,
    ) -> _Family | None:
        """The family of ``key`` (a counter if ``counter``, or by a ``_total`` suffix when
        ``None``); ``None`` when the name is taken by a family of another shape."""
        base = _metric_name(key)
        if base.endswith("_total"):
            base = base[: -len("_total")]
            counter = True if counter is None else counter
        counter = bool(counter)
        name = f"{self._ns}_index_{base}"
        family = families.get(name)
        if family is not None:
            # The same key with another shape (in another index): keep the first shape.
            same = tuple(getattr(family, "_labelnames", labels)) == tuple(labels)
            kind = isinstance(family, CounterMetricFamily) == counter
            return family if same and kind else None
        doc = f"{key} from a tracked index's stats()."
        new: _Family = (
            CounterMetricFamily(name, doc, labels=labels)
            if counter
            else GaugeMetricFamily(name, doc, labels=labels)
        )
        families[name] = new
        return new

    def __repr__(self) -> str:
        return (
            f"workers={len(self._workers)} sources, policies={self.policy_labels()}, "
            f"indexes={[n for n, _, _ in self._indexes]}"
        )
