"""Summary metrics of a simulation run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cacheroute._validation import check_int, check_real, fail
from cacheroute.sim.request import ideal_hit_tokens
from cacheroute.sim.simulator import RunResult

__all__ = ["Summary", "percentile", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly; NaN if empty.

    ``values`` must be sorted ascending.

    Raises:
        TypeError: ``q`` is not a real number.
        ValueError: ``q`` is outside [0, 100] (or NaN).
    """
    check_real("q", q, minimum=0.0, maximum=100.0)
    n = len(values)
    if n == 0:
        return math.nan
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


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
        e2e_p50, e2e_p99: arrival to last token.
        makespan_s: first arrival to last completion.
        output_throughput: generated tokens per second of makespan.
        total_throughput: prompt plus generated tokens per second of makespan.
        requests_per_worker: requests routed to each worker.
        share_max_over_mean: busiest worker's request count over the mean (1.0 = even).
        lb_fraction: decisions the policy took in its load-balancing (imbalanced) branch,
            as a fraction; ``None`` when the policy reports no decisions.
        oversized: requests larger than an engine's free cache (run alone).
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
    e2e_p50: float
    e2e_p99: float
    makespan_s: float
    output_throughput: float
    total_throughput: float
    requests_per_worker: list[int]
    share_max_over_mean: float
    lb_fraction: float | None
    oversized: int
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def summarize(result: RunResult, ideal_hits: int | None = None) -> Summary:
    """The :class:`Summary` of ``result``.

    ``ideal_hits`` (from :func:`cacheroute.sim.request.ideal_hit_tokens`) may be passed
    to avoid recomputing it for every policy of one workload.

    Raises:
        TypeError: ``result`` is not a :class:`RunResult`, ``ideal_hits`` not an int (or
            ``None``).
        ValueError: ``ideal_hits`` is negative.
    """
    if not isinstance(result, RunResult):
        raise fail("result", "a RunResult", result, TypeError)
    check_int("ideal_hits", ideal_hits, minimum=0, none_ok=True)
    reqs = result.workload.requests
    n = len(reqs)
    if ideal_hits is None:
        ideal_hits = ideal_hit_tokens(reqs)
    input_tokens = sum(r.input_tokens for r in reqs)
    output_tokens = sum(r.output_tokens for r in reqs)
    hits = sum(result.hit)
    ttft = sorted(f - r.arrival for f, r in zip(result.first_token, reqs, strict=True))
    e2e = sorted(d - r.arrival for d, r in zip(result.done, reqs, strict=True))
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
        e2e_p50=percentile(e2e, 50),
        e2e_p99=percentile(e2e, 99),
        makespan_s=makespan,
        output_throughput=output_tokens / makespan if makespan > 0 else 0.0,
        total_throughput=(input_tokens + output_tokens) / makespan if makespan > 0 else 0.0,
        requests_per_worker=per_worker,
        share_max_over_mean=max(per_worker) / mean if n else 0.0,
        lb_fraction=result.imbalanced / result.decisions if result.decisions else None,
        oversized=result.oversized,
        wall_s=result.wall_s,
    )
