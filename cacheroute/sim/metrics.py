"""Summary metrics of a simulation run."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

from cacheroute._validation import check_int, check_real, check_sequence, fail
from cacheroute.sim.request import ideal_hit_tokens
from cacheroute.sim.simulator import RunResult

__all__ = ["DEFAULT_SLO_TTFT_S", "Summary", "percentile", "summarize"]

DEFAULT_SLO_TTFT_S = 2.0
"""The default time-to-first-token objective of :func:`summarize` (seconds).

2 s is about the cold prefill of a 38k-token prompt on the default engine (Llama-3.1-8B
on one H100: 0.005 + 3.25e-5 x 38,000 + 1.06e-9 x 38,000^2 / 2 = 2.0 s). Any chat or
RAG prompt meets it when it does not queue, so missing it means queueing; a 100k-token
agent context meets it only on a cache hit (cold it takes ~8.6 s), so meeting it there
means affinity. A tighter objective would fail long prompts even on an idle cluster, a
looser one would hide the queues that decide the tails.
"""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly; NaN if empty.

    ``values`` must be sorted ascending (checked: O(n), once per call, in C).

    >>> percentile([1.0, 2.0, 4.0], 75)
    3.0

    Raises:
        TypeError: ``q`` is not a real number, ``values`` not a list or tuple (or its
            first or last element not a real number).
        ValueError: ``q`` is outside [0, 100] (or NaN), or ``values`` is not sorted.
    """
    check_real("q", q, minimum=0.0, maximum=100.0)
    check_sequence("values", values)
    n = len(values)
    if n and not all(type(v) in (float, int) for v in (values[0], values[-1])):
        for i, v in enumerate(values):  # O(n) only on the way to the error
            check_real(f"values[{i}]", v, finite=False)
    if n == 0:
        return math.nan
    if any(map(operator.gt, values, islice(values, 1, None))):
        i = next(i for i in range(n - 1) if values[i] > values[i + 1])
        raise ValueError(
            f"values must be sorted ascending, got values[{i}]={values[i]!r} > "
            f"values[{i + 1}]={values[i + 1]!r}"
        )
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    low, high, frac = values[lo], values[hi], pos - lo
    if frac == 0 or low == high:  # on an element: no inf * 0 (or inf - inf) making NaN
        return float(low)
    return low + (high - low) * frac


@dataclass(frozen=True)
class Summary:
    """The headline numbers of one run (times in seconds).

    Attributes:
        policy: the policy spec label.
        requests: requests completed.
        input_tokens: prompt tokens over all requests.
        output_tokens: generated tokens over all requests.
        hit_tokens: prompt tokens served from an engine's prefix cache.
        hit_rate: ``hit_tokens / input_tokens`` (token-weighted).
        ideal_hit_rate: the same with one unbounded cache seeing every request (ceiling).
        ttft_p50, ttft_p90, ttft_p99: time to first token, from arrival.
        queue_p50, queue_p99, queue_mean: queueing delay at dispatch: from arrival to
            admission into a prefill batch on the chosen engine (the part of TTFT that
            routing controls most directly).
        slo_ttft_s: the TTFT objective the next two use.
        slo_met: fraction of requests whose TTFT is at most ``slo_ttft_s``.
        goodput_rps: requests meeting the TTFT objective per second of makespan. When
            the makespan is set by the longest session (a trace replayed below
            saturation), throughput is equal for every policy; goodput still tells
            them apart.
        e2e_p50, e2e_p99: arrival to last token.
        makespan_s: first arrival to last completion.
        output_throughput: generated tokens per second of makespan.
        total_throughput: prompt plus generated tokens per second of makespan.
        requests_per_worker: requests routed to each worker.
        share_max_over_mean: busiest worker's request count over the mean (1.0 = even).
        lb_fraction: decisions the policy took in its load-balancing (imbalanced) branch,
            as a fraction; ``None`` when the policy reports no decisions.
        oversized: requests larger than a whole engine cache (prompt plus output above
            ``cache_tokens``), each run alone on an otherwise empty engine while
            whatever is queued behind it waits: they decide the tails of traces with
            huge contexts.
        kv_events_stored, kv_events_removed: KV events the engines emitted (0 unless
            the run had ``kv_event_delay_s``).
        wall_s: wall-clock seconds of the simulation.
    """

    policy: str
    requests: int
    input_tokens: int
    output_tokens: int
    hit_tokens: int
    hit_rate: float
    ideal_hit_rate: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    queue_p50: float
    queue_p99: float
    queue_mean: float
    slo_ttft_s: float
    slo_met: float
    goodput_rps: float
    e2e_p50: float
    e2e_p99: float
    makespan_s: float
    output_throughput: float
    total_throughput: float
    requests_per_worker: list[int]
    share_max_over_mean: float
    lb_fraction: float | None
    oversized: int
    kv_events_stored: int
    kv_events_removed: int
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def summarize(
    result: RunResult,
    ideal_hits: int | None = None,
    *,
    slo_ttft_s: float = DEFAULT_SLO_TTFT_S,
) -> Summary:
    """The :class:`Summary` of ``result``.

    ``ideal_hits`` (from :func:`cacheroute.sim.request.ideal_hit_tokens`) may be passed
    to avoid recomputing it for every policy of one workload. ``slo_ttft_s`` is the TTFT
    objective of ``slo_met`` and ``goodput_rps`` (default :data:`DEFAULT_SLO_TTFT_S`).

    Raises:
        TypeError: ``result`` is not a :class:`RunResult`, ``ideal_hits`` not an int (or
            ``None``).
        ValueError: ``ideal_hits`` is negative.
    """
    if not isinstance(result, RunResult):
        raise fail("result", "a RunResult", result, TypeError)
    check_int("ideal_hits", ideal_hits, minimum=0, none_ok=True)
    slo = check_real("slo_ttft_s", slo_ttft_s, minimum=0.0, min_open=True)
    reqs = result.workload.requests
    n = len(reqs)
    if ideal_hits is None:
        ideal_hits = ideal_hit_tokens(reqs)
    input_tokens = sum(r.input_tokens for r in reqs)
    output_tokens = sum(r.output_tokens for r in reqs)
    hits = sum(result.hit)
    ttft = sorted(f - r.arrival for f, r in zip(result.first_token, reqs, strict=True))
    e2e = sorted(d - r.arrival for d, r in zip(result.done, reqs, strict=True))
    queue = sorted(a - r.arrival for a, r in zip(result.admitted, reqs, strict=True))
    met = sum(1 for t in ttft if t <= slo)
    start = reqs[0].arrival if reqs else 0.0
    makespan = (max(result.done) - start) if reqs else 0.0
    per_worker = [0] * result.workers
    for w in result.worker:
        per_worker[w] += 1
    mean = n / result.workers
    return Summary(
        policy=result.policy,
        requests=n,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        hit_tokens=hits,
        hit_rate=hits / input_tokens if input_tokens else 0.0,
        ideal_hit_rate=ideal_hits / input_tokens if input_tokens else 0.0,
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        ttft_p99=percentile(ttft, 99),
        queue_p50=percentile(queue, 50),
        queue_p99=percentile(queue, 99),
        queue_mean=sum(queue) / n if n else math.nan,
        slo_ttft_s=slo,
        slo_met=met / n if n else math.nan,
        goodput_rps=met / makespan if makespan > 0 else math.nan,
        e2e_p50=percentile(e2e, 50),
        e2e_p99=percentile(e2e, 99),
        makespan_s=makespan,
        output_throughput=output_tokens / makespan if makespan > 0 else 0.0,
        total_throughput=(input_tokens + output_tokens) / makespan if makespan > 0 else 0.0,
        requests_per_worker=per_worker,
        share_max_over_mean=max(per_worker) / mean if n else 0.0,
        lb_fraction=result.imbalanced / result.decisions if result.decisions else None,
        oversized=result.oversized,
        kv_events_stored=result.kv_events.get("stored", 0),
        kv_events_removed=result.kv_events.get("removed", 0),
        wall_s=result.wall_s,
    )
